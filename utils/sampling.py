"""Samplers and per-sample seeding: what a training loader draws, as a function of (seed, epoch, index).

``SeededItems`` wraps a dataset so that sample ``i`` of epoch ``e`` is augmented from a seed of
``(seed, e, i)``; ``ResumableSampler`` shuffles per epoch from ``(seed, epoch)``, gives each rank its
strided share and can start part-way through an epoch. Together they make resume exact whatever
the number of DataLoader workers (``utils.engine.Trainer.loader`` builds the loader from them).
"""
from __future__ import annotations

import random
from typing import Iterator

import torch
from torch.utils.data import Dataset, Sampler


def _mix(*values: int) -> int:
    """A 63-bit seed from a tuple of ints, stable across processes and runs: PYTHONHASHSEED
    randomises the hashes of str and bytes only, never those of ints and tuples of ints."""
    return hash(tuple(values)) & 0x7FFF_FFFF_FFFF_FFFF


class SeededItems(Dataset):
    """Wraps a dataset so that item ``i`` in epoch ``e`` draws its augmentation from a seed of
    ``(seed, e, i)``: resume and worker count cannot change what a sample looks like. The global
    RNGs are restored afterwards, so the main process's dropout stream is untouched."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):  # expose the wrapped dataset's attributes (text, img2txt, ...)
        if name in ("dataset", "seed", "epoch"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int):
        s = _mix(self.seed, self.epoch, index)
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            random.seed(s)
            # CPU only: torch.manual_seed also seeds the lazy CUDA/XPU/MTIA generators and captures a
            # stack trace each time (~1.5 ms a sample); augmentation draws from the CPU generator.
            torch.default_generator.manual_seed(s)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)


class ResumableSampler(Sampler[int]):
    """A distributed sampler (shuffle per epoch, each rank a strided share, padded to equal length)
    that can start part-way through an epoch."""

    def __init__(self, n: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1, drop_last: bool = False):
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.drop_last = drop_last
        self.num_samples = n // world_size if drop_last else -(-n // world_size)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def resize(self, n: int) -> None:
        """A dataset whose items change per epoch (BLIP's ``laion_path``): ``n`` items from now on."""
        self.n = n
        self.num_samples = n // self.world_size if self.drop_last else -(-n // self.world_size)

    def _indices(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.num_samples * self.world_size
        order = (order * (-(-total // max(1, len(order)))))[:total]
        return order[self.rank:total:self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start
