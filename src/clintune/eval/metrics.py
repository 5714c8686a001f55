"""Metric math as small pure functions over parsed predictions (torchmetrics underneath)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score


def label_metrics(
    predictions: Sequence[str | None], golds: Sequence[str], labels: Sequence[str]
) -> dict[str, float]:
    """Macro-F1, accuracy and per-class F1 over ``labels``.

    An unparseable prediction (None) is its own class: it is always wrong, lowers the recall
    of its gold class, and is left out of the macro average, which runs over the real labels.
    """
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} gold labels")
    if not golds:
        raise ValueError("no examples to score")
    index = {label: position for position, label in enumerate(labels)}
    unknown = sorted({gold for gold in golds if gold not in index})
    if unknown:
        raise ValueError(f"gold labels {unknown} are not in the label set {list(labels)}")
    invalid = len(labels)
    predicted = torch.tensor(
        [index.get(p, invalid) if p is not None else invalid for p in predictions]
    )
    target = torch.tensor([index[g] for g in golds])
    num_classes = len(labels) + 1
    per_class = multiclass_f1_score(predicted, target, num_classes=num_classes, average=None)
    accuracy = multiclass_accuracy(predicted, target, num_classes=num_classes, average="micro")
    metrics = {
        "f1_macro": float(per_class[: len(labels)].mean()),
        "accuracy": float(accuracy),
    }
    for label, value in zip(labels, per_class[: len(labels)].tolist(), strict=True):
        metrics[f"f1_class_{label}"] = float(value)
    return metrics
