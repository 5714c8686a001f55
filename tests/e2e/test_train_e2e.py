"""Short real train.py runs: real tiny models, a real Lightning Trainer, real offline W&B."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_script

from clintune.models.loading import CHECKPOINT_MANIFEST
from clintune.wandb_files import find_offline_runs, read_run

SHORT = [
    "method.train.max_steps=6",
    "method.train.batch_size=8",
    "method.train.val_check_interval=3",
    "trainer.log_every_n_steps=2",
    "eval.limit=24",
    "eval.progress_bar=false",
]


def _read_predictions(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny_llama", "tiny_mistral"])
def test_short_sft_run_writes_the_run_directory(model: str, tmp_path: Path, run_env) -> None:
    run_dir = tmp_path / "run"
    result = run_script("train.py", [f"model={model}", *SHORT, f"hydra.run.dir={run_dir}"], run_env)
    assert f"Results in {run_dir}" in result.stdout
    assert "test/f1_macro = " in result.stdout

    assert (run_dir / ".hydra" / "config.yaml").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    test_keys = {key for key in metrics if key.startswith("test/")}
    assert {"test/f1_macro", "test/accuracy", "test/f1_class_yes", "test/f1_class_no"} <= test_keys
    assert metrics["test/n"] == 24
    assert metrics["compute/sft/optimizer_steps"] == 6
    assert metrics["compute/tokens"] > 0 and metrics["compute/train_seconds"] > 0

    predictions = _read_predictions(run_dir)
    assert len(predictions) == 24
    assert {"id", "output", "prediction", "target", "correct"} <= set(predictions[0])
    accuracy = sum(p["correct"] for p in predictions) / len(predictions)
    assert accuracy == pytest.approx(metrics["test/accuracy"])

    manifest = json.loads((run_dir / "model" / CHECKPOINT_MANIFEST).read_text())
    assert manifest["kind"] == "full" and manifest["method"] == "sft"
    assert (
        (run_dir / "logs" / "metrics.csv").read_text().startswith(("epoch", "step", "train", "val"))
    )

    (run_file,) = find_offline_runs(run_dir / "wandb")
    run = read_run(run_file)
    assert run.exit_code == 0
    assert run.name == f"{model}-classification-sft-s42"
    assert run.group == "classification"
    assert set(run.tags) == {f"model:{model}", "task:classification", "method:sft", "seed:42"}
    assert run.config["model"]["name"] == model
    assert run.config["method"]["train"]["max_steps"] == 6
    for key in test_keys | {k for k in metrics if k.startswith("compute/")}:
        assert run.summary[key] == pytest.approx(metrics[key]), key
    assert any("train/loss" in row for row in run.history)
    assert "test/predictions" in run.tables  # the shipped synthetic data, unchanged


@pytest.mark.slow
def test_base_method_evaluates_without_training(tmp_path: Path, run_env) -> None:
    run_dir = tmp_path / "base"
    run_script("train.py", ["method=base", "eval.limit=16", f"hydra.run.dir={run_dir}"], run_env)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test/n"] == 16
    assert not any(key.startswith("compute/sft") for key in metrics)
    assert not (run_dir / "model").exists()


@pytest.mark.slow
def test_sensitive_data_keeps_text_out_of_wandb(tmp_path: Path, run_env) -> None:
    run_dir = tmp_path / "sensitive"
    run_script(
        "train.py",
        [
            "method=base",
            "eval.limit=8",
            "task.data.contains_sensitive_text=true",
            f"hydra.run.dir={run_dir}",
        ],
        run_env,
    )
    (run_file,) = find_offline_runs(run_dir / "wandb")
    run = read_run(run_file)
    assert run.tables == []
    assert "test/f1_macro" in run.summary
    raw = run_file.read_bytes()
    first_note = json.loads((Path("data/classification/test.jsonl")).read_text().splitlines()[0])[
        "text"
    ]
    assert first_note[:40].encode() not in raw


@pytest.mark.slow
def test_failed_training_still_finishes_wandb_and_writes_no_metrics(
    tmp_path: Path, run_env
) -> None:
    run_dir = tmp_path / "failed"
    result = run_script(
        "train.py",
        # A Trainer argument Lightning refuses: the config check leaves the trainer node to
        # Lightning, so this fails after the W&B run has started (a bad precision no longer
        # gets that far).
        ["+trainer.not_a_trainer_argument=1", f"hydra.run.dir={run_dir}"],
        run_env,
        check=False,
    )
    assert result.returncode != 0
    assert not (run_dir / "metrics.json").exists()
    (run_file,) = find_offline_runs(run_dir / "wandb")
    assert read_run(run_file).exit_code == 1
