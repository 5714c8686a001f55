"""Paired significance tests, checked against scipy/statsmodels and hand-computed answers."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from clintune.eval.metrics import label_metrics
from clintune.eval.significance import (
    METRIC_TESTS,
    NotPairedError,
    align,
    compare,
    holm,
    mcnemar_exact,
    paired_bootstrap_test,
    paired_permutation_test,
    wilcoxon_signed_rank,
)

# ------------------------------------------------------------------------------------ McNemar


def _paired_flags(both: int, only_a: int, only_b: int, neither: int) -> tuple[list, list]:
    a = [True] * both + [True] * only_a + [False] * only_b + [False] * neither
    b = [True] * both + [False] * only_a + [True] * only_b + [False] * neither
    return a, b


def test_mcnemar_exact_matches_binomial_hand_value() -> None:
    a, b = _paired_flags(both=5, only_a=1, only_b=6, neither=3)
    result = mcnemar_exact(a, b)
    # exact two-sided binomial: 2 * P(X <= 1 | n=7, p=0.5) = 2 * 8/128 = 0.125
    assert result.p_value == pytest.approx(0.125)
    assert result.p_value == pytest.approx(stats.binomtest(1, 7, 0.5).pvalue)
    reference = mcnemar([[5, 1], [6, 3]], exact=True)
    assert result.p_value == pytest.approx(reference.pvalue)
    assert result.statistic == pytest.approx(reference.statistic) == 1
    assert result.test == "McNemar exact"
    assert (result.n, result.n_dropped) == (15, 0)
    assert result.effect == pytest.approx((11 - 6) / 15)  # accuracy(b) - accuracy(a)


def test_mcnemar_all_agree_is_one() -> None:
    a, b = _paired_flags(both=4, only_a=0, only_b=0, neither=2)
    result = mcnemar_exact(a, b)
    assert result.p_value == 1.0
    assert result.effect == 0.0


def test_mcnemar_rejects_unpaired_lengths() -> None:
    with pytest.raises(ValueError):
        mcnemar_exact([True, False], [True])


# -------------------------------------------------------------------------------- permutation


def _enumerated_p(statistic, a, b) -> float:
    """Two-sided exact p over all 2^n within-pair swaps, by brute force."""
    a, b = list(a), list(b)
    observed = statistic(b) - statistic(a)
    null = []
    for swaps in itertools.product([False, True], repeat=len(a)):
        new_a = [y if s else x for x, y, s in zip(a, b, swaps, strict=True)]
        new_b = [x if s else y for x, y, s in zip(a, b, swaps, strict=True)]
        null.append(statistic(new_b) - statistic(new_a))
    null = np.array(null)
    tol = 1e-12
    greater = np.mean(null >= observed - tol)
    less = np.mean(null <= observed + tol)
    return min(1.0, 2 * min(greater, less))


def test_permutation_mean_exact_hand_value() -> None:
    a = [0, 1, 2, 0, 1, 3]
    b = [2, 3, 2, 1, 4, 5]  # differences 2, 2, 0, 1, 3, 2: only "no swap" (x2 for the 0) >= obs
    result = paired_permutation_test(np.mean, a, b, n_resamples=10000)
    assert result.p_value == pytest.approx(2 * 2 / 64)
    assert result.p_value == pytest.approx(_enumerated_p(np.mean, a, b))
    assert result.effect == pytest.approx(10 / 6) == result.statistic
    assert result.test.startswith("paired permutation (exact")
    assert result.n == 6


def test_permutation_macro_f1_matches_enumeration() -> None:
    labels = ["x", "y", "z"]
    golds = ["x", "y", "z", "x", "y", "z", "x", "y"]
    a_pred = ["x", "z", None, "y", "y", "x", "x", "z"]
    b_pred = ["x", "y", "z", "x", "y", "z", "y", "y"]
    a = [(p, g) for p, g in zip(a_pred, golds, strict=True)]
    b = [(p, g) for p, g in zip(b_pred, golds, strict=True)]

    def f1(items) -> float:
        return label_metrics([p for p, _ in items], [g for _, g in items], labels)["f1_macro"]

    result = paired_permutation_test(f1, a, b, n_resamples=1000)  # 1000 >= 2^8: exact
    assert result.p_value == pytest.approx(_enumerated_p(f1, a, b))
    assert result.effect == pytest.approx(f1(b) - f1(a))
    assert 0 < result.p_value < 1


def _label_rows(rng: np.random.Generator, labels: list[str], n: int, skill: float) -> list:
    golds = [str(g) for g in rng.choice(labels[:2] if n % 3 == 0 else labels, n)]  # some absent
    rows = []
    for i, gold in enumerate(golds):
        draw = rng.random()
        prediction = gold if draw < skill else None if draw < skill + 0.1 else "other"
        prediction = str(rng.choice(labels)) if draw > 0.9 else prediction
        rows.append({"id": i, "prediction": prediction, "target": gold})
    return rows


@pytest.mark.parametrize("n", [7, 30, 61])
def test_report_macro_f1_test_is_the_generic_test_on_label_metrics(n: int) -> None:
    """compare()'s counting macro-F1, a batch of resamples at a time, gives the P value and
    effect that the plain permutation test gives with label_metrics on each resample:
    unparseable and unknown predictions, and classes absent from the test set, included."""
    rng = np.random.default_rng(n)
    labels = ["x", "y", "z"]
    a, b = _label_rows(rng, labels, n, 0.4), _label_rows(rng, labels, n, 0.7)
    for row_a, row_b in zip(a, b, strict=True):
        row_b["target"] = row_a["target"]
    items_a = [(r["prediction"], r["target"]) for r in a]
    items_b = [(r["prediction"], r["target"]) for r in b]

    def f1(items) -> float:
        return label_metrics([p for p, _ in items], [g for _, g in items], labels)["f1_macro"]

    generic = paired_permutation_test(f1, items_a, items_b, n_resamples=999, seed=5)
    fast = compare("f1_macro", a, b, labels_for=lambda _: labels, n_resamples=999, seed=5)
    assert fast.p_value == pytest.approx(generic.p_value, abs=1e-12)
    assert fast.effect == pytest.approx(generic.effect, abs=1e-6)
    assert fast.effect != pytest.approx(0.0, abs=1e-3)


def test_permutation_identical_runs_is_one() -> None:
    values = [0.1, 0.5, 0.3, 0.9, 0.2, 0.7, 0.4, 0.6, 0.8, 0.05, 0.33, 0.12] * 3
    result = paired_permutation_test(np.mean, values, values, n_resamples=500)
    assert result.p_value == 1.0
    assert result.effect == 0.0
    assert result.test == "paired permutation (500 resamples)"


def test_permutation_randomized_is_seeded() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=40)
    b = a + rng.normal(0.3, 1.0, size=40)
    first = paired_permutation_test(np.mean, a, b, n_resamples=999, seed=3)
    second = paired_permutation_test(np.mean, a, b, n_resamples=999, seed=3)
    assert first == second
    reference = stats.permutation_test(
        (b, a),
        lambda x, y: np.mean(x) - np.mean(y),
        permutation_type="samples",
        n_resamples=999,
        rng=np.random.default_rng(3),
    )
    assert first.statistic == pytest.approx(reference.statistic)
    assert abs(first.p_value - reference.pvalue) < 0.06  # different draws, same distribution


# ---------------------------------------------------------------------------------- bootstrap


def test_bootstrap_identical_runs_is_one() -> None:
    values = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    result = paired_bootstrap_test(np.mean, values, values, n_resamples=200)
    assert result.p_value == 1.0
    assert result.effect == 0.0
    assert result.test == "paired bootstrap (200 resamples)"


def test_bootstrap_clearly_better_run_is_small() -> None:
    a = [0.0] * 20 + [1.0] * 5
    b = [1.0] * 25
    result = paired_bootstrap_test(np.mean, a, b, n_resamples=199)
    assert result.effect == pytest.approx(20 / 25)
    # every resampled difference is > 0: p = 2 * (0 + 1) / (199 + 1)
    assert result.p_value == pytest.approx(2 / 200)


def test_bootstrap_single_example_is_nan() -> None:
    result = paired_bootstrap_test(np.mean, [0.0], [1.0], n_resamples=50)
    assert math.isnan(result.p_value)
    assert result.effect == 1.0


# ----------------------------------------------------------------------------------- Wilcoxon


def test_wilcoxon_matches_scipy_on_kept_pairs_with_ties_and_zeros() -> None:
    a = [3, 4, None, 5, 2, 4, 5, 1, 3, 4, 4, 2]
    b = [4, 4, 3, 5, 4, 5, 5, 3, 3, 5, None, 2]
    result = wilcoxon_signed_rank(a, b)
    kept = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    xs = [x for x, _ in kept]
    ys = [y for _, y in kept]
    reference = stats.wilcoxon(ys, xs, zero_method="pratt")
    assert result.p_value == pytest.approx(reference.pvalue)
    assert result.statistic == pytest.approx(reference.statistic)
    assert (result.n, result.n_dropped) == (10, 2)
    assert result.effect == pytest.approx(np.mean(ys) - np.mean(xs))
    assert result.test == "Wilcoxon signed-rank (Pratt)"


def test_wilcoxon_all_equal_is_one() -> None:
    result = wilcoxon_signed_rank([3, 4, None, 5], [3, 4, 2, 5])
    assert result.p_value == 1.0
    assert (result.n, result.n_dropped, result.effect) == (3, 1, 0.0)


def test_wilcoxon_no_pairs_or_one_nonzero_is_graceful() -> None:
    empty = wilcoxon_signed_rank([None, 3], [4, None])
    assert math.isnan(empty.p_value) and (empty.n, empty.n_dropped) == (0, 2)
    single = wilcoxon_signed_rank([3, 3, 3], [3, 3, 4])
    assert 0.0 <= single.p_value <= 1.0
    assert single.n == 3


# --------------------------------------------------------------------------------------- Holm


def test_holm_hand_values_and_statsmodels() -> None:
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    p = [0.001, 0.2, 0.03, 0.04, 0.5, 0.012]
    assert holm(p) == pytest.approx(list(multipletests(p, method="holm")[1]))


def test_holm_passes_nan_through() -> None:
    adjusted = holm([0.01, float("nan"), 0.04, 0.03])
    assert math.isnan(adjusted[1])
    assert [adjusted[0], adjusted[2], adjusted[3]] == pytest.approx([0.03, 0.06, 0.06])
    assert holm([]) == []


# -------------------------------------------------------------------------------------- align


def _rows(targets: list, predictions: list, **scores: list) -> list[dict]:
    rows = []
    for i, (target, prediction) in enumerate(zip(targets, predictions, strict=True)):
        row = {"id": f"ex{i:02d}", "output": str(prediction), "prediction": prediction}
        row["target"] = target
        for name, values in scores.items():
            row[name] = values[i]
        rows.append(row)
    return rows


def test_align_pairs_by_id_regardless_of_order() -> None:
    a = _rows(["x", "y", "z"], ["x", "x", "z"])
    b = list(reversed(_rows(["x", "y", "z"], ["y", "y", "z"])))
    paired_a, paired_b = align(a, b)
    assert [r["id"] for r in paired_a] == [r["id"] for r in paired_b] == ["ex00", "ex01", "ex02"]
    assert [r["prediction"] for r in paired_b] == ["y", "y", "z"]


def test_align_refuses_different_id_sets() -> None:
    a = _rows(["x", "y", "z"], ["x", "x", "z"])
    b = [*_rows(["x", "y"], ["x", "x"]), {"id": "other", "target": "z", "prediction": "z"}]
    with pytest.raises(NotPairedError, match=r"1 ids only in run a.*'ex02'.*1 ids only in run b"):
        align(a, b)


def test_align_refuses_different_targets() -> None:
    a = _rows(["x", "y", "z"], ["x", "x", "z"])
    b = _rows(["x", "z", "z"], ["x", "x", "z"])
    with pytest.raises(NotPairedError, match=r"different targets for 1 of 3 ids.*'ex01'"):
        align(a, b)


def test_align_refuses_duplicate_ids() -> None:
    a = _rows(["x", "y"], ["x", "x"])
    with pytest.raises(NotPairedError, match="duplicate"):
        align(a + a[:1], a)


# ------------------------------------------------------------------------------------ compare


CLASS_TARGETS = ["x", "y", "z", "x", "y", "z", "x", "y", "z", "x"]
A_PRED = ["x", "z", None, "y", "y", "x", "x", "z", "z", "y"]
B_PRED = ["x", "y", "z", "x", "y", "z", "y", "y", "z", "x"]


def _classification(predictions: list) -> list[dict]:
    correct = [p == t for p, t in zip(predictions, CLASS_TARGETS, strict=True)]
    return _rows(CLASS_TARGETS, predictions, correct=correct)


def test_compare_accuracy_uses_mcnemar() -> None:
    a, b = _classification(A_PRED), _classification(B_PRED)
    for metric in ("accuracy", "exact_match"):
        result = compare(metric, a, b)
        direct = mcnemar_exact([r["correct"] for r in a], [r["correct"] for r in b])
        assert result == direct
        assert result.test == METRIC_TESTS[metric].test == "McNemar exact"


def test_compare_f1_uses_permutation_on_label_metrics() -> None:
    a, b = _classification(A_PRED), _classification(B_PRED)
    result = compare("f1_macro", a, b, n_resamples=2000)  # 2000 >= 2^10: exact
    labels = ["x", "y", "z"]
    expected = (
        label_metrics(B_PRED, CLASS_TARGETS, labels)["f1_macro"]
        - label_metrics(A_PRED, CLASS_TARGETS, labels)["f1_macro"]
    )
    assert result.effect == pytest.approx(expected)
    assert result.test.startswith("paired permutation")
    assert METRIC_TESTS["f1_macro"].test == "paired permutation on macro-F1"
    # A label no gold uses has no F1 and stays out of the macro average (MACRO_F1_RULE), so
    # an explicit label set with such a label leaves the effect as it was.
    wider = compare("f1_macro", a, b, labels_for=lambda m: [*labels, "w"], n_resamples=100)
    assert wider.effect == pytest.approx(expected)


def _triage(predictions: list) -> list[dict]:
    targets = [
        {"provider": "gp", "urgency": "routine"},
        {"provider": "er", "urgency": "urgent"},
        {"provider": "gp", "urgency": "urgent"},
        {"provider": "nurse", "urgency": "routine"},
        {"provider": "er", "urgency": "emergency"},
        {"provider": "nurse", "urgency": "routine"},
    ]
    rows = _rows(targets, predictions)
    for row in rows:
        prediction, target = row["prediction"] or {}, row["target"]
        row["provider_correct"] = prediction.get("provider") == target["provider"]
        row["urgency_correct"] = prediction.get("urgency") == target["urgency"]
        row["correct"] = row["provider_correct"] and row["urgency_correct"]
    return rows


TRIAGE_A = [
    {"provider": "gp", "urgency": "urgent"},
    None,
    {"provider": "gp", "urgency": None},
    {"provider": "gp", "urgency": "routine"},
    {"provider": None, "urgency": "emergency"},
    {"provider": "nurse", "urgency": "urgent"},
]
TRIAGE_B = [
    {"provider": "gp", "urgency": "routine"},
    {"provider": "er", "urgency": "urgent"},
    {"provider": "gp", "urgency": "urgent"},
    {"provider": "nurse", "urgency": "urgent"},
    {"provider": "er", "urgency": "emergency"},
    {"provider": "nurse", "urgency": "routine"},
]


@pytest.mark.parametrize(
    ("metric", "field"),
    [("provider_accuracy", "provider_correct"), ("urgency_accuracy", "urgency_correct")],
)
def test_compare_triage_accuracy(metric: str, field: str) -> None:
    a, b = _triage(TRIAGE_A), _triage(TRIAGE_B)
    result = compare(metric, a, b)
    assert result == mcnemar_exact([r[field] for r in a], [r[field] for r in b])
    assert result.test == "McNemar exact"


@pytest.mark.parametrize("part", ["provider", "urgency"])
def test_compare_triage_f1(part: str) -> None:
    a, b = _triage(TRIAGE_A), _triage(TRIAGE_B)
    result = compare(f"{part}_f1_macro", a, b, n_resamples=64)  # 64 = 2^6: exact
    golds = [r["target"][part] for r in a]
    labels = sorted(set(golds))
    a_pred = [(p or {}).get(part) for p in TRIAGE_A]
    b_pred = [p[part] for p in TRIAGE_B]
    expected = (
        label_metrics(b_pred, golds, labels)["f1_macro"]
        - label_metrics(a_pred, golds, labels)["f1_macro"]
    )
    assert result.effect == pytest.approx(expected)
    assert result.test == "paired permutation (exact, all 64 swaps)"


def _summaries(rouge: list, likert: list) -> list[dict]:
    targets = [f"summary {i}" for i in range(len(rouge))]
    return _rows(targets, targets, rougeL=rouge, likert=likert)


def test_compare_summarization_metrics() -> None:
    a = _summaries([0.2, 0.3, 0.25, 0.4, 0.1, 0.35], [3, None, 4, 2, 3, 3])
    b = _summaries([0.3, 0.35, 0.25, 0.5, 0.2, 0.3], [4, 4, 4, 3, None, 5])
    likert = compare("likert_mean", a, b)
    assert likert == wilcoxon_signed_rank([3, None, 4, 2, 3, 3], [4, 4, 4, 3, None, 5])
    assert (likert.test, likert.n, likert.n_dropped) == ("Wilcoxon signed-rank (Pratt)", 4, 2)
    rouge = compare("rougeL", a, b, n_resamples=100)
    assert rouge.effect == pytest.approx(np.mean([0.1, 0.05, 0.0, 0.1, 0.1, -0.05]))
    assert rouge.test.startswith("paired permutation")
    assert METRIC_TESTS["rougeL"].test == "paired permutation on the mean"


def test_compare_unknown_metric_lists_supported() -> None:
    rows = _classification(A_PRED)
    with pytest.raises(ValueError, match=r"supported: .*'accuracy'.*'urgency_f1_macro'"):
        compare("bleu", rows, rows)


def test_compare_refuses_unpaired_runs() -> None:
    a = _classification(A_PRED)
    with pytest.raises(NotPairedError):
        compare("accuracy", a, a[:-1])
