"""Paired significance tests for comparing two runs (e.g. base vs SFT, SFT vs DPO) on the same
test examples, using the standard scipy/statsmodels implementations.

Conventions used throughout:

* Run ``a`` is the control and run ``b`` the treatment. ``TestResult.effect`` is always
  ``metric(b) - metric(a)`` ("treatment minus control") over the paired examples the test used,
  so a positive effect means ``b`` is better on a higher-is-better metric.
* Every test is two-sided and paired: both runs must have scored the *same* test examples.
  :func:`align` pairs prediction rows by ``"id"`` and refuses (:class:`NotPairedError`) runs on
  different examples; a comparison on different test sets is never computed.
* :func:`compare` picks the test from the metric name through :func:`metric_test`:
  :data:`METRIC_TESTS` by name, else by the name's ending for one answer of several
  (``<answer>_accuracy``, ``<answer>_f1_macro``, …, as a custom task names them), the one
  place a report can quote for "which test was used".
* Several comparisons in one report should be corrected together with :func:`holm`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
from scipy.stats import bootstrap, permutation_test, wilcoxon
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from clintune.eval.metrics import label_indices

Row = Mapping[str, Any]


@dataclass(frozen=True)
class TestResult:
    """Outcome of one paired two-sided test of run ``b`` against run ``a``.

    ``test`` names the test as a report should print it; ``statistic`` is the test's own
    statistic (McNemar: min of the discordant counts; permutation/bootstrap: the observed
    ``metric(b) - metric(a)``; Wilcoxon: scipy's signed-rank statistic); ``n`` is the number of
    paired examples used and ``n_dropped`` the pairs left out (e.g. a missing Likert grade);
    ``effect`` is ``metric(b) - metric(a)`` on the ``n`` used pairs.
    """

    __test__ = False  # not a pytest test class despite the name

    test: str
    statistic: float
    p_value: float
    n: int
    n_dropped: int
    effect: float


class NotPairedError(ValueError):
    """The two runs were not evaluated on the same test examples."""


class PairedExamples(NamedTuple):
    """Rows of two runs, ordered so that ``a[i]`` and ``b[i]`` are the same test example."""

    a: list[Row]
    b: list[Row]


def _format_ids(ids: Sequence[Any], limit: int = 5) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (", ..." if len(ids) > limit else "")


def _sorted_ids(ids: set[Any]) -> list[Any]:
    try:
        return sorted(ids)
    except TypeError:  # mixed id types: any fixed order will do
        return sorted(ids, key=repr)


def _by_id(rows: Sequence[Row], name: str) -> dict[Any, Row]:
    by_id: dict[Any, Row] = {}
    duplicates = []
    for position, row in enumerate(rows):
        if "id" not in row:
            raise NotPairedError(f"run {name}: row {position} has no 'id', cannot pair examples")
        if row["id"] in by_id:
            duplicates.append(row["id"])
        by_id[row["id"]] = row
    if duplicates:
        raise NotPairedError(
            f"run {name}: {len(duplicates)} duplicate ids (e.g. {_format_ids(duplicates)}), "
            "cannot pair examples"
        )
    return by_id


def align(a_rows: Sequence[Row], b_rows: Sequence[Row]) -> PairedExamples:
    """Pair the prediction rows of runs ``a`` and ``b`` by ``"id"``, both sorted by id.

    Raises :class:`NotPairedError` if the runs are not on the same test examples: different id
    sets, duplicate ids, or an id whose ``"target"`` differs between the runs.
    """
    a_by_id = _by_id(a_rows, "a")
    b_by_id = _by_id(b_rows, "b")
    only_a = _sorted_ids(a_by_id.keys() - b_by_id.keys())
    only_b = _sorted_ids(b_by_id.keys() - a_by_id.keys())
    if only_a or only_b:
        raise NotPairedError(
            "the runs are not on the same test examples: "
            f"{len(only_a)} ids only in run a (e.g. {_format_ids(only_a)}), "
            f"{len(only_b)} ids only in run b (e.g. {_format_ids(only_b)}); "
            "refusing to compare"
        )
    ids = _sorted_ids(set(a_by_id))
    differing = [i for i in ids if a_by_id[i].get("target") != b_by_id[i].get("target")]
    if differing:
        first = differing[0]
        raise NotPairedError(
            f"the runs have different targets for {len(differing)} of {len(ids)} ids "
            f"(e.g. {_format_ids(differing)}; id {first!r}: "
            f"a={a_by_id[first].get('target')!r}, b={b_by_id[first].get('target')!r}); "
            "refusing to compare"
        )
    return PairedExamples([a_by_id[i] for i in ids], [b_by_id[i] for i in ids])


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> TestResult:
    """Exact McNemar test (binomial on the discordant pairs) of paired per-example correctness.

    ``effect`` is accuracy(b) - accuracy(a). With no discordant pairs the runs agree on every
    example and p = 1.0.
    """
    a = np.asarray(a_correct, dtype=bool)
    b = np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"need two equal-length 1-D sequences, got {a.shape} and {b.shape}")
    n = len(a)
    if n == 0:
        raise ValueError("no paired examples to test")
    table = np.array(
        [[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]], dtype=int
    )
    effect = float(b.mean() - a.mean())
    if table[0, 1] + table[1, 0] == 0:
        return TestResult("McNemar exact", 0.0, 1.0, n, 0, effect)
    result = mcnemar(table, exact=True)
    return TestResult("McNemar exact", float(result.statistic), float(result.pvalue), n, 0, effect)


def _items(values: Sequence[Any]) -> np.ndarray:
    """1-D array of per-example items: numeric as is, anything else as an object array."""
    array = np.asarray(values) if len(values) else np.array([], dtype=float)
    if array.ndim == 1 and array.dtype.kind in "biuf":
        return array
    items = np.empty(len(values), dtype=object)
    for position, value in enumerate(values):
        items[position] = value
    return items


def _pooled(a: Sequence[Any], b: Sequence[Any]) -> tuple[np.ndarray, int]:
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    if len(a) == 0:
        raise ValueError("no paired examples to test")
    a_items, b_items = _items(a), _items(b)
    if a_items.dtype == object or b_items.dtype == object:
        return np.concatenate([a_items.astype(object), b_items.astype(object)]), len(a)
    return np.concatenate([a_items, b_items]), len(a)


def _batch(n: int) -> int:
    """Resamples per vectorised call: about 2 million items, so a batch of a large test set
    stays within a few hundred MB."""
    return max(1, 2_000_000 // n)


def _difference(
    statistic: Callable[[np.ndarray], Any], pooled: np.ndarray, vectorized: bool
) -> Callable[..., Any]:
    """``statistic(b) - statistic(a)`` from index arrays into ``pooled``: one resample at a
    time, or a (resamples, n) batch when ``statistic`` reduces the last axis."""
    if vectorized:

        def batch(a_index: np.ndarray, b_index: np.ndarray, axis: int = -1) -> np.ndarray:
            if axis != -1:
                raise ValueError(f"the statistic reduces the last axis, not axis {axis}")
            return statistic(pooled[b_index]) - statistic(pooled[a_index])

        return batch

    def single(a_index: np.ndarray, b_index: np.ndarray) -> float:
        return float(statistic(pooled[b_index]) - statistic(pooled[a_index]))

    return single


def paired_permutation_test(
    statistic: Callable[[np.ndarray], float],
    a: Sequence[Any],
    b: Sequence[Any],
    *,
    n_resamples: int = 10000,
    seed: int = 0,
    vectorized: bool = False,
) -> TestResult:
    """Two-sided paired permutation test of ``statistic(b) - statistic(a)``.

    ``a[i]`` and ``b[i]`` are the per-example items of the two runs on example ``i`` (numbers,
    or any objects, e.g. ``(prediction, gold)`` tuples); ``statistic`` maps an array of items to
    the metric (macro-F1, mean, ...), so metrics that are not means work. Under the null the run
    labels are exchangeable within each example, so scipy's ``permutation_type="samples"``
    swaps A/B within pairs. If ``n_resamples >= 2**n`` scipy enumerates all swaps (exact test).
    ``vectorized=True`` says that ``statistic`` reduces the last axis of a (resamples, n) array,
    as :func:`paired_items`' statistics do: the same test, computed a batch at a time.
    """
    pooled, n = _pooled(a, b)
    difference = _difference(statistic, pooled, vectorized)

    exact = n < 63 and n_resamples >= 2**n
    result = permutation_test(
        (np.arange(n), np.arange(n, 2 * n)),
        difference,
        permutation_type="samples",
        vectorized=vectorized,
        batch=_batch(n) if vectorized else None,
        n_resamples=n_resamples,
        alternative="two-sided",
        rng=np.random.default_rng(seed),
    )
    name = (
        f"paired permutation (exact, all {2**n:,} swaps)"
        if exact
        else f"paired permutation ({n_resamples:,} resamples)"
    )
    observed = float(result.statistic)
    return TestResult(name, observed, float(result.pvalue), n, 0, observed)


def _paired_bootstrap(
    statistic: Callable[[np.ndarray], float],
    pooled: np.ndarray,
    n: int,
    *,
    n_resamples: int,
    seed: int,
    confidence: float = 0.95,
    vectorized: bool = False,
) -> Any:
    """``scipy.stats.bootstrap`` of ``statistic(b) - statistic(a)`` over the ``n`` paired
    examples of ``pooled`` (a's items, then b's): each resample takes the same examples from
    both runs."""
    return bootstrap(
        (np.arange(n), np.arange(n, 2 * n)),
        _difference(statistic, pooled, vectorized),
        paired=True,
        vectorized=vectorized,
        batch=_batch(n) if vectorized else None,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )


def paired_bootstrap_test(
    statistic: Callable[[np.ndarray], float],
    a: Sequence[Any],
    b: Sequence[Any],
    *,
    n_resamples: int = 10000,
    seed: int = 0,
) -> TestResult:
    """Two-sided paired bootstrap test of ``statistic(b) - statistic(a)``.

    Examples are resampled with replacement (the same examples for both runs, via
    ``scipy.stats.bootstrap(..., paired=True)``) and the difference ``d*`` recomputed on each of
    the ``B = n_resamples`` resamples. The p-value is the two-sided proportion of resampled
    differences on the far side of zero, with the usual +1 correction so it is never 0::

        p = min(1, 2 * min(1 + #{d* <= 0}, 1 + #{d* >= 0}) / (B + 1))

    i.e. (up to the correction) the smallest alpha at which the percentile-bootstrap
    (1 - alpha) interval of the difference excludes 0. Identical runs give p = 1. Item and
    ``statistic`` conventions are those of :func:`paired_permutation_test`, which is the
    default for F1 in :func:`compare`; this is an alternative the caller may choose. With fewer
    than two examples there is nothing to resample and p is NaN.
    """
    pooled, n = _pooled(a, b)
    observed = float(statistic(pooled[n:]) - statistic(pooled[:n]))
    name = f"paired bootstrap ({n_resamples:,} resamples)"
    if n < 2:
        return TestResult(name, observed, float("nan"), n, 0, observed)

    result = _paired_bootstrap(statistic, pooled, n, n_resamples=n_resamples, seed=seed)
    differences = np.asarray(result.bootstrap_distribution, dtype=float)
    below = 1 + int(np.sum(differences <= 0))
    above = 1 + int(np.sum(differences >= 0))
    p_value = min(1.0, 2 * min(below, above) / (n_resamples + 1))
    return TestResult(name, observed, p_value, n, 0, observed)


def wilcoxon_signed_rank(a: Sequence[float | None], b: Sequence[float | None]) -> TestResult:
    """Two-sided Wilcoxon signed-rank test of paired grades (e.g. Likert 1–5), ``b - a``.

    Only pairs where both grades are present are used; the others are counted in
    ``n_dropped``. ``effect`` is mean(b) - mean(a) over the used pairs. If every used pair has
    zero difference the runs do not differ: p = 1.0 (NaN statistic). With no pair left there
    is nothing to test, which is not evidence of no difference: p is NaN.
    """
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    kept = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    n_dropped = len(a) - len(kept)
    name = "Wilcoxon signed-rank (Pratt)"
    if not kept:
        return TestResult(name, float("nan"), float("nan"), 0, n_dropped, float("nan"))
    a_kept = np.array([x for x, _ in kept], dtype=float)
    b_kept = np.array([y for _, y in kept], dtype=float)
    effect = float(b_kept.mean() - a_kept.mean())
    if np.all(b_kept == a_kept):
        return TestResult(name, float("nan"), 1.0, len(kept), n_dropped, effect)
    # Pratt: Likert grades are coarse, so many pairs tie at zero difference. The default
    # "wilcox" discards those pairs before ranking, as if they had never been graded; Pratt
    # ranks them too (then leaves their ranks out of the sum), so the "no difference" pairs
    # still shape the ranks and the null distribution instead of silently vanishing.
    result = wilcoxon(b_kept, a_kept, zero_method="pratt", alternative="two-sided")
    return TestResult(
        name, float(result.statistic), float(result.pvalue), len(kept), n_dropped, effect
    )


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (statsmodels ``multipletests(method="holm")``).

    NaN p-values (tests that could not be run) are passed through untouched and do not count
    towards the number of comparisons.
    """
    values = np.asarray(p_values, dtype=float)
    adjusted = values.copy()
    present = ~np.isnan(values)
    if present.any():
        adjusted[present] = multipletests(values[present], method="holm")[1]
    return [float(p) for p in adjusted]


# --------------------------------------------------------------------------- metric -> test

TestKind = Literal["mcnemar", "permutation_f1", "wilcoxon", "permutation_mean"]


@dataclass(frozen=True)
class MetricTest:
    """How :func:`compare` tests one metric: the test, and which per-example field it uses.

    ``field`` is the per-example score (``"correct"``, ``"likert"``, ...) or, for F1, ``None``
    (recomputed from ``prediction``/``target``); ``part`` picks the triage sub-label.
    """

    test: str
    kind: TestKind
    field: str | None = None
    part: str | None = None


METRIC_TESTS: Mapping[str, MetricTest] = {
    "accuracy": MetricTest("McNemar exact", "mcnemar", field="correct"),
    "exact_match": MetricTest("McNemar exact", "mcnemar", field="correct"),
    "provider_accuracy": MetricTest("McNemar exact", "mcnemar", field="provider_correct"),
    "urgency_accuracy": MetricTest("McNemar exact", "mcnemar", field="urgency_correct"),
    "f1_macro": MetricTest("paired permutation on macro-F1", "permutation_f1"),
    "provider_f1_macro": MetricTest(
        "paired permutation on macro-F1", "permutation_f1", part="provider"
    ),
    "urgency_f1_macro": MetricTest(
        "paired permutation on macro-F1", "permutation_f1", part="urgency"
    ),
    "likert_mean": MetricTest("Wilcoxon signed-rank (Pratt)", "wilcoxon", field="likert"),
    "rougeL": MetricTest("paired permutation on the mean", "permutation_mean", field="rougeL"),
}
"""Metric name -> test used by :func:`compare` (quote ``METRIC_TESTS[m].test`` in reports)."""

# The metric an answer's prefixed name ends in → its test, with the per-example field the
# task writes for that answer (``<answer>_correct``, ``<answer>_rougeL``).
_PER_ANSWER = {
    "f1_macro": lambda part: MetricTest(
        "paired permutation on macro-F1", "permutation_f1", part=part
    ),
    "accuracy": lambda part: MetricTest("McNemar exact", "mcnemar", field=f"{part}_correct"),
    "exact_match": lambda part: MetricTest("McNemar exact", "mcnemar", field=f"{part}_correct"),
    "rougeL": lambda part: MetricTest(
        "paired permutation on the mean", "permutation_mean", field=f"{part}_rougeL"
    ),
}


def metric_test(metric: str) -> MetricTest | None:
    """How :func:`compare` tests ``metric``: by its name in :data:`METRIC_TESTS`, else as one
    answer's metric (``provider_f1_macro``, ``dept_accuracy``), else None (no paired test)."""
    if metric in METRIC_TESTS:
        return METRIC_TESTS[metric]
    for suffix, make in _PER_ANSWER.items():
        part = metric.removesuffix(f"_{suffix}")
        if part != metric and part:
            return make(part)
    return None


def _field(rows: Sequence[Row], field: str) -> list[Any]:
    missing = [row.get("id") for row in rows if field not in row]
    if missing:
        raise KeyError(f"{len(missing)} rows have no {field!r} (e.g. ids {_format_ids(missing)})")
    return [row[field] for row in rows]


def _label(value: Any, part: str | None) -> str | None:
    if part is None:
        return value
    return value.get(part) if isinstance(value, Mapping) else None


def _mean(values: np.ndarray) -> Any:
    return np.mean(values, axis=-1)


def _label_codes(
    predictions: Sequence[str | None], golds: Sequence[str], labels: Sequence[str]
) -> list[int]:
    """Each (prediction, gold) as one integer, ``prediction * K + gold`` over the K labels
    (positions as :func:`label_indices` gives them), so resampled macro-F1 is counting."""
    predicted, target = label_indices(predictions, golds, labels)
    return [p * len(labels) + g for p, g in zip(predicted, target, strict=True)]


def _macro_f1(labels: Sequence[str]) -> Callable[[np.ndarray], Any]:
    """Macro-F1 of :func:`_label_codes` items along the last axis: for each label,
    F1 = 2·TP / (#predicted + #gold), undefined (left out) where the resample has no gold
    example of it. The same numbers as :func:`clintune.eval.metrics.label_metrics` (a test)."""
    count = len(labels)

    def f1(codes: np.ndarray) -> Any:
        predicted, gold = np.divmod(codes, count)
        per_label = []
        for label in range(count):
            is_predicted, is_gold = predicted == label, gold == label
            true_positives = np.sum(is_predicted & is_gold, axis=-1)
            gold_total = np.sum(is_gold, axis=-1)
            denominator = np.sum(is_predicted, axis=-1) + gold_total
            with np.errstate(invalid="ignore", divide="ignore"):
                per_label.append(np.where(gold_total > 0, 2 * true_positives / denominator, np.nan))
        return np.nanmean(np.stack(per_label), axis=0)

    return f1


def paired_items(
    metric: str,
    a_rows: Sequence[Row],
    b_rows: Sequence[Row],
    *,
    labels_for: Callable[[str], Sequence[str] | None] | None = None,
) -> tuple[Callable[[np.ndarray], float], list[Any], list[Any], int]:
    """The metric as a function of per-example items, both runs' items on the paired
    examples, and how many pairs were left out (a missing Likert grade). The one place that
    says what :func:`compare` tests and :func:`difference_ci` resamples."""
    spec = metric_test(metric)
    if spec is None:
        raise ValueError(
            f"no test for metric {metric!r}; supported: {sorted(METRIC_TESTS)} and "
            f"<answer>_<metric> for {sorted(_PER_ANSWER)}"
        )
    a, b = align(a_rows, b_rows)
    if spec.kind in ("mcnemar", "wilcoxon", "permutation_mean"):
        assert spec.field is not None
        a_values, b_values = _field(a, spec.field), _field(b, spec.field)
        if spec.kind == "mcnemar":
            return (
                _mean,
                [float(bool(v)) for v in a_values],
                [float(bool(v)) for v in b_values],
                0,
            )
        if spec.kind == "wilcoxon":
            kept = [(x, y) for x, y in zip(a_values, b_values, strict=True) if None not in (x, y)]
            dropped = len(a_values) - len(kept)
            return _mean, [float(x) for x, _ in kept], [float(y) for _, y in kept], dropped
        a_floats = np.array(a_values, dtype=float)
        b_floats = np.array(b_values, dtype=float)
        if np.isnan(a_floats).any() or np.isnan(b_floats).any():
            raise ValueError(f"missing {spec.field!r} scores: cannot test the mean")
        return _mean, list(a_floats), list(b_floats), 0
    golds = [_label(target, spec.part) for target in _field(a, "target")]
    if any(gold is None for gold in golds):
        raise ValueError(f"some targets have no {spec.part or 'label'} for {metric!r}")
    labels = labels_for(metric) if labels_for is not None else None
    if labels is None:
        labels = sorted(set(golds))
    a_items = _label_codes([_label(p, spec.part) for p in _field(a, "prediction")], golds, labels)
    b_items = _label_codes([_label(p, spec.part) for p in _field(b, "prediction")], golds, labels)
    return _macro_f1(list(labels)), a_items, b_items, 0


def compare(
    metric: str,
    a_rows: Sequence[Row],
    b_rows: Sequence[Row],
    *,
    labels_for: Callable[[str], Sequence[str] | None] | None = None,
    n_resamples: int = 10000,
    seed: int = 0,
) -> TestResult:
    """Test run ``b`` against run ``a`` on ``metric`` with the test :data:`METRIC_TESTS` names.

    Rows are the runs' ``predictions.jsonl`` records; they are paired with :func:`align`
    (different test examples raise :class:`NotPairedError`). For F1 metrics the label set is
    ``labels_for(metric)`` if given (and not None), else the sorted set of gold labels.
    ``effect`` is ``metric(b) - metric(a)``.
    """
    spec = metric_test(metric)
    statistic, a_items, b_items, _ = paired_items(metric, a_rows, b_rows, labels_for=labels_for)
    assert spec is not None
    if spec.kind == "mcnemar":
        return mcnemar_exact([bool(v) for v in a_items], [bool(v) for v in b_items])
    if spec.kind == "wilcoxon":
        assert spec.field is not None
        a, b = align(a_rows, b_rows)
        return wilcoxon_signed_rank(_field(a, spec.field), _field(b, spec.field))
    return paired_permutation_test(
        statistic, a_items, b_items, n_resamples=n_resamples, seed=seed, vectorized=True
    )


def difference_ci(
    metric: str,
    a_rows: Sequence[Row],
    b_rows: Sequence[Row],
    *,
    labels_for: Callable[[str], Sequence[str] | None] | None = None,
    n_resamples: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Paired percentile-bootstrap CI of ``metric(b) - metric(a)``: the test examples are
    resampled with replacement, the same ones for both runs (``scipy.stats.bootstrap`` with
    ``paired=True``), and the metric recomputed on each resample, so macro-F1 works as well
    as means. (NaN, NaN) with fewer than two paired examples."""
    statistic, a_items, b_items, _ = paired_items(metric, a_rows, b_rows, labels_for=labels_for)
    pooled, n = _pooled(a_items, b_items)
    if n < 2:
        return float("nan"), float("nan")

    result = _paired_bootstrap(
        statistic,
        pooled,
        n,
        n_resamples=n_resamples,
        seed=seed,
        confidence=confidence,
        vectorized=True,
    )
    interval = result.confidence_interval
    return float(interval.low), float(interval.high)
