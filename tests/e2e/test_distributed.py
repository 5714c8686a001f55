"""Training on two CPU processes, data-parallel (trainer=ddp_cpu) and sharded (trainer=fsdp_cpu,
FSDP2), both on gloo, against one process with the same global batch (SFT, DPO, ORPO, KTO);
rank-zero-only writes; the sharded run's gathered weights evaluated in one process; both inside
a Hydra multirun."""

from __future__ import annotations

import contextlib
import csv
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import micro_llama, run_script
from safetensors.torch import load_file

from clintune.distributed import processes_per_job, shard_bounds
from clintune.methods.losses import completion_token_count
from clintune.methods.sft import SFTModule
from clintune.tokenization import IGNORE_INDEX

SMALL = [
    "model=tiny_llama",
    "task=classification",
    "subsample.train=32",
    "subsample.val=16",
    "eval.limit=10",
    "eval.bootstrap.samples=20",
    "stages.reuse=false",
    "trainer.log_every_n_steps=1",
]


def test_shards_cover_items_in_order_with_sizes_within_one() -> None:
    for count in (0, 1, 7, 10):
        for shards in (1, 2, 3, 4):
            bounds = [shard_bounds(count, shards, i) for i in range(shards)]
            assert [i for start, end in bounds for i in range(start, end)] == list(range(count))
            sizes = [end - start for start, end in bounds]
            assert max(sizes) - min(sizes) <= 1


def test_processes_per_job_only_counts_devices_for_distributed_strategies() -> None:
    from omegaconf import OmegaConf

    assert processes_per_job(OmegaConf.create({"devices": 2, "strategy": "ddp"})) == 2
    assert processes_per_job(OmegaConf.create({"devices": 2, "strategy": "auto"})) == 1
    fsdp = {"_target_": "clintune.sharding.fsdp_strategy", "data_parallel_size": "auto"}
    assert processes_per_job(OmegaConf.create({"devices": 4, "strategy": fsdp})) == 4


class _FakeTrainer:
    """The parts of a Trainer that ``SFTModule.training_step`` reads, for a world of
    ``world_size`` ranks: ``strategy.reduce(..., "sum")`` adds the other ranks' completion
    tokens, which a test knows in advance, as DDP's all-reduce would."""

    global_step = 0

    def __init__(self, world_size: int, other_ranks_tokens: int = 0) -> None:
        self.world_size = world_size
        self.other_ranks_tokens = other_ranks_tokens
        self.strategy = self

    def reduce(self, value: torch.Tensor, reduce_op: str) -> torch.Tensor:
        assert reduce_op == "sum"
        return value + self.other_ranks_tokens


def _tiny_float64_sft_module() -> SFTModule:
    torch.manual_seed(0)
    # float64: the two-rank gradients must agree with one process's to rounding only.
    return SFTModule(micro_llama().double(), learning_rate=1e-3)


def _gradients(
    module: SFTModule, batch: dict[str, torch.Tensor], trainer: _FakeTrainer
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    module.trainer = trainer  # type: ignore[assignment]
    module.zero_grad()
    loss = module.training_step(batch, 0)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in module.parameters() if p.requires_grad]


