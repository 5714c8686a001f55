"""Every P value of a small report, recomputed without the report's code.

A sweep small enough to enumerate (one model, base/sft/dpo, two seeds of four test examples:
eight pooled pairs, so 2**8 swaps) goes through the real report code (collect_dirs →
build_report). Each P value is then recomputed from the prediction rows alone: McNemar's
exact test as a binomial test on the discordant pairs (scipy.stats.binomtest), the paired
permutation tests by enumerating every within-pair swap (our own macro-F1 and mean), the
Wilcoxon signed-rank test (Pratt) by enumerating every sign flip of the differences, and
Holm's adjustment by hand. The report is asked for exactly 2**8 resamples, the fewest with
which scipy enumerates all swaps, so its permutation P values are exact and must agree to
1e-9 rather than within Monte Carlo error.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import yaml
from scipy.stats import binomtest, rankdata, wilcoxon
from statsmodels.stats.contingency_tables import mcnemar

from clintune.report import build_report, collect_dirs
from clintune.report.table import Comparison, Report, comparisons_for

# One worker runs this module under -n: its module fixtures are built once.
pytestmark = pytest.mark.xdist_group("report_pvalues")

MODEL = "m1"
METHODS = ("base", "sft", "dpo")
SEEDS = (1, 2)
PER_SEED = 4  # test examples per run
N_PAIRS = PER_SEED * len(SEEDS)  # pooled pairs per comparison
ALL_SWAPS = 2**N_PAIRS
TOLERANCE = 1e-9
SKILL = {"base": 0.35, "sft": 0.6, "dpo": 0.8}

PROVIDERS = ["physician", "nurse", "pharmacist", "admin"]
URGENCIES = ["routine", "soon", "urgent", "emergent"]
TASKS: dict[str, dict[str, Any]] = {
    "classification": {
        "_target_": "clintune.tasks.classification.ClassificationTask",
        "name": "classification",
        "labels": ["yes", "no"],
    },
    "triage": {
        "_target_": "clintune.tasks.triage.TriageTask",
        "name": "triage",
        "provider_labels": PROVIDERS,
        "urgency_labels": URGENCIES,
    },
    "summarization": {
        "_target_": "clintune.tasks.summarization.SummarizationTask",
        "name": "summarization",
    },
}
# The report's rows, headline first, as build_report orders them.
METRICS = {
    "classification": ["f1_macro", "accuracy"],
    "triage": ["provider_f1_macro", "provider_accuracy"],
    "summarization": ["rougeL", "likert_mean"],
}
CASES = [
    (task, metric, control, treatment)
    for task, metrics in METRICS.items()
    for metric in metrics
    for control, treatment in comparisons_for(METHODS)
]


# ------------------------------------------------------------------ the sweep


def _rows(task: str, method: str, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng([list(TASKS).index(task), METHODS.index(method), seed])
    skill = SKILL[method]
    rows: list[dict[str, Any]] = []
    for i in range(PER_SEED):
        row: dict[str, Any] = {"id": f"{task}-{i:03d}"}
        if task == "classification":
            gold = "yes" if (i + seed) % 2 == 0 else "no"
            other = "no" if gold == "yes" else "yes"
            draw = rng.random()
            # Unparseable (None) answers are their own class: always wrong, out of the average.
            prediction = gold if draw < skill else None if draw > 0.9 else other
            row |= {"target": gold, "prediction": prediction, "correct": prediction == gold}
        elif task == "triage":
            # "admin" is never the gold provider, only a wrong answer: it has no F1 and is not
            # averaged, but answering it is still an error.
            gold = {"provider": PROVIDERS[(i + seed) % 3], "urgency": URGENCIES[(2 * i + seed) % 4]}
            provider = gold["provider"] if rng.random() < skill else str(rng.choice(PROVIDERS))
            urgency = gold["urgency"] if rng.random() < skill else str(rng.choice(URGENCIES))
            prediction = {"provider": provider, "urgency": urgency}
            row |= {
                "target": gold,
                "prediction": prediction,
                "provider_correct": prediction["provider"] == gold["provider"],
                "urgency_correct": prediction["urgency"] == gold["urgency"],
            }
        else:
            # Likert grades tie a lot, and some pairs do not differ at all: Pratt's zeros.
            grade = int(np.clip(round(1 + 4 * skill + rng.normal(0, 1)), 1, 5))
            missing = (method, seed, i) == ("sft", 2, 3)  # the judge gave no grade
            row |= {
                "target": "reference summary",
                "prediction": "a summary",
                "rougeL": round(float(np.clip(skill + rng.normal(0, 0.2), 0, 1)), 2),
                "likert": None if missing else grade,
            }
        rows.append(row)
    return rows


def _metrics_json(task: str) -> dict[str, float]:
    # Any values: the table only averages them. The tests recompute from predictions.jsonl.
    return {f"test/{metric}": 0.5 for metric in METRICS[task]} | {"test/n": float(PER_SEED)}


def make_sweep(root: Path) -> Path:
    sweep = root / "multirun" / "small"
    for task, task_config in TASKS.items():
        for method in METHODS:
            for seed in SEEDS:
                run = sweep / f"{MODEL}-{task}-{method}-s{seed}"
                (run / ".hydra").mkdir(parents=True)
                config = {
                    "model": {"name": MODEL},
                    "task": task_config,
                    "method": {"name": method},
                    "seed": seed,
                }
                (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
                lines = "".join(json.dumps(r) + "\n" for r in _rows(task, method, seed))
                (run / "predictions.jsonl").write_text(lines)
                (run / "metrics.json").write_text(json.dumps(_metrics_json(task)))
                (run / "job.json").write_text(json.dumps({"status": "finished"}))
    return sweep


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Report:
    sweep = make_sweep(tmp_path_factory.mktemp("pvalues"))
    return build_report(collect_dirs([sweep]), n_resamples=ALL_SWAPS)


def _comparison(report: Report, task: str, metric: str, control: str, treatment: str) -> Comparison:
    key = (task, metric, MODEL, control, treatment)
    matches = [
        c for c in report.comparisons if (c.task, c.metric, c.model, c.control, c.treatment) == key
    ]
    assert len(matches) == 1, key
    return matches[0]


def _pooled(task: str, method: str, seeds: Sequence[int] = SEEDS) -> list[dict[str, Any]]:
    """The runs' rows, seed after seed: seed s of one method pairs with seed s of the other."""
    return [row for seed in seeds for row in _rows(task, method, seed)]


