"""The study's numbers from a collection of runs: the comparison table (mean and 95% CI per
task × metric × model × method), paired significance tests and the compute table."""

from __future__ import annotations

import importlib
import math
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from clintune.eval.significance import (
    NotPairedError,
    compare,
    difference_ci,
    holm,
    metric_test,
)
from clintune.report.collect import FINISHED, Collection, RunRecord

METHOD_ORDER = ("base", "sft", "dpo", "dpo_on_policy", "dpo_only", "rpo", "orpo", "simpo", "kto")
# control → treatment, as the study reads them (did DPO beat SFT, did SFT beat base, ...),
# then the pair-source axis: did on-policy pairs beat uniformly drawn wrong labels?
COMPARISONS = (("sft", "dpo"), ("base", "sft"), ("base", "dpo"), ("dpo", "dpo_on_policy"))
# Reference points of the cost-effectiveness answer, not methods whose gain is asked about.
BASELINES = ("base", "sft")
COUNT_METRICS = frozenset(
    {"n", "unparseable", "truncated_prompts", "likert_graded", "likert_missing", "n_correct"}
)
SUFFIXES = ("_ci_low", "_ci_high", "_n")
CONFIDENCE = 0.95


@dataclass
class Cell:
    """One model × method column of one task × metric row."""

    task: str
    metric: str
    model: str
    method: str
    mean: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    ci_kind: str | None = None  # "t" (over seeds) | "bootstrap" (one seed, over examples)
    seeds: list[int | None] = field(default_factory=list)
    expected_seeds: list[int | None] = field(default_factory=list)
    gaps: dict[str, list[int | None]] = field(default_factory=dict)  # reason → seeds
    # Examples the metric scored and the test examples, summed over the cell's seeds; the
    # two differ for a metric that skips some outputs (a judge's grade that did not parse).
    scored: float | None = None
    examples: float | None = None

    @property
    def partly_scored(self) -> bool:
        return self.scored is not None and self.examples is not None and self.scored < self.examples

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)

    @property
    def is_gap(self) -> bool:
        return self.mean is None

    @property
    def gap_text(self) -> str:
        return "; ".join(
            f"{reason} ({', '.join(_seed_name(s) for s in seeds)})"
            if len(self.expected_seeds) > 1
            else reason
            for reason, seeds in self.gaps.items()
        )


@dataclass
class Comparison:
    """One paired test, DPO vs SFT say, of one task × metric × model."""

    task: str
    metric: str
    model: str
    control: str
    treatment: str
    status: str  # ok | refused | no predictions | not computed | error
    test: str = ""
    seeds: list[int | None] = field(default_factory=list)
    n: int | None = None
    n_dropped: int | None = None
    statistic: float | None = None
    effect: float | None = None
    p_value: float | None = None
    p_adjusted: float | None = None
    note: str = ""
    # Paired bootstrap CI of the effect (headline metric only: the cost-effectiveness table).
    ci_low: float | None = None
    ci_high: float | None = None

    @property
    def label(self) -> str:
        return f"{self.treatment} vs {self.control}"


@dataclass
class ComputeRow:
    task: str
    model: str
    method: str
    seeds: list[int | None]
    train_seconds: float | None
    tokens: float | None
    flops: float | None
    peak_memory_bytes: float | None
    sft_reused: int = 0  # seeds whose SFT stage came from the cache
    # A preference method's total (incl. its SFT stage, if it has one) / SFT alone
    flops_vs_sft: float | None = None
    seconds_vs_sft: float | None = None
    # Its preference stage alone / SFT alone (named for DPO, the first such method)
    dpo_stage_flops_vs_sft: float | None = None
    dpo_stage_seconds_vs_sft: float | None = None
    note: str = ""
    gpu_hours: float | None = None  # 0 on CPU; None for runs that predate the figure


@dataclass
class CostEffect:
    """One method of one task × model in the cost-effectiveness answer: its headline metric,
    its gains over SFT and over base (paired tests), and what it cost beyond SFT."""

    task: str
    model: str
    method: str
    metric: str
    mean: float | None
    ci_low: float | None
    ci_high: float | None
    flops: float | None
    seconds: float | None
    gpu_hours: float | None
    vs_sft: Comparison | None = None
    vs_base: Comparison | None = None
    flops_vs_sft: float | None = None
    seconds_vs_sft: float | None = None
    extra_flops: float | None = None  # beyond SFT's
    extra_seconds: float | None = None
    extra_gpu_hours: float | None = None
    pareto: bool = False  # no other method here is as good for less compute


