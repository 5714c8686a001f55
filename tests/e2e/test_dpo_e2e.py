"""Short real ``train.py`` runs of DPO: SFT→DPO on both tiny models, the SFT stage cache
(reused by a second DPO run and by method=sft, not reused when half-written), DPO without an
SFT stage or from a given checkpoint, and the LoRA and copy reference modes.

Runs train on a 48-example slice of the classification data so that reference log-probs
and epochs stay cheap on a CPU; DPO sees every pair several times, so its reward accuracy
on training pairs must climb well above chance."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from helpers import REPO, compose_train, run_script

from clintune.models.loading import CHECKPOINT_MANIFEST, load_model
from clintune.stages import STAGE_COMPLETE
from clintune.wandb_files import find_offline_runs, read_run

# One worker runs this module under -n: its module fixtures are shared runs.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("dpo_e2e")]

TRAIN_EXAMPLES, VAL_EXAMPLES = 48, 16
SFT_STEPS = 6
# The SFT stage's settings: method=sft with SFT_AS_METHOD is the same stage as method=dpo's.
SFT_STAGE = [f"method.sft.train.max_steps={SFT_STEPS}", "method.sft.train.batch_size=8"]
SFT_AS_METHOD = [f"method.train.max_steps={SFT_STEPS}", "method.train.batch_size=8"]
DPO = [
    "method.train.epochs=4",
    "method.train.max_steps=24",
    "method.train.batch_size=8",
    "method.module.learning_rate=1e-3",
]
SHORT_DPO = ["method.train.max_steps=4", "method.train.batch_size=8"]
COMMON = [
    "trainer.log_every_n_steps=2",
    "eval.limit=8",
    "eval.progress_bar=false",
    "eval.bootstrap.samples=100",
]
COMPUTE = ("train_seconds", "tokens", "padding_tokens", "reference_tokens", "flops_estimate")


@pytest.fixture(scope="module")
def data_args(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A small slice of the classification splits (test stays the shipped one)."""
    folder = tmp_path_factory.mktemp("dpo-data")
    for split, count in (("train", TRAIN_EXAMPLES), ("val", VAL_EXAMPLES)):
        lines = (REPO / "data" / "classification" / f"{split}.jsonl").read_text().splitlines()
        (folder / f"{split}.jsonl").write_text("\n".join(lines[:count]) + "\n")
    return [f"task.data.train={folder / 'train.jsonl'}", f"task.data.val={folder / 'val.jsonl'}"]


class Runs:
    """train.py runs shared by the tests of this module (each command runs once)."""

    def __init__(self, root: Path, env: dict[str, str], data: list[str]) -> None:
        self.root, self.env, self.data = root, env, data
        self.done: dict[str, tuple[Path, str]] = {}

    def run(self, name: str, args: list[str]) -> tuple[Path, dict, str]:
        if name not in self.done:
            run_dir = self.root / name
            result = run_script(
                "train.py", [*self.data, *COMMON, *args, f"hydra.run.dir={run_dir}"], self.env
            )
            self.done[name] = (run_dir, result.stdout)
        run_dir, stdout = self.done[name]
        return run_dir, json.loads((run_dir / "metrics.json").read_text()), stdout

    def sft_then_dpo(self, model: str) -> tuple[Path, dict, str]:
        return self.run(f"dpo-{model}", [f"model={model}", "method=dpo", *SFT_STAGE, *DPO])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, run_env, data_args) -> Runs:
    return Runs(tmp_path_factory.mktemp("dpo-runs"), run_env, data_args)


def _manifest(weights: Path) -> dict:
    return json.loads((weights / CHECKPOINT_MANIFEST).read_text())


def _assert_dpo_metrics(metrics: dict, steps: int, validated: bool = True) -> None:
    assert metrics["compute/dpo/optimizer_steps"] == steps
    assert metrics["compute/dpo/tokens"] > 0
    assert metrics["pairs/from_label/train"] == metrics["pairs/total/train"] == TRAIN_EXAMPLES
    assert metrics["pairs/from_label/val"] == metrics["pairs/total/val"] == VAL_EXAMPLES
    assert metrics["test/n"] == 8
    if validated:  # a run shorter than an epoch never validates (DPO's val runs per epoch)
        assert math.isfinite(metrics["train/dpo/best_eval_loss"])


