"""The classification parser and the label metrics, against hand-computed values."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from clintune.eval.metrics import MACRO_F1_RULE, label_metrics
from clintune.eval.runner import score_outputs
from clintune.eval.significance import compare
from clintune.eval.statistics import bootstrap_intervals
from clintune.tasks.classification import ClassificationTask, parse_label

LABELS = ["yes", "no"]


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("yes", "yes"),
        ("No", "no"),
        ("YES.", "yes"),
        ("  **No**, the criteria are not met", "no"),
        ('"yes"', "yes"),
        ("The answer is yes", "yes"),
        ("Criteria met: yes.", "yes"),
        ("No. Although yes, dysuria is present", "no"),  # the leading answer wins
        ("maybe", None),
        ("", None),
        ("nothing to report", None),  # 'no' inside a word is not an answer
        ("no-show", None),
        ("it could be yes or no", None),  # ambiguous when not leading
    ],
)
def test_parse_label(output: str, expected: str | None) -> None:
    assert parse_label(output, LABELS) == expected


def test_parse_label_with_multiword_labels() -> None:
    labels = ["not met", "met"]
    assert parse_label("Not met.", labels) == "not met"
    assert parse_label("met", labels) == "met"


def test_label_metrics_hand_computed() -> None:
    predictions = ["yes", "no", None, "yes", "yes"]
    golds = ["yes", "yes", "no", "no", "yes"]
    metrics = label_metrics(predictions, golds, LABELS)
    # yes: tp=2 fp=1 fn=1 → P=2/3 R=2/3 F1=2/3; no: tp=0 → F1=0; unparseable is just wrong.
    assert metrics["f1_class_yes"] == pytest.approx(2 / 3)
    assert metrics["f1_class_no"] == pytest.approx(0.0)
    assert metrics["f1_macro"] == pytest.approx(1 / 3)
    assert metrics["accuracy"] == pytest.approx(2 / 5)


def test_label_metrics_perfect_and_all_unparseable() -> None:
    assert label_metrics(["yes", "no"], ["yes", "no"], LABELS)["f1_macro"] == pytest.approx(1.0)
    worst = label_metrics([None, None], ["yes", "no"], LABELS)
    assert worst["f1_macro"] == 0.0 and worst["accuracy"] == 0.0


def test_label_metrics_rejects_unknown_gold_and_length_mismatch() -> None:
    with pytest.raises(ValueError, match="not in the label set"):
        label_metrics(["yes"], ["maybe"], LABELS)
    with pytest.raises(ValueError, match="predictions for"):
        label_metrics(["yes"], ["yes", "no"], LABELS)


def test_a_class_without_test_examples_has_undefined_f1_and_leaves_macro_f1_alone() -> None:
    # eval.limit cut the head of a file whose "no" examples come later: every prediction right.
    metrics = label_metrics(["yes", "yes", "yes"], ["yes", "yes", "yes"], LABELS)
    assert metrics["f1_class_yes"] == 1.0
    assert math.isnan(metrics["f1_class_no"])
    assert metrics["f1_macro"] == 1.0  # not (1 + 0) / 2
    # A prediction of the absent class is still an error: it costs the true class's recall.
    metrics = label_metrics(["yes", "no"], ["yes", "yes"], LABELS)
    assert metrics["f1_class_yes"] == pytest.approx(2 / 3)  # P=1, R=1/2
    assert math.isnan(metrics["f1_class_no"])
    assert metrics["f1_macro"] == pytest.approx(2 / 3)
    # Three classes, one absent: the mean is over the two present.
    three = label_metrics(["a", "b", "a"], ["a", "b", "b"], ["a", "b", "c"])
    assert three["f1_macro"] == pytest.approx((2 / 3 + 2 / 3) / 2)


def test_a_run_warns_about_an_undefined_class_and_names_the_rule(
    caplog: pytest.LogCaptureFixture,
) -> None:
    task = ClassificationTask(name="cls", data={}, instruction="?", labels=LABELS)
    examples = [{"id": str(i), "text": "t", "label": "yes"} for i in range(6)]
    with caplog.at_level(logging.WARNING):
        result = score_outputs(task, examples, ["yes"] * 6, bootstrap={"samples": 50})
    assert result.metrics["f1_macro"] == 1.0
    assert math.isnan(result.metrics["f1_class_no"])
    assert "f1_class_no" in caplog.text and MACRO_F1_RULE in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        score_outputs(task, [*examples[:1], {**examples[1], "label": "no"}], ["yes", "no"])
    assert "undefined" not in caplog.text  # both classes present: no warning


def test_bootstrap_interval_of_a_metric_undefined_on_some_resamples() -> None:
    golds = ["yes"] * 18 + ["no"] * 2
    predictions = list(golds)

    def metrics_of(indices: np.ndarray) -> dict[str, float]:
        return label_metrics([predictions[i] for i in indices], [golds[i] for i in indices], LABELS)

    intervals = bootstrap_intervals(len(golds), metrics_of, n_resamples=200, seed=1)
    # Some resamples hold no "no" example (P = 0.9^20 ≈ 0.12): the class's F1 is NaN there,
    # and the interval comes from the resamples where it is defined.
    assert intervals["f1_class_no"] == (1.0, 1.0)
    assert intervals["f1_macro"] == (1.0, 1.0)


def test_bootstrap_with_nan_resamples_keeps_scipys_interval_where_all_are_defined() -> None:
    values = np.linspace(0.0, 1.0, 30)

    def metrics_of(indices: np.ndarray) -> dict[str, float]:
        mean = float(values[indices].mean())
        sometimes = mean if 0 in indices else math.nan  # undefined without example 0
        return {"mean": mean, "sometimes": sometimes, "never": math.nan}

    intervals = bootstrap_intervals(len(values), metrics_of, n_resamples=300, seed=3)
    from scipy.stats import bootstrap

    reference = bootstrap(
        (values,),
        np.mean,
        n_resamples=300,
        method="percentile",
        rng=np.random.default_rng(3),
    ).confidence_interval
    assert intervals["mean"] == pytest.approx((reference.low, reference.high))
    low, high = intervals["sometimes"]
    assert 0.0 < low < high < 1.0
    assert all(math.isnan(v) for v in intervals["never"])


def test_paired_f1_test_on_one_class_golds() -> None:
    rows_a = [{"id": str(i), "target": "yes", "prediction": "yes"} for i in range(8)]
    rows_b = [{**row, "prediction": "no" if i < 4 else "yes"} for i, row in enumerate(rows_a)]
    result = compare("f1_macro", rows_a, rows_b, labels_for=lambda _: LABELS, n_resamples=200)
    # macro-F1 over the one class present: a = 1, b = F1(yes) with recall 1/2 = 2/3.
    assert result.effect == pytest.approx(2 / 3 - 1)