@dataclass
class LikelihoodRow:
    """A preference method's rewards at its last validation, mean over seeds: TRL's
    ``rewards/chosen`` is β·(log π − log π_ref) of the gold answers, so below zero the method
    made the gold answer less likely than its reference did (likelihood displacement)."""

    task: str
    model: str
    method: str
    seeds: list[int | None]
    rewards_chosen: float
    rewards_rejected: float | None
    rewards_margins: float | None
    logps_chosen: float | None

    @property
    def displaced(self) -> bool:
        return self.rewards_chosen < 0


@dataclass
class Report:
    tasks: list[str]
    models: list[str]
    methods: list[str]
    seeds: list[int | None]
    metrics: dict[str, list[str]]  # task → its table metrics, headline first
    cells: list[Cell]
    comparisons: list[Comparison]
    compute: list[ComputeRow]
    correction: str
    n_resamples: int
    warnings: list[str] = field(default_factory=list)
    cost_effect: list[CostEffect] = field(default_factory=list)
    likelihood: list[LikelihoodRow] = field(default_factory=list)

    def cell(self, task: str, metric: str, model: str, method: str) -> Cell:
        for cell in self.cells:
            if (cell.task, cell.metric, cell.model, cell.method) == (task, metric, model, method):
                return cell
        raise KeyError((task, metric, model, method))


def _seed_name(seed: int | None) -> str:
    return "s?" if seed is None else f"s{seed}"


