import random
from collections import Counter
from collections.abc import Iterable, Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DistributedSampler, SequentialSampler

from gru_nlp.batching import BucketBatchSampler, collate

_rng = random.Random(0)
LENGTHS = [_rng.randint(1, 300) for _ in range(203)]


def padding_fraction(lengths: Sequence[int], batches: Iterable[Sequence[int]], pad_to: int | None = None) -> float:
    """The fraction of padded positions when `batches` are padded.

    Args:
        lengths: The length of each example.
        batches: Batches of indices into `lengths`, e.g. from `BucketBatchSampler`.
        pad_to: Pad every batch to this length (naive fixed-length padding);
            `None` pads each batch to its longest example, as `collate` does.

    Returns:
        Padded positions divided by all positions, from 0 to 1.
    """
    real = total = 0
    for batch in batches:
        batch_lengths = [int(lengths[i]) for i in batch]
        width = max(batch_lengths) if pad_to is None else pad_to
        real += sum(batch_lengths)
        total += width * len(batch_lengths)
    return 1 - real / total if total else 0.0


def flat(batches: list[list[int]]) -> list[int]:
    return [i for batch in batches for i in batch]


@pytest.mark.parametrize("shuffle", [True, False])
def test_every_index_once_per_epoch(shuffle):
    sampler = BucketBatchSampler(LENGTHS, batch_size=8, shuffle=shuffle, pool_size=4)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert sorted(flat(batches)) == list(range(len(LENGTHS)))
        assert len(batches) == len(sampler) == 26  # ceil(203 / 8)


def test_shuffle_is_seeded_and_changes_with_the_epoch():
    first, again = (BucketBatchSampler(LENGTHS, 8, shuffle=True, seed=3) for _ in range(2))
    assert list(first) == list(again)
    again.set_epoch(1)
    assert list(first) != list(again)
    assert list(BucketBatchSampler(LENGTHS, 8, shuffle=True, seed=4)) != list(first)


def test_eval_batches_are_sorted_longest_first():
    batches = list(BucketBatchSampler(LENGTHS, 8, shuffle=False))
    assert flat(batches) == sorted(range(len(LENGTHS)), key=lambda i: -LENGTHS[i])


def test_buckets_hold_less_padding_than_random_batches():
    random_batches = torch.randperm(len(LENGTHS), generator=torch.Generator().manual_seed(0)).split(8)
    random_padding = padding_fraction(LENGTHS, [batch.tolist() for batch in random_batches])
    bucket_padding = padding_fraction(LENGTHS, BucketBatchSampler(LENGTHS, 8, shuffle=True, pool_size=25))
    assert bucket_padding < random_padding / 5


def test_padding_fraction():
    assert padding_fraction([1, 3, 2, 2], [[0, 1], [2, 3]]) == pytest.approx(2 / 10)
    assert padding_fraction([1, 3, 2, 2], [[0, 1], [2, 3]], pad_to=4) == pytest.approx(8 / 16)


@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_are_disjoint_and_equally_long(drop_last):
    # 203 examples in batches of 8: 26 batches (the last of 3), shared by 3 ranks
    ranks = [
        BucketBatchSampler(LENGTHS, 8, shuffle=True, pool_size=4, drop_last=drop_last, num_replicas=3, rank=r)
        for r in range(3)
    ]
    batches = [list(sampler) for sampler in ranks]
    assert [len(b) for b in batches] == [len(s) for s in ranks] == ([8, 8, 8] if drop_last else [9, 9, 9])
    seen = Counter(flat(flat(batches)))
    if drop_last:  # 24 full batches, no repeats
        assert len(seen) == 24 * 8 and set(seen.values()) == {1}
    else:  # every index, and one batch repeated to fill the last step
        assert set(seen) == set(range(len(LENGTHS))) and sum(seen.values()) - len(LENGTHS) <= 8


