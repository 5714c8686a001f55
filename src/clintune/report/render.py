"""The report on disk: markdown, CSVs and one self-contained HTML page with its plots."""

from __future__ import annotations

import base64
import csv
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clintune.eval.metrics import MACRO_F1_RULE
from clintune.io import write_atomic
from clintune.report.table import (
    Cell,
    Comparison,
    ComputeRow,
    CostEffect,
    Report,
    answer_sentence,
)

CI_NOTE = {
    "t": "t-interval over seeds (scipy.stats.t, n − 1 df)",
    "bootstrap": "one seed: that run's percentile bootstrap CI over test examples (metrics.json)",
}
CI_MARK = {"t": "†", "bootstrap": "‡"}
METHOD_COLORS = {
    "base": "#9e9e9e",
    "sft": "#1f77b4",
    "dpo": "#d62728",
    "dpo_on_policy": "#e377c2",
    "dpo_only": "#ff7f0e",
    "rpo": "#8c564b",
    "orpo": "#2ca02c",
    "simpo": "#9467bd",
    "kto": "#17becf",
}


# --------------------------------------------------------------------------- formatting


def fmt_value(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def fmt_p(value: float | None) -> str:
    if value is None or value != value:
        return ""
    return f"{value:.3f}" if value >= 0.001 else f"{value:.1e}"


def fmt_big(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.2e}"


def fmt_bytes(value: float | None) -> str:
    return "" if value is None else f"{value / 2**30:.2f} GiB"


def fmt_ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}×"


def cell_text(cell: Cell) -> str:
    """``mean [low, high]†`` for a value; ``— (reason)`` for a gap, never a zero."""
    if cell.is_gap:
        return f"— ({cell.gap_text or 'no runs'})"
    text = fmt_value(cell.mean)
    if cell.ci_low is not None and cell.ci_high is not None:
        text += f" [{fmt_value(cell.ci_low)}, {fmt_value(cell.ci_high)}]"
    text += CI_MARK.get(cell.ci_kind or "", "")
    if cell.partly_scored:
        text += f" (scored {cell.scored:.0f} of {cell.examples:.0f})"
    if cell.gaps:
        text += f" ({cell.n_seeds}/{len(cell.expected_seeds)} seeds)"
    return text


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _column_names(report: Report) -> list[tuple[str, str]]:
    return [(model, method) for model in report.models for method in report.methods]


def _row_label(report: Report, task: str, metric: str) -> str:
    headline = report.metrics[task] and report.metrics[task][0] == metric
    return f"{metric} (headline)" if headline else metric


# --------------------------------------------------------------------------- rows for tables


def comparison_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    header = ["task", "metric", *(f"{model} · {method}" for model, method in _column_names(report))]
    rows = []
    for task in report.tasks:
        for metric in report.metrics[task]:
            rows.append(
                [
                    task,
                    _row_label(report, task, metric),
                    *(
                        cell_text(report.cell(task, metric, model, method))
                        for model, method in _column_names(report)
                    ),
                ]
            )
    return header, rows


#: The comparisons the headline table shows beside its cells: the study's question, then the
#: pair-source axis.
HEADLINE_TESTS = (("sft", "dpo"), ("dpo", "dpo_on_policy"))


def headline_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    """One row per task × model: the headline metric of every method, then each of
    ``HEADLINE_TESTS`` present as its effect and adjusted P value."""
    tests = [(c, t) for c, t in HEADLINE_TESTS if c in report.methods and t in report.methods]
    p_name = "P (Holm)" if report.correction == "holm" else "P"
    header = ["task", "metric", "model", *report.methods]
    header += [f"{treatment} − {control} ({p_name})" for control, treatment in tests]
    by_key = {(c.task, c.metric, c.model, c.control, c.treatment): c for c in report.comparisons}
    rows = []
    for task in report.tasks:
        if not report.metrics[task]:
            continue
        metric = report.metrics[task][0]
        for model in report.models:
            row = [task, metric, model]
            row += [cell_text(report.cell(task, metric, model, m)) for m in report.methods]
            for control, treatment in tests:
                comparison = by_key.get((task, metric, model, control, treatment))
                if comparison is None or comparison.effect is None:
                    row.append("—" if comparison is None else f"— ({comparison.status})")
                else:
                    row.append(f"{comparison.effect:+.3f} ({fmt_p(comparison.p_adjusted)})")
            rows.append(row)
    return header, rows


