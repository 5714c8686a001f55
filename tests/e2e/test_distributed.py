"""Data-parallel training on two CPU processes (trainer=ddp_cpu, gloo) against one process
with the same global batch; rank-zero-only writes; DDP inside a Hydra multirun."""

from __future__ import annotations

import csv
import json
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
    fsdp = {"_target_": "clintune.distributed.fsdp_strategy", "layers": []}
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


@pytest.mark.slow
def test_sft_on_two_processes_matches_one_with_the_same_global_batch(
    tmp_path: Path, run_env
) -> None:
    # Triage answers are 12 to 15 tokens, so the ranks' halves of a batch hold different
    # numbers of completion tokens and a per-rank token mean would not match one process.
    # (Classification's answers are all 2 tokens, which hides exactly that mistake.) A one-word
    # instruction keeps its prompts short: ~50 tokens instead of ~265.
    triage = [arg for arg in SMALL if arg != "task=classification"]
    common = [
        *triage,
        "task=triage",
        "task.instruction=Triage",
        "method=sft",
        "method.train.epochs=1",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    run_script(
        "train.py",
        [*common, "trainer=cpu", "method.train.batch_size=8", f"hydra.run.dir={one}"],
        run_env,
    )
    run_script(
        "train.py",
        [*common, "trainer=ddp_cpu", "method.train.batch_size=4", f"hydra.run.dir={two}"],
        run_env,
    )
    _assert_same_training(one, two, "train/loss")
    metrics = _assert_rank_zero_wrote_once(two)
    assert metrics["compute/sft/processes"] == 2
    single = json.loads((one / "metrics.json").read_text())
    assert metrics["compute/sft/tokens"] == single["compute/sft/tokens"]  # summed over ranks


@pytest.mark.slow
def test_dpo_on_two_processes_matches_one_with_the_same_global_batch(
    tmp_path: Path, run_env, cache_dir: Path
) -> None:
    common = [
        *SMALL,
        "method=dpo_only",
        "method.train.epochs=1",
        "method.pairs.source=label",
        # Ten times DPO's default rate: the weights move ~2.5e-3, far beyond the rounding by
        # which one and two processes differ, so the comparison below can tell them apart.
        "method.module.learning_rate=1e-3",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    references = cache_dir / "reference"
    before = set(references.glob("*.pt"))
    run_script(
        "train.py",
        [*common, "trainer=ddp_cpu", "method.train.batch_size=4", f"hydra.run.dir={two}"],
        run_env,
    )
    # The single process must score the pairs itself, not read the sharded pass's cache.
    for written in set(references.glob("*.pt")) - before:
        written.unlink()
    run_script(
        "train.py",
        [*common, "trainer=cpu", "method.train.batch_size=8", f"hydra.run.dir={one}"],
        run_env,
    )
    _assert_same_training(one, two, "train/loss")
    assert _curve(one, "train/rewards/margins") == pytest.approx(
        _curve(two, "train/rewards/margins"), abs=2e-4
    )
    metrics = _assert_rank_zero_wrote_once(two)
    single = json.loads((one / "metrics.json").read_text())
    assert metrics["compute/dpo/reference_cache_hits"] == single["compute/dpo/reference_cache_hits"]
    assert metrics["compute/dpo/reference_cache_hits"] == 0
    # The sharded reference pass scored every training pair once, over both ranks.
    assert metrics["compute/dpo/reference_tokens"] == single["compute/dpo/reference_tokens"] > 0


@pytest.mark.slow
def test_ddp_inside_a_hydra_multirun_gives_one_directory_and_wandb_run_per_job(
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
            "trainer=ddp_cpu",
            "method=sft",
            "method.train.max_steps=2",
            "seed=1,2",
            f"hydra.sweep.dir={sweep}",
        ],
        env,
    )
    built = [p for p in (tmp_path / "cold-cache" / "models").glob("tiny_llama-*") if p.is_dir()]
    assert len(built) == 1 and (built[0] / "model.safetensors").is_file()
    jobs = sorted(path.name for path in sweep.iterdir() if path.is_dir())
    assert jobs == ["tiny_llama-classification-sft-s1", "tiny_llama-classification-sft-s2"]
    for job in jobs:
        _assert_rank_zero_wrote_once(sweep / job)
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert summary["finished"] == jobs and summary["jobs_run"] == 2
    # jobs_run == 2 above: the ranks did not re-run the sweep, as Lightning's launcher would.
    assert "2 finished, 0 failed" in result.stdout
