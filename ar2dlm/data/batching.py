"""Batches of tokenised examples: right-padded tensors, one ordered pass for evaluation, and the endless training
batcher whose position is a two-number state that a checkpoint stores to resume exactly where it stopped."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ar2dlm.data.tokenize import Example
from ar2dlm.errors import Ar2dlmError


@dataclass
class Batch:
    input_ids: torch.Tensor  # LongTensor [N, L], right-padded with pad_id
    maskable: torch.Tensor  # BoolTensor [N, L], False on padding
    lengths: torch.Tensor  # LongTensor [N]


def collate(examples: list[Example], pad_id: int, pad_to_multiple: int = 8) -> Batch:
    """Right-pad to the longest row, rounded up to a multiple of `pad_to_multiple`."""
    longest = max(len(e) for e in examples)
    m = max(1, pad_to_multiple)
    width = -(-longest // m) * m
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for i, e in enumerate(examples):
        ids[i, :len(e)] = torch.tensor(e.input_ids, dtype=torch.long)
        mask[i, :len(e)] = torch.tensor(e.maskable, dtype=torch.bool)
    return Batch(ids, mask, torch.tensor([len(e) for e in examples], dtype=torch.long))


def iter_batches(examples: list[Example], batch_size: int, pad_id: int, pad_to_multiple: int = 8) -> Iterator[Batch]:
    """One pass in order, the last batch possibly smaller (for evaluation)."""
    for i in range(0, len(examples), batch_size):
        yield collate(examples[i:i + batch_size], pad_id, pad_to_multiple)


class Batcher:
    """Endless, seeded, exactly resumable batches.

    Each epoch is a permutation of all examples (`torch.randperm` seeded with `seed + epoch`, or the identity when
    `shuffle=False`). Global batches of `batch_size * world_size` consecutive examples are cut from the epoch
    order, running on into the next epoch when one ends, so every batch is full and every example is seen once per
    epoch. Rank r takes rows r::world_size of each global batch. `state_dict()` is the position of the next global
    batch; `load_state_dict()` on a fresh Batcher (same examples, sizes and seed) continues exactly there.
    """

    def __init__(self, examples: list[Example], batch_size: int, seed: int, pad_id: int, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, pad_to_multiple: int = 8):
        if not examples:
            raise Ar2dlmError("no training examples to batch")
        if batch_size < 1:
            raise Ar2dlmError(f"batch size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise Ar2dlmError(f"invalid rank {rank} for world size {world_size}")
        self.examples = examples
        self.batch_size, self.seed, self.pad_id, self.shuffle = batch_size, seed, pad_id, shuffle
        self.rank, self.world_size, self.pad_to_multiple = rank, world_size, pad_to_multiple
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order = -1, None

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def _order_for(self, epoch: int) -> list[int]:
        if epoch != self._order_epoch:
            n = len(self.examples)
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._order = torch.randperm(n, generator=g).tolist()
            else:
                self._order = list(range(n))
            self._order_epoch = epoch
        return self._order

    def next_indices(self) -> list[int]:
        """Advance by one global batch; return this rank's example indices."""
        picked = []
        n = len(self.examples)
        while len(picked) < self.global_batch_size:
            order = self._order_for(self.epoch)
            take = min(self.global_batch_size - len(picked), n - self.index)
            picked += order[self.index:self.index + take]
            self.index += take
            if self.index >= n:
                self.epoch, self.index = self.epoch + 1, 0
        return picked[self.rank::self.world_size]

    def __iter__(self) -> Batcher:
        return self

    def __next__(self) -> Batch:
        return collate([self.examples[i] for i in self.next_indices()], self.pad_id, self.pad_to_multiple)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < len(self.examples):
            raise Ar2dlmError(f"batcher state {state} does not fit {len(self.examples)} examples; "
                              "was the data changed since the checkpoint?")
        self.epoch, self.index = epoch, index
