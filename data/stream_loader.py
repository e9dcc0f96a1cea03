"""The loader side of a stream: what the trainer iterates over a ``data/stream.py`` ``PairStream``.

- ``StreamLoader``: a DataLoader with the interface the trainer uses (``len``: the batches left in the
  epoch; ``set_epoch(epoch, states, done)`` positions every slot of this rank).
- ``StreamCollator``: a task's collator plus the stream's bookkeeping, the ``_keys``, ``_slot``,
  ``_state``, ``_skipped``, ``_examples`` and ``_repeats`` keys the trainer takes out before the loss.
- ``StreamFailure``: what a worker yields instead of a sample when the run must stop; the collator
  turns it into a ``_failure`` batch.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset


class StreamFailure:
    """Yielded by a worker instead of a sample when the run must stop (``max_bad_fraction``): the
    collator turns it into a batch the trainer raises on, so the message reaches the user intact."""

    def __init__(self, message: str):
        self.message = message


class StreamCollator:
    """Wraps a task's collator: ``(image, caption, idx, meta)`` samples -> the task's batch plus
    ``_keys`` (sample keys), ``_slot`` / ``_state`` (the slot's state after this batch),
    ``_skipped`` (skip counts by (shard, reason)), ``_examples`` and ``_repeats``."""

    def __init__(self, inner: Callable):
        self.inner = inner

    def __call__(self, samples: list) -> dict:
        failure = next((s for s in samples if isinstance(s, StreamFailure)), None)
        if failure is not None:
            return {"_failure": failure.message}
        batch = self.inner([s[:3] for s in samples])
        skipped: Counter = Counter()
        examples: dict = {}
        for s in samples:
            skipped.update(s[3]["skipped"])
            for k, v in s[3]["examples"].items():
                examples.setdefault(k, []).extend(v)
        last = samples[-1][3]
        batch.update({"_keys": [s[3]["key"] for s in samples], "_slot": last["slot"], "_state": last["state"],
                      "_skipped": dict(skipped), "_examples": examples,
                      "_repeats": sum(1 for s in samples if s[3]["repeat"])})
        return batch


class StreamLoader:
    """A DataLoader over a :class:`PairStream` with the interface the trainer uses: ``len`` is the
    batches left in the epoch, ``set_epoch(epoch, states)`` positions every slot."""

    def __init__(self, stream: IterableDataset, batch_size: int, collate_fn: Callable, num_workers: int, rank: int,
                 world_size: int, pin_memory: bool = False):
        self.dataset = stream
        self.batch_size = batch_size
        self.num_workers = num_workers
        stream.configure(rank, world_size, num_workers, batch_size)
        self.collate = StreamCollator(collate_fn)
        self.pin_memory = pin_memory
        self.done = 0

    def set_epoch(self, epoch: int, states: Optional[dict] = None, done: int = 0) -> None:
        self.dataset.epoch = epoch
        mine = {int(k): v for k, v in (states or {}).items()}
        slots = range(self.dataset.rank * max(1, self.num_workers), (self.dataset.rank + 1) * max(1, self.num_workers))
        self.dataset.states = {s: mine[s] for s in slots if s in mine}
        self.dataset.rotate = done % max(1, self.num_workers)
        self.done = done

    def __len__(self) -> int:
        return self.dataset.batches_per_epoch() - self.done

    def __iter__(self):
        # A generator of its own: creating the iterator then draws from it, not from the global RNG
        # whose state (dropout) a checkpoint restores.
        loader = DataLoader(self.dataset, batch_size=self.batch_size, collate_fn=self.collate,
                            num_workers=self.num_workers, pin_memory=self.pin_memory, persistent_workers=False,
                            generator=torch.Generator().manual_seed(self.dataset.seed))
        return iter(loader)
