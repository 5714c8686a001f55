"""Less padding: global batches of similar lengths, in an order that depends only on the seed,
the epoch and the global batch size, so one process and N processes train on the same batches.

The scheme is the one HF's ``LengthGroupedSampler`` popularised: shuffle, cut the shuffled order
into buckets of a few global batches, sort each bucket by length, cut it into global batches and
shuffle those. The bucket keeps batches random across epochs while their lengths stay close."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def padded_length(item: Any) -> int:
    """The length an item is padded to in its batch: prompt plus answer for SFT examples,
    prompt plus the longer answer for preference pairs (with or without reference log-probs)."""
    if isinstance(item, tuple):
        item = item[0]
    if hasattr(item, "completion_ids"):
        return len(item.prompt_ids) + len(item.completion_ids)
    if hasattr(item, "chosen_ids"):
        return len(item.prompt_ids) + max(len(item.chosen_ids), len(item.rejected_ids))
    raise TypeError(f"no length for a {type(item).__name__}")


def length_grouped_order(
    order: Sequence[int],
    lengths: Sequence[int],
    *,
    global_batch: int,
    bucket_batches: int,
    generator: torch.Generator,
) -> list[int]:
    """``order`` rearranged so that each run of ``global_batch`` indices has similar lengths.

    Buckets of ``bucket_batches`` global batches are sorted longest first (a stable sort, so
    ties keep the shuffled order); the full batches are then shuffled, except that the batch
    holding the longest item goes first, so a run that would run out of memory does so at its
    first step. A short final batch stays last so that every other batch is full."""
    if global_batch < 1 or bucket_batches < 1:
        raise ValueError("global_batch and bucket_batches must be at least 1")
    bucket = global_batch * bucket_batches
    batches: list[list[int]] = []
    for start in range(0, len(order), bucket):
        ranked = sorted(order[start : start + bucket], key=lambda index: -lengths[index])
        batches += [ranked[s : s + global_batch] for s in range(0, len(ranked), global_batch)]
    short = [b for b in batches if len(b) < global_batch]
    full = [b for b in batches if len(b) == global_batch]
    shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
    if shuffled:
        longest = max(range(len(shuffled)), key=lambda b: max(lengths[i] for i in shuffled[b]))
        shuffled.insert(0, shuffled.pop(longest))
    return [index for batch in shuffled + short for index in batch]


def padding_fraction(lengths: Sequence[int], order: Sequence[int], batch_size: int) -> float:
    """The share of the tokens in right-padded batches of ``batch_size`` (taken in ``order``)
    that are padding."""
    padded = real = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start : start + batch_size]]
        padded += max(batch) * len(batch)
        real += sum(batch)
    return (padded - real) / padded if padded else 0.0