# tiny_mistral's SFT→DPO runs end to end in test_report_demo's grid.
@pytest.mark.parametrize("model", ["tiny_llama"])
def test_sft_then_dpo_run(model: str, runs: Runs) -> None:
    run_dir, metrics, stdout = runs.sft_then_dpo(model)
    assert f"Results in {run_dir}" in stdout
    assert "Reusing the finished SFT stage" not in stdout

    # Both stages' compute, and totals over both.
    assert metrics["compute/sft/reused"] == 0
    assert metrics["compute/sft/optimizer_steps"] == SFT_STEPS
    _assert_dpo_metrics(metrics, steps=24)
    assert metrics["data/train_examples"] == TRAIN_EXAMPLES
    assert metrics["compute/sft/reference_tokens"] == 0
    # Reference log-probs precomputed once over every train pair (chosen and rejected rows).
    assert metrics["compute/dpo/reference_tokens"] > 2 * TRAIN_EXAMPLES
    assert metrics["compute/dpo/reference_cache_hits"] == 0
    for figure in COMPUTE:
        both = metrics[f"compute/sft/{figure}"] + metrics[f"compute/dpo/{figure}"]
        assert metrics[f"compute/{figure}"] == pytest.approx(both), figure

    # DPO started from the SFT stage's weights, and saved full weights of its own.
    sft_manifest = _manifest(run_dir / "sft_model")
    assert sft_manifest["method"] == "sft" and sft_manifest["stage_key"]
    manifest = _manifest(run_dir / "model")
    assert manifest["kind"] == "full" and manifest["method"] == "dpo"
    assert manifest["init_from"] == str(run_dir / "sft_model")

    (run_file,) = find_offline_runs(run_dir / "wandb")
    run = read_run(run_file)
    assert run.exit_code == 0
    accuracies = [
        row["train/rewards/accuracies"] for row in run.history if "train/rewards/accuracies" in row
    ]
    assert len(accuracies) >= 10
    late = accuracies[-4:]
    assert sum(late) / len(late) > 0.5, accuracies
    margins = [
        row["train/rewards/margins"] for row in run.history if "train/rewards/margins" in row
    ]
    assert sum(margins[-4:]) / 4 > 0, margins
    assert any("eval/rewards/accuracies" in row for row in run.history)
    assert any("sft-train/loss" in row for row in run.history)
    for key in ("compute/sft/tokens", "compute/dpo/tokens", "pairs/total/train"):
        assert run.summary[key] == pytest.approx(metrics[key]), key


def test_sft_stage_is_reused_and_a_half_written_entry_is_not(runs: Runs, cache_dir: Path) -> None:
    first_dir, first, _ = runs.sft_then_dpo("tiny_llama")
    key = _manifest(first_dir / "sft_model")["stage_key"]
    entry = cache_dir / "stages" / f"sft-{key}"
    assert (entry / STAGE_COMPLETE).is_file() and (entry / "model" / CHECKPOINT_MANIFEST).is_file()

    # The same SFT→DPO command again: the SFT stage comes from the cache.
    again_dir, again, stdout = runs.run(
        "dpo-tiny_llama-again", ["model=tiny_llama", "method=dpo", *SFT_STAGE, *DPO]
    )
    assert "Reusing the finished SFT stage" in stdout
    assert again["compute/sft/reused"] == 1
    # A reused stage reports what it cost when it ran, and still counts in the totals.
    assert again["compute/sft/train_seconds"] == first["compute/sft/train_seconds"]
    assert again["compute/sft/tokens"] == first["compute/sft/tokens"]
    assert again["compute/tokens"] == pytest.approx(
        again["compute/sft/tokens"] + again["compute/dpo/tokens"]
    )
    # Every stage leaves its weights in its own output directory, reused or not: the run
    # directory holds the SFT weights it started from (hard links into the cache entry).
    assert _manifest(again_dir / "sft_model") == _manifest(entry / "model")
    assert _manifest(again_dir / "model")["init_from"] == str(again_dir / "sft_model")
    # Same SFT weights and pairs: the reference log-probs come from their cache too.
    assert again["compute/dpo/reference_cache_hits"] == 2
    assert again["compute/dpo/reference_tokens"] == 0
    _assert_dpo_metrics(again, steps=24)

    # method=sft with the same SFT settings is the same stage.
    sft_dir, sft, stdout = runs.run("sft-tiny_llama", ["model=tiny_llama", *SFT_AS_METHOD])
    assert "Reusing the finished SFT stage" in stdout
    assert sft["compute/sft/reused"] == 1
    assert _manifest(sft_dir / "model")["stage_key"] == key

    # A cache entry without its completion marker is never taken as a result: retrained.
    (entry / STAGE_COMPLETE).unlink()
    retrain_dir, retrained, stdout = runs.run(
        "sft-tiny_llama-retrain", ["model=tiny_llama", *SFT_AS_METHOD]
    )
    assert "Reusing the finished SFT stage" not in stdout
    assert retrained["compute/sft/reused"] == 0
    assert retrained["compute/sft/optimizer_steps"] == SFT_STEPS
    assert _manifest(retrain_dir / "model")["stage_key"] == key
    # ... and the retrained stage is published again, complete.
    assert json.loads((entry / STAGE_COMPLETE).read_text())["compute/sft/reused"] == 0
    assert (entry / "model" / CHECKPOINT_MANIFEST).is_file()


