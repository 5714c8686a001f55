"""Length-grouped batches: less padding, and the same global batches on 1 and N processes."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from clintune.batching import length_grouped_order, padded_length, padding_fraction
from clintune.checkpointing import EpochSampler
from clintune.tokenization import EncodedExample, EncodedPair


def _lengths(count: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(8, 400) for _ in range(count)]


def _grouped(lengths: list[int], global_batch: int, bucket_batches: int, seed: int = 0):
    generator = torch.Generator()
    generator.manual_seed(seed)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    grouped = length_grouped_order(
        order,
        lengths,
        global_batch=global_batch,
        bucket_batches=bucket_batches,
        generator=generator,
    )
    return order, grouped


def test_grouping_is_a_permutation_that_cuts_padding_by_two_thirds() -> None:
    lengths = _lengths(203)
    shuffled, grouped = _grouped(lengths, global_batch=8, bucket_batches=8)
    assert sorted(grouped) == list(range(203))
    assert padding_fraction(lengths, shuffled, 8) > 0.3
    assert padding_fraction(lengths, grouped, 8) < 0.12


def test_the_longest_batch_comes_first_and_the_short_one_last() -> None:
    lengths = _lengths(203, seed=1)
    _, grouped = _grouped(lengths, global_batch=8, bucket_batches=4)
    assert max(lengths) in [lengths[i] for i in grouped[:8]]
    # 203 = 25 full batches of 8 and one of 3, which must not land mid-epoch
    tail = grouped[-3:]
    assert all(len({*tail} & {*grouped[s : s + 8]}) == 0 for s in range(0, 200, 8))


def test_batches_are_shuffled_not_sorted_across_the_epoch() -> None:
    lengths = _lengths(400, seed=2)
    _, grouped = _grouped(lengths, global_batch=8, bucket_batches=5)
    batch_means = [sum(lengths[i] for i in grouped[s : s + 8]) / 8 for s in range(8, 400, 8)]
    descending = sum(a >= b for a, b in itertools.pairwise(batch_means))
    assert 0.2 < descending / (len(batch_means) - 1) < 0.8


def _global_batches(per_rank: list[list[int]], batch_size: int) -> list[set[int]]:
    steps = len(per_rank[0]) // batch_size
    return [
        {i for rank in per_rank for i in rank[step * batch_size : (step + 1) * batch_size]}
        for step in range(steps)
    ]


@pytest.mark.parametrize("epoch", [0, 3])
def test_one_process_and_two_see_the_same_grouped_global_batches(epoch: int) -> None:
    data = list(range(96))
    lengths = _lengths(96, seed=3)
    single = EpochSampler(data, shuffle=True, seed=5, num_replicas=1, rank=0, lengths=lengths,
                          batch_size=8, bucket_batches=4)  # fmt: skip
    single.set_epoch(epoch)
    ranks = []
    for rank in range(2):
        sampler = EpochSampler(data, shuffle=True, seed=5, num_replicas=2, rank=rank,
                               lengths=lengths, batch_size=4, bucket_batches=4)  # fmt: skip
        sampler.set_epoch(epoch)
        ranks.append(list(sampler))
    assert _global_batches([list(single)], 8) == _global_batches(ranks, 4)
    # and grouping changed the batches compared with plain shuffling
    plain = EpochSampler(data, shuffle=True, seed=5, num_replicas=1, rank=0)
    plain.set_epoch(epoch)
    assert _global_batches([list(plain)], 8) != _global_batches([list(single)], 8)


def test_the_order_follows_seed_and_epoch_and_resumes_with_skip() -> None:
    data = list(range(64))
    lengths = _lengths(64, seed=4)

    def order(seed: int, epoch: int, skip: int = 0) -> list[int]:
        sampler = EpochSampler(data, shuffle=True, seed=seed, num_replicas=1, rank=0,
                               lengths=lengths, batch_size=8, bucket_batches=2)  # fmt: skip
        sampler.set_epoch(epoch)
        sampler.skip = skip
        return list(sampler)

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)
    assert order(1, 0, skip=24) == order(1, 0)[24:]


def test_a_length_per_item_is_required() -> None:
    with pytest.raises(ValueError, match="3 lengths for 4 items"):
        EpochSampler([0, 1, 2, 3], shuffle=True, seed=0, num_replicas=1, rank=0, lengths=[1, 2, 3])


def test_padded_length_of_examples_pairs_and_pairs_with_reference_log_probs() -> None:
    assert padded_length(EncodedExample([1, 2, 3], [4, 5])) == 5
    pair = EncodedPair([1, 2], [3], [4, 5, 6, 7])
    assert padded_length(pair) == 6
    assert padded_length((pair, -1.0, -2.0)) == 6
    with pytest.raises(TypeError):
        padded_length(3)
