"""--log-to-wandb (clintune.report.wandb_log): the branches that skip without touching W&B, and
the tables and the run it would log, against a stand-in ``wandb`` module (no network)."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest

from clintune.report.collect import RunRecord
from clintune.report.table import Cell, Comparison, Report
from clintune.report.wandb_log import comparison_table_rows, log_report, significance_table_rows

# Text that must never leave the machine: gap reasons, error messages, notes.
PRIVATE = ("failed: FloatingPointError", "loss is nan at step 3", "seeds without a finished pair")


def _report() -> Report:
    finished = Cell("classification", "f1_macro", "m1", "dpo", 0.8, 0.7, 0.9, "t", [1, 2], [1, 2])
    gap = Cell(
        "classification",
        "f1_macro",
        "m1",
        "sft",
        expected_seeds=[1, 2],
        gaps={f"{PRIVATE[0]} ({PRIVATE[1]})": [1, 2]},
    )
    tested = Comparison(
        "classification",
        "f1_macro",
        "m1",
        "sft",
        "dpo",
        status="ok",
        test="paired permutation on macro-F1",
        seeds=[1, 2],
        n=60,
        n_dropped=0,
        statistic=0.1,
        effect=0.1,
        p_value=0.01,
        p_adjusted=0.03,
        note=PRIVATE[2],
    )
    refused = Comparison(
        "classification", "f1_macro", "m1", "base", "dpo", status="refused", note=PRIVATE[1]
    )
    return Report(
        tasks=["classification"],
        models=["m1"],
        methods=["sft", "dpo"],
        seeds=[1, 2],
        metrics={"classification": ["f1_macro"]},
        cells=[finished, gap],
        comparisons=[tested, refused],
        compute=[],
        correction="holm",
        n_resamples=100,
    )


def _runs(*groups: str | None) -> list[RunRecord]:
    return [
        RunRecord("m1", "classification", "dpo", seed, "finished", group=group)
        for seed, group in enumerate(groups)
    ]


class FakeTable:
    def __init__(self, columns: list[str], data: list[list[Any]]) -> None:
        self.columns, self.data = columns, data


class FakeRun:
    id, name, url = "abc123", "report-grid", "https://wandb.example/team/clintune/runs/abc123"

    def __init__(self) -> None:
        self.logged: list[dict[str, Any]] = []
        self.finished = False

    def log(self, data: dict[str, Any]) -> None:
        self.logged.append(data)

    def finish(self) -> None:
        self.finished = True


class FakeWandb(types.ModuleType):
    """What log_report uses of ``wandb``: init() and Table."""

    Table = FakeTable

    def __init__(self, init_error: Exception | None = None) -> None:
        super().__init__("wandb")
        self.init_calls: list[dict[str, Any]] = []
        self.runs: list[FakeRun] = []
        self.init_error = init_error

    def init(self, **kwargs: Any) -> FakeRun:
        self.init_calls.append(kwargs)
        if self.init_error is not None:
            raise self.init_error
        self.runs.append(FakeRun())
        return self.runs[-1]


@pytest.fixture
def fake_wandb(monkeypatch: pytest.MonkeyPatch) -> FakeWandb:
    module = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.setenv("WANDB_MODE", "online")
    # Not installed here; an installed one must not be reached either.
    monkeypatch.setitem(sys.modules, "wandb_workspaces", None)
    monkeypatch.setitem(sys.modules, "wandb_workspaces.reports", None)
    monkeypatch.setitem(sys.modules, "wandb_workspaces.reports.v2", None)
    return module


# ------------------------------------------------------------------ skipped: nothing is sent


def test_without_a_wandb_path_it_skips_and_says_why(fake_wandb: FakeWandb) -> None:
    for spec in (None, ""):
        messages = log_report(_report(), _runs("grid"), spec)
        assert messages == [
            "--log-to-wandb skipped: it needs --wandb ENTITY/PROJECT[:GROUP] (where to log)"
        ]
    assert fake_wandb.init_calls == []


@pytest.mark.parametrize("mode", ["offline", "disabled", "dryrun", "OFFLINE"])
def test_offline_modes_skip_without_starting_a_run(
    fake_wandb: FakeWandb, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    monkeypatch.setenv("WANDB_MODE", mode)
    messages = log_report(_report(), _runs("grid"), "team/clintune:grid")
    assert messages == [
        f"--log-to-wandb skipped: WANDB_MODE={mode.lower()} (W&B logging is online only)"
    ]
    assert fake_wandb.init_calls == []


def test_without_wandb_installed_it_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    messages = log_report(_report(), _runs("grid"), "team/clintune:grid")
    assert messages == ["--log-to-wandb skipped: wandb is not installed"]


# ------------------------------------------------------------------ the tables


def test_comparison_table_has_numbers_and_names_only() -> None:
    columns, data = comparison_table_rows(_report())
    rows = [dict(zip(columns, row, strict=True)) for row in data]
    assert rows == [
        {
            "task": "classification",
            "metric": "f1_macro",
            "model": "m1",
            "method": "dpo",
            "mean": 0.8,
            "ci_low": 0.7,
            "ci_high": 0.9,
            "ci_kind": "t",
            "n_seeds": 2,
            "n_expected_seeds": 2,
            "gap": 0,
        },
        {
            "task": "classification",
            "metric": "f1_macro",
            "model": "m1",
            "method": "sft",
            "mean": None,  # a gap stays empty, never a zero
            "ci_low": None,
            "ci_high": None,
            "ci_kind": "",
            "n_seeds": 0,
            "n_expected_seeds": 2,
            "gap": 1,  # flagged, without its reason
        },
    ]


def test_significance_table_has_numbers_and_names_only() -> None:
    columns, data = significance_table_rows(_report())
    rows = [dict(zip(columns, row, strict=True)) for row in data]
    assert [(r["control"], r["treatment"], r["status"]) for r in rows] == [
        ("sft", "dpo", "ok"),
        ("base", "dpo", "refused"),
    ]
    assert rows[0] == {
        "task": "classification",
        "metric": "f1_macro",
        "model": "m1",
        "control": "sft",
        "treatment": "dpo",
        "test": "paired permutation on macro-F1",
        "status": "ok",
        "n": 60,
        "effect": 0.1,
        "p_value": 0.01,
        "p_adjusted": 0.03,
    }
    assert rows[1]["p_value"] is None and rows[1]["p_adjusted"] is None


# ------------------------------------------------------------------ online, with a stand-in


def _all_text(tables: list[FakeTable]) -> str:
    return repr([(table.columns, table.data) for table in tables])


def test_online_logs_both_tables_into_a_report_run_of_the_group(fake_wandb: FakeWandb) -> None:
    report = _report()
    messages = log_report(report, _runs("grid"), "team/clintune:grid")
    assert fake_wandb.init_calls == [
        {
            "entity": "team",
            "project": "clintune",
            "group": "grid",
            "job_type": "report",
            "name": "report-grid",
            "mode": "online",
        }
    ]
    (run,) = fake_wandb.runs
    assert run.finished
    (logged,) = run.logged
    assert set(logged) == {
        "report/comparison",
        "report/significance",
        "report/cost_effectiveness",
    }  # the stand-in has no Image: no cost plots
    comparison, significance = logged["report/comparison"], logged["report/significance"]
    assert (comparison.columns, comparison.data) == comparison_table_rows(report)
    assert (significance.columns, significance.data) == significance_table_rows(report)
    sent = _all_text([comparison, significance])
    assert not [text for text in PRIVATE if text in sent]
    assert messages == [
        f"Logged the comparison table to W&B run {FakeRun.url}",
        "W&B Report skipped: wandb-workspaces is not installed (pip install it to build one)",
    ]


def test_without_a_group_in_the_path_it_takes_the_runs_most_common_group(
    fake_wandb: FakeWandb,
) -> None:
    log_report(_report(), _runs("grid", None, "other", "grid"), "team/clintune")
    assert fake_wandb.init_calls[0]["group"] == "grid"
    assert fake_wandb.init_calls[0]["name"] == "report-grid"
    log_report(_report(), _runs(None), "team/clintune")
    assert fake_wandb.init_calls[1]["group"] is None
    assert fake_wandb.init_calls[1]["name"] == "report"


def test_a_failing_wandb_is_a_message_not_a_crash(
    fake_wandb: FakeWandb, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fake_wandb, "init_error", ConnectionError("no route to api.wandb.ai"))
    messages = log_report(_report(), _runs("grid"), "team/clintune:grid")
    assert messages == ["--log-to-wandb failed: ConnectionError: no route to api.wandb.ai"]


def test_a_bad_wandb_path_is_refused_before_anything_is_sent(fake_wandb: FakeWandb) -> None:
    with pytest.raises(ValueError, match="ENTITY/PROJECT"):
        log_report(_report(), _runs("grid"), "no-project")
    assert fake_wandb.init_calls == []
