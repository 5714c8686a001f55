"""The study's table from a real multirun: the tiny demo grid (2 models × 4 tasks × base, sft,
dpo) with very short training, then `python -m clintune.report` on its directory."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, run_script

SHORT = [
    "method.train.max_steps=2",
    "method.train.val_check_interval=null",
    "method.sft.train.max_steps=2",
    "method.sft.train.val_check_interval=null",
    "subsample.train=24",
    "subsample.val=8",
    "eval.limit=12",
    "eval.bootstrap.samples=50",
    "logger=none",
]


def _rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


@pytest.mark.slow
def test_demo_grid_multirun_fills_the_comparison_table(tmp_path: Path, run_env) -> None:
    sweep = tmp_path / "demo_grid"
    run_script("train.py", ["experiment=demo_grid", f"hydra.sweep.dir={sweep}", *SHORT], run_env)
    jobs = sorted(p.name for p in sweep.iterdir() if (p / "metrics.json").is_file())
    assert len(jobs) == 2 * 4 * 3, jobs

    out = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, "-m", "clintune.report", str(sweep), "--out", str(out), "--resamples=200"],
        cwd=REPO,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| classification" in result.stdout  # the markdown table is printed
    for name in ("report.md", "report.html", "comparison.csv", "significance.csv", "compute.csv"):
        assert (out / name).is_file(), name

    cells = _rows(out / "comparison.csv")
    headline = {r["task"]: r["metric"] for r in cells if r["headline"] == "1"}
    assert headline == {
        "classification": "f1_macro",
        "reasoning": "accuracy",
        "summarization": "rougeL",
        "triage": "provider_f1_macro",
    }
    columns = {(r["model"], r["method"]) for r in cells}
    assert columns == {
        (m, x) for m in ("tiny_llama", "tiny_mistral") for x in ("base", "sft", "dpo")
    }
    for row in cells:
        if row["metric"] == "likert_mean":
            continue  # a random tiny judge grades nothing: a gap with its reason, not a zero
        assert row["gap"] == "", row
        assert float(row["ci_low"]) <= float(row["mean"]) <= float(row["ci_high"])

    tests = _rows(out / "significance.csv")
    pairs = {(r["control"], r["treatment"]) for r in tests}
    assert pairs == {("sft", "dpo"), ("base", "sft"), ("base", "dpo")}
    by_metric = {r["metric"]: r["test"] for r in tests if r["status"] == "ok"}
    assert by_metric["accuracy"] == "McNemar exact"
    assert by_metric["f1_macro"].startswith("paired permutation")
    ok = [r for r in tests if r["status"] == "ok"]
    assert ok and all(0.0 <= float(r["p_adjusted"]) <= 1.0 for r in ok)
    assert all(float(r["p_adjusted"]) >= float(r["p_value"]) for r in ok)  # Holm

    compute = _rows(out / "compute.csv")
    dpo = [r for r in compute if r["method"] == "dpo"]
    assert len(dpo) == 8
    for row in dpo:
        assert float(row["flops_vs_sft"]) > 1.0  # DPO includes its SFT stage
        assert row["sft_reused"] == "1"  # the sweep trained SFT once: dpo reused it