def headline_markdown(report: Report) -> str:
    notes = "\n".join(f"{n}  " for n in _footnotes(report))
    return _md_table(*headline_rows(report)) + "\n\n" + notes


def significance_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    adjusted = "P (Holm)" if report.correction == "holm" else "P (uncorrected)"
    header = ["task", "metric", "model", "comparison", "test", "seeds", "n", "effect", "P"]
    header += [adjusted, "status"]
    rows = []
    for c in report.comparisons:
        status = c.status if not c.note else f"{c.status}: {c.note}"
        rows.append(
            [
                c.task,
                c.metric,
                c.model,
                c.label,
                c.test,
                ", ".join(f"s{s}" for s in c.seeds),
                "" if c.n is None else str(c.n) + (f" (−{c.n_dropped})" if c.n_dropped else ""),
                "" if c.effect is None else f"{c.effect:+.3f}",
                fmt_p(c.p_value),
                fmt_p(c.p_adjusted),
                status,
            ]
        )
    return header, rows


def compute_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    header = [
        "task",
        "model",
        "method",
        "seeds",
        "train s",
        "tokens",
        "FLOPs (est.)",
        "peak memory",
        "FLOPs vs SFT",
        "time vs SFT",
        "DPO stage FLOPs vs SFT",
        "DPO stage time vs SFT",
        "note",
    ]
    rows = [
        [
            r.task,
            r.model,
            r.method,
            str(len(r.seeds)),
            fmt_big(r.train_seconds),
            fmt_big(r.tokens),
            fmt_big(r.flops),
            fmt_bytes(r.peak_memory_bytes),
            fmt_ratio(r.flops_vs_sft),
            fmt_ratio(r.seconds_vs_sft),
            fmt_ratio(r.dpo_stage_flops_vs_sft),
            fmt_ratio(r.dpo_stage_seconds_vs_sft),
            r.note,
        ]
        for r in report.compute
    ]
    return header, rows


def _gain_text(comparison: Comparison | None) -> str:
    if comparison is None:
        return ""
    if comparison.status != "ok" or comparison.effect is None:
        return f"— ({comparison.status})"
    text = f"{comparison.effect:+.3f}"
    if comparison.ci_low is not None and comparison.ci_high is not None:
        text += f" [{comparison.ci_low:+.3f}, {comparison.ci_high:+.3f}]"
    return text


def _headline_text(row: CostEffect) -> str:
    if row.mean is None:
        return "—"
    text = fmt_value(row.mean)
    if row.ci_low is not None and row.ci_high is not None:
        text += f" [{fmt_value(row.ci_low)}, {fmt_value(row.ci_high)}]"
    return text


def _p_of(comparison: Comparison | None) -> str:
    return fmt_p(comparison.p_adjusted) if comparison is not None else ""


def cost_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    p_name = "P (Holm)" if report.correction == "holm" else "P"
    header = [
        "task",
        "model",
        "method",
        "headline [95% CI]",
        "gain vs SFT [95% CI]",
        f"{p_name} vs SFT",
        "gain vs base [95% CI]",
        f"{p_name} vs base",
        "train FLOPs",
        "FLOPs vs SFT",
        "extra FLOPs",
        "train s",
        "time vs SFT",
        "GPU-h",
        "Pareto",
    ]
    rows = [
        [
            r.task,
            r.model,
            r.method,
            f"{r.metric}: {_headline_text(r)}",
            _gain_text(r.vs_sft),
            _p_of(r.vs_sft),
            _gain_text(r.vs_base),
            _p_of(r.vs_base),
            fmt_big(r.flops),
            fmt_ratio(r.flops_vs_sft),
            fmt_big(r.extra_flops),
            fmt_big(r.seconds),
            fmt_ratio(r.seconds_vs_sft),
            "0" if r.method == "base" and r.gpu_hours == 0 else _gpu_hours_text(r.gpu_hours),
            "yes" if r.pareto else "",
        ]
        for r in report.cost_effect
    ]
    return header, rows


