"""python -m clintune.report on hand-made run directories with known predictions."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from clintune.eval.metrics import MACRO_F1_RULE
from clintune.report import build_report, collect_dirs, collect_wandb, write_report
from clintune.report.__main__ import main
from clintune.report.render import cell_text, fmt_p, headline_rows
from clintune.report.table import Report

# One worker runs this module under -n: its module fixtures are built once.
pytestmark = pytest.mark.xdist_group("report")

MODELS = ("m1", "m2")
METHODS = ("base", "sft", "dpo")
SEEDS = (1, 2)
N = 30
SKILL = {"base": 0.45, "sft": 0.7, "dpo": 0.85}
TASKS = {
    "classification": {
        "_target_": "clintune.tasks.classification.ClassificationTask",
        "name": "classification",
        "labels": ["yes", "no"],
    },
    "reasoning": {"_target_": "clintune.tasks.reasoning.ReasoningTask", "name": "reasoning"},
}
# Not on disk at all: a never-started job.
MISSING = {("m2", "reasoning", "sft", 2)}
# failure.json and no metrics.json.
FAILED = {("m2", "reasoning", "dpo", 1), ("m2", "reasoning", "dpo", 2)}
# Evaluated on other test examples, so every comparison with it must be refused.
OTHER_IDS = {("m2", "classification", "dpo", 1)}
RESAMPLES = 200


def _rows(model: str, task: str, method: str, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng([MODELS.index(model), len(task), METHODS.index(method), seed])
    rows = []
    for i in range(N):
        gold = "yes" if i % 2 == 0 else "no"
        correct = bool(rng.random() < SKILL[method])
        other = "no" if gold == "yes" else "yes"
        prefix = "other" if (model, task, method, seed) in OTHER_IDS else task
        rows.append(
            {
                "id": f"{prefix}-{i:03d}",
                "output": gold if correct else other,
                "prediction": gold if correct else other,
                "target": gold,
                "correct": correct,
            }
        )
    return rows


def _metrics(task: str, method: str, rows: list[dict[str, Any]], seed: int) -> dict[str, float]:
    accuracy = float(np.mean([r["correct"] for r in rows]))
    metrics = {
        "test/accuracy": accuracy,
        "test/accuracy_ci_low": accuracy - 0.1,
        "test/accuracy_ci_high": accuracy + 0.1,
        "test/accuracy_n": float(N),
        "test/n": float(N),
        "test/unparseable": 0.0,
        "compute/peak_memory_bytes": 2.0**30,
    }
    if task == "classification":
        f1 = accuracy - 0.01  # its own value; the table only averages it
        metrics |= {
            "test/f1_macro": f1,
            "test/f1_macro_ci_low": f1 - 0.1,
            "test/f1_macro_ci_high": f1 + 0.1,
            "test/f1_macro_n": float(N),
            "test/f1_class_yes": 0.5,
        }
    else:
        metrics["test/n_correct"] = accuracy * N
    if method in ("sft", "dpo"):
        sft = {"train_seconds": 100.0 * seed, "tokens": 1000.0, "flops_estimate": 6e9 * seed}
        metrics |= {f"compute/sft/{k}": v for k, v in sft.items()}
        metrics |= {f"compute/{k}": v for k, v in sft.items()}
        metrics["compute/sft/reused"] = 0.0
    if method == "dpo":
        dpo = {"train_seconds": 250.0 * seed, "tokens": 3000.0, "flops_estimate": 1.5e10 * seed}
        metrics |= {f"compute/dpo/{k}": v for k, v in dpo.items()}
        metrics |= {f"compute/{k}": sft[k] + v for k, v in dpo.items()}
        metrics["compute/sft/reused"] = 1.0  # method=sft trained it first
    return metrics


def make_sweep(root: Path) -> Path:
    sweep = root / "multirun" / "grid"
    for model in MODELS:
        for task, task_cfg in TASKS.items():
            for method in METHODS:
                for seed in SEEDS:
                    key = (model, task, method, seed)
                    if key in MISSING:
                        continue
                    run = sweep / f"{model}-{task}-{method}-s{seed}"
                    (run / ".hydra").mkdir(parents=True)
                    config = {
                        "model": {"name": model},
                        "task": task_cfg,
                        "method": {"name": method},
                        "seed": seed,
                        "sweep": {"name": "grid"},
                        "logger": {"group": "${sweep.name}"},
                    }
                    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
                    if key in FAILED:
                        failure = {"error": "FloatingPointError", "message": "loss is nan"}
                        (run / "failure.json").write_text(json.dumps(failure))
                        (run / "job.json").write_text(json.dumps({"status": "failed"}))
                        continue
                    rows = _rows(*key)
                    lines = "".join(json.dumps(r) + "\n" for r in rows)
                    (run / "predictions.jsonl").write_text(lines)
                    metrics = _metrics(task, method, rows, seed)
                    (run / "metrics.json").write_text(json.dumps(metrics))
                    (run / "job.json").write_text(json.dumps({"status": "finished"}))
    return sweep


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sweep(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def report(sweep: Path) -> Report:
    return build_report(collect_dirs([sweep]), n_resamples=RESAMPLES)


def _metric(path: Path, key: str) -> float:
    return json.loads((path / "metrics.json").read_text())[key]


def test_rows_are_task_metrics_headline_first(report: Report) -> None:
    assert report.metrics == {
        "classification": ["f1_macro", "accuracy"],
        "reasoning": ["accuracy"],
    }
    assert report.methods == ["base", "sft", "dpo"]
    assert report.models == ["m1", "m2"]


def test_mean_and_t_interval_over_seeds(report: Report, sweep: Path) -> None:
    values = [_metric(sweep / f"m1-classification-sft-s{s}", "test/accuracy") for s in SEEDS]
    cell = report.cell("classification", "accuracy", "m1", "sft")
    low, high = stats.t.interval(0.95, 1, loc=np.mean(values), scale=stats.sem(values))
    assert cell.ci_kind == "t" and cell.seeds == [1, 2]
    assert cell.mean == pytest.approx(np.mean(values))
    assert (cell.ci_low, cell.ci_high) == (pytest.approx(low), pytest.approx(high))


def test_single_seed_uses_the_runs_bootstrap_ci(report: Report, sweep: Path) -> None:
    cell = report.cell("reasoning", "accuracy", "m2", "sft")
    value = _metric(sweep / "m2-reasoning-sft-s1", "test/accuracy")
    assert cell.ci_kind == "bootstrap" and cell.seeds == [1]
    expected = (value, value - 0.1, value + 0.1)
    assert (cell.mean, cell.ci_low, cell.ci_high) == pytest.approx(expected)
    assert cell.gap_text == "missing (s2)"


def test_failed_and_missing_are_gaps_with_reasons(report: Report, sweep: Path) -> None:
    failed = report.cell("reasoning", "accuracy", "m2", "dpo")
    assert failed.is_gap and failed.mean is None
    assert failed.gap_text == "failed: FloatingPointError (s1, s2)"
    out = sweep.parent / "out-gaps"
    write_report(report, out, {"finished": 1})
    markdown = (out / "report.md").read_text()
    assert "— (failed: FloatingPointError (s1, s2))" in markdown
    assert "missing (s2)" in markdown
    rows = (out / "comparison.csv").read_text().splitlines()
    gap_row = next(r for r in rows if r.startswith("reasoning,accuracy,1,m2,dpo,"))
    assert gap_row.split(",")[5:8] == ["", "", ""]  # no mean, no CI: never a zero


def _pooled(model: str, task: str, method: str) -> list[dict[str, Any]]:
    return [{**r, "id": f"s{s}:{r['id']}"} for s in SEEDS for r in _rows(model, task, method, s)]


def test_mcnemar_p_value_matches_statsmodels(report: Report) -> None:
    comparison = next(
        c
        for c in report.comparisons
        if (c.task, c.metric, c.model, c.control, c.treatment)
        == ("classification", "accuracy", "m1", "sft", "dpo")
    )
    a = np.array([r["correct"] for r in _pooled("m1", "classification", "sft")])
    b = np.array([r["correct"] for r in _pooled("m1", "classification", "dpo")])
    table = [[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]]
    assert comparison.status == "ok" and comparison.test == "McNemar exact"
    assert comparison.n == 2 * N and comparison.seeds == [1, 2]
    assert comparison.p_value == pytest.approx(mcnemar(table, exact=True).pvalue)
    assert comparison.effect == pytest.approx(b.mean() - a.mean())


def test_headline_table_has_one_row_per_task_and_model_with_dpo_vs_sft(
    report: Report, sweep: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    header, rows = headline_rows(report)
    assert header[:6] == ["task", "metric", "model", "base", "sft", "dpo"]
    assert header[6:] == ["dpo − sft (P (Holm))"]  # no dpo_on_policy runs: no pair-source column
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (task, metric, model)
        for task, metric in (("classification", "f1_macro"), ("reasoning", "accuracy"))
        for model in ("m1", "m2")
    ]
    for row in rows:
        task, metric, model = row[:3]
        assert row[3:6] == [cell_text(report.cell(task, metric, model, m)) for m in header[3:6]]
        test = next(
            c
            for c in report.comparisons
            if (c.task, c.metric, c.model, c.control, c.treatment)
            == (task, metric, model, "sft", "dpo")
        )
        if test.effect is not None:
            assert row[6] == f"{test.effect:+.3f} ({fmt_p(test.p_adjusted)})"
    assert (
        main([str(sweep), "--headline", "--resamples", "50", "--out", str(sweep.parent / "h")]) == 0
    )
    printed = capsys.readouterr().out
    assert "| classification | f1_macro | m1 |" in printed
    assert "accuracy (headline)" not in printed  # the full table is not what --headline prints


def test_holm_across_the_whole_report(report: Report) -> None:
    done = [c for c in report.comparisons if c.status == "ok"]
    expected = multipletests([c.p_value for c in done], method="holm")[1]
    assert [c.p_adjusted for c in done] == pytest.approx(list(expected))
    assert any(c.p_adjusted > c.p_value for c in done)
    assert all(c.p_adjusted is None for c in report.comparisons if c.status != "ok")
    f1 = [c for c in done if c.metric == "f1_macro"]
    assert f1 and all(c.test.startswith("paired permutation on macro-F1") for c in f1)


def test_runs_on_different_test_ids_are_refused(report: Report) -> None:
    refused = [
        c
        for c in report.comparisons
        if c.task == "classification" and c.model == "m2" and "dpo" in (c.control, c.treatment)
    ]
    assert len(refused) == 4  # 2 metrics × (dpo vs sft, dpo vs base)
    for comparison in refused:
        assert comparison.status == "refused" and comparison.p_value is None
        assert "not on the same test examples" in comparison.note


def test_failed_runs_are_not_tested(report: Report) -> None:
    comparison = next(
        c
        for c in report.comparisons
        if (c.task, c.model, c.control, c.treatment) == ("reasoning", "m2", "sft", "dpo")
    )
    assert comparison.status == "not computed" and comparison.p_value is None


def test_compute_ratios(report: Report) -> None:
    rows = {(r.task, r.model, r.method): r for r in report.compute}
    dpo, sft = rows[("classification", "m1", "dpo")], rows[("classification", "m1", "sft")]
    sft_flops, sft_seconds = np.mean([6e9, 12e9]), np.mean([100.0, 200.0])
    assert sft.flops == pytest.approx(sft_flops)
    assert dpo.flops == pytest.approx(np.mean([21e9, 42e9]))
    assert dpo.flops_vs_sft == pytest.approx(np.mean([21e9, 42e9]) / sft_flops)
    assert dpo.seconds_vs_sft == pytest.approx(np.mean([350.0, 700.0]) / sft_seconds)
    assert dpo.dpo_stage_flops_vs_sft == pytest.approx(2.5)
    assert dpo.dpo_stage_seconds_vs_sft == pytest.approx(2.5)
    assert dpo.sft_reused == 2 and "reused" in dpo.note
    assert rows[("reasoning", "m2", "dpo")].flops is None  # failed: no figure, not a zero


def test_outputs_written(report: Report, sweep: Path) -> None:
    out = sweep.parent / "out"
    written = write_report(report, out, {"finished": 21, "failed": 2})
    names = {"report.md", "comparison.csv", "compute.csv", "significance.csv", "report.html"}
    names |= {"cost_effectiveness.csv", "cost_classification.png", "cost_reasoning.png"}
    names |= {"likelihood.csv"}
    assert set(written) == names
    assert {p.name for p in out.iterdir()} == names  # no temporary files left behind
    html = (out / "report.html").read_text()
    # Per task: the metric bars and the cost-effectiveness plot.
    assert html.count('src="data:image/png;base64,') == 4 and "<style>" in html
    assert "McNemar exact" in (out / "significance.csv").read_text()
    # The rule for classes without test examples is named wherever macro-F1 is shown.
    assert f"Macro-F1: {MACRO_F1_RULE}." in (out / "report.md").read_text()


def test_cli(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    options = ["--resamples", "50", "--correction", "none", "--methods", "sft,dpo"]
    result = subprocess.run(
        [sys.executable, "-m", "clintune.report", str(sweep), "--out", str(out), *options],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "| classification | f1_macro (headline) |" in result.stdout
    assert "m1 · base" not in result.stdout  # --methods left base out
    significance = (out / "significance.csv").read_text()
    assert "base" not in significance and ",none," in significance


class FakeRun:
    def __init__(self, name: str, state: str, summary: dict[str, Any]) -> None:
        model, task, method, seed = name.split("-")
        self.name, self.state, self.summary, self.group = name, state, summary, "grid"
        self.config = {
            "model": {"name": model},
            "task": {"name": task},
            "method": {"name": method},
            "seed": int(seed[1:]),
        }


class FakeApi:
    def __init__(self, runs: list[FakeRun]) -> None:
        self._runs = runs
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def runs(self, path: str, filters: dict[str, Any] | None = None) -> list[FakeRun]:
        self.calls.append((path, filters or {}))
        return self._runs


def test_wandb_runs(tmp_path: Path) -> None:
    summary = {"test/accuracy": 0.8, "test/accuracy_ci_low": 0.7, "test/accuracy_ci_high": 0.9}
    api = FakeApi(
        [
            FakeRun("m1-reasoning-sft-s1", "finished", summary),
            FakeRun("m1-reasoning-dpo-s1", "finished", {**summary, "test/accuracy": 0.9}),
            FakeRun("m1-reasoning-base-s1", "crashed", {}),
        ]
    )
    collection = collect_wandb("team/clintune:grid", api=api)
    assert api.calls == [("team/clintune", {"group": "grid"})]
    report = build_report(collection, n_resamples=RESAMPLES)
    assert report.cell("reasoning", "accuracy", "m1", "dpo").mean == pytest.approx(0.9)
    assert report.cell("reasoning", "accuracy", "m1", "base").gap_text.startswith("failed")
    tested = {c.label: c for c in report.comparisons}
    assert tested["dpo vs sft"].status == "no predictions"
    assert main(["--wandb", "team/clintune:grid", "--out", str(tmp_path)], wandb_api=api) == 0
    assert (tmp_path / "report.html").is_file()


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_html_renders_in_chromium(report: Report, tmp_path: Path) -> None:
    out = tmp_path / "html"
    write_report(report, out, {"finished": 21})
    profile = tmp_path / "profile"
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        (out / "report.html").as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    shutil.rmtree(profile, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    assert 'data-images-loaded="true"' in dom and 'data-image-count="4"' in dom
    assert "— (failed: FloatingPointError (s1, s2))" in dom
    assert "f1_macro (headline)" in dom and "McNemar exact" in dom


# ------------------------------------------------------------------ the gold answer's likelihood

CURVES = (
    "epoch,eval/loss,eval/rewards/chosen,eval/rewards/rejected,eval/rewards/margins,step\n"
    "0,0.6,-0.10,-0.50,0.40,100\n"
    ",,,,,150\n"  # a training-only row: blanks never overwrite a value
    "1,0.4,-0.32,-2.10,1.78,200\n"
)


def _preference_sweep(root: Path, methods: dict[str, dict[str, Any]]) -> Path:
    sweep = root / "likelihood"
    for method, config in methods.items():
        for seed in (1, 2):
            run = sweep / f"m-classification-{method}-s{seed}"
            (run / ".hydra").mkdir(parents=True)
            (run / "logs").mkdir()
            full = {
                "model": {"name": "m"},
                "task": TASKS["classification"],
                "method": {"name": method, **config},
                "seed": seed,
            }
            (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(full))
            curves = CURVES if seed == 1 else CURVES.replace("-0.32", "-0.12")
            (run / "logs" / "metrics.csv").write_text(curves)
            (run / "metrics.json").write_text(json.dumps({"test/accuracy": 0.5}))
            (run / "job.json").write_text(json.dumps({"status": "finished"}))
    return sweep


def test_likelihood_table_reads_the_last_validation_of_reference_methods(
    tmp_path: Path,
) -> None:
    sweep = _preference_sweep(
        tmp_path, {"dpo": {"reference": "precompute"}, "orpo": {"lambda_": 0.1}}
    )
    report = build_report(collect_dirs([sweep]), n_resamples=10)
    # ORPO's rewards have no reference in them: no row for it
    assert [(r.method, r.seeds) for r in report.likelihood] == [("dpo", [1, 2])]
    row = report.likelihood[0]
    assert row.rewards_chosen == pytest.approx((-0.32 - 0.12) / 2)
    assert row.rewards_rejected == pytest.approx(-2.10)
    assert row.rewards_margins == pytest.approx(1.78)
    assert row.displaced
    written = write_report(report, tmp_path / "out", {"finished": 4})
    text = written["report.md"].read_text()
    assert "## The gold answer's likelihood" in text
    assert "less likely than under the reference" in text
    csv_rows = written["likelihood.csv"].read_text().splitlines()
    assert csv_rows[1].startswith("classification,m,dpo,1 2,-0.22")


def test_a_method_left_out_of_a_task_reads_not_run(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path)
    for seed in SEEDS:  # the grid never ran DPO on m1's reasoning (as real_study has no on-policy)
        shutil.rmtree(sweep / f"m1-reasoning-dpo-s{seed}")
    left_out = build_report(collect_dirs([sweep]), n_resamples=RESAMPLES)
    cell = left_out.cell("reasoning", "accuracy", "m1", "dpo")
    assert cell.is_gap and cell.gap_text == "not run (s1, s2)"
    # one seed short is still "missing": runs that should be there and are not
    assert left_out.cell("reasoning", "accuracy", "m2", "sft").gap_text == "missing (s2)"
    write_report(left_out, tmp_path / "out", {"finished": 1})
    assert "— (not run (s1, s2))" in (tmp_path / "out" / "report.md").read_text()


def test_a_metric_scored_on_part_of_the_test_set_says_how_much(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path)
    for seed, scored in zip(SEEDS, (2, 5), strict=True):  # a judge that graded 2, then 5
        path = sweep / f"m1-reasoning-sft-s{seed}" / "metrics.json"
        metrics = json.loads(path.read_text())
        metrics |= {"test/likert_mean": 4.0, "test/likert_mean_n": float(scored)}
        path.write_text(json.dumps(metrics))
    partial = build_report(collect_dirs([sweep]), n_resamples=RESAMPLES)
    cell = partial.cell("reasoning", "likert_mean", "m1", "sft")
    assert (cell.scored, cell.examples) == (7.0, 2.0 * N)
    assert cell_text(cell).endswith(f"(scored 7 of {2 * N})")
    # fully scored metrics carry no such note
    accuracy = partial.cell("reasoning", "accuracy", "m1", "sft")
    assert not accuracy.partly_scored and "scored" not in cell_text(accuracy)
    write_report(partial, tmp_path / "out", {"finished": 1})
    assert (
        f"4.000 [4.000, 4.000]† (scored 7 of {2 * N})"
        in (tmp_path / "out" / "report.md").read_text()
    )
    comparison = (tmp_path / "out" / "comparison.csv").read_text().splitlines()
    assert any(
        row.startswith("reasoning,likert_mean,0,m1,sft,") and row.endswith(f",7.0,{2 * N}.0")
        for row in comparison
    )


def test_a_grade_no_example_has_in_both_runs_is_not_tested(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path)
    for method, grade in (("sft", None), ("dpo", 4)):  # a judge that graded nothing after SFT
        for seed in SEEDS:
            run = sweep / f"m1-reasoning-{method}-s{seed}"
            rows = [json.loads(line) for line in (run / "predictions.jsonl").open()]
            lines = "".join(json.dumps(row | {"likert": grade}) + "\n" for row in rows)
            (run / "predictions.jsonl").write_text(lines)
            metrics = json.loads((run / "metrics.json").read_text())
            metrics |= {
                "test/likert_mean": grade,
                "test/likert_mean_n": 0.0 if grade is None else N,
            }
            (run / "metrics.json").write_text(json.dumps(metrics))
    graded = build_report(collect_dirs([sweep]), n_resamples=RESAMPLES)
    (untested,) = [
        c
        for c in graded.comparisons
        if (c.task, c.metric, c.model, c.label) == ("reasoning", "likert_mean", "m1", "dpo vs sft")
    ]
    assert untested.status == "not computed" and untested.p_value is None
    assert untested.note == f"no example scored in both runs ({len(SEEDS) * N} left out)"
    assert untested.p_adjusted is None  # and not one of the tests Holm corrects for
