"""Portal-message triage: a patient's message → which provider should answer it and how soon,
both in one structured answer ("provider: nurse; urgency: soon")."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, ClassVar

from clintune.eval.metrics import label_metrics
from clintune.tasks.base import Task
from clintune.tasks.data import FieldSpec

PART_KEYS: dict[str, tuple[str, ...]] = {
    "provider": ("provider", "route", "routing", "routed to", "send to"),
    "urgency": ("urgency", "priority"),
}

# A label right after one of these is denied, not given ("urgency: not urgent").
_NEGATIONS = ("not", "no", "non", "never", "isn't", "isnt")
# Decoration a model may put between a key and its value ("**Provider** = the Nurse").
_KEY_VALUE_GAP = r"""(?:[\s*_"'`:=>\-–—]|\bis\b|\bto\b|\bthe\b|\ba\b|\ban\b|\blevel\b)*"""


def _label_alternatives(labels: Sequence[str]) -> str:
    # Longest first, so a label that extends another ("urgent care" vs "urgent") wins.
    return "|".join(re.escape(label.lower()) for label in sorted(labels, key=len, reverse=True))


def _is_negated(text: str, start: int) -> bool:
    # Articles are skipped so that "not the nurse" is caught as well as "not nurse".
    preceding = [
        word
        for word in re.findall(r"[\w']+", text[max(0, start - 30) : start])
        if word not in ("the", "a", "an")
    ]
    return bool(preceding) and preceding[-1] in _NEGATIONS


def parse_part(output: str, keys: Sequence[str], labels: Sequence[str]) -> str | None:
    """One part of a structured answer: the label after its key, or else the one label of
    this set the text mentions.

    The keyed value is trusted first, and its first occurrence wins, so a model that repeats
    itself after answering is scored on its answer; a keyed hedge ("provider: nurse or
    physician") is unparseable. Without a key exactly one distinct un-negated label must
    appear, so "nurse or physician" and "not urgent" stay unparseable.
    """
    text = output.lower()
    by_lower = {label.lower(): label for label in labels}
    alternatives = _label_alternatives(labels)
    key_pattern = "|".join(re.escape(key) for key in sorted(keys, key=len, reverse=True))
    keyed = re.search(
        rf"(?<![\w-])(?:{key_pattern})(?![\w-]){_KEY_VALUE_GAP}(?<![\w-])({alternatives})(?![\w-])",
        text,
    )
    if keyed and not _is_negated(text, keyed.start(1)):
        hedged = re.match(
            rf"\s*(?:or|and|/)\s*(?:the\s+|an?\s+)?(?:{alternatives})(?![\w-])",
            text[keyed.end(1) :],
        )
        return None if hedged else by_lower[keyed.group(1)]
    found = {
        match.group(0)
        for match in re.finditer(rf"(?<![\w-])(?:{alternatives})(?![\w-])", text)
        if not _is_negated(text, match.start())
    }
    return by_lower[found.pop()] if len(found) == 1 else None


def parse_triage(
    output: str, provider_labels: Sequence[str], urgency_labels: Sequence[str]
) -> dict[str, str | None] | None:
    """``{"provider": …, "urgency": …}`` with each part parsed on its own (a part that cannot
    be read is None and is scored wrong), or None when neither part can be read."""
    parsed = {
        "provider": parse_part(output, PART_KEYS["provider"], provider_labels),
        "urgency": parse_part(output, PART_KEYS["urgency"], urgency_labels),
    }
    return None if all(value is None for value in parsed.values()) else parsed


def format_triage(provider: str, urgency: str) -> str:
    return f"provider: {provider.lower()}; urgency: {urgency.lower()}"


class TriageTask(Task):
    headline_metric: ClassVar[str] = "provider_f1_macro"

    def __init__(
        self, *, provider_labels: Sequence[str], urgency_labels: Sequence[str], **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.provider_labels = [str(label) for label in provider_labels]
        self.urgency_labels = [str(label) for label in urgency_labels]
        for part, labels in (("provider", self.provider_labels), ("urgency", self.urgency_labels)):
            if len({label.lower() for label in labels}) < 2:
                raise ValueError(f"task '{self.name}' needs at least two distinct {part} labels")
        # A label shared by both sets would make an unkeyed answer ("nurse, soon") ambiguous.
        shared = {x.lower() for x in self.provider_labels} & {
            x.lower() for x in self.urgency_labels
        }
        if shared:
            raise ValueError(f"task '{self.name}': labels {sorted(shared)} are in both sets")

    def schema(self) -> dict[str, FieldSpec]:
        return {
            "text": FieldSpec(str, description="the patient portal message"),
            "provider": FieldSpec(
                str, allowed=tuple(self.provider_labels), description="who should answer it"
            ),
            "urgency": FieldSpec(
                str, allowed=tuple(self.urgency_labels), description="how soon it needs handling"
            ),
        }

    def input_text(self, example: dict[str, Any]) -> str:
        return example["text"]

    def target_text(self, example: dict[str, Any]) -> str:
        return format_triage(example["provider"], example["urgency"])

    def wrong_answers(self, example: dict[str, Any]) -> list[str]:
        return [
            format_triage(provider, urgency)
            for provider in self.provider_labels
            for urgency in self.urgency_labels
            if (provider, urgency) != (example["provider"], example["urgency"])
        ]

    def gold(self, example: dict[str, Any]) -> dict[str, str]:
        return {"provider": example["provider"], "urgency": example["urgency"]}

    def parse(
        self, output: str, example: dict[str, Any] | None = None
    ) -> dict[str, str | None] | None:
        return parse_triage(output, self.provider_labels, self.urgency_labels)

    def score_examples(
        self, examples: list[dict[str, Any]], predictions: list[Any | None], golds: list[Any]
    ) -> list[dict[str, Any]]:
        scores = []
        for prediction, gold in zip(predictions, golds, strict=True):
            parts = prediction or {}
            provider = parts.get("provider") == gold["provider"]
            urgency = parts.get("urgency") == gold["urgency"]
            scores.append(
                {
                    "provider_correct": provider,
                    "urgency_correct": urgency,
                    "correct": provider and urgency,
                }
            )
        return scores

    def aggregate(
        self, predictions: list[Any | None], golds: list[Any], scores: list[dict[str, Any]]
    ) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for part, labels in (("provider", self.provider_labels), ("urgency", self.urgency_labels)):
            part_predictions = [(p or {}).get(part) for p in predictions]
            part_golds = [g[part] for g in golds]
            for key, value in label_metrics(part_predictions, part_golds, labels).items():
                metrics[f"{part}_{key}"] = value
        metrics["exact_match"] = sum(bool(s["correct"]) for s in scores) / len(scores)
        return metrics
