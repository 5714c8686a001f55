"""``python train.py -m method=orpo,simpo,kto,rpo task=triage``, cut to a few steps on a
handful of examples: every job finishes with metrics.json, each method runs the stages it
should (ORPO alone from the base model, the others after one shared SFT stage), counts
reference tokens only where it has a reference, records KTO's unpaired counts, and logs TRL's
metric names."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from helpers import run_script

pytestmark = pytest.mark.slow

METHODS = ("orpo", "simpo", "kto", "rpo")
TRAIN, VAL, STEPS = 8, 4, 2
SHORT = [
    f"subsample.train={TRAIN}",
    f"subsample.val={VAL}",
    f"method.train.max_steps={STEPS}",
    "method.train.batch_size=4",
    "method.train.eval_batch_size=8",
    # ORPO has no SFT stage: ++ sets the key for the others and adds an ignored one to ORPO.
    f"++method.sft.train.max_steps={STEPS}",
    "++method.sft.train.batch_size=4",
    "method.train.val_check_interval=2",
    "eval.limit=4",
    "eval.batch_size=4",
    "eval.bootstrap.samples=20",
    "eval.progress_bar=false",
    "trainer.log_every_n_steps=1",
    "logger=none",
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, run_env) -> Path:
    folder = tmp_path_factory.mktemp("preference-sweep") / "sweep"
    args = ["-m", f"method={','.join(METHODS)}", "task=triage", f"hydra.sweep.dir={folder}"]
    result = run_script("train.py", [*args, *SHORT], run_env)
    assert "4 finished, 0 failed" in result.stdout, result.stdout[-3000:]
    return folder


def _run(sweep: Path, method: str) -> tuple[Path, dict]:
    (run_dir,) = sweep.glob(f"tiny_llama-triage-{method}-s*")
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


def _logged_columns(run_dir: Path) -> set[str]:
    with (run_dir / "logs" / "metrics.csv").open() as handle:
        return set(next(csv.reader(handle)))


@pytest.mark.parametrize("method", METHODS)
def test_each_method_runs_its_stages_and_records_its_compute(sweep: Path, method: str) -> None:
    run_dir, metrics = _run(sweep, method)
    stage = "dpo" if method == "rpo" else method
    assert metrics["test/n"] == 4
    assert metrics[f"compute/{stage}/optimizer_steps"] == STEPS
    assert metrics[f"compute/{stage}/tokens"] > 0
    manifest = json.loads((run_dir / "model" / "clintune_checkpoint.json").read_text())
    assert manifest["method"] == method

    reference = metrics[f"compute/{stage}/reference_tokens"]
    if method in ("orpo", "simpo"):  # reference-free
        assert reference == 0 and metrics["compute/reference_tokens"] == 0
    else:  # precomputed once over the train split
        assert reference > 0
    if method == "orpo":  # one stage from the base model
        assert not any(key.startswith("compute/sft/") for key in metrics)
        assert not (run_dir / "sft_model").exists()
        assert "base_model" in manifest and "init_from" not in manifest
    else:  # after the SFT stage, shared by the three through the stage cache
        assert metrics["compute/sft/optimizer_steps"] == STEPS
        assert (run_dir / "sft_model").is_dir()
    totals = [metrics.get(f"compute/{s}/flops_estimate", 0.0) for s in ("sft", stage)]
    assert metrics["compute/flops_estimate"] == pytest.approx(sum(totals))


def test_the_sft_stage_is_trained_once_for_the_three_methods_that_need_it(sweep: Path) -> None:
    reused = [_run(sweep, method)[1]["compute/sft/reused"] for method in ("simpo", "kto", "rpo")]
    assert sorted(reused) == [0.0, 1.0, 1.0]


def test_kto_records_its_unpaired_counts(sweep: Path) -> None:
    _, metrics = _run(sweep, "kto")
    # Triage records carry no feedback: every example becomes a label pair, then two
    # unpaired examples (its gold answer desirable, a wrong one undesirable).
    for split, count in (("train", TRAIN), ("val", VAL)):
        assert metrics[f"pairs/total/{split}"] == count
        assert metrics[f"unpaired/desirable/{split}"] == count
        assert metrics[f"unpaired/undesirable/{split}"] == count
        assert metrics[f"unpaired/from_pairs/{split}"] == 2 * count
        assert metrics[f"unpaired/total/{split}"] == 2 * count


@pytest.mark.parametrize(
    ("method", "names"),
    [
        ("orpo", ("rewards/margins", "nll_loss", "log_odds_ratio", "log_odds_chosen")),
        ("simpo", ("rewards/margins", "rewards/accuracies", "logps/chosen")),
        ("kto", ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen")),
        ("rpo", ("rewards/margins", "rewards/accuracies", "nll_loss")),
    ],
)
def test_each_method_logs_trl_metric_names(sweep: Path, method: str, names: tuple) -> None:
    columns = _logged_columns(_run(sweep, method)[0])
    for prefix in ("train", "eval"):
        for name in ("loss", *names):
            assert f"{prefix}/{name}" in columns, (method, prefix, name, sorted(columns))
