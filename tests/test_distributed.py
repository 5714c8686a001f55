"""Data-parallel training on two CPU processes (trainer=ddp_cpu, gloo) against one process
with the same global batch; rank-zero-only writes; DDP inside a Hydra multirun."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import run_script
from safetensors.torch import load_file

from clintune.distributed import processes_per_job, shard_bounds
from clintune.methods.losses import completion_token_count, sft_loss
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


def test_rank_shares_of_the_sft_loss_average_to_the_global_batch_loss() -> None:
    """What SFTModule does under DDP: each rank divides by the global token count (times the
    world size); DDP's mean over ranks then equals one process's loss on the whole batch."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 11, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 11, (4, 6), generator=generator)
    labels[0, :4] = IGNORE_INDEX  # ranks hold different numbers of completion tokens
    labels[2, :2] = IGNORE_INDEX
    whole = sft_loss(logits, labels)
    halves = [(logits[:2], labels[:2]), (logits[2:], labels[2:])]
    global_tokens = completion_token_count(labels).double()
    shares = [sft_loss(lg, lb, global_tokens / 2) for lg, lb in halves]
    assert torch.allclose(sum(shares) / 2, whole)
    # The naive per-rank mean would not match: the test data must tell them apart.
    naive = sum(sft_loss(lg, lb) for lg, lb in halves) / 2
    assert not torch.allclose(naive, whole)


def _curve(run_dir: Path, name: str) -> list[float]:
    rows = list(csv.DictReader((run_dir / "logs" / "metrics.csv").open()))
    return [float(row[name]) for row in rows if row.get(name)]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def _assert_same_training(one: Path, two: Path, loss: str) -> None:
    single, double = _curve(one, loss), _curve(two, loss)
    assert len(single) == len(double) >= 4
    assert single == pytest.approx(double, abs=2e-4)
    assert _curve(one, "eval/loss") == pytest.approx(_curve(two, "eval/loss"), abs=2e-4)
    first, second = _weights(one), _weights(two)
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], atol=2e-4, rtol=1e-3)


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
    common = [*SMALL, "method=sft", "method.train.epochs=1"]
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
    common = [*SMALL, "method=dpo_only", "method.train.epochs=1", "method.pairs.source=label"]
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
