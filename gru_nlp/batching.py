"""Length-bucketed batching and padding.

Texts vary from a few tokens to hundreds, so batches of random texts are mostly
padding. `BucketBatchSampler` groups texts of similar length, and `collate` pads
each batch only to its own longest text.

How Lightning (2.6) treats this batch sampler, read from
`lightning/pytorch/utilities/data.py::_dataloader_init_kwargs_resolve_sampler`
and `trainer/connectors/data_connector.py`:

- Under DDP with `use_distributed_sampler=True` (the default), Lightning checks
  `dataloader.sampler`, not the batch sampler. A DataLoader built with
  `batch_sampler=` always has a plain `SequentialSampler` there, so Lightning
  wraps it in a `DistributedSamplerWrapper` and rebuilds the DataLoader.
- To rebuild a custom batch sampler, Lightning needs it to subclass
  `torch.utils.data.BatchSampler` and to be created inside a `*_dataloader` hook
  (where Lightning records its constructor arguments); it then calls the
  constructor again with the same arguments but `sampler=` the distributed
  sampler (and `drop_last=False` when predicting, also on one device).
  Without an argument named `sampler` it raises a TypeError; a batch sampler
  that does not subclass `BatchSampler` is called as `cls(sampler, batch_size=,
  drop_last=)`, or rejected.
- Each epoch Lightning calls `set_epoch` on `dataloader.sampler` and on
  `dataloader.batch_sampler.sampler`, never on the batch sampler itself.

So `BucketBatchSampler` subclasses `BatchSampler`, takes a `sampler` argument,
and keeps a `DistributedSampler` as its `.sampler`: one it makes from
`num_replicas` and `rank`, or the one Lightning injects. It reads only that
sampler's `num_replicas`, `rank` and `epoch`, never its indices, because
bucketing has to see every length to put similar lengths on every rank at the
same step. DDP therefore works with no trainer flags, and Lightning's epoch
reaches the shuffle.
"""

from collections.abc import Iterator, Sequence
from itertools import cycle, islice
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DistributedSampler, Sampler

from gru_nlp.tokenizer import PAD_ID


