"""Multiruns: one directory per job, failures isolated and reported, resume skips finished
jobs, the launchers' configs, and submitit's local executor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import run_script

TINY = [
    "method.train.max_steps=2",
    "method.sft.train.max_steps=2",
    "method.train.val_check_interval=null",
    "method.sft.train.val_check_interval=null",
    "eval.limit=8",
    "eval.bootstrap.samples=50",
    "logger=none",
]


def _broken_task_dir(tmp_path: Path) -> Path:
    """A config dir adding a task whose test file does not exist: a job that fails."""
    conf = tmp_path / "extra_conf" / "task"
    conf.mkdir(parents=True)
    (conf / "broken.yaml").write_text(
        "defaults:\n  - classification\n  - _self_\nname: broken\n"
        "data:\n  test: /nonexistent/test.jsonl\n"
    )
    return tmp_path / "extra_conf"


@pytest.mark.slow
def test_failed_job_is_isolated_reported_and_resume_skips_finished(tmp_path: Path, run_env) -> None:
    sweep = tmp_path / "sweep"
    args = [
        f"--config-dir={_broken_task_dir(tmp_path)}",  # options before the overrides
        "experiment=demo_grid",
        "model=tiny_llama",
        "task=classification,broken",
        "method=base",
        f"hydra.sweep.dir={sweep}",
        *TINY,
    ]
    first = run_script("train.py", args, run_env)
    good, bad = sweep / "tiny_llama-classification-base-s1", sweep / "tiny_llama-broken-base-s1"
    assert json.loads((good / "metrics.json").read_text())["test/n"] == 8
    assert not (bad / "metrics.json").exists()
    failure = json.loads((bad / "failure.json").read_text())
    assert failure["error"] == "FileNotFoundError"
    assert "/nonexistent/test.jsonl" in failure["message"]
    assert "Job tiny_llama-broken-base-s1 FAILED (FileNotFoundError" in first.stdout
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert summary["finished"] == ["tiny_llama-classification-base-s1"]
    assert list(summary["failed"]) == ["tiny_llama-broken-base-s1"]
    assert "1 finished, 1 failed" in first.stdout

    finished_at = (good / "metrics.json").stat().st_mtime_ns
    second = run_script("train.py", args, run_env)
    assert "Skipping tiny_llama-classification-base-s1: already finished" in second.stdout
    assert (good / "metrics.json").stat().st_mtime_ns == finished_at
    assert "Job tiny_llama-broken-base-s1 FAILED" in second.stdout  # failed jobs run again

    third = run_script("train.py", [*args, "sweep.resume=false"], run_env)
    assert "Skipping" not in third.stdout
    assert (good / "metrics.json").stat().st_mtime_ns > finished_at


@pytest.mark.slow
def test_a_changed_config_is_not_taken_as_finished(tmp_path: Path, run_env) -> None:
    sweep = tmp_path / "sweep"
    base = [
        "experiment=demo_grid",
        "model=tiny_llama",
        "task=classification",
        "method=base",
        f"hydra.sweep.dir={sweep}",
        *TINY,
    ]
    run_script("train.py", base, run_env)
    changed = run_script("train.py", [*base[:-3], "eval.limit=6", *base[-2:]], run_env)
    assert "Skipping" not in changed.stdout
    metrics = json.loads((sweep / "tiny_llama-classification-base-s1" / "metrics.json").read_text())
    assert metrics["test/n"] == 6


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_job(tmp_path: Path, run_env) -> None:
    sweep = tmp_path / "sweep"
    run_script(
        "train.py",
        [
            "experiment=demo_grid",
            "hydra/launcher=submitit_local_preset",
            "model=tiny_llama",
            "task=classification",
            "method=base",
            f"hydra.sweep.dir={sweep}",
            *TINY,
        ],
        run_env,
    )
    metrics = json.loads((sweep / "tiny_llama-classification-base-s1" / "metrics.json").read_text())
    assert metrics["test/n"] == 8
    assert list((sweep / ".submitit").iterdir())  # the job really went through submitit


ALL_METHODS = "base,sft,dpo,orpo,simpo,kto,rpo"


@pytest.mark.parametrize(
    ("experiment", "methods"),
    [
        ("study_grid", ALL_METHODS),
        ("demo_grid", "base,sft,dpo"),
        ("demo_grid_methods", ALL_METHODS),
    ],
)
def test_grid_experiments_compose(experiment: str, methods: str, run_env) -> None:
    result = run_script("train.py", [f"experiment={experiment}", "--cfg", "hydra"], run_env)
    hydra_cfg = yaml.safe_load(result.stdout)["hydra"]
    params = hydra_cfg["sweeper"]["params"]
    assert params["task"] == "classification,reasoning,summarization,triage"
    assert params["method"] == methods
    assert hydra_cfg["mode"] == "MULTIRUN"
    assert hydra_cfg["sweep"]["dir"] == "multirun/${sweep.name}"
    job = yaml.safe_load(
        run_script("train.py", [f"experiment={experiment}", "--cfg", "job"], run_env).stdout
    )
    assert job["sweep"]["name"] == experiment
    assert job["logger"]["group"] == "${sweep.name}"  # one W&B group per sweep


@pytest.mark.parametrize(
    ("preset", "target"),
    [
        ("slurm", "SlurmLauncher"),
        ("local_parallel", "JoblibLauncher"),
        ("submitit_local_preset", "LocalLauncher"),
    ],
)
def test_launcher_presets_compose(preset: str, target: str, run_env) -> None:
    result = run_script(
        "train.py", ["experiment=study_grid", f"hydra/launcher={preset}", "--cfg", "hydra"], run_env
    )
    launcher = yaml.safe_load(result.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith(target)
    if preset == "slurm":
        assert launcher["gpus_per_node"] == 1 and launcher["max_num_timeout"] == 3


def test_wandb_sweep_files_describe_the_grids() -> None:
    from helpers import REPO

    study = yaml.safe_load((REPO / "sweeps" / "wandb_study_grid.yaml").read_text())
    assert study["program"] == "train.py" and study["method"] == "grid"
    assert study["parameters"]["method"]["values"] == ALL_METHODS.split(",")
    assert study["parameters"]["model"]["values"] == ["llama3", "mistral2"]
    assert "${args_no_hyphens}" in study["command"]
