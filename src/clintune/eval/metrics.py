"""Metric math as small pure functions over parsed predictions (torchmetrics underneath)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

#: The rule for a class without test examples, quoted in warnings, the report and the docs.
MACRO_F1_RULE = (
    "macro-F1 is the mean F1 over the classes with at least one test example; a class with "
    "none has no F1 (undefined, reported as NaN) and is left out of the mean"
)


def label_indices(
    predictions: Sequence[str | None], golds: Sequence[str], labels: Sequence[str]
) -> tuple[list[int], list[int]]:
    """Predictions and golds as positions in ``labels``; an unparseable (None) or unknown
    prediction is position ``len(labels)``, a class of its own that is always wrong. A gold
    label outside ``labels`` is an error."""
    index = {label: position for position, label in enumerate(labels)}
    unknown = sorted({gold for gold in golds if gold not in index})
    if unknown:
        raise ValueError(f"gold labels {unknown} are not in the label set {list(labels)}")
    invalid = len(labels)
    predicted = [index.get(p, invalid) if p is not None else invalid for p in predictions]
    return predicted, [index[g] for g in golds]


def label_metrics(
    predictions: Sequence[str | None], golds: Sequence[str], labels: Sequence[str]
) -> dict[str, float]:
    """Macro-F1, accuracy and per-class F1 over ``labels``.

    An unparseable prediction (None) is its own class: it is always wrong, lowers the recall
    of its gold class, and is left out of the macro average, which runs over the real labels.

    A label with no gold example has no recall, so its F1 is undefined: it is NaN and left
    out of the macro average (``MACRO_F1_RULE``). Scoring it 0 would halve a binary task's
    macro-F1 whenever a test cut holds one class only, however right every prediction was.
    Predictions of such a label still count against the recall of the examples' true class.
    """
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} gold labels")
    if not golds:
        raise ValueError("no examples to score")
    predicted_indices, target_indices = label_indices(predictions, golds, labels)
    predicted, target = torch.tensor(predicted_indices), torch.tensor(target_indices)
    num_classes = len(labels) + 1
    per_class = multiclass_f1_score(predicted, target, num_classes=num_classes, average=None)
    accuracy = multiclass_accuracy(predicted, target, num_classes=num_classes, average="micro")
    present = set(golds)
    class_f1 = {
        label: float(value) if label in present else math.nan
        for label, value in zip(labels, per_class[: len(labels)].tolist(), strict=True)
    }
    defined = [value for value in class_f1.values() if not math.isnan(value)]
    metrics = {"f1_macro": sum(defined) / len(defined), "accuracy": float(accuracy)}
    for label, value in class_f1.items():
        metrics[f"f1_class_{label}"] = value
    return metrics


def undefined_class_f1(metrics: Mapping[str, float]) -> list[str]:
    """The ``…f1_class_<label>`` keys whose F1 is undefined (the class had no test example)."""
    return sorted(
        key
        for key, value in metrics.items()
        if "f1_class_" in key and isinstance(value, float) and math.isnan(value)
    )
