"""A sampler that puts samples of similar length in the same batch, so batches carry little padding.

Rows are padded to the longest one in their batch. With a caption (~40 tokens) in almost every random batch of
short VQA and text samples (~25 tokens), about half of every training step is spent on padding. This is HF
``Trainer``'s ``group_by_length``: shuffle, cut into mega-batches of ``mega_batch`` batches, sort each mega-batch
by length and cut it into batches; the batch order is then shuffled too, so long and short batches interleave.
Every index is still drawn exactly once per epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class LengthGroupedSampler(Sampler[int]):
    """Indices in an order whose consecutive runs of ``batch_size`` have similar lengths.

    Args:
        lengths: a length estimate per index (characters are fine: only the order matters).
        batch_size: the DataLoader's batch size.
        mega_batch: batches per sorted group; larger groups pad less but mix lengths less randomly (HF uses 50).
        seed: the base seed; ``set_epoch`` (called by Lightning) changes the order every epoch.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, mega_batch: int = 50, seed: int = 0) -> None:
        if batch_size < 1 or mega_batch < 1:
            raise ValueError(f"LengthGroupedSampler: batch_size and mega_batch must be >= 1, got {batch_size}, "
                             f"{mega_batch}")
        self.lengths = torch.as_tensor(lengths)
        self.batch_size, self.mega_batch, self.seed, self.epoch = batch_size, mega_batch, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g)
        size = self.batch_size * self.mega_batch
        batches = []
        for mega in order.split(size):
            # Longest first within the mega-batch (stable, so equal lengths keep their random order).
            mega = mega[torch.argsort(self.lengths[mega], descending=True, stable=True)]
            batches.extend(mega.split(self.batch_size))
        # The last, possibly short, batch stays last (as drop_last expects); the full ones are shuffled.
        last = batches.pop() if len(batches[-1]) < self.batch_size else None
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g)]
        if last is not None:
            batches.append(last)
        return iter(torch.cat(batches).tolist()) if batches else iter([])
