"""Preference pairs for DPO: chosen is the gold answer; rejected comes from a named source.

Sources, in the order ``auto`` tries them per example:
1. ``data``: a ``rejected`` field in the user's data;
2. ``label``: a wrong label or distractor option (``Task.wrong_answers``), sampled
   reproducibly per example;
3. ``on_policy``: the policy's own sampled outputs that the task's metric scores as wrong,
   up to a cap per example, falling back to ``label`` where every sample was right.

KTO's unpaired examples (thumbs-up/down on one answer) come from records with a
``completion`` and a desirable/undesirable label, or are derived from these pairs.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from clintune.errors import UserError
from clintune.tasks.base import Task

SOURCES = ("auto", "data", "label", "on_policy")

#: (examples, samples per example) → samples[i] = the outputs for examples[i]
Sampler = Callable[[list[dict[str, Any]], int], list[list[str]]]


@dataclass(frozen=True)
class PreferencePair:
    example_id: str
    messages: list[dict[str, str]]
    chosen: str
    rejected: str
    source: str


def _rng_for(example_id: str, seed: int) -> random.Random:
    # Per-example generators keep a pair unchanged when other examples are added or removed.
    digest = hashlib.sha256(f"{seed}:{example_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _normalised(text: str) -> str:
    return " ".join(text.split()).lower()


def build_pairs(
    task: Task,
    examples: list[dict[str, Any]],
    *,
    source: str = "auto",
    seed: int = 0,
    sampler: Sampler | None = None,
    samples_per_example: int = 4,
    max_pairs_per_example: int = 1,
) -> tuple[list[PreferencePair], dict[str, int]]:
    """Pairs for ``examples`` and counts of where they came from (and what was dropped).

    Pairs whose rejected text equals the chosen one (after normalising whitespace and case)
    are dropped and counted; an example that yields no pair is counted as well.
    """
    if source not in SOURCES:
        raise ValueError(f"method.pairs.source must be one of {SOURCES}, got {source!r}")
    counts: Counter[str] = Counter()
    candidates: dict[str, list[tuple[str, str]]] = {e["id"]: [] for e in examples}

    wants_on_policy = source == "on_policy" or (
        source == "auto"
        and sampler is not None
        and bool(examples)
        and not task.wrong_answers(examples[0])
    )
    needs_sampling = [
        e for e in examples if wants_on_policy and not (source == "auto" and e.get("rejected"))
    ]
    if needs_sampling:
        if sampler is None:
            raise ValueError("on-policy pairs need a sampler (the policy model)")
        outputs = sampler(needs_sampling, samples_per_example)
        for example, samples in zip(needs_sampling, outputs, strict=True):
            wrong = [text for text in samples if not task.is_correct(example, text)]
            unique = list(dict.fromkeys(text.strip() for text in wrong if text.strip()))
            candidates[example["id"]] += [(t, "on_policy") for t in unique[:max_pairs_per_example]]
            if not unique:
                counts["pairs/on_policy_all_correct"] += 1

    for example in examples:
        found = candidates[example["id"]]
        if source in ("data", "auto") and example.get("rejected"):
            found.append((example["rejected"], "data"))
        if source == "data" and not example.get("rejected"):
            counts["pairs/missing_rejected_field"] += 1
        if source == "label" or (source in ("auto", "on_policy") and not found):
            wrong = task.wrong_answers(example)
            if wrong:
                rng = _rng_for(example["id"], seed)
                picks = rng.sample(wrong, k=min(max_pairs_per_example, len(wrong)))
                fallback = source == "on_policy"
                found += [(text, "label_fallback" if fallback else "label") for text in picks]

    pairs: list[PreferencePair] = []
    for example in examples:
        chosen = task.target_text(example)
        kept = 0
        for rejected, origin in candidates[example["id"]]:
            if _normalised(rejected) == _normalised(chosen):
                counts["pairs/dropped_rejected_equals_chosen"] += 1
                continue
            pairs.append(
                PreferencePair(example["id"], task.messages(example), chosen, rejected, origin)
            )
            counts[f"pairs/from_{origin}"] += 1
            kept += 1
        if not kept:
            counts["pairs/examples_without_pair"] += 1
    counts["pairs/total"] = len(pairs)
    return pairs, dict(counts)


def answer_shift(
    task: Task, examples: list[dict[str, Any]], pairs: list[PreferencePair]
) -> dict[str, float]:
    """How far the answers on the rejected side are distributed from those on the chosen side:
    the total variation distance between the two marginals, per answer field
    (``pairs/answer_shift_tv/<field>``; a task with one label has the field ``answer``).

    A pair teaches "this answer, not that one, for this input". When a label is chosen more
    often than it is rejected over the whole set, DPO can also raise its reward by moving the
    answer prior towards that label, whatever the input says. Uniformly drawn wrong labels do
    this to every majority class: triage's physician (42% of the chosen answers) is only
    about 24% of the rejected ones. Free-text tasks (no parsed label) give no entry.
    """
    by_id = {example["id"]: example for example in examples}
    if not pairs or not task.wrong_answers(by_id[pairs[0].example_id]):
        return {}
    chosen: dict[str, Counter[Any]] = {}
    rejected: dict[str, Counter[Any]] = {}
    for pair in pairs:
        example = by_id[pair.example_id]
        # The gold answer's parse gives the fields (triage: provider, urgency; else one).
        shape = task.parse(pair.chosen, example)
        for side, text in ((chosen, pair.chosen), (rejected, pair.rejected)):
            parsed = task.parse(text, example)
            if isinstance(shape, dict):
                # An unparseable answer (None) is a value of its own on every field.
                answer = parsed if isinstance(parsed, dict) else {}
                fields = {field: answer.get(field) for field in shape}
            else:
                fields = {"answer": parsed}
            for field, value in fields.items():
                side.setdefault(field, Counter())[value] += 1
    shift: dict[str, float] = {}
    for field, chosen_counts in chosen.items():
        rejected_counts = rejected.get(field, Counter())
        chosen_total, rejected_total = sum(chosen_counts.values()), sum(rejected_counts.values())
        values = set(chosen_counts) | set(rejected_counts)
        shift[f"pairs/answer_shift_tv/{field}"] = 0.5 * sum(
            abs(chosen_counts[v] / chosen_total - rejected_counts[v] / rejected_total)
            for v in values
        )
    return shift


# --------------------------------------------------------------------------- KTO: unpaired

UNPAIRED_SOURCES = ("auto", "data", "pairs")
FEEDBACK = {"desirable": True, "undesirable": False}
#: the field holding the drafted answer that a record's feedback label judges
COMPLETION_FIELD = "completion"


@dataclass(frozen=True)
class UnpairedExample:
    """One thumbs-up or thumbs-down: a completion for a prompt, and whether it is wanted."""

    example_id: str
    messages: list[dict[str, str]]
    completion: str
    desirable: bool
    source: str  # "data" (the record's own feedback) or "pairs" (a side of a pair)


class FeedbackError(UserError, ValueError):
    """A record's feedback fields are inconsistent (named by example id and field)."""


