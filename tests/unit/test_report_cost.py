"""The cost-effectiveness answer of ``python -m clintune.report`` on hand-made run directories:
every method's gain over SFT and over base on the headline metric (paired CI and P), its
compute beyond SFT's, the Pareto front, the opening sentence, and the files (Markdown, CSV,
PNG, HTML in headless Chromium, W&B tables and Report against stand-ins)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import yaml
from scipy.stats import bootstrap

from clintune.report import build_report, collect_dirs, write_report
from clintune.report.table import CostEffect, Report, answer_sentence, pareto_front
from clintune.report.wandb_log import cost_table_rows, log_report

MODELS = ("m1", "m2")  # m1 trained on a GPU, m2 on CPU
METHODS = ("base", "sft", "dpo", "orpo", "simpo", "kto", "rpo")
SEEDS = (1, 2)
N = 60
RESAMPLES = 400
# Accuracy per method: exact, by construction of the rows. On qa_gain DPO and RPO beat SFT
# clearly; ORPO edges past it for less compute than SFT; on qa_flat no method beats SFT.
SKILL = {
    "qa_gain": {
        "base": 0.30, "sft": 0.60, "dpo": 0.90, "orpo": 0.65,
        "simpo": 0.60, "kto": 0.55, "rpo": 0.85,
    },
    "qa_flat": {
        "base": 0.30, "sft": 0.60, "dpo": 0.60, "orpo": 0.50,
        "simpo": 0.55, "kto": 0.60, "rpo": 0.60,
    },
}  # fmt: skip
SFT_FLOPS = 6e9
# The preference stage's FLOPs (ORPO: its only stage); seconds are FLOPs / 1e8.
STAGE_FLOPS = {"dpo": 1.2e10, "orpo": 5e9, "simpo": 3e9, "kto": 1e10, "rpo": 1.2e10}
GPU_SECONDS_PER_FLOP = 1e-8  # m1's GPU-hours follow its seconds


def _rows(task: str, method: str, seed: int) -> list[dict[str, Any]]:
    correct_count = round(SKILL[task][method] * N)
    offset = 7 * METHODS.index(method) + 13 * seed
    rows = []
    for i in range(N):
        correct = (i * 11 + offset) % N < correct_count
        rows.append(
            {
                "id": f"{task}-{i:03d}",
                "output": "A" if correct else "B",
                "prediction": "A" if correct else "B",
                "target": "A",
                "correct": correct,
            }
        )
    return rows


def _metrics(model: str, method: str, rows: list[dict[str, Any]]) -> dict[str, float]:
    accuracy = float(np.mean([r["correct"] for r in rows]))
    metrics = {
        "test/accuracy": accuracy,
        "test/accuracy_ci_low": accuracy - 0.05,
        "test/accuracy_ci_high": accuracy + 0.05,
        "test/n": float(N),
    }
    stages = {}
    if method not in ("base", "orpo"):
        stages["sft"] = SFT_FLOPS
    if method in STAGE_FLOPS:
        stages["dpo" if method == "rpo" else method] = STAGE_FLOPS[method]
    gpus = 1.0 if model == "m1" else 0.0
    for stage, flops in stages.items():
        seconds = flops / 1e8
        metrics |= {
            f"compute/{stage}/flops_estimate": flops,
            f"compute/{stage}/train_seconds": seconds,
            f"compute/{stage}/gpu_hours": seconds * gpus / 3600,
        }
    if stages:
        metrics["compute/flops_estimate"] = sum(stages.values())
        metrics["compute/train_seconds"] = sum(stages.values()) / 1e8
        metrics["compute/gpu_hours"] = sum(stages.values()) / 1e8 * gpus / 3600
    return metrics


def make_sweep(root: Path) -> Path:
    sweep = root / "multirun" / "methods"
    for model in MODELS:
        for task in SKILL:
            for method in METHODS:
                for seed in SEEDS:
                    run = sweep / f"{model}-{task}-{method}-s{seed}"
                    (run / ".hydra").mkdir(parents=True)
                    config = {
                        "model": {"name": model},
                        "task": {
                            "_target_": "clintune.tasks.reasoning.ReasoningTask",
                            "name": task,
                        },
                        "method": {"name": method},
                        "seed": seed,
                    }
                    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
                    rows = _rows(task, method, seed)
                    (run / "predictions.jsonl").write_text(
                        "".join(json.dumps(r) + "\n" for r in rows)
                    )
                    (run / "metrics.json").write_text(json.dumps(_metrics(model, method, rows)))
                    job = {"status": "finished", "headline_metric": "test/accuracy"}
                    (run / "job.json").write_text(json.dumps(job))
    return sweep


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sweep(tmp_path_factory.mktemp("cost"))


@pytest.fixture(scope="module")
def report(sweep: Path) -> Report:
    return build_report(collect_dirs([sweep]), n_resamples=RESAMPLES)


def _row(report: Report, task: str, model: str, method: str) -> CostEffect:
    (row,) = [r for r in report.cost_effect if (r.task, r.model, r.method) == (task, model, method)]
    return row


def _pooled_correct(task: str, method: str) -> np.ndarray:
    return np.array([r["correct"] for s in SEEDS for r in _rows(task, method, s)], dtype=float)


# --------------------------------------------------------------------------- numbers


def test_every_method_is_tested_against_sft_and_base(report: Report) -> None:
    assert report.methods == ["base", "sft", "dpo", "rpo", "orpo", "simpo", "kto"]
    pairs = {(c.control, c.treatment) for c in report.comparisons}
    for method in ("dpo", "rpo", "orpo", "simpo", "kto"):
        assert {("sft", method), ("base", method)} <= pairs
    assert ("base", "sft") in pairs
    assert len(report.cost_effect) == 2 * 2 * len(METHODS)  # tasks × models × methods


def test_gain_over_sft_with_its_paired_bootstrap_ci(report: Report) -> None:
    row = _row(report, "qa_gain", "m1", "dpo")
    assert row.metric == "accuracy" and row.mean == pytest.approx(0.9)
    test = row.vs_sft
    assert test is not None and test.status == "ok" and test.test == "McNemar exact"
    sft, dpo = _pooled_correct("qa_gain", "sft"), _pooled_correct("qa_gain", "dpo")
    assert test.effect == pytest.approx(dpo.mean() - sft.mean()) == pytest.approx(0.3)
    # The CI: examples resampled in pairs (the same for both runs), as scipy does it.
    expected = bootstrap(
        (np.arange(2 * N), np.arange(2 * N, 4 * N)),
        lambda a, b: float(
            np.concatenate([sft, dpo])[b].mean() - np.concatenate([sft, dpo])[a].mean()
        ),
        paired=True,
        vectorized=False,
        n_resamples=RESAMPLES,
        method="percentile",
        rng=np.random.default_rng(0),
    ).confidence_interval
    assert (test.ci_low, test.ci_high) == (
        pytest.approx(expected.low),
        pytest.approx(expected.high),
    )
    assert 0 < test.ci_low < test.effect < test.ci_high
    assert test.p_adjusted is not None and test.p_adjusted < 0.001
    # Against base too, and only the headline metric carries a CI (it is what is quoted).
    assert row.vs_base is not None and row.vs_base.effect == pytest.approx(0.6)
    assert row.vs_base.ci_low is not None


def test_compute_beyond_sft(report: Report) -> None:
    dpo = _row(report, "qa_gain", "m1", "dpo")
    assert dpo.flops == pytest.approx(SFT_FLOPS + STAGE_FLOPS["dpo"])
    assert dpo.flops_vs_sft == pytest.approx(3.0)
    assert dpo.extra_flops == pytest.approx(STAGE_FLOPS["dpo"])
    assert dpo.seconds_vs_sft == pytest.approx(3.0)
    assert dpo.extra_seconds == pytest.approx(STAGE_FLOPS["dpo"] / 1e8)
    assert dpo.extra_gpu_hours == pytest.approx(STAGE_FLOPS["dpo"] / 1e8 / 3600)
    orpo = _row(report, "qa_gain", "m1", "orpo")  # no SFT stage: cheaper than SFT
    assert orpo.flops_vs_sft == pytest.approx(STAGE_FLOPS["orpo"] / SFT_FLOPS)
    assert orpo.extra_flops == pytest.approx(STAGE_FLOPS["orpo"] - SFT_FLOPS)
    assert orpo.extra_flops is not None and orpo.extra_flops < 0
    rpo = _row(report, "qa_gain", "m1", "rpo")  # its stage is named dpo
    assert rpo.flops_vs_sft == pytest.approx(3.0)
    base = _row(report, "qa_gain", "m1", "base")
    assert (base.flops, base.seconds, base.gpu_hours) == (0.0, 0.0, 0.0)
    sft = _row(report, "qa_gain", "m1", "sft")
    assert (sft.flops_vs_sft, sft.extra_flops) == (1.0, 0.0)
    cpu = _row(report, "qa_gain", "m2", "dpo")
    assert cpu.gpu_hours == 0.0 and cpu.extra_gpu_hours == 0.0


def test_pareto_front_of_metric_against_flops(report: Report) -> None:
    front = {
        r.method for r in report.cost_effect if (r.task, r.model) == ("qa_gain", "m1") and r.pareto
    }
    # base: free; ORPO: better than SFT for less; DPO: the best. SFT is beaten by ORPO, RPO
    # and SimPO by DPO or SFT at no lower cost, KTO by SFT.
    assert front == {"base", "orpo", "dpo"}
    flat = {
        r.method for r in report.cost_effect if (r.task, r.model) == ("qa_flat", "m1") and r.pareto
    }
    assert flat == {"base", "orpo", "sft"}


def test_pareto_front_rule() -> None:
    points = [(0, 0.3), (5, 0.65), (6, 0.6), (6, 0.6), (18, 0.9), (18, 0.85), (9, 0.9)]
    assert pareto_front(points) == [True, True, False, False, False, False, True]


def test_the_opening_sentence_answers_the_question(report: Report) -> None:
    def p(task: str, model: str, method: str) -> str:
        value = _row(report, task, model, method).vs_sft.p_adjusted  # type: ignore[union-attr]
        return f"{value:.3f}" if value >= 0.001 else f"{value:.1e}"

    expected = (
        f"On qa_flat (m1) no method beat SFT; on qa_flat (m2) no method beat SFT; "
        f"on qa_gain (m1), DPO gained +0.3 accuracy (P = {p('qa_gain', 'm1', 'dpo')}) for 3× "
        f"SFT's compute, RPO +0.25 (P = {p('qa_gain', 'm1', 'rpo')}) for 3× SFT's compute; "
        f"on qa_gain (m2), DPO gained +0.3 accuracy (P = {p('qa_gain', 'm2', 'dpo')}) for 3× "
        f"SFT's compute, RPO +0.25 (P = {p('qa_gain', 'm2', 'rpo')}) for 3× SFT's compute."
    )
    assert answer_sentence(report) == expected
    # ORPO's +0.05 is not significant after correction, so it is not claimed.
    orpo = _row(report, "qa_gain", "m1", "orpo").vs_sft
    assert orpo is not None and orpo.effect == pytest.approx(0.05) and orpo.p_adjusted > 0.05


def test_the_sentence_without_sft_runs_or_tests(sweep: Path, tmp_path: Path) -> None:
    only = build_report(collect_dirs([sweep]), methods=["base", "dpo"], n_resamples=50)
    assert answer_sentence(only).startswith("On qa_flat (m1) there is no finished SFT run")
    no_tests = build_report(collect_dirs([sweep]), methods=["sft", "base"], n_resamples=50)
    assert "no method was tested against SFT" in answer_sentence(no_tests)


# --------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def written(report: Report, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cost-out")
    write_report(report, out, {"finished": 56})
    return out


def test_markdown_opens_with_the_answer_and_has_the_table_and_plots(
    report: Report, written: Path
) -> None:
    markdown = (written / "report.md").read_text()
    lines = markdown.splitlines()
    assert lines[0] == "# clintune report" and lines[2] == f"**{answer_sentence(report)}**"
    section = markdown.split("## Cost-effectiveness")[1].split("## Compute")[0]
    dpo = next(line for line in section.splitlines() if line.startswith("| qa_gain | m1 | dpo |"))
    cells = [cell.strip() for cell in dpo.strip("|").split("|")]
    assert cells[3].startswith("accuracy: 0.900")
    assert cells[4].startswith("+0.300 [")
    assert cells[9] == "3.00×" and cells[14] == "yes"
    cpu = next(line for line in section.splitlines() if line.startswith("| qa_gain | m2 | dpo |"))
    assert "— (CPU)" in cpu
    for task in SKILL:
        assert f"](cost_{task}.png)" in section


def test_csv_holds_every_number(report: Report, written: Path) -> None:
    import csv

    rows = list(csv.DictReader((written / "cost_effectiveness.csv").open()))
    assert len(rows) == len(report.cost_effect)
    dpo = next(r for r in rows if (r["task"], r["model"], r["method"]) == ("qa_gain", "m1", "dpo"))
    row = _row(report, "qa_gain", "m1", "dpo")
    assert float(dpo["gain_vs_sft"]) == pytest.approx(0.3)
    assert float(dpo["gain_vs_sft_ci_low"]) == pytest.approx(row.vs_sft.ci_low)  # type: ignore[union-attr]
    assert float(dpo["p_adjusted_vs_sft"]) == pytest.approx(row.vs_sft.p_adjusted)  # type: ignore[union-attr]
    assert float(dpo["extra_flops"]) == pytest.approx(STAGE_FLOPS["dpo"])
    assert dpo["pareto"] == "1" and dpo["correction"] == "holm"
    sft = next(r for r in rows if (r["task"], r["model"], r["method"]) == ("qa_gain", "m1", "sft"))
    assert sft["status_vs_sft"] == "" and sft["gain_vs_sft"] == ""  # not tested against itself


def test_cost_plots_are_real_pngs(written: Path) -> None:
    from PIL import Image

    for task in SKILL:
        with Image.open(written / f"cost_{task}.png") as image:
            image.load()
            assert image.format == "PNG" and image.size[0] > 400 and image.size[1] > 200


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_html_with_the_cost_section_renders_in_chromium(
    report: Report, written: Path, tmp_path: Path
) -> None:
    profile = tmp_path / "profile"
    command = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
        "--dump-dom", (written / "report.html").as_uri(),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    shutil.rmtree(profile, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    # Per task: the metric bars and the cost plot, every one decoded.
    assert 'data-images-loaded="true"' in dom and 'data-image-count="4"' in dom
    assert 'alt="qa_gain cost"' in dom and 'alt="qa_flat cost"' in dom
    assert 'id="cost-effectiveness"' in dom
    sentence = answer_sentence(report).replace("'", "&#x27;")
    assert sentence.split(";")[0] in dom  # the opening answer, first clause
    assert dom.index('class="answer"') < dom.index("<h2>Comparison</h2>")


# --------------------------------------------------------------------------- W&B


def test_wandb_cost_table_has_numbers_and_names_only(report: Report) -> None:
    columns, data = cost_table_rows(report)
    rows = [dict(zip(columns, row, strict=True)) for row in data]
    dpo = next(r for r in rows if (r["task"], r["model"], r["method"]) == ("qa_gain", "m1", "dpo"))
    assert dpo["gain_vs_sft"] == pytest.approx(0.3) and dpo["pareto"] == 1
    assert dpo["gain_vs_sft_ci_low"] is not None and dpo["flops_vs_sft"] == pytest.approx(3.0)
    for row in rows:
        assert all(isinstance(v, int | float | type(None)) for k, v in row.items() if k not in (
            "task", "model", "method", "metric"))  # fmt: skip


class _Block:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs


class _FakeReport(_Block):
    saved: ClassVar[list[_FakeReport]] = []
    url = "https://wandb.example/report"

    def save(self) -> None:
        _FakeReport.saved.append(self)


def _fake_wr() -> types.ModuleType:
    module = types.ModuleType("wandb_workspaces.reports.v2")
    for name in ("Runset", "H1", "P", "PanelGrid", "WeavePanelSummaryTable", "MediaBrowser"):
        setattr(module, name, type(name, (_Block,), {}))
    module.Report = _FakeReport  # type: ignore[attr-defined]
    return module


class _FakeWandb(types.ModuleType):
    def __init__(self) -> None:
        super().__init__("wandb")
        self.logged: list[dict[str, Any]] = []
        outer = self

        class Run:
            id, name, url = "r1", "report-methods", "https://wandb.example/r1"

            def log(self, data: dict[str, Any]) -> None:
                outer.logged.append(data)

            def finish(self) -> None:
                pass

        self.init = lambda **kwargs: Run()
        self.Table = _Block
        self.Image = lambda image: ("image", image.size)


def test_wandb_logs_the_cost_table_plots_and_builds_the_report(
    report: Report, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clintune.report.collect import RunRecord

    fake = _FakeWandb()
    wr = _fake_wr()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setitem(sys.modules, "wandb_workspaces", types.ModuleType("wandb_workspaces"))
    reports = types.ModuleType("wandb_workspaces.reports")
    reports.v2 = wr  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb_workspaces.reports", reports)
    monkeypatch.setitem(sys.modules, "wandb_workspaces.reports.v2", wr)
    monkeypatch.setenv("WANDB_MODE", "online")
    _FakeReport.saved.clear()
    runs = [RunRecord("m1", "qa_gain", "dpo", 1, "finished", group="methods")]
    messages = log_report(report, runs, "team/clintune:methods")
    assert messages[-1] == f"W&B Report saved: {_FakeReport.url}"
    (logged,) = fake.logged
    table = logged["report/cost_effectiveness"]
    assert (table.kwargs["columns"], table.kwargs["data"]) == cost_table_rows(report)
    for task in SKILL:
        kind, size = logged[f"report/cost_plot/{task}"]
        assert kind == "image" and size[0] > 400
    (saved,) = _FakeReport.saved
    blocks = saved.kwargs["blocks"]
    assert type(blocks[0]).__name__ == "P" and blocks[0].args == (answer_sentence(report),)
    assert type(blocks[1]).__name__ == "H1" and blocks[1].args == ("Cost-effectiveness",)
    panels = blocks[2].kwargs["panels"]
    assert panels[0].kwargs == {"table_name": "report/cost_effectiveness"}
    assert panels[1].kwargs == {"media_keys": [f"report/cost_plot/{t}" for t in report.tasks]}