def test_sft_training_step_on_two_ranks_takes_the_same_step_as_one_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SFTModule's own training_step under a faked two-rank world: each rank's loss is divided
    by the completion tokens of the global batch times the world size, so DDP's mean of the
    ranks' gradients (and losses) equals one process's on the whole batch."""
    module = _tiny_float64_sft_module()
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)  # no Trainer loop to log to
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 32, (4, 8), generator=generator)
    labels = input_ids.clone()
    # Rank 0 holds 1 + 3 completion tokens, rank 1 holds 6 + 7: a per-rank mean would weight
    # rank 0's tokens far more than one process does.
    for row, prompt_length in enumerate((7, 5, 2, 1)):
        labels[row, :prompt_length] = IGNORE_INDEX
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    halves = [
        {key: value[rows] for key, value in batch.items()} for rows in (slice(0, 2), slice(2, 4))
    ]
    tokens = [int(completion_token_count(half["labels"])) for half in halves]
    assert tokens == [4, 13]

    whole_loss, whole_gradients = _gradients(module, batch, _FakeTrainer(world_size=1))
    rank_losses, rank_gradients = zip(
        *(
            _gradients(
                module, half, _FakeTrainer(world_size=2, other_ranks_tokens=tokens[1 - rank])
            )
            for rank, half in enumerate(halves)
        ),
        strict=True,
    )
    # DDP averages the ranks' gradients; the logged loss is the mean over ranks (sync_dist).
    torch.testing.assert_close(sum(rank_losses) / 2, whole_loss)
    for whole, first, second in zip(whole_gradients, *rank_gradients, strict=True):
        torch.testing.assert_close((first + second) / 2, whole)


def _curve(run_dir: Path, name: str) -> list[float]:
    rows = list(csv.DictReader((run_dir / "logs" / "metrics.csv").open()))
    return [float(row[name]) for row in rows if row.get(name)]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def _weight_change(run_dir: Path) -> torch.Tensor:
    """Final minus initial weights, all parameters flattened into one float64 vector."""
    info = json.loads((run_dir / "model" / "clintune_checkpoint.json").read_text())
    initial = load_file(str(Path(info["base_model"]) / "model.safetensors"))
    final = _weights(run_dir)
    assert final.keys() == initial.keys()
    return torch.cat([(final[k].double() - initial[k].double()).flatten() for k in sorted(final)])


# Relative to the size of the weight change itself: one process against two differs by
# rounding only (measured 2e-6 for SFT, 8e-5 for DPO), while a real mistake in the global-batch
# arithmetic (per-rank token mean, unsynchronised gradients, shifted shards) moves it by 4e-2 or
# more. An absolute tolerance on the weights would not do: Adam's first step is about
# ±learning rate on every weight whatever the gradient's size, so the final weights of a wrong
# and a right run can agree to within a few learning rates.
RELATIVE_WEIGHT_CHANGE_TOLERANCE = 1e-3


def _assert_same_training(one: Path, two: Path, loss: str) -> None:
    single, double = _curve(one, loss), _curve(two, loss)
    assert len(single) == len(double) >= 4
    assert single == pytest.approx(double, abs=2e-4)
    assert _curve(one, "eval/loss") == pytest.approx(_curve(two, "eval/loss"), abs=2e-4)
    change_one, change_two = _weight_change(one), _weight_change(two)
    # Training really moved the weights, far beyond what the tolerance below allows.
    assert change_one.abs().max() > 1e-3
    relative_difference = float((change_two - change_one).norm() / change_one.norm())
    assert relative_difference < RELATIVE_WEIGHT_CHANGE_TOLERANCE


def _assert_rank_zero_wrote_once(run_dir: Path) -> dict[str, float]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["compute/eval_processes"] == 2
    assert metrics["test/n"] == 10  # every rank's shard gathered
    predictions = (run_dir / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 10
    assert len({json.loads(line)["id"] for line in predictions}) == 10
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    return metrics


# Triage answers are 12 to 15 tokens, so the ranks' halves of a batch hold different numbers of
# completion tokens and a per-rank token mean would not match one process. (Classification's
# answers are all 2 tokens, which hides exactly that mistake.) A one-word instruction keeps its
# prompts short: ~50 tokens instead of ~265.
SFT_ARGS = [
    *[arg for arg in SMALL if arg != "task=classification"],
    "task=triage",
    "task.instruction=Triage",
    "method=sft",
    "method.train.epochs=1",
]


@pytest.fixture(scope="module")
def sft_one_process(tmp_path_factory: pytest.TempPathFactory, run_env) -> Path:
    """The one-process run both two-process SFT runs are compared with (run once)."""
    one = tmp_path_factory.mktemp("sft") / "one"
    args = [*SFT_ARGS, "trainer=cpu", "method.train.batch_size=8", f"hydra.run.dir={one}"]
    run_script("train.py", args, run_env)
    return one


def _test_metrics(run_dir: Path) -> dict[str, float]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {key: value for key, value in metrics.items() if key.startswith("test/")}


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["ddp_cpu", "fsdp_cpu"])
def test_sft_on_two_processes_matches_one_with_the_same_global_batch(
    tmp_path: Path, run_env, sft_one_process: Path, trainer: str
) -> None:
    one, two = sft_one_process, tmp_path / "two"
    args = [*SFT_ARGS, f"trainer={trainer}", "method.train.batch_size=4", f"hydra.run.dir={two}"]
    run_script("train.py", args, run_env)
    _assert_same_training(one, two, "train/loss")
    metrics = _assert_rank_zero_wrote_once(two)
    assert metrics["compute/sft/processes"] == 2
    single = json.loads((one / "metrics.json").read_text())
    assert metrics["compute/sft/tokens"] == single["compute/sft/tokens"]  # summed over ranks
    if trainer == "fsdp_cpu":
        # The shards were gathered into an ordinary model directory: one process loads it and
        # evaluates it to the metrics the two ranks reported.
        evaluated = tmp_path / "evaluated"
        run_script(
            "evaluate.py",
            [f"checkpoint={two}", "trainer=cpu", "logger=none", f"hydra.run.dir={evaluated}"],
            run_env,
        )
        assert _test_metrics(evaluated) == _test_metrics(two)


DPO_ARGS = [
    *SMALL,
    "method=dpo_only",
    "method.train.epochs=1",
    "method.pairs.source=label",
    # Ten times DPO's default rate: the weights move ~2.5e-3, far beyond the rounding by which
    # one and two processes differ, so the comparison below can tell them apart.
    "method.module.learning_rate=1e-3",
]


@contextlib.contextmanager
def _reference_cache_dropped_after(cache_dir: Path) -> Iterator[None]:
    """Deletes the reference log-probs a run cached, so that the next run scores the pairs
    itself rather than reading them (every run here must compute its own)."""
    references = cache_dir / "reference"
    before = set(references.glob("*.pt"))
    yield
    for written in set(references.glob("*.pt")) - before:
        written.unlink()


@pytest.fixture(scope="module")
def dpo_one_process(tmp_path_factory: pytest.TempPathFactory, run_env, cache_dir: Path) -> Path:
    one = tmp_path_factory.mktemp("dpo") / "one"
    args = [*DPO_ARGS, "trainer=cpu", "method.train.batch_size=8", f"hydra.run.dir={one}"]
    with _reference_cache_dropped_after(cache_dir):
        run_script("train.py", args, run_env)
    return one


@pytest.mark.slow
@pytest.mark.parametrize(
    ("trainer", "reference"),
    # Precomputed references on data-parallel ranks; a sharded policy beside its frozen copy.
    # (FSDP with a precomputed reference runs the same rank-sharded precompute as DDP.)
    [("ddp_cpu", "precompute"), ("fsdp_cpu", "copy")],
)
def test_dpo_on_two_processes_matches_one_with_the_same_global_batch(
    tmp_path: Path, run_env, cache_dir: Path, dpo_one_process: Path, trainer: str, reference: str
) -> None:
    """Against one process precomputing the reference: the sharded pass over the ranks, or,
    under FSDP2, a frozen copy sharded like the policy (the same log-probs, as the tiny model
    has no dropout)."""
    one, two = dpo_one_process, tmp_path / "two"
    args = [
        *DPO_ARGS,
        f"trainer={trainer}",
        f"method.reference={reference}",
        "method.train.batch_size=4",
        f"hydra.run.dir={two}",
    ]
    with _reference_cache_dropped_after(cache_dir):
        run_script("train.py", args, run_env)
    _assert_same_training(one, two, "train/loss")
    assert _curve(one, "train/rewards/margins") == pytest.approx(
        _curve(two, "train/rewards/margins"), abs=2e-4
    )
    metrics = _assert_rank_zero_wrote_once(two)
    single = json.loads((one / "metrics.json").read_text())
    assert metrics["compute/dpo/reference_cache_hits"] == single["compute/dpo/reference_cache_hits"]
    assert metrics["compute/dpo/reference_cache_hits"] == 0
    if reference == "precompute":
        # The sharded reference pass scored every training pair once, over both ranks.
        assert metrics["compute/dpo/reference_tokens"] == single["compute/dpo/reference_tokens"] > 0


# ORPO and KTO on triage (answers of 12 to 15 tokens): ORPO's NLL term is normalised by the
# global batch's chosen tokens, which a per-rank token count would get wrong. KTO from the base
# model (no SFT stage): its KL reference point z0 is a mean over the batch's mismatched
# completions, which two ranks compute on halves and average.
PREFERENCE_ARGS = [
    *[arg for arg in SMALL if arg not in ("task=classification", "subsample.train=32")],
    "task=triage",
    "task.instruction=Triage",
    "method.train.epochs=1",
    "method.pairs.source=label",
    "method.module.learning_rate=1e-3",
]
METHOD_ARGS = {
    "orpo": ["method=orpo", "subsample.train=32"],  # 32 pairs: 4 steps of 8
    # 16 pairs unpaired into 32 examples: 4 steps of 8; 16 val pairs into 32 examples.
    # Unequal weights: with equal ones z0 nearly cancels between the desirable and the
    # undesirable half of a batch, and a wrong z0 would hardly move the loss or the weights.
    # The desirable side: a heavier undesirable one drove z0 below 0, where it is clamped.
    "kto": [
        "method=kto",
        "method.sft=null",
        "subsample.train=16",
        "method.module.desirable_weight=1.5",
    ],
}


def _preference_run(
    method: str, trainer: str, per_rank: int, run_dir: Path, env: dict[str, str], cache_dir: Path
) -> None:
    """One run of ``method``; the evaluation batch is per rank too: KTO's z0 is a mean over
    each evaluation batch, so one process and two must see the same global ones."""
    args = [
        *PREFERENCE_ARGS,
        *METHOD_ARGS[method],
        f"trainer={trainer}",
        f"method.train.batch_size={per_rank}",
        f"method.train.eval_batch_size={per_rank}",
        f"hydra.run.dir={run_dir}",
    ]
    with _reference_cache_dropped_after(cache_dir):
        run_script("train.py", args, env)


@pytest.fixture(scope="module")
def orpo_one_process(tmp_path_factory: pytest.TempPathFactory, run_env, cache_dir: Path) -> Path:
    one = tmp_path_factory.mktemp("orpo") / "one"
    _preference_run("orpo", "cpu", 8, one, run_env, cache_dir)
    return one


@pytest.fixture(scope="module")
def kto_one_process(tmp_path_factory: pytest.TempPathFactory, run_env, cache_dir: Path) -> Path:
    one = tmp_path_factory.mktemp("kto") / "one"
    _preference_run("kto", "cpu", 8, one, run_env, cache_dir)
    return one


@pytest.mark.slow
@pytest.mark.parametrize(
    "trainer",
    [
        # Sharded, whose ranks also split the data as DDP's do; ORPO has no rank-specific
        # state, and DDP is tested for SFT, DPO and in the multirun test below.
        pytest.param(trainer, marks=pytest.mark.xdist_group("distributed_orpo"))
        for trainer in ("fsdp_cpu",)
    ],
)
def test_orpo_on_two_processes_matches_one_with_the_same_global_batch(
    tmp_path: Path, run_env, cache_dir: Path, orpo_one_process: Path, trainer: str
) -> None:
    one, two = orpo_one_process, tmp_path / "two"
    _preference_run("orpo", trainer, 4, two, run_env, cache_dir)
    _assert_same_training(one, two, "train/loss")
    for curve in ("train/nll_loss", "train/log_odds_ratio"):
        assert _curve(one, curve) == pytest.approx(_curve(two, curve), abs=2e-4), curve
    metrics = _assert_rank_zero_wrote_once(two)
    single = json.loads((one / "metrics.json").read_text())
    assert metrics["compute/orpo/processes"] == 2
    assert metrics["compute/orpo/tokens"] == single["compute/orpo/tokens"]
    assert metrics["compute/orpo/reference_tokens"] == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "trainer",
    [
        # Sharded: its ranks average z0 and shard the reference pass as data-parallel ranks
        # do, so one trainer tests both (CI time; kill/resume runs KTO under ddp_cpu).
        pytest.param(trainer, marks=pytest.mark.xdist_group("distributed_kto"))
        for trainer in ("fsdp_cpu",)
    ],
)
def test_kto_on_two_processes_matches_one_with_the_same_global_batch(
    tmp_path: Path, run_env, cache_dir: Path, kto_one_process: Path, trainer: str
) -> None:
    """Our mismatched completions are fixed before batching (TRL's rotate within each
    per-device batch, so they change with the number of processes), and each rank's z0 is
    averaged over the ranks as TRL gathers it: with equal shares per rank, the global batch's
    mean, so two processes train as one does."""
    one, two = kto_one_process, tmp_path / "two"
    _preference_run("kto", trainer, 4, two, run_env, cache_dir)
    _assert_same_training(one, two, "train/loss")
    kl_one, kl_two = _curve(one, "train/kl"), _curve(two, "train/kl")
    assert max(kl_one) > 1e-3  # z0 above its clamp at 0, where the loss reads it
    assert kl_one == pytest.approx(kl_two, abs=2e-4)
    for curve in ("eval/kl", "train/rewards/chosen", "train/rewards/rejected"):
        assert _curve(one, curve) == pytest.approx(_curve(two, curve), abs=2e-4), curve
    metrics = _assert_rank_zero_wrote_once(two)
    single = json.loads((one / "metrics.json").read_text())
    for key in ("unpaired/desirable/train", "unpaired/undesirable/train", "compute/kto/tokens"):
        assert metrics[key] == single[key], key
    # The sharded reference pass scored every example and its mismatched answer once.
    assert metrics["compute/kto/reference_tokens"] == single["compute/kto/reference_tokens"] > 0


@pytest.mark.slow
def test_two_process_jobs_inside_a_hydra_multirun_give_one_directory_and_wandb_run_each(
    tmp_path: Path, run_env
) -> None:
    sweep = tmp_path / "sweep"
    # A cold cache: the ranks must not both build the tiny model (transformers writes nothing
    # from a rank other than zero, which once left a model without weights in the cache).
    env = {**run_env, "CLINTUNE_CACHE": str(tmp_path / "cold-cache")}
    result = run_script(
        "train.py",
        [
            "-m",
            *SMALL,
            "trainer=ddp_cpu,fsdp_cpu",
            "method=sft",
            "method.train.max_steps=2",
            f"hydra.sweep.dir={sweep}",
            "hydra.sweep.subdir=${hydra:runtime.choices.trainer}",
        ],
        env,
    )
    built = [p for p in (tmp_path / "cold-cache" / "models").glob("tiny_llama-*") if p.is_dir()]
    assert len(built) == 1 and (built[0] / "model.safetensors").is_file()
    jobs = sorted(path.name for path in sweep.iterdir() if path.is_dir())
    assert jobs == ["ddp_cpu", "fsdp_cpu"]
    for job in jobs:
        _assert_rank_zero_wrote_once(sweep / job)
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert summary["finished"] == jobs and summary["jobs_run"] == 2
    # jobs_run == 2 above: the ranks did not re-run the sweep, as Lightning's launcher would.
    assert "2 finished, 0 failed" in result.stdout