def feedback_of(example: dict[str, Any], label_field: str) -> tuple[str, bool] | None:
    """(completion, desirable) when the record carries feedback, else None. A record has
    feedback when it has a ``completion``; its ``label_field`` must then say desirable or
    undesirable (and a desirable/undesirable label needs a completion to judge)."""
    completion = example.get(COMPLETION_FIELD)
    label = example.get(label_field)
    if completion is None:
        if isinstance(label, str) and label in FEEDBACK:
            raise FeedbackError(
                f"example {example.get('id')!r}: field '{label_field}' is {label!r} but there is "
                f"no '{COMPLETION_FIELD}' field holding the answer it judges"
            )
        return None
    if not isinstance(completion, str) or not completion.strip():
        raise FeedbackError(
            f"example {example.get('id')!r}: field '{COMPLETION_FIELD}' must be non-empty text, "
            f"got {completion!r:.60}"
        )
    if label not in FEEDBACK:
        raise FeedbackError(
            f"example {example.get('id')!r}: field '{label_field}' must be 'desirable' or "
            f"'undesirable' for a record with a '{COMPLETION_FIELD}', got {label!r:.60}"
        )
    return completion, FEEDBACK[label]


def split_by_feedback(
    task: Task, examples: list[dict[str, Any]], *, source: str, label_field: str
) -> tuple[list[UnpairedExample], list[dict[str, Any]]]:
    """The unpaired examples the records give themselves, and the records left to derive
    unpaired examples from pairs (none for ``source=data``, all for ``source=pairs``)."""
    if source not in UNPAIRED_SOURCES:
        raise ValueError(
            f"method.unpaired.source must be one of {UNPAIRED_SOURCES}, got {source!r}"
        )
    own: list[UnpairedExample] = []
    rest: list[dict[str, Any]] = []
    for example in examples:
        feedback = feedback_of(example, label_field) if source != "pairs" else None
        if feedback is not None:
            completion, desirable = feedback
            messages = task.messages(example)
            own.append(UnpairedExample(example["id"], messages, completion, desirable, "data"))
        elif source != "data":
            rest.append(example)
    return own, rest


def unpaired_from_pairs(pairs: list[PreferencePair]) -> list[UnpairedExample]:
    """Each pair's chosen answer as desirable and its rejected one as undesirable (TRL's
    ``unpair_preference_dataset``); a chosen answer repeated over pairs is kept once."""
    unpaired: list[UnpairedExample] = []
    seen: set[tuple[str, str]] = set()
    for pair in pairs:
        for text, desirable in ((pair.chosen, True), (pair.rejected, False)):
            if (pair.example_id, text) in seen:
                continue
            seen.add((pair.example_id, text))
            unpaired.append(
                UnpairedExample(pair.example_id, pair.messages, text, desirable, "pairs")
            )
    return unpaired


def unpaired_counts(unpaired: list[UnpairedExample]) -> dict[str, int]:
    """How many examples are desirable, undesirable, and where they came from."""
    counts: Counter[str] = Counter()
    for example in unpaired:
        counts["unpaired/desirable" if example.desirable else "unpaired/undesirable"] += 1
        counts[f"unpaired/from_{example.source}"] += 1
    counts["unpaired/total"] = len(unpaired)
    return dict(counts)


def mismatched_completions(unpaired: list[UnpairedExample], seed: int) -> list[str]:
    """For each example, a completion written for another prompt: KTO's mismatched pairs
    (x_i, y_j), whose log-ratio to the reference estimates the KL reference point.

    TRL rotates completions by one within each batch of a sequentially read data set. Batches
    here are shuffled, so the rotation runs once over a seeded order of all examples, and
    skips completions of the same example (derived pairs put two completions of one prompt
    side by side)."""
    ids = {example.example_id for example in unpaired}
    if len(ids) < 2:
        raise ValueError(
            f"KTO's KL estimate needs examples of at least two different prompts, got {len(ids)}"
        )
    order = list(range(len(unpaired)))
    random.Random(seed).shuffle(order)
    mismatched = [""] * len(unpaired)
    for position, index in enumerate(order):
        step = 1
        while True:
            other = unpaired[order[(position - step) % len(order)]]
            if other.example_id != unpaired[index].example_id:
                mismatched[index] = other.completion
                break
            step += 1
    return mismatched
