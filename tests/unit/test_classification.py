"""The classification parser and the label metrics, against hand-computed values."""

from __future__ import annotations

import pytest

from clintune.eval.metrics import label_metrics
from clintune.tasks.classification import parse_label

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
