"""Rule-based text classification: a clinical note → a label by a stated rule (the study's
first task, e.g. 'does this note meet the criteria for a urinary tract infection?')."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, ClassVar

from clintune.eval.metrics import label_metrics
from clintune.tasks.base import Task
from clintune.tasks.data import FieldSpec


def parse_label(output: str, labels: Sequence[str]) -> str | None:
    """The label a free-text answer gives, tolerant of case, punctuation and extra words.

    The answer's first word wins when it is a label ("Yes, the criteria are met."); otherwise
    exactly one distinct label must appear, so "yes or no" stays unparseable.
    """
    text = output.strip().lower()
    by_lower = {label.lower(): label for label in labels}
    alternatives = "|".join(re.escape(label) for label in sorted(by_lower, key=len, reverse=True))
    pattern = rf"(?<![\w-])(?:{alternatives})(?![\w-])"
    leading = re.match(rf"[\W_]*({alternatives})(?![\w-])", text)
    if leading:
        return by_lower[leading.group(1)]
    found = {match.group(0) for match in re.finditer(pattern, text)}
    return by_lower[found.pop()] if len(found) == 1 else None


class ClassificationTask(Task):
    headline_metric: ClassVar[str] = "f1_macro"

    def __init__(self, *, labels: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.labels = [str(label) for label in labels]
        if len(set(self.labels)) < 2:
            raise ValueError(f"task '{self.name}' needs at least two distinct labels")

    def schema(self) -> dict[str, FieldSpec]:
        return {
            "text": FieldSpec(str, description="the clinical note"),
            "label": FieldSpec(str, allowed=tuple(self.labels), description="the rule's verdict"),
        }

    def input_text(self, example: dict[str, Any]) -> str:
        return example["text"]

    def target_text(self, example: dict[str, Any]) -> str:
        return example["label"]

    def wrong_answers(self, example: dict[str, Any]) -> list[str]:
        return [label for label in self.labels if label != example["label"]]

    def gold(self, example: dict[str, Any]) -> str:
        return example["label"]

    def parse(self, output: str, example: dict[str, Any] | None = None) -> str | None:
        return parse_label(output, self.labels)

    def score_examples(
        self, examples: list[dict[str, Any]], predictions: list[Any | None], golds: list[Any]
    ) -> list[dict[str, Any]]:
        return [{"correct": p == g} for p, g in zip(predictions, golds, strict=True)]

    def aggregate(
        self, predictions: list[Any | None], golds: list[Any], scores: list[dict[str, Any]]
    ) -> dict[str, float]:
        return label_metrics(predictions, golds, self.labels)
