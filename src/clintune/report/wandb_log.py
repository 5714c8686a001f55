"""Optional: the report's numbers into W&B (a table in a run of the sweep's group) and a W&B
Report. Only numbers and names go: no gap reasons, error messages or example text."""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from typing import Any

from clintune.report.collect import RunRecord, parse_wandb_path
from clintune.report.render import cost_figure_png
from clintune.report.table import Report, answer_sentence

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


def cost_table_rows(report: Report) -> tuple[list[str], list[list[Any]]]:
    """The cost-effectiveness table: numbers, names and fixed status words only."""
    columns = ["task", "model", "method", "metric", "mean", "ci_low", "ci_high"]
    for control in ("sft", "base"):
        columns += [f"gain_vs_{control}", f"gain_vs_{control}_ci_low"]
        columns += [f"gain_vs_{control}_ci_high", f"p_adjusted_vs_{control}"]
    columns += ["flops", "train_seconds", "gpu_hours", "flops_vs_sft", "extra_flops", "pareto"]
    data = []
    for r in report.cost_effect:
        row: list[Any] = [r.task, r.model, r.method, r.metric, r.mean, r.ci_low, r.ci_high]
        for test in (r.vs_sft, r.vs_base):
            ok = test is not None and test.status == "ok"
            row += (
                [test.effect, test.ci_low, test.ci_high, test.p_adjusted]  # type: ignore[union-attr]
                if ok
                else [None, None, None, None]
            )
        row += [r.flops, r.seconds, r.gpu_hours, r.flops_vs_sft, r.extra_flops, int(r.pareto)]
        data.append(row)
    return columns, data


def _cost_images(report: Report, wandb: Any) -> dict[str, Any]:
    """The cost plots as W&B images (only where the module can make them)."""
    if not hasattr(wandb, "Image"):
        return {}
    import io

    from PIL import Image

    tasks = dict.fromkeys(r.task for r in report.cost_effect)
    return {
        f"report/cost_plot/{task}": wandb.Image(
            Image.open(io.BytesIO(cost_figure_png(report, task)))
        )
        for task in tasks
    }


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
        cost_columns, cost_data = cost_table_rows(report)
        run.log(
            {
                "report/comparison": wandb.Table(columns=columns, data=data),
                "report/significance": wandb.Table(columns=sig_columns, data=sig_data),
                "report/cost_effectiveness": wandb.Table(columns=cost_columns, data=cost_data),
                **_cost_images(report, wandb),
            }
        )
        url = getattr(run, "url", None)
        run.finish()
        messages.append(f"Logged the comparison table to W&B run {url or run.id}")
    except Exception as error:  # network, auth: the report on disk is already complete
        return [f"--log-to-wandb failed: {type(error).__name__}: {error}"]
    messages.append(_wandb_report(entity, project, group, run, report))
    return messages


def _wandb_report(entity: str, project: str, group: str | None, run: Any, summary: Report) -> str:
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
        this_run = [wr.Runset(entity=entity, project=project, name="report", query=run.name)]
        cost_panels: list[Any] = [wr.WeavePanelSummaryTable(table_name="report/cost_effectiveness")]
        with contextlib.suppress(Exception):  # the media panel's arguments vary by version
            tasks = dict.fromkeys(r.task for r in summary.cost_effect)
            cost_panels.append(
                wr.MediaBrowser(media_keys=[f"report/cost_plot/{task}" for task in tasks])
            )
        report = wr.Report(
            entity=entity,
            project=project,
            title=f"clintune: {group or project}",
            description="Base vs SFT vs DPO and the other preference methods: the answer, "
            "cost-effectiveness, comparison table, significance, compute",
            blocks=[
                wr.P(answer_sentence(summary)),
                wr.H1("Cost-effectiveness"),
                wr.PanelGrid(runsets=this_run, panels=cost_panels),
                wr.H1("Comparison"),
                wr.PanelGrid(
                    runsets=this_run,
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
