"""Preference pairs for DPO: chosen is the gold answer; rejected comes from a named source.

Sources, in the order ``auto`` tries them per example:
1. ``data``: a ``rejected`` field in the user's data;
2. ``label``: a wrong label or distractor option (``Task.wrong_answers``), sampled
   reproducibly per example;
3. ``on_policy``: the policy's own sampled outputs that the task's metric scores as wrong,
   up to a cap per example, falling back to ``label`` where every sample was right.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