def _gpu_hours_text(value: float | None) -> str:
    if value is None:
        return ""
    return "— (CPU)" if value == 0 else f"{value:.3g}"


COST_NOTE = (
    "Gains are the treatment's headline metric minus the control's on the same test examples "
    "(seeds pooled), with a paired percentile-bootstrap 95% CI over examples and the paired "
    "test's P, corrected with the rest of the report. Compute is training only (SFT stage "
    "included where the method has one; base trains nothing), FLOPs estimated as in "
    "docs/methods.md; GPU-hours = stage seconds × GPUs, shown where a GPU was used. Pareto: "
    "no other method of that task and model reaches as high a headline metric for as few FLOPs."
)


def _footnotes(report: Report) -> list[str]:
    kinds = sorted({c.ci_kind for c in report.cells if c.ci_kind})
    notes = [f"{CI_MARK[k]} 95% CI: {CI_NOTE[k]}." for k in kinds]
    notes.append(
        "Cells are means over seeds; a gap (—) gives its reason and is never counted as zero."
    )
    if any(cell.metric.endswith("f1_macro") for cell in report.cells):
        notes.append(f"Macro-F1: {MACRO_F1_RULE}.")
    if report.correction == "holm":
        tests = sum(c.status == "ok" for c in report.comparisons)
        notes.append(
            "P values are two-sided and paired on seed-matched runs (seeds pooled, examples "
            f"paired by id); Holm's correction across all {tests} tests of this report."
        )
    else:
        notes.append("P values are two-sided, paired, and not corrected for multiple tests.")
    return notes


def _partial_gaps(report: Report) -> list[str]:
    seen: set[tuple[str, str, str]] = set()
    lines = []
    for cell in report.cells:
        key = (cell.task, cell.model, cell.method)
        if cell.gaps and not cell.is_gap and key not in seen:
            seen.add(key)
            lines.append(f"{cell.task} · {cell.model} · {cell.method}: {cell.gap_text}")
    return lines