def _method_key(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _seed_key(seed: int | None) -> tuple[int, int]:
    return (1, 0) if seed is None else (0, seed)


def _ordered(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _task_class_info(record: RunRecord) -> tuple[str | None, frozenset[str]]:
    target = record.task_config.get("_target_")
    if not isinstance(target, str) or "." not in target:
        return None, frozenset()
    module_name, _, class_name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
        headline = cls.headline_for_config(record.task_config)
    except Exception:  # a task from another checkout: fall back to the known names
        return None, frozenset()
    return headline, frozenset(getattr(cls, "count_metrics", ()))


def is_table_metric(name: str, counts: frozenset[str] = frozenset()) -> bool:
    """A task metric that belongs in the table: not a CI bound, support count, per-class F1
    or a count of examples."""
    if name.endswith(SUFFIXES) or "f1_class_" in name:
        return False
    return name not in COUNT_METRICS and name not in counts


def task_metrics(runs: Sequence[RunRecord], task: str) -> list[str]:
    """The task's table rows, headline metric first, then the others by name."""
    task_runs = [r for r in runs if r.task == task]
    headline, counts = None, frozenset[str]()
    for record in task_runs:
        # Recorded by the run (job.json, W&B config); older runs name their task class.
        headline, counts = record.headline, record.count_metrics
        if not headline:
            headline, counts = _task_class_info(record)
        if headline:
            break
    names = {
        key.removeprefix("test/")
        for record in task_runs
        if record.status == FINISHED
        for key in record.metrics
        if key.startswith("test/")
    }
    names = {name for name in names if is_table_metric(name, counts)}
    if not names and headline:
        # No run finished: the headline row still shows every column's gap and its reason.
        return [headline]
    rest = sorted(names - {headline} if headline else names)
    return ([headline] if headline in names else []) + rest


def mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean over seeds and its two-sided t-interval (n ≥ 2)."""
    array = np.asarray(values, dtype=float)
    mean = float(array.mean())
    sem = float(array.std(ddof=1) / math.sqrt(len(array)))
    if sem == 0.0:  # identical seeds (greedy base runs): scipy would give NaN bounds
        return mean, mean, mean
    low, high = stats.t.interval(CONFIDENCE, len(array) - 1, loc=mean, scale=sem)
    return mean, float(low), float(high)


def _pick_runs(runs: Sequence[RunRecord], warnings: list[str]) -> dict[tuple, RunRecord]:
    """One record per task × model × method × seed; a finished run beats a failed rerun."""
    chosen: dict[tuple, RunRecord] = {}
    rank = {FINISHED: 2, "failed": 1}
    for record in runs:
        key = (*record.key, record.seed)
        current = chosen.get(key)
        if current is None:
            chosen[key] = record
            continue
        where = record.path or record.source
        warnings.append(
            f"two runs for {record.model}/{record.task}/{record.method} "
            f"{_seed_name(record.seed)} ({where}, {current.path}); keeping the one that got "
            "furthest (finished > failed > incomplete)"
        )
        if rank.get(record.status, 0) > rank.get(current.status, 0):
            chosen[key] = record
    return chosen


def _fill_cell(cell: Cell, runs: dict[tuple, RunRecord]) -> None:
    values: list[float] = []
    counts: list[tuple[Any, Any]] = []  # (scored, test examples) per seed with a value
    for seed in cell.expected_seeds:
        record = runs.get((cell.task, cell.model, cell.method, seed))
        if record is None:
            reason = "missing"
        elif record.status != FINISHED:
            reason = record.reason or record.status
        elif f"test/{cell.metric}" not in record.metrics:
            reason = "undefined (no value in metrics)"
        else:
            cell.seeds.append(seed)
            values.append(record.metrics[f"test/{cell.metric}"])
            counts.append(
                (record.metrics.get(f"test/{cell.metric}_n"), record.metrics.get("test/n"))
            )
            continue
        cell.gaps.setdefault(reason, []).append(seed)
    if counts and all(None not in pair for pair in counts):
        cell.scored = sum(scored for scored, _ in counts)
        cell.examples = sum(examples for _, examples in counts)
    if list(cell.gaps) == ["missing"] and not values:
        # No seed of this task × method ran at all: a grid that leaves it out (on-policy pairs
        # for a task whose pairs are on-policy already), not runs that went missing.
        cell.gaps = {"not run": cell.gaps["missing"]}
    if len(values) >= 2:
        cell.mean, cell.ci_low, cell.ci_high = mean_ci(values)
        cell.ci_kind = "t"
    elif len(values) == 1:
        record = runs[(cell.task, cell.model, cell.method, cell.seeds[0])]
        cell.mean = values[0]
        cell.ci_low = record.metrics.get(f"test/{cell.metric}_ci_low")
        cell.ci_high = record.metrics.get(f"test/{cell.metric}_ci_high")
        cell.ci_kind = "bootstrap" if cell.ci_low is not None else None


def _labels_for(records: Sequence[RunRecord]) -> Callable[[str], Sequence[str] | None]:
    """The task's own label set for macro-F1 (a label no run ever predicted still counts)."""

    def labels(metric: str) -> Sequence[str] | None:
        part = metric.removesuffix("f1_macro").removesuffix("_")
        key = f"{part}_labels" if part else "labels"
        for record in records:
            value = record.task_config.get(key)
            if isinstance(value, list) and value:
                return [str(v) for v in value]
            # A custom task: task.answers.<answer>.labels (or letters), by the metric's prefix,
            # or the only answer's when the metric has none.
            answers = record.task_config.get("answers")
            if isinstance(answers, dict) and answers:
                answer = answers.get(part) if part else next(iter(answers.values()))
                if isinstance(answer, dict):
                    found = answer.get("labels") or answer.get("letters")
                    if answer.get("type") == "letter" and not found:
                        found = ["A", "B", "C", "D"]
                    if isinstance(found, list) and found:
                        return [str(v) for v in found]
        return None

    return labels


class _Predictions:
    """Each run's predictions.jsonl read once, however many comparisons use it."""

    def __init__(self) -> None:
        self._rows: dict[int, list[dict[str, Any]] | None] = {}

    def __call__(self, record: RunRecord) -> list[dict[str, Any]] | None:
        if id(record) not in self._rows:
            self._rows[id(record)] = record.load_predictions()
        return self._rows[id(record)]


def _pooled(record: RunRecord, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Seed-prefixed ids keep the seeds' copies of one example apart, so align() pairs seed s of
    # one method only with seed s of the other.
    return [{**row, "id": f"{_seed_name(record.seed)}:{row.get('id')}"} for row in rows]


def _compare(
    task: str,
    metric: str,
    model: str,
    control: str,
    treatment: str,
    runs: dict[tuple, RunRecord],
    seeds: Sequence[int | None],
    predictions: _Predictions,
    n_resamples: int,
    with_ci: bool = False,
) -> Comparison:
    result = Comparison(task, metric, model, control, treatment, status="not computed")
    spec = metric_test(metric)
    if spec is None:
        result.note = f"no paired test defined for {metric}"
        return result
    result.test = spec.test
    pairs, dropped = [], []
    for seed in seeds:
        a = runs.get((task, model, control, seed))
        b = runs.get((task, model, treatment, seed))
        if a is None and b is None:
            continue
        if a is not None and b is not None and a.status == FINISHED == b.status:
            pairs.append((a, b))
        else:
            dropped.append(seed)
    if dropped:
        result.note = f"seeds without a finished pair: {', '.join(map(_seed_name, dropped))}"
    if not pairs:
        result.note = result.note or "no seed-matched finished runs"
        return result
    result.seeds = [a.seed for a, _ in pairs]
    a_rows: list[dict[str, Any]] = []
    b_rows: list[dict[str, Any]] = []
    for a, b in pairs:
        a_pred, b_pred = predictions(a), predictions(b)
        if a_pred is None or b_pred is None:
            result.status = "no predictions"
            where = "W&B run" if (a if a_pred is None else b).source == "wandb" else "run"
            result.note = f"{where} has no predictions.jsonl ({_seed_name(a.seed)})"
            return result
        a_rows += _pooled(a, a_pred)
        b_rows += _pooled(b, b_pred)
    try:
        outcome = compare(
            metric,
            a_rows,
            b_rows,
            labels_for=_labels_for([a for a, _ in pairs]),
            n_resamples=n_resamples,
            seed=0,
        )
    except NotPairedError as error:
        result.status, result.note = "refused", str(error)
        return result
    except (ValueError, KeyError) as error:
        result.status, result.note = "error", f"{type(error).__name__}: {error}"
        return result
    if outcome.n == 0:  # e.g. no example graded in both runs: nothing to test, not "no difference"
        result.n_dropped = outcome.n_dropped
        result.note = f"no example scored in both runs ({outcome.n_dropped} left out)"
        return result
    result.status = "ok"
    # compare() says how it ran (exact or resampled); metric_test says what it tests.
    detail = re.search(r"\(([^)]*)\)$", outcome.test)
    if outcome.test != spec.test and detail:
        result.test = f"{spec.test} ({detail.group(1)})"
    result.n, result.n_dropped = outcome.n, outcome.n_dropped
    result.statistic, result.effect = outcome.statistic, outcome.effect
    result.p_value = outcome.p_value
    if with_ci:
        try:
            low, high = difference_ci(
                metric,
                a_rows,
                b_rows,
                labels_for=_labels_for([a for a, _ in pairs]),
                n_resamples=n_resamples,
                seed=0,
                confidence=CONFIDENCE,
            )
        except ValueError as error:  # e.g. fewer examples than a resample needs
            result.note = "; ".join(filter(None, [result.note, f"no CI: {error}"]))
        else:
            if math.isfinite(low) and math.isfinite(high):
                result.ci_low, result.ci_high = low, high
    return result


def comparisons_for(methods: Sequence[str]) -> list[tuple[str, str]]:
    """control → treatment pairs to test: the study's (COMPARISONS), then every other method
    against SFT and against base."""
    pairs = [(c, t) for c, t in COMPARISONS if c in methods and t in methods]
    for treatment in methods:
        if treatment in BASELINES:
            continue
        for control in ("sft", "base"):
            if control in methods and (control, treatment) not in pairs:
                pairs.append((control, treatment))
    return pairs


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _preference_stage(records: Sequence[RunRecord]) -> str | None:
    """The stage a preference method trains after (or instead of) SFT: dpo, orpo, simpo,
    kto, read from its compute figures."""
    stages: list[str] = []
    for record in records:
        for key in record.metrics:
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "compute" and parts[2] == "flops_estimate":
                stages.append(parts[1])
    others = [stage for stage in dict.fromkeys(stages) if stage != "sft"]
    return others[0] if others else None
    return None


def _compute_rows(
    tasks: list[str], models: list[str], methods: list[str], runs: dict[tuple, RunRecord]
) -> list[ComputeRow]:
    rows: list[ComputeRow] = []
    for task in tasks:
        for model in models:
            by_method: dict[str, ComputeRow] = {}
            finished: dict[str, list[RunRecord]] = {}
            for method in methods:
                done = [
                    r
                    for (t, m, meth, _), r in runs.items()
                    if (t, m, meth) == (task, model, method) and r.status == FINISHED
                ]
                done.sort(key=lambda r: _seed_key(r.seed))
                finished[method] = done

                def figure(name: str, records: list[RunRecord] = done) -> float | None:
                    return _mean([r.metrics.get(f"compute/{name}") for r in records])

                row = ComputeRow(
                    task,
                    model,
                    method,
                    seeds=[r.seed for r in done],
                    train_seconds=figure("train_seconds"),
                    tokens=figure("tokens"),
                    flops=figure("flops_estimate"),
                    peak_memory_bytes=figure("peak_memory_bytes"),
                    gpu_hours=figure("gpu_hours"),
                    sft_reused=sum(r.metrics.get("compute/sft/reused") == 1.0 for r in done),
                )
                if not done:
                    row.note = "no finished runs"
                elif row.sft_reused:
                    row.note = (
                        f"SFT stage reused in {row.sft_reused} of {len(done)} seeds "
                        "(cost paid once, counted in every run that uses it)"
                    )
                by_method[method] = row
                rows.append(row)
            for method in methods:
                if method in BASELINES or not finished[method]:
                    continue
                row, method_runs = by_method[method], finished[method]
                stage = _preference_stage(method_runs)
                sft = by_method.get("sft")
                sft_flops = sft.flops if sft else None
                sft_seconds = sft.train_seconds if sft else None
                source = "the sft runs"
                if sft_flops is None:
                    # No sft runs in the report: the method's own SFT stage is the same job.
                    sft_flops = _mean(
                        [r.metrics.get("compute/sft/flops_estimate") for r in method_runs]
                    )
                    sft_seconds = _mean(
                        [r.metrics.get("compute/sft/train_seconds") for r in method_runs]
                    )
                    source = f"the {method} runs' own SFT stage"
                stage_flops = _mean(
                    [r.metrics.get(f"compute/{stage}/flops_estimate") for r in method_runs]
                )
                stage_seconds = _mean(
                    [r.metrics.get(f"compute/{stage}/train_seconds") for r in method_runs]
                )
                row.flops_vs_sft = _ratio(row.flops, sft_flops)
                row.seconds_vs_sft = _ratio(row.train_seconds, sft_seconds)
                row.dpo_stage_flops_vs_sft = _ratio(stage_flops, sft_flops)
                row.dpo_stage_seconds_vs_sft = _ratio(stage_seconds, sft_seconds)
                if sft_flops is not None:
                    row.note = "; ".join(filter(None, [row.note, f"SFT baseline: {source}"]))
    return rows


def build_report(
    collection: Collection,
    *,
    methods: Sequence[str] | None = None,
    correction: str = "holm",
    n_resamples: int = 10000,
    progress: bool = False,
) -> Report:
    """Every number of the report, from the collected runs."""
    if correction not in ("holm", "none"):
        raise ValueError(f"correction must be holm or none, got {correction!r}")
    warnings = list(collection.warnings)
    records = [r for r in collection.runs if methods is None or r.method in methods]
    declared = collection.declared
    tasks = sorted(_ordered([*declared.get("task", []), *(r.task for r in records)]))
    models = _ordered([*declared.get("model", []), *sorted({r.model for r in records})])
    found = [*declared.get("method", []), *(r.method for r in records)]
    all_methods = sorted(set(found) if methods is None else set(methods), key=_method_key)
    seeds: list[int | None] = sorted(
        {*(int(s) for s in declared.get("seed", []) if s.lstrip("-").isdigit())}
        | {r.seed for r in records},
        key=_seed_key,
    )
    runs = _pick_runs(records, warnings)

    metrics = {task: task_metrics(records, task) for task in tasks}
    cells: list[Cell] = []
    for task in tasks:
        if not metrics[task]:
            warnings.append(f"task {task}: no finished run, so no metric rows")
        for metric in metrics[task]:
            for model in models:
                for method in all_methods:
                    cell = Cell(task, metric, model, method, expected_seeds=list(seeds))
                    _fill_cell(cell, runs)
                    cells.append(cell)

    predictions = _Predictions()
    comparisons: list[Comparison] = []
    for task in tasks:
        for metric in metrics[task]:
            if metric_test(metric) is None:
                continue
            for model in models:
                for control, treatment in comparisons_for(all_methods):
                    if progress:
                        print(
                            f"testing {task}/{metric}/{model}: {treatment} vs {control}",
                            file=sys.stderr,
                        )
                    comparisons.append(
                        _compare(
                            task,
                            metric,
                            model,
                            control,
                            treatment,
                            runs,
                            seeds,
                            predictions,
                            n_resamples,
                            # The cost-effectiveness answer quotes the headline's gains.
                            with_ci=metric == metrics[task][0],
                        )
                    )
    computed = [c for c in comparisons if c.status == "ok" and c.p_value is not None]
    adjusted = holm([c.p_value for c in computed]) if correction == "holm" else None
    for position, comparison in enumerate(computed):
        comparison.p_adjusted = adjusted[position] if adjusted is not None else comparison.p_value

    report = Report(
        tasks=tasks,
        models=models,
        methods=all_methods,
        seeds=seeds,
        metrics=metrics,
        cells=cells,
        comparisons=comparisons,
        compute=_compute_rows(tasks, models, all_methods, runs),
        correction=correction,
        n_resamples=n_resamples,
        warnings=warnings,
    )
    report.cost_effect = cost_effectiveness(report)
    report.likelihood = likelihood_rows(tasks, models, all_methods, runs)
    return report


def likelihood_rows(
    tasks: Sequence[str], models: Sequence[str], methods: Sequence[str], runs: dict[tuple, Any]
) -> list[LikelihoodRow]:
    """Per task × model × method with reference-based rewards (DPO, RPO, KTO, ...): the
    rewards at the last validation, mean over the finished seeds."""
    rows = []
    for task in tasks:
        for model in models:
            for method in methods:
                finished = [
                    r
                    for (t, m, meth, _seed), r in sorted(runs.items(), key=lambda kv: str(kv[0]))
                    if (t, m, meth) == (task, model, method)
                    and r.status == FINISHED
                    and "eval/rewards/chosen" in r.metrics
                ]
                if not finished:
                    continue

                def mean_of(name: str, runs_: list = finished) -> float | None:
                    return _mean([r.metrics.get(name) for r in runs_])

                rows.append(
                    LikelihoodRow(
                        task,
                        model,
                        method,
                        [r.seed for r in finished],
                        rewards_chosen=mean_of("eval/rewards/chosen") or 0.0,
                        rewards_rejected=mean_of("eval/rewards/rejected"),
                        rewards_margins=mean_of("eval/rewards/margins"),
                        logps_chosen=mean_of("eval/logps/chosen"),
                    )
                )
    return rows


# --------------------------------------------------------------------------- cost-effectiveness


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (cost, value) points, whether each is on the Pareto front: no other point costs
    no more and is worth at least as much, being strictly better in one of the two."""
    front = []
    for cost, value in points:
        dominated = any(
            other_cost <= cost
            and other_value >= value
            and (other_cost, other_value) != (cost, value)
            for other_cost, other_value in points
        )
        front.append(not dominated)
    return front


def cost_effectiveness(report: Report) -> list[CostEffect]:
    """Per task × model, each method's headline metric, its paired gains over SFT and over
    base, and its training compute beyond SFT's; the Pareto front of metric against FLOPs.
    Base trains nothing, so its training compute is zero."""
    rows: list[CostEffect] = []
    for task in report.tasks:
        if not report.metrics[task]:
            continue
        headline = report.metrics[task][0]
        for model in report.models:
            tested = {
                (c.control, c.treatment): c
                for c in report.comparisons
                if (c.task, c.metric, c.model) == (task, headline, model)
            }
            compute = {r.method: r for r in report.compute if (r.task, r.model) == (task, model)}
            group: list[CostEffect] = []
            for method in report.methods:
                cell = report.cell(task, headline, model, method)
                figures = compute.get(method)
                trained = figures is not None and bool(figures.seeds)
                untrained = method == "base" and trained
                row = CostEffect(
                    task,
                    model,
                    method,
                    headline,
                    cell.mean,
                    cell.ci_low,
                    cell.ci_high,
                    flops=0.0 if untrained else (figures.flops if figures else None),
                    seconds=0.0 if untrained else (figures.train_seconds if figures else None),
                    gpu_hours=0.0 if untrained else (figures.gpu_hours if figures else None),
                    vs_sft=tested.get(("sft", method)),
                    vs_base=tested.get(("base", method)),
                )
                ratio = 1.0 if method == "sft" else (figures.flops_vs_sft if figures else None)
                if ratio and row.flops is not None:
                    sft_flops = row.flops / ratio
                    row.flops_vs_sft, row.extra_flops = ratio, row.flops - sft_flops
                time_ratio = (
                    1.0 if method == "sft" else (figures.seconds_vs_sft if figures else None)
                )
                if time_ratio and row.seconds is not None:
                    sft_seconds = row.seconds / time_ratio
                    row.seconds_vs_sft, row.extra_seconds = time_ratio, row.seconds - sft_seconds
                group.append(row)
            sft_row = next((r for r in group if r.method == "sft"), None)
            sft_hours = sft_row.gpu_hours if sft_row else None
            for row in group:
                if sft_hours is not None and row.gpu_hours is not None and row.method != "base":
                    row.extra_gpu_hours = row.gpu_hours - sft_hours
            placed = [r for r in group if r.mean is not None and r.flops is not None]
            for row, on_front in zip(
                placed, pareto_front([(r.flops, r.mean) for r in placed]), strict=True
            ):
                row.pareto = on_front
            rows += group
    return rows


METHOD_NAMES = {
    "base": "the base model",
    "sft": "SFT",
    "dpo": "DPO",
    "dpo_on_policy": "DPO with on-policy pairs",
    "dpo_only": "DPO without SFT",
    "rpo": "RPO",
    "orpo": "ORPO",
    "simpo": "SimPO",
    "kto": "KTO",
}
SIGNIFICANCE = 0.05


def method_name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


def _p_text(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _tested_gain(row: CostEffect) -> tuple[float, float] | None:
    """(effect over SFT, corrected P) where the paired test against SFT ran."""
    test = row.vs_sft
    if test is None or test.status != "ok" or test.effect is None or test.p_adjusted is None:
        return None
    return test.effect, test.p_adjusted


def answer_sentence(report: Report) -> str:
    """The study's question answered in words for this sweep: per task (and model, when
    there are several), which methods beat SFT on the headline metric, by how much, how
    surely (paired P, corrected as the report says) and at what compute relative to SFT."""
    clauses = []
    for task in report.tasks:
        for model in report.models:
            rows = [r for r in report.cost_effect if (r.task, r.model) == (task, model)]
            if not rows:
                continue
            where = task if len(report.models) == 1 else f"{task} ({model})"
            metric = rows[0].metric
            sft = next((r for r in rows if r.method == "sft"), None)
            if sft is None or sft.mean is None:
                clauses.append(f"on {where} there is no finished SFT run to compare with")
                continue
            tested = [(r, _tested_gain(r)) for r in rows if r.method not in BASELINES]
            tested = [(r, gain) for r, gain in tested if gain is not None]
            if not tested:
                clauses.append(f"on {where} no method was tested against SFT")
                continue
            winners = sorted(
                ((r, g) for r, g in tested if g[0] > 0 and g[1] < SIGNIFICANCE),
                key=lambda item: -item[1][0],
            )
            if not winners:
                clauses.append(f"on {where} no method beat SFT")
                continue
            gains = []
            for position, (row, (effect, p_value)) in enumerate(winners):
                gain = f"{effect:+.3g}"
                what = f"{gain} {metric}" if position == 0 else gain
                cost = (
                    f" for {row.flops_vs_sft:.2g}× SFT's compute"
                    if row.flops_vs_sft is not None
                    else ""
                )
                verb = "gained " if position == 0 else ""
                gains.append(
                    f"{method_name(row.method)} {verb}{what} (P = {_p_text(p_value)}){cost}"
                )
            clauses.append(f"on {where}, " + ", ".join(gains))
    if not clauses:
        return "No task has a finished run to answer the question with."
    text = "; ".join(clauses)
    return text[0].upper() + text[1:] + "."