def test_evaluation_ranks_score_every_example_once():
    # 26 batches over 3 ranks: 9, 9 and 8, nothing repeated (training would repeat one to make 9 each)
    ranks = [BucketBatchSampler(LENGTHS, 8, shuffle=False, num_replicas=3, rank=r) for r in range(3)]
    batches = [list(sampler) for sampler in ranks]
    assert [len(b) for b in batches] == [len(s) for s in ranks] == [9, 9, 8]
    assert sorted(flat(flat(batches))) == list(range(len(LENGTHS)))
    # Fewer batches than ranks: each rank still gets one, so none waits on the others with nothing.
    tiny = [list(BucketBatchSampler([5, 3, 4], 2, shuffle=False, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(b) for b in tiny] == [1, 1, 1] and sorted(flat(flat(tiny[:2]))) == [0, 1, 2]


def test_ranks_get_batches_of_similar_length_at_each_step():
    ranks = [list(BucketBatchSampler(LENGTHS, 8, shuffle=True, num_replicas=2, rank=r)) for r in range(2)]
    for batch0, batch1 in zip(*ranks, strict=True):
        assert abs(max(LENGTHS[i] for i in batch0) - max(LENGTHS[i] for i in batch1)) < 30


def test_an_injected_distributed_sampler_sets_rank_and_epoch():
    """Lightning rebuilds the batch sampler with `sampler=` a DistributedSampler under DDP."""
    injected = DistributedSampler(range(len(LENGTHS)), num_replicas=2, rank=1, shuffle=False)
    sampler = BucketBatchSampler(LENGTHS, 8, shuffle=True, sampler=injected)
    assert list(sampler) == list(BucketBatchSampler(LENGTHS, 8, shuffle=True, num_replicas=2, rank=1))
    injected.set_epoch(5)  # Lightning calls set_epoch on batch_sampler.sampler
    expected = BucketBatchSampler(LENGTHS, 8, shuffle=True, num_replicas=2, rank=1)
    expected.set_epoch(5)
    assert list(sampler) == list(expected)


def test_a_plain_injected_sampler_means_one_replica():
    """Lightning passes the DataLoader's SequentialSampler when predicting on one device."""
    sampler = BucketBatchSampler(LENGTHS, 8, shuffle=False, sampler=SequentialSampler(LENGTHS))
    assert sorted(flat(list(sampler))) == list(range(len(LENGTHS)))


def test_no_examples_no_batches():
    assert list(BucketBatchSampler([], 4, shuffle=True, num_replicas=2)) == []


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        BucketBatchSampler(LENGTHS, 0, shuffle=True)
    with pytest.raises(ValueError, match="pool_size"):
        BucketBatchSampler(LENGTHS, 4, shuffle=True, pool_size=0)
    with pytest.raises(ValueError, match="rank"):
        BucketBatchSampler(LENGTHS, 4, shuffle=True, num_replicas=2, rank=2)


@settings(max_examples=80, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 50), max_size=60),
    batch_size=st.integers(1, 9),
    pool_size=st.integers(1, 4),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
    replicas=st.integers(1, 4),
    epoch=st.integers(0, 3),
)
def test_sampler_properties(lengths, batch_size, pool_size, shuffle, drop_last, replicas, epoch):
    samplers = [
        BucketBatchSampler(lengths, batch_size, shuffle, pool_size, drop_last=drop_last, num_replicas=replicas, rank=r)
        for r in range(replicas)
    ]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    batches = [list(sampler) for sampler in samplers]
    assert [len(b) for b in batches] == [len(s) for s in samplers]
    counts = {len(b) for b in batches}
    training = shuffle or drop_last
    assert len(counts) == 1 if training else max(counts) - min(counts) <= 1  # evaluation: one fewer at most
    all_batches = flat(batches)
    assert all(0 < len(batch) <= batch_size for batch in all_batches)
    seen = Counter(flat(all_batches))
    if drop_last:
        assert set(seen.values()) <= {1} and all(len(batch) == batch_size for batch in all_batches)
    else:
        assert set(seen) == set(range(len(lengths)))
        if replicas == 1 or not training and -(-len(lengths) // batch_size) >= replicas:
            assert set(seen.values()) <= {1}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(1, 999), min_size=1, max_size=12), min_size=1, max_size=6), st.booleans())
def test_collate_pads_to_the_longest(sequences, as_tensors):
    examples = [
        {"input_ids": torch.tensor(ids) if as_tensors else ids, "labels": i % 3, "index": i}
        for i, ids in enumerate(sequences)
    ]
    batch = collate(examples)
    width = max(len(ids) for ids in sequences)
    assert batch["input_ids"].shape == (len(sequences), width)
    assert batch["input_ids"].dtype == batch["lengths"].dtype == batch["labels"].dtype == torch.long
    assert batch["lengths"].tolist() == [len(ids) for ids in sequences]
    for row, ids in zip(batch["input_ids"].tolist(), sequences, strict=True):
        assert row == ids + [0] * (width - len(ids))
    assert batch["labels"].tolist() == [i % 3 for i in range(len(sequences))]
    assert batch["index"].tolist() == list(range(len(sequences)))


def test_collate_without_labels():
    assert set(collate([{"input_ids": [5, 6]}, {"input_ids": [7]}])) == {"input_ids", "lengths"}