# --------------------------------------------------------------------------- markdown


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(_md_escape(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_line(report: Report, n_runs: dict[str, int]) -> str:
    parts = ", ".join(f"{count} {status}" for status, count in n_runs.items())
    return (
        f"{sum(n_runs.values())} runs ({parts}); models {', '.join(report.models)}; "
        f"methods {', '.join(report.methods)}; seeds "
        f"{', '.join('?' if s is None else str(s) for s in report.seeds)}."
    )


def comparison_markdown(report: Report) -> str:
    header, rows = comparison_rows(report)
    return _md_table(header, rows) + "\n\n" + "\n".join(f"{n}  " for n in _footnotes(report))


def cost_figure_name(task: str) -> str:
    """The cost plot's file beside report.md (task names are config names: safe in a path)."""
    return f"cost_{task}.png"


def to_markdown(report: Report, n_runs: dict[str, int]) -> str:
    out = ["# clintune report", "", f"**{answer_sentence(report)}**", ""]
    out += [summary_line(report, n_runs), ""]
    out += ["## Headline", "", headline_markdown(report), ""]
    out += ["## Comparison", "", comparison_markdown(report), ""]
    partial = _partial_gaps(report)
    if partial:
        out += ["Seeds left out of a mean:", "", *(f"- {_md_escape(p)}" for p in partial), ""]
    out += ["## Significance", "", _md_table(*significance_rows(report)), ""]
    if report.likelihood:
        out += ["## The gold answer's likelihood", "", _md_table(*likelihood_rows_text(report))]
        out += ["", LIKELIHOOD_NOTE, ""]
    if report.cost_effect:
        out += ["## Cost-effectiveness", "", _md_table(*cost_rows(report)), ""]
        out += [COST_NOTE, ""]
        for task in dict.fromkeys(r.task for r in report.cost_effect):
            out += [f"![{task}: metric against FLOPs]({cost_figure_name(task)})", ""]
    out += ["## Compute", "", _md_table(*compute_rows(report)), ""]
    out += [
        "FLOPs vs SFT and time vs SFT: a preference method's total (its SFT stage included) "
        "over the sft runs'; DPO stage: its preference stage alone (DPO, ORPO, SimPO, KTO) "
        "over SFT.",
        "",
    ]
    if report.warnings:
        out += ["## Warnings", "", *(f"- {_md_escape(w)}" for w in report.warnings), ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- CSV


def _csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return buffer.getvalue()


def comparison_csv(report: Report) -> str:
    header = ["task", "metric", "headline", "model", "method", "mean", "ci_low", "ci_high"]
    header += ["ci_kind", "n_seeds", "seeds", "expected_seeds", "gap", "scored", "examples"]
    rows = [
        [
            c.task,
            c.metric,
            int(report.metrics[c.task][0] == c.metric),
            c.model,
            c.method,
            c.mean,
            c.ci_low,
            c.ci_high,
            c.ci_kind,
            c.n_seeds,
            " ".join(str(s) for s in c.seeds),
            " ".join(str(s) for s in c.expected_seeds),
            c.gap_text,
            c.scored,
            c.examples,
        ]
        for c in report.cells
    ]
    return _csv(header, rows)


def significance_csv(report: Report) -> str:
    header = ["task", "metric", "model", "control", "treatment", "test", "status", "seeds", "n"]
    header += ["n_dropped", "statistic", "effect", "p_value", "p_adjusted", "correction", "note"]
    rows = [
        [
            c.task,
            c.metric,
            c.model,
            c.control,
            c.treatment,
            c.test,
            c.status,
            " ".join(str(s) for s in c.seeds),
            c.n,
            c.n_dropped,
            c.statistic,
            c.effect,
            c.p_value,
            c.p_adjusted,
            report.correction,
            c.note,
        ]
        for c in report.comparisons
    ]
    return _csv(header, rows)


def compute_csv(report: Report) -> str:
    fields = list(ComputeRow.__dataclass_fields__)
    rows = []
    for row in report.compute:
        values = [getattr(row, name) for name in fields]
        values[fields.index("seeds")] = " ".join(str(s) for s in row.seeds)
        rows.append(values)
    return _csv(fields, rows)


LIKELIHOOD_NOTE = (
    "TRL's rewards at the last validation, mean over seeds: rewards/chosen = "
    "β·(log π − log π_ref) of the gold answers on the validation pairs, rewards/rejected the "
    "same for the rejected answers, margins their difference. rewards/chosen below zero: the "
    "method made the gold answer less likely than its reference (the SFT model) did "
    "(likelihood displacement), even where the margin grew; its probability mass went to "
    "answers in neither side of the pairs."
)


def likelihood_rows_text(report: Report) -> tuple[list[str], list[list[str]]]:
    header = [
        "task",
        "model",
        "method",
        "seeds",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "gold answer",
    ]
    rows = [
        [
            row.task,
            row.model,
            row.method,
            str(len(row.seeds)),
            fmt_value(row.rewards_chosen),
            fmt_value(row.rewards_rejected),
            fmt_value(row.rewards_margins),
            "less likely than under the reference" if row.displaced else "as or more likely",
        ]
        for row in report.likelihood
    ]
    return header, rows


def likelihood_csv(report: Report) -> str:
    header = [
        "task",
        "model",
        "method",
        "seeds",
        "rewards_chosen",
        "rewards_rejected",
        "rewards_margins",
        "logps_chosen",
        "displaced",
    ]
    rows = [
        [
            r.task,
            r.model,
            r.method,
            " ".join(str(seed) for seed in r.seeds),
            r.rewards_chosen,
            r.rewards_rejected,
            r.rewards_margins,
            r.logps_chosen,
            int(r.displaced),
        ]
        for r in report.likelihood
    ]
    return _csv(header, rows)


def _comparison_fields(comparison: Comparison | None) -> list[Any]:
    if comparison is None:
        return ["", None, None, None, None, None, ""]
    return [
        comparison.status,
        comparison.effect,
        comparison.ci_low,
        comparison.ci_high,
        comparison.p_value,
        comparison.p_adjusted,
        comparison.test,
    ]


def cost_csv(report: Report) -> str:
    header = ["task", "model", "method", "metric", "mean", "ci_low", "ci_high"]
    for control in ("sft", "base"):
        header += [
            f"status_vs_{control}",
            f"gain_vs_{control}",
            f"gain_vs_{control}_ci_low",
            f"gain_vs_{control}_ci_high",
            f"p_vs_{control}",
            f"p_adjusted_vs_{control}",
            f"test_vs_{control}",
        ]
    header += ["flops", "train_seconds", "gpu_hours", "flops_vs_sft", "seconds_vs_sft"]
    header += ["extra_flops", "extra_seconds", "extra_gpu_hours", "pareto", "correction"]
    rows = [
        [
            r.task,
            r.model,
            r.method,
            r.metric,
            r.mean,
            r.ci_low,
            r.ci_high,
            *_comparison_fields(r.vs_sft),
            *_comparison_fields(r.vs_base),
            r.flops,
            r.seconds,
            r.gpu_hours,
            r.flops_vs_sft,
            r.seconds_vs_sft,
            r.extra_flops,
            r.extra_seconds,
            r.extra_gpu_hours,
            int(r.pareto),
            report.correction,
        ]
        for r in report.cost_effect
    ]
    return _csv(header, rows)


# --------------------------------------------------------------------------- plots


def _short_gap(cell: Cell) -> str:
    reasons = [reason.split(":")[0] for reason in cell.gaps]
    return "/".join(dict.fromkeys(reasons)) or "no runs"


def task_figure_png(report: Report, task: str) -> bytes:
    """Grouped bars: model groups, one bar per method, CI whiskers; one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    metrics = report.metrics[task]
    ncols = min(3, len(metrics))
    nrows = -(-len(metrics) // ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(max(4.2 * ncols, 6.0), 3.2 * nrows + 0.6),
        squeeze=False,
        dpi=96,
        layout="constrained",
    )
    width = 0.8 / max(1, len(report.methods))
    for ax, metric in zip(axes.flat, metrics, strict=False):
        top = 0.0
        for position, method in enumerate(report.methods):
            xs, heights, low_err, high_err = [], [], [], []
            gaps: list[tuple[float, str]] = []
            for group, model in enumerate(report.models):
                x = group - 0.4 + width * (position + 0.5)
                cell = report.cell(task, metric, model, method)
                if cell.is_gap:
                    gaps.append((x, _short_gap(cell)))
                    continue
                assert cell.mean is not None
                xs.append(x)
                heights.append(cell.mean)
                low = cell.ci_low if cell.ci_low is not None else cell.mean
                high = cell.ci_high if cell.ci_high is not None else cell.mean
                low_err.append(max(0.0, cell.mean - low))
                high_err.append(max(0.0, high - cell.mean))
                top = max(top, high)
            ax.bar(
                xs,
                heights,
                width,
                yerr=[low_err, high_err],
                capsize=3,
                label=method,
                color=METHOD_COLORS.get(method, f"C{position}"),
                edgecolor="black",
                linewidth=0.5,
            )
            for x, label in gaps:  # a gap is labelled, never drawn as a zero-height bar
                ax.text(
                    x,
                    0.02,
                    label,
                    rotation=90,
                    ha="center",
                    va="bottom",
                    color="#b00020",
                    fontsize=8,
                    transform=ax.get_xaxis_transform(),
                )
        # Fixed limits: a group of gaps only draws text, which autoscaling would not include.
        ax.set_xlim(-0.5, len(report.models) - 0.5)
        ax.set_xticks(range(len(report.models)), report.models)
        ax.set_title(metric, fontsize=10)
        ax.set_ylim(0, max(1.0, top * 1.1) if top <= 1.0 else top * 1.15)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    # Built by hand: a method whose every cell is a gap draws no bar to take a legend from.
    handles = [
        Patch(facecolor=METHOD_COLORS.get(m, f"C{i}"), edgecolor="black", label=m)
        for i, m in enumerate(report.methods)
    ]
    fig.legend(
        handles=handles, loc="outside upper right", ncols=len(handles), fontsize=9, frameon=False
    )
    fig.suptitle(f"{task}: mean over seeds, 95% CI", fontsize=11, x=0.01, ha="left")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def cost_figure_png(report: Report, task: str) -> bytes:
    """Headline metric against training FLOPs, one panel per model: each method a point with
    its 95% CI whisker, the Pareto front joined and ringed; methods without a point named."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report.cost_effect if r.task == task]
    models = [m for m in report.models if any(r.model == m for r in rows)]
    fig, axes = plt.subplots(
        1,
        max(1, len(models)),
        figsize=(max(5.0 * len(models), 6.0), 4.2),
        squeeze=False,
        dpi=96,
        layout="constrained",
    )
    metric = rows[0].metric if rows else ""
    for ax, model in zip(axes.flat, models, strict=False):
        placed = [
            r for r in rows if r.model == model and r.mean is not None and r.flops is not None
        ]
        missing = [r.method for r in rows if r.model == model and r not in placed]
        for position, row in enumerate(placed):
            assert row.mean is not None and row.flops is not None
            low = row.ci_low if row.ci_low is not None else row.mean
            high = row.ci_high if row.ci_high is not None else row.mean
            color = METHOD_COLORS.get(row.method, f"C{position}")
            ax.errorbar(
                [row.flops],
                [row.mean],
                yerr=[[max(0.0, row.mean - low)], [max(0.0, high - row.mean)]],
                fmt="o",
                color=color,
                ecolor=color,
                capsize=4,
                markersize=7,
                label=row.method,
            )
            ax.annotate(
                row.method, (row.flops, row.mean), textcoords="offset points", xytext=(6, 4),
                fontsize=8,
            )  # fmt: skip
        front = sorted((r for r in placed if r.pareto), key=lambda r: r.flops or 0.0)
        if front:
            ax.plot(
                [r.flops for r in front],
                [r.mean for r in front],
                linestyle="--",
                color="black",
                linewidth=1,
                drawstyle="steps-post",
                label="Pareto front",
            )
            ax.scatter(
                [r.flops for r in front],
                [r.mean for r in front],
                s=180,
                facecolors="none",
                edgecolors="black",
                linewidths=1.2,
            )
        if missing:
            ax.text(
                0.01, 0.01, "no point: " + ", ".join(missing), transform=ax.transAxes,
                fontsize=8, color="#b00020", va="bottom",
            )  # fmt: skip
        ax.set_title(model, fontsize=10)
        ax.set_xlabel("training FLOPs (estimate; base = 0)")
        ax.set_ylabel(f"{metric} (mean, 95% CI)")
        ax.grid(alpha=0.3)
        if placed:
            ax.legend(fontsize=8, frameon=False, loc="best")
    fig.suptitle(f"{task}: headline metric against training compute", fontsize=11, x=0.01,
                 ha="left")  # fmt: skip
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


# --------------------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem;color:#222;
max-width:1400px}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}
th,td{border:1px solid #ccc;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f3f5f7;position:sticky;top:0}
tr:nth-child(even) td{background:#fafbfc}
td.gap{color:#b00020;font-style:italic}td.num{font-variant-numeric:tabular-nums;
white-space:nowrap}
td.sig{font-weight:600}td.refused{color:#b00020}
.note{color:#555;font-size:.8rem}figure{margin:1rem 0}figure img{max-width:100%;
border:1px solid #eee}
"""

# Tells a headless browser (and the test) that every embedded plot decoded.
IMAGES_SCRIPT = """
<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.every(function (i) { return i.complete && i.naturalWidth > 0; });
  document.body.dataset.imagesLoaded = ok ? 'true' : 'false';
  document.body.dataset.imageCount = String(imgs.length);
});
</script>
"""


def _html_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], classes: Sequence[Sequence[str]] | None
) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for r, row in enumerate(rows):
        cells = []
        for c, value in enumerate(row):
            css = classes[r][c] if classes else ""
            attr = f' class="{css}"' if css else ""
            cells.append(f"<td{attr}>{html.escape(value)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _figure_html(name: str, png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def to_html(
    report: Report,
    n_runs: dict[str, int],
    figures: dict[str, bytes],
    cost_figures: dict[str, bytes] | None = None,
) -> str:
    header, rows = comparison_rows(report)
    classes = [
        ["", ""] + ["gap" if value.startswith("—") else "num" for value in row[2:]] for row in rows
    ]
    sig_header, sig_rows = significance_rows(report)
    sig_classes = []
    for comparison, _row in zip(report.comparisons, sig_rows, strict=True):
        significant = comparison.p_adjusted is not None and comparison.p_adjusted < 0.05
        status_class = "" if comparison.status == "ok" else "refused"
        sig_classes.append([""] * 9 + ["sig num" if significant else "num", status_class])
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>clintune report</title>",
        f"<style>{CSS}</style>",
        IMAGES_SCRIPT,
        "</head><body>",
        "<h1>clintune report</h1>",
        f'<p class="answer"><strong>{html.escape(answer_sentence(report))}</strong></p>',
        f"<p>{html.escape(summary_line(report, n_runs))}</p>",
        "<h2>Headline</h2>",
        _html_table(*headline_rows(report), None),
        "<h2>Comparison</h2>",
        _html_table(header, rows, classes),
        *(f'<p class="note">{html.escape(n)}</p>' for n in _footnotes(report)),
    ]
    partial = _partial_gaps(report)
    if partial:
        parts.append('<p class="note">Seeds left out of a mean:</p><ul class="note">')
        parts += [f"<li>{html.escape(p)}</li>" for p in partial]
        parts.append("</ul>")
    parts.append("<h2>Plots</h2>")
    for task, png in figures.items():
        parts.append(_figure_html(task, png, task))
    if report.cost_effect:
        parts += ['<h2 id="cost-effectiveness">Cost-effectiveness</h2>']
        cost_header, cost_table = cost_rows(report)
        cost_classes = [
            ["", "", "", "num"]
            + ["gap" if value.startswith("—") else "num" for value in row[4:-1]]
            + ["sig" if row[-1] else ""]
            for row in cost_table
        ]
        parts.append(_html_table(cost_header, cost_table, cost_classes))
        parts.append(f'<p class="note">{html.escape(COST_NOTE)}</p>')
        for task, png in (cost_figures or {}).items():
            parts.append(_figure_html(f"{task} cost", png, f"{task}: metric against FLOPs"))
    parts += [
        "<h2>Significance</h2>",
        _html_table(sig_header, sig_rows, sig_classes),
    ]
    if report.likelihood:
        parts += [
            "<h2>The gold answer's likelihood</h2>",
            _html_table(*likelihood_rows_text(report), None),
            f'<p class="note">{html.escape(LIKELIHOOD_NOTE)}</p>',
        ]
    parts += [
        "<h2>Compute</h2>",
        _html_table(*compute_rows(report), None),
        '<p class="note">FLOPs and time vs SFT: a preference method\'s total (its SFT stage '
        "included) over the sft runs; DPO stage: its preference stage alone over SFT.</p>",
    ]
    if report.warnings:
        parts.append("<h2>Warnings</h2><ul>")
        parts += [f"<li>{html.escape(w)}</li>" for w in report.warnings]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(report: Report, out_dir: Path, n_runs: dict[str, int]) -> dict[str, Path]:
    """Render everything in memory first, then write each file atomically."""
    figures = {task: task_figure_png(report, task) for task in report.tasks if report.metrics[task]}
    cost_tasks = dict.fromkeys(r.task for r in report.cost_effect)
    cost_figures = {task: cost_figure_png(report, task) for task in cost_tasks}
    contents: dict[str, str | bytes] = {
        "report.md": to_markdown(report, n_runs),
        "comparison.csv": comparison_csv(report),
        "significance.csv": significance_csv(report),
        "compute.csv": compute_csv(report),
        "cost_effectiveness.csv": cost_csv(report),
        "likelihood.csv": likelihood_csv(report),
        "report.html": to_html(report, n_runs, figures, cost_figures),
    }
    contents |= {cost_figure_name(task): png for task, png in cost_figures.items()}
    written = {}
    for name, text in contents.items():
        write_atomic(out_dir / name, text)
        written[name] = out_dir / name
    return written
