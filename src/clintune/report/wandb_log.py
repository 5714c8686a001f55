"""Optional: the report's numbers into W&B (a table in a run of the sweep's group) and a W&B
Report. Only numbers and names go: no gap reasons, error messages or example text."""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from typing import Any

from clintune.report.collect import RunRecord, parse_wandb_path
from clintune.report.table import Report

OFFLINE_MODES = {"offline", "disabled", "dryrun"}


def comparison_table_rows(report: Report) -> tuple[list[str], list[list[Any]]]:
    columns = ["task", "metric", "model", "method", "mean", "ci_low", "ci_high", "ci_kind"]
    columns += ["n_seeds", "n_expected_seeds", "gap"]
    data = [
        [
            c.task,
            c.metric,
            c.model,
            c.method,
            c.mean,
            c.ci_low,
            c.ci_high,
            c.ci_kind or "",
            c.n_seeds,
            len(c.expected_seeds),
            int(c.is_gap),
        ]
        for c in report.cells
    ]
    return columns, data


def significance_table_rows(report: Report) -> tuple[list[str], list[list[Any]]]:
    columns = ["task", "metric", "model", "control", "treatment", "test", "status", "n"]
    columns += ["effect", "p_value", "p_adjusted"]
    data = [
        [
            c.task,
            c.metric,
            c.model,
            c.control,
            c.treatment,
            c.test,
            c.status,
            c.n,
            c.effect,
            c.p_value,
            c.p_adjusted,
        ]
        for c in report.comparisons
    ]
    return columns, data


def log_report(report: Report, runs: list[RunRecord], wandb_spec: str | None) -> list[str]:
    """Log to W&B when online; returns what happened, one line each, for the console."""
    if not wandb_spec:
        return ["--log-to-wandb skipped: it needs --wandb ENTITY/PROJECT[:GROUP] (where to log)"]
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in OFFLINE_MODES:
        return [f"--log-to-wandb skipped: WANDB_MODE={mode} (W&B logging is online only)"]
    try:
        import wandb
    except ImportError:
        return ["--log-to-wandb skipped: wandb is not installed"]
    path, group = parse_wandb_path(wandb_spec)
    entity, project = path.split("/")
    groups = Counter(r.group for r in runs if r.group)
    group = group or (groups.most_common(1)[0][0] if groups else None)
    messages: list[str] = []
    try:
        run = wandb.init(
            entity=entity,
            project=project,
            group=group,
            job_type="report",
            name=f"report-{group}" if group else "report",
            mode="online",
        )
        columns, data = comparison_table_rows(report)
        sig_columns, sig_data = significance_table_rows(report)
        run.log(
            {
                "report/comparison": wandb.Table(columns=columns, data=data),
                "report/significance": wandb.Table(columns=sig_columns, data=sig_data),
            }
        )
        url = getattr(run, "url", None)
        run.finish()
        messages.append(f"Logged the comparison table to W&B run {url or run.id}")
    except Exception as error:  # network, auth: the report on disk is already complete
        return [f"--log-to-wandb failed: {type(error).__name__}: {error}"]
    messages.append(_wandb_report(entity, project, group, run))
    return messages


def _wandb_report(entity: str, project: str, group: str | None, run: Any) -> str:
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError:
        return "W&B Report skipped: wandb-workspaces is not installed (pip install it to build one)"
    try:
        runset = wr.Runset(entity=entity, project=project, name=group or "runs")
        if group:
            # The filter syntax differs across versions: without it, the project's runs show.
            with contextlib.suppress(Exception):
                runset = wr.Runset(
                    entity=entity, project=project, name=group, filters=f"Group == '{group}'"
                )
        report = wr.Report(
            entity=entity,
            project=project,
            title=f"clintune: {group or project}",
            description="Base vs SFT vs DPO: comparison table, significance, compute",
            blocks=[
                wr.H1("Comparison"),
                wr.PanelGrid(
                    runsets=[
                        wr.Runset(entity=entity, project=project, name="report", query=run.name)
                    ],
                    panels=[
                        wr.WeavePanelSummaryTable(table_name="report/comparison"),
                        wr.WeavePanelSummaryTable(table_name="report/significance"),
                    ],
                ),
                wr.H1("Runs"),
                wr.PanelGrid(runsets=[runset]),
            ],
        )
        report.save()
        return f"W&B Report saved: {getattr(report, 'url', '')}"
    except Exception as error:
        return f"W&B Report failed: {type(error).__name__}: {error}"