class BucketBatchSampler(BatchSampler):
    """Yield batches of indices whose texts have similar lengths.

    With `shuffle=True` (training) the indices are shuffled with `seed + epoch`,
    cut into pools of `batch_size * pool_size`, each pool is sorted by length and
    cut into batches, and the order of the batches is shuffled. A larger pool
    means less padding but less randomness in which texts share a batch. With
    `shuffle=False` (evaluation) all indices are sorted longest first, so an
    out-of-memory error shows on the first batch.

    Across `num_replicas` processes, every `num_replicas` neighbouring batches
    form one step and rank `r` takes the `r`-th batch of each step, so the ranks
    wait little for each other. In training (`shuffle=True`) every rank gets the
    same number of batches, as gradient syncing needs: the last step is filled by
    repeating batches from the start of the epoch, or, with `drop_last=True`, the
    batches that do not fill a step are dropped (as `DistributedSampler` pads or
    trims samples). In evaluation (`shuffle=False`, `drop_last=False`) nothing is
    repeated, so metrics count every example once: the ranks' batch counts differ
    by at most one, unless there are fewer batches than ranks, when each rank gets
    one and some are repeats.

    Args:
        lengths: The length of each example; the dataset's size is `len(lengths)`.
        batch_size: The number of examples per batch (the last may be smaller).
        shuffle: Whether to shuffle (training) or sort longest first (evaluation).
        pool_size: How many batches' worth of examples are sorted together.
        seed: The base seed of the shuffle; the same on every rank.
        drop_last: Drop the last, smaller batch and the batches that do not fill
            a step across ranks.
        num_replicas: The number of processes sharing the data.
        rank: This process's rank, from 0 to `num_replicas - 1`.
        sampler: A `DistributedSampler` whose `num_replicas`, `rank` and `epoch`
            replace `num_replicas`, `rank` and `set_epoch`; Lightning passes one
            under DDP. A sampler without them (Lightning passes a
            `SequentialSampler` when predicting on one device) is ignored.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        shuffle: bool,
        pool_size: int = 50,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
        sampler: Sampler | None = None,
    ) -> None:
        if pool_size < 1:
            raise ValueError(f"pool_size must be at least 1, got {pool_size}")
        self.lengths = torch.as_tensor(lengths, dtype=torch.long)
        if self.lengths.dim() != 1:
            raise ValueError(f"lengths must be one-dimensional, got shape {tuple(self.lengths.shape)}")
        if not isinstance(sampler, DistributedSampler):
            sampler = DistributedSampler(range(len(self.lengths)), num_replicas=num_replicas, rank=rank, shuffle=False)
        super().__init__(sampler, batch_size, drop_last)
        self.shuffle = shuffle
        self.pool_size = pool_size
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        """Pick the shuffle of `epoch`; Lightning does this through `.sampler`."""
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._all_batches()[self.sampler.rank :: self.sampler.num_replicas]

    def __len__(self) -> int:
        num_examples, replicas = len(self.lengths), self.sampler.num_replicas
        if self.drop_last:
            return num_examples // self.batch_size // replicas
        num_batches = -(-num_examples // self.batch_size)
        if self._equal_ranks or num_batches < replicas:
            return -(-num_batches // replicas)  # the same on every rank
        return len(range(self.sampler.rank, num_batches, replicas))

    @property
    def _equal_ranks(self) -> bool:
        """Whether every rank must get as many batches (training), or may get one fewer (evaluation)."""
        return self.shuffle or self.drop_last

    def _all_batches(self) -> list[list[int]]:
        """The batches of every rank for this epoch, in step order."""
        generator = torch.Generator().manual_seed(self.seed + self.sampler.epoch)
        num_examples = len(self.lengths)
        if self.shuffle:
            order = torch.randperm(num_examples, generator=generator)
            pool = self.batch_size * self.pool_size
        else:
            order = torch.arange(num_examples)
            pool = max(num_examples, 1)
        batches = []
        for chunk in order.split(pool) if num_examples else ():
            # stable, so equal lengths keep their (shuffled or original) order
            chunk = chunk[torch.argsort(self.lengths[chunk], descending=True, stable=True)]
            batches.extend(chunk.split(self.batch_size))
        # pools are whole batches, so only the very last batch can be short
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()

        replicas = self.sampler.num_replicas
        if not self._equal_ranks:
            if len(batches) < replicas:
                batches = list(islice(cycle(batches), replicas))  # one batch for every rank
            return [batch.tolist() for batch in batches]
        num_batches = len(self) * replicas
        batches = list(islice(cycle(batches), num_batches))  # pads by repeating, or trims
        if self.shuffle:
            # Shuffle the steps, and which rank gets which batch of a step: otherwise
            # rank 0 would always get the longest batch of its step.
            steps = torch.arange(num_batches).view(-1, replicas)  # (steps, replicas)
            steps = steps[torch.randperm(len(steps), generator=generator)]
            steps = steps.gather(1, torch.rand(steps.shape, generator=generator).argsort(dim=1))
            batches = [batches[i] for i in steps.flatten().tolist()]
        return [batch.tolist() for batch in batches]


def collate(examples: list[dict[str, Any]], pad_id: int = PAD_ID) -> dict[str, Tensor]:
    """Pad a list of encoded examples into one batch.

    Args:
        examples: Dicts with `input_ids` (a list or 1-D tensor of ids) and
            optionally `labels` and `index` (ints or 0-D tensors).
        pad_id: The id that pads the shorter examples.

    Returns:
        `input_ids` (B, T) long, padded with `pad_id` to the longest example;
        `lengths` (B,) long; and `labels` (B,) long and `index` (B,) long when
        the examples have them.
    """
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    sequences = [torch.as_tensor(example["input_ids"], dtype=torch.long) for example in examples]
    batch = {
        "input_ids": torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=pad_id),  # (B, T)
        "lengths": torch.tensor([len(sequence) for sequence in sequences], dtype=torch.long),  # (B,)
    }
    for key in ("labels", "index"):
        if key in examples[0]:
            batch[key] = torch.tensor([int(example[key]) for example in examples], dtype=torch.long)  # (B,)
    return batch