def test_copy_reference_without_sft_stage(runs: Runs) -> None:
    run_dir, metrics, _ = runs.run(
        "dpo_only-copy", ["method=dpo_only", "method.reference=copy", "logger=none", *SHORT_DPO]
    )
    assert not any(key.startswith("compute/sft") for key in metrics)
    assert not (run_dir / "sft_model").exists()
    _assert_dpo_metrics(metrics, steps=4, validated=False)
    # The frozen copy scores every training batch live: nothing precomputed, nothing cached.
    assert metrics["compute/dpo/reference_cache_hits"] == 0
    assert metrics["compute/dpo/reference_tokens"] == metrics["compute/dpo/tokens"]
    assert metrics["compute/reference_tokens"] == metrics["compute/dpo/reference_tokens"]
    manifest = _manifest(run_dir / "model")
    assert manifest["method"] == "dpo_only" and "init_from" not in manifest


def test_on_policy_pairs_and_their_sampling_time_count_as_dpo_compute(runs: Runs) -> None:
    runs.sft_then_dpo("tiny_llama")  # trains the SFT stage this run reuses
    _, metrics, stdout = runs.run(
        "dpo_on_policy",
        [
            "method=dpo_on_policy",
            *SFT_STAGE,
            "method.pairs.samples_per_example=8",
            "logger=none",
            *SHORT_DPO,
        ],
    )
    assert "Reusing the finished SFT stage" in stdout
    sampled = metrics.get("pairs/from_on_policy/train", 0)
    fallback = metrics.get("pairs/from_label_fallback/train", 0)
    assert sampled > 0 and sampled + fallback == metrics["pairs/total/train"]
    # Sampling 8 answers for each of 64 prompts and the reference pass are DPO's compute too.
    pair_seconds = metrics["compute/dpo/pair_seconds"]
    reference_seconds = metrics["compute/dpo/reference_seconds"]
    assert pair_seconds > 0 and reference_seconds > 0
    assert metrics["compute/dpo/train_seconds"] > pair_seconds + reference_seconds
    assert metrics["compute/train_seconds"] == pytest.approx(
        metrics["compute/sft/train_seconds"] + metrics["compute/dpo/train_seconds"]
    )


def test_dpo_from_a_given_checkpoint(runs: Runs) -> None:
    first_dir, _, _ = runs.sft_then_dpo("tiny_llama")
    init = first_dir / "model"
    run_dir, metrics, stdout = runs.run(
        "dpo-init_from", ["method=dpo", f"method.init_from={init}", "logger=none", *SHORT_DPO]
    )
    # init_from replaces the SFT stage.
    assert "Reusing the finished SFT stage" not in stdout
    assert not any(key.startswith("compute/sft") for key in metrics)
    _assert_dpo_metrics(metrics, steps=4, validated=False)
    assert _manifest(run_dir / "model")["init_from"] == str(init)


def test_lora_adapter_disabled_reference(runs: Runs, tmp_path: Path) -> None:
    run_dir, metrics, _ = runs.run(
        "dpo-lora",
        [
            "method=dpo",
            "model.lora.enabled=true",
            "method.reference=adapter_disabled",
            "method.sft.train.max_steps=4",
            "method.sft.train.batch_size=8",
            "logger=none",
            *SHORT_DPO,
        ],
    )
    assert metrics["compute/sft/reused"] == 0
    _assert_dpo_metrics(metrics, steps=4, validated=False)
    assert metrics["compute/dpo/trainable_parameters"] < metrics["compute/dpo/parameters"]
    # The reference is the policy with its adapter off, run live on every batch.
    assert metrics["compute/dpo/reference_tokens"] == metrics["compute/dpo/tokens"] > 0
    manifest = _manifest(run_dir / "model")
    assert manifest["kind"] == "lora" and manifest["method"] == "dpo"
    assert (run_dir / "model" / "adapter_model.safetensors").is_file()
    assert not (run_dir / "model" / "model.safetensors").exists()
    # DPO's adapter sits on the SFT adapter merged into the base; that adapter travels along.
    assert manifest["merged_adapter"] == "init_adapter"
    inner = _manifest(run_dir / "model" / "init_adapter")
    assert inner["kind"] == "lora" and inner["method"] == "sft"
    # The saved adapter is self-contained: it still loads after the SFT stage dirs are gone.
    moved = tmp_path / "adapter"
    shutil.copytree(run_dir / "model", moved)
    cfg = compose_train(["model.lora.enabled=true"], Path(runs.env["CLINTUNE_CACHE"]))
    loaded = load_model(cfg.model, cfg.paths.cache_dir, checkpoint=moved)
    assert loaded.is_lora