# ------------------------------------------------------------------ independent P values


def exact_mcnemar_p(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> float:
    """Exact McNemar: under the null a discordant pair is b-right-a-wrong with chance 1/2."""
    b_only = sum(b and not a for a, b in zip(a_correct, b_correct, strict=True))
    a_only = sum(a and not b for a, b in zip(a_correct, b_correct, strict=True))
    if a_only + b_only == 0:
        return 1.0
    return float(binomtest(b_only, a_only + b_only, 0.5, alternative="two-sided").pvalue)


def every_swap(n: int) -> np.ndarray:
    """All 2**n ways to swap (True) or keep each of n pairs, one row each."""
    return ((np.arange(2**n)[:, None] >> np.arange(n)) & 1).astype(bool)


def two_sided_p(null: np.ndarray, observed: float) -> float:
    """Share of the enumerated null at least as far from zero as the observed statistic.

    Swapping every pair negates the statistic, so the null is symmetric about zero and this
    equals twice the smaller tail."""
    return float(np.mean(np.abs(null) >= abs(observed) - TOLERANCE))


def macro_f1(predicted: np.ndarray, gold: np.ndarray, n_labels: int) -> np.ndarray:
    """Macro-F1 over the labels 0..n_labels-1 that some gold example has, for each row of
    ``predicted`` (label indices; any other index is an invalid answer: wrong, and not a class
    of the average). A label no gold example has has no F1 and is not averaged."""
    scores = []
    for label in range(n_labels):
        is_gold = gold == label
        if not is_gold.any():
            continue
        hit = predicted == label
        true_pos = np.sum(hit & is_gold, axis=-1)
        false_pos = np.sum(hit & ~is_gold, axis=-1)
        false_neg = np.sum(~hit & is_gold, axis=-1)
        scores.append(2 * true_pos / (2 * true_pos + false_pos + false_neg))
    return np.mean(scores, axis=0)


def permutation_p(
    statistic: Callable[[np.ndarray], np.ndarray], a: np.ndarray, b: np.ndarray
) -> tuple[float, float]:
    """(p, observed) of ``statistic(b) - statistic(a)`` over every within-pair swap."""
    swapped = every_swap(len(a))
    a_null, b_null = np.where(swapped, b, a), np.where(swapped, a, b)
    null = statistic(b_null) - statistic(a_null)
    observed = float(statistic(b[None, :])[0] - statistic(a[None, :])[0])
    return two_sided_p(null, observed), observed


def f1_permutation_p(
    a_predictions: Sequence[str | None],
    b_predictions: Sequence[str | None],
    golds: Sequence[str],
    labels: Sequence[str],
) -> tuple[float, float]:
    def index(label: str | None) -> int:
        return labels.index(label) if label in labels else len(labels)

    gold = np.array([index(g) for g in golds])
    a = np.array([index(p) for p in a_predictions])
    b = np.array([index(p) for p in b_predictions])
    return permutation_p(lambda predicted: macro_f1(predicted, gold, len(labels)), a, b)


def mean_permutation_p(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    return permutation_p(lambda x: np.mean(x, axis=-1), np.asarray(a), np.asarray(b))


def wilcoxon_pratt_p(differences: Sequence[float]) -> float:
    """Signed-rank test with Pratt's zeros, exactly: rank |d| with the zeros (average ranks for
    ties), sum the ranks of the positive d, and compare with that sum under every sign flip."""
    d = np.asarray(differences, dtype=float)
    ranks = rankdata(np.abs(d))
    observed = ranks[d > 0].sum()
    signed = np.where(every_swap(len(d)), -d, d)
    null = (ranks * (signed > 0)).sum(axis=1)
    lower = np.mean(null <= observed + TOLERANCE)
    upper = np.mean(null >= observed - TOLERANCE)
    return float(min(1.0, 2 * min(lower, upper)))


def holm_adjusted(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down: the k-th smallest of m P values times (m - k + 1), made monotone."""
    m = len(p_values)
    adjusted = [0.0] * m
    running = 0.0
    for position, index in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - position) * p_values[index]))
        adjusted[index] = running
    return adjusted


def _labels(task: str, part: str | None) -> list[str]:
    config = TASKS[task]
    return list(config[f"{part}_labels"] if part else config["labels"])


class Expected(NamedTuple):
    p_value: float
    n: int  # pairs the test used
    effect: float  # metric(treatment) - metric(control) on those pairs


def _part_label(value: Any, part: str | None) -> str | None:
    return value.get(part) if part and value is not None else value


def recompute(task: str, metric: str, control: str, treatment: str) -> Expected:
    """What the report should say of ``treatment`` vs ``control``, from the rows alone."""
    a_rows, b_rows = _pooled(task, control), _pooled(task, treatment)
    if metric.endswith("accuracy"):
        field = metric.removesuffix("accuracy") + "correct"
        a, b = [r[field] for r in a_rows], [r[field] for r in b_rows]
        return Expected(exact_mcnemar_p(a, b), N_PAIRS, float(np.mean(b) - np.mean(a)))
    if metric.endswith("f1_macro"):
        part = metric.removesuffix("f1_macro").removesuffix("_") or None
        p, observed = f1_permutation_p(
            [_part_label(r["prediction"], part) for r in a_rows],
            [_part_label(r["prediction"], part) for r in b_rows],
            [_part_label(r["target"], part) for r in a_rows],
            _labels(task, part),
        )
        return Expected(p, N_PAIRS, observed)
    if metric == "rougeL":
        p, observed = mean_permutation_p(
            [r["rougeL"] for r in a_rows], [r["rougeL"] for r in b_rows]
        )
        return Expected(p, N_PAIRS, observed)
    assert metric == "likert_mean"
    graded = np.array(
        [
            (a["likert"], b["likert"])
            for a, b in zip(a_rows, b_rows, strict=True)
            if a["likert"] is not None and b["likert"] is not None
        ]
    )
    differences = graded[:, 1] - graded[:, 0]
    return Expected(wilcoxon_pratt_p(differences), len(graded), float(differences.mean()))


# ------------------------------------------------------------------ the tests


def test_the_small_report_runs_every_kind_of_test_exactly(report: Report) -> None:
    assert {(c.task, c.metric, c.control, c.treatment) for c in report.comparisons} == set(CASES)
    assert all(c.status == "ok" and c.p_value is not None for c in report.comparisons)
    tests = {c.test for c in report.comparisons}
    assert tests == {
        "McNemar exact",
        f"paired permutation on macro-F1 (exact, all {ALL_SWAPS:,} swaps)",
        f"paired permutation on the mean (exact, all {ALL_SWAPS:,} swaps)",
        "Wilcoxon signed-rank (Pratt)",
    }


@pytest.mark.parametrize(
    ("task", "metric", "control", "treatment"),
    CASES,
    ids=[f"{t}-{m}-{treat}_vs_{ctrl}" for t, m, ctrl, treat in CASES],
)
def test_every_p_value_matches_an_independent_computation(
    report: Report, task: str, metric: str, control: str, treatment: str
) -> None:
    comparison = _comparison(report, task, metric, control, treatment)
    want = recompute(task, metric, control, treatment)
    assert comparison.n == want.n
    assert comparison.n_dropped == N_PAIRS - want.n
    assert comparison.p_value == pytest.approx(want.p_value, abs=TOLERANCE, rel=0)
    # torchmetrics computes F1 in float32, hence the looser tolerance for the effect.
    assert comparison.effect == pytest.approx(want.effect, abs=1e-6, rel=0)


def test_holm_adjustment_of_the_independent_p_values(report: Report) -> None:
    # build_report adjusts over every computed test of the report, in report order.
    independent = [
        recompute(c.task, c.metric, c.control, c.treatment).p_value for c in report.comparisons
    ]
    expected = holm_adjusted(independent)
    assert [c.p_adjusted for c in report.comparisons] == pytest.approx(
        expected, abs=TOLERANCE, rel=0
    )
    # The data can tell Holm from no correction and from plain Bonferroni.
    bonferroni = [min(1.0, len(independent) * p) for p in independent]
    assert any(abs(h - p) > 1e-3 for h, p in zip(expected, independent, strict=True))
    assert any(abs(h - b) > 1e-3 for h, b in zip(expected, bonferroni, strict=True))


def test_the_data_can_tell_the_test_variants_apart(report: Report) -> None:
    """Were the report to use a neighbouring variant of a test, its P values would differ."""
    sft, dpo = _pooled("classification", "sft"), _pooled("classification", "dpo")
    a = np.array([r["correct"] for r in sft])
    b = np.array([r["correct"] for r in dpo])
    table = [[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]]
    exact = exact_mcnemar_p(a, b)
    assert abs(mcnemar(table, exact=False).pvalue - exact) > 1e-3  # chi-square, not exact
    assert abs(exact_mcnemar_p(a[:PER_SEED], b[:PER_SEED]) - exact) > 1e-3  # one seed only

    wilcox, pratt = [], []
    for control, treatment in comparisons_for(METHODS):
        pairs = zip(
            _pooled("summarization", control), _pooled("summarization", treatment), strict=True
        )
        differences = [
            b["likert"] - a["likert"]
            for a, b in pairs
            if a["likert"] is not None and b["likert"] is not None
        ]
        pratt.append(wilcoxon_pratt_p(differences))
        wilcox.append(wilcoxon(differences, zero_method="wilcox").pvalue)
        # scipy, asked the same question, agrees with the enumeration.
        assert wilcoxon(differences, zero_method="pratt").pvalue == pytest.approx(
            pratt[-1], abs=TOLERANCE, rel=0
        )
    # Where some pairs tie at zero, dropping them ("wilcox") gives another P value.
    assert any(abs(w - p) > 1e-3 for w, p in zip(wilcox, pratt, strict=True))

    # "admin" is in the task's provider labels but never a gold label: it has no F1, so the
    # macro-F1 over the task's labels equals the one over the gold labels (MACRO_F1_RULE);
    # DPO's "admin" answers still count, as errors against their gold class.
    sft, dpo = _pooled("triage", "sft"), _pooled("triage", "dpo")
    arguments = (
        [r["prediction"]["provider"] for r in sft],
        [r["prediction"]["provider"] for r in dpo],
        [r["target"]["provider"] for r in sft],
    )
    assert "admin" not in arguments[2] and "admin" in arguments[1]
    _, effect_over_task_labels = f1_permutation_p(*arguments, PROVIDERS)
    _, effect_over_gold_labels = f1_permutation_p(*arguments, sorted(set(arguments[2])))
    assert effect_over_task_labels == pytest.approx(effect_over_gold_labels, abs=1e-12)


def test_seeds_are_pooled_into_one_test_of_independent_pairs(report: Report) -> None:
    """Both seeds' pairs go into one test with n = the sum of their examples, seed s of one
    method paired with seed s of the other (not a test per seed, nor an average over seeds)."""
    comparison = _comparison(report, "classification", "accuracy", "sft", "dpo")
    assert comparison.seeds == list(SEEDS)
    assert comparison.n == len(SEEDS) * PER_SEED
    a = [r["correct"] for r in _pooled("classification", "sft")]
    b = [r["correct"] for r in _pooled("classification", "dpo")]
    pooled = exact_mcnemar_p(a, b)
    assert comparison.p_value == pytest.approx(pooled, abs=TOLERANCE, rel=0)
    per_seed = [
        exact_mcnemar_p(
            [r["correct"] for r in _rows("classification", "sft", seed)],
            [r["correct"] for r in _rows("classification", "dpo", seed)],
        )
        for seed in SEEDS
    ]
    assert all(abs(p - pooled) > 1e-3 for p in per_seed)
    # Seed 1 of sft against seed 2 of dpo would be another test with another P value.
    crossed = exact_mcnemar_p(
        a, [r["correct"] for r in _pooled("classification", "dpo", seeds=SEEDS[::-1])]
    )
    assert abs(crossed - pooled) > 1e-3
