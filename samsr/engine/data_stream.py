"""A resumable, reproducible stream of training samples.

Sample ``k`` of a run (counting from the first step, across epochs) is a pure function of
``(seed, k)``: which image it is (a seeded permutation per epoch) and every random choice made
while loading it (crop, flip, jitter, coarse-mask synthesis; the global RNGs are seeded from
``(seed, k)`` before the dataset is called). A run resumed at step ``s`` therefore continues with
sample ``s * batch_size`` and sees exactly what the uninterrupted run would have seen, whatever
the number of DataLoader workers.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def _mix(seed: int, k: int) -> int:
    """A 63-bit seed for sample ``k`` of a run seeded with ``seed`` (SplitMix-style hash)."""
    z = (seed * 0x9E3779B97F4A7C15 + k + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


class SampleStream(Dataset):
    """Wraps a map-style dataset; key ``k`` (a stream position) -> a seeded sample.

    Args:
        dataset: the training dataset (``len(dataset) > 0``).
        seed: run seed.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self.size = len(dataset)  # type: ignore[arg-type]
        if self.size == 0:
            raise ValueError("the training dataset is empty")
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def index(self, k: int) -> int:
        """Dataset index of stream position ``k`` (epoch ``k // n``, seeded permutation)."""
        epoch, i = divmod(k, self.size)
        if epoch != self._perm_epoch:
            rng = np.random.default_rng(_mix(self.seed, -1 - epoch))
            self._perm = rng.permutation(self.size)
            self._perm_epoch = epoch
        assert self._perm is not None
        return int(self._perm[i])

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, k: int) -> Any:
        s = _mix(self.seed, k)
        random.seed(s)
        np.random.seed(s & 0xFFFFFFFF)
        torch.manual_seed(s)
        return self.dataset[self.index(k)]


class StreamSampler(Sampler[int]):
    """Yields the stream positions ``start, start + 1, ...`` up to ``stop`` (exclusive) that
    this rank reads.

    With ``period`` (the global batch ``B``) and ``shards > 1`` (the world size ``W``), each
    step's ``B`` positions are cut into ``W`` consecutive slices and rank ``shard`` reads only
    its slice: the ranks together read the single-process sequence, step by step.

    Args:
        start: first position (a multiple of ``period``).
        stop: end position (exclusive; a multiple of ``period``).
        period: positions per step (``B``, divisible by ``shards``); needed with ``shards > 1``.
        shard: this rank.
        shards: the world size.
    """

    def __init__(
        self, start: int, stop: int, period: int | None = None, shard: int = 0, shards: int = 1
    ) -> None:
        self.start = int(start)
        self.stop = int(stop)
        self.shard = int(shard)
        self.shards = int(shards)
        if self.shards > 1 and (period is None or period % self.shards):
            raise ValueError(f"period {period} must be a multiple of the {shards} shards")
        if not 0 <= self.shard < self.shards:
            raise ValueError(f"shard {shard} is not in [0, {shards})")
        self.period = int(period) if period is not None else 0

    def __iter__(self) -> Iterator[int]:
        if self.shards == 1:
            return iter(range(self.start, self.stop))
        size = self.period // self.shards
        return (
            step + self.shard * size + i
            for step in range(self.start, self.stop, self.period)
            for i in range(size)
        )

    def __len__(self) -> int:
        return max(0, self.stop - self.start) // self.shards
