"""The epoch plan of a stream (docs/FORMATS.md 2c): which records each *slot* (rank x dataloader
worker) reads in an epoch. The shards are shuffled per epoch (seed, epoch) and laid end to end; the
resulting sequence of records is cut into one contiguous, equal range per slot, so no record is read
by two slots and every rank takes the same number of steps (``plan_epoch``: a pure function, computed
alike by every worker of every rank). ``_range_records`` reads a slot's range from any position in
it (where a resumed slot continues), ``range_sources`` counts the range's records per source, and
``_mix`` mixes seeds (the plan's shuffle; ``data/stream.py``'s per-block and per-sample seeds).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from .shards import UNREADABLE_SHARD, Record, Shard, _shard_records


def _mix(*values: int) -> int:
    return hash(tuple(values)) & 0x7FFF_FFFF_FFFF_FFFF


@dataclass
class SlotPlan:
    """Slot ``s``'s share of an epoch: records ``[start, stop)`` of the epoch's shard sequence
    (``order``: shard indices, ``offsets``: where each starts) and ``quota`` batches."""
    order: list[int]
    offsets: list[int]
    start: int
    stop: int
    quota: int


def plan_epoch(counts: Sequence[int], slots: int, batch_size: int, seed: int, epoch: int, shuffle: bool,
               num_samples: Optional[int] = None) -> list[SlotPlan]:
    """Every slot's range and quota for ``epoch`` (a pure function: each worker of each rank computes
    the same plan). Equal ranges; quota = ``num_samples / (slots * batch_size)`` batches (default:
    as many whole batches as a range holds)."""
    order = list(range(len(counts)))
    if shuffle:
        g = torch.Generator().manual_seed(_mix(seed, epoch, 11))
        order = torch.randperm(len(counts), generator=g).tolist()
    offsets, total = [], 0
    for i in order:
        offsets.append(total)
        total += counts[i]
    per_slot = total // slots
    if num_samples is None:
        quota = per_slot // batch_size
    else:
        quota = num_samples // (slots * batch_size)
    plans = []
    for s in range(slots):
        # The first `total % slots` slots take one extra record (nothing is left unassigned).
        start = s * per_slot + min(s, total % slots)
        stop = start + per_slot + (1 if s < total % slots else 0)
        plans.append(SlotPlan(order, offsets, start, stop, quota))
    return plans


def _range_records(plan: SlotPlan, shards: Sequence[Shard], pos: int, failed=()) -> Iterator[Record]:
    """The records of ``plan``'s range from record ``pos`` of the range on (earlier records of the
    first shard are read and dropped, not decoded). A shard in ``failed`` (one that broke off on an
    earlier pass of this epoch) is not opened again: its records come as unreadable."""
    g = plan.start + pos
    k = 0
    while k < len(plan.order) and plan.offsets[k] + shards[plan.order[k]].count <= g:
        k += 1
    while k < len(plan.order) and g < plan.stop:
        idx = plan.order[k]
        skip = g - plan.offsets[k]
        records = (Record(idx, n, f"#{n}", UNREADABLE_SHARD) for n in range(shards[idx].count)) if idx in failed \
            else _shard_records(shards, idx)
        for rec in records:
            if rec.index < skip:
                continue
            yield rec
            g += 1
            if g >= plan.stop:
                return
        k += 1


def range_sources(plan: SlotPlan, shards: Sequence[Shard]) -> Counter:
    """Records per source in ``plan``'s range (what ``max_bad_fraction`` is judged against when a
    source has fewer than ``BAD_CHECK_AFTER`` records there)."""
    sizes: Counter = Counter()
    for idx, offset in zip(plan.order, plan.offsets):
        lo, hi = max(offset, plan.start), min(offset + shards[idx].count, plan.stop)
        if hi > lo:
            sizes[shards[idx].source] += hi - lo
    return sizes
