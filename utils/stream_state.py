"""The Trainer's side of streamed data (``data/stream.py``): each batch's bookkeeping taken out of it
(its data slot's state for the next checkpoint, skip counts, sample keys) and the epoch's data counts
(samples, repeats, skipped records by shard and reason) summed over the ranks for ``log.txt``.

``StreamBookkeeping`` is a mixin of ``utils.engine.Trainer`` (its methods use the attributes
``Trainer.__init__`` sets); ``_DataCounts`` is one rank's counts, carried in checkpoints.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional

from utils import dist as du
from utils.errors import DataError

logger = logging.getLogger("utils.engine")  # the Trainer's log lines keep the engine's name


class StreamBookkeeping:
    """A streamed batch's bookkeeping (a mixin of ``utils.engine.Trainer``)."""

    def _stream_batch(self, batch: dict, epoch: int, record: bool = True) -> dict:
        """Take a streamed batch's bookkeeping (``data/stream.py``: ``_failure``, ``_state``,
        ``_skipped``, ``_keys`` ...) out of it: the slot's state for the next checkpoint, the skip
        counts for log.txt, and (``log_sample_keys``) the keys for ``samples_rank<R>.txt``."""
        meta = {k: batch.pop(k) for k in [k for k in batch if k.startswith("_")]}
        if "_failure" in meta:
            raise DataError(meta["_failure"])
        if not record:
            return batch
        self.state.stream["states"][meta["_slot"]] = meta["_state"]
        self.data_counts.add(meta)
        if self.log_sample_keys:
            self._log_keys(epoch, meta["_keys"])
        return batch

    def _data_record(self, epoch: int) -> dict:
        """The epoch's data counts summed over ranks, for log.txt (and one log line naming the
        skipped records)."""
        parts = du.all_gather_object(self.data_counts.as_dict()) if self.info.distributed else [
            self.data_counts.as_dict()]
        total = _DataCounts.merged(parts)
        skipped = {shard: dict(reasons) for shard, reasons in total.skipped.items()}
        n_skipped = sum(sum(r.values()) for r in skipped.values())
        if n_skipped and self.info.is_main:
            logger.warning("epoch %d: skipped %d bad record(s): %s", epoch, n_skipped, "; ".join(
                f"{shard}: " + ", ".join(f"{n} {reason} (e.g. {', '.join(total.examples.get(shard, {}).get(reason, []))})"
                                         for reason, n in reasons.items()) for shard, reasons in skipped.items()))
        return {"data_samples": total.samples, "data_skipped": n_skipped, "data_repeats": total.repeats,
                "data_skipped_by_shard": skipped}


class _DataCounts:
    """A streamed epoch's data bookkeeping on one rank: samples trained, repeats, and skipped
    records by shard and reason (with a few example keys)."""

    def __init__(self, samples: int = 0, repeats: int = 0, skipped: Optional[dict] = None,
                 examples: Optional[dict] = None):
        self.samples, self.repeats = samples, repeats
        self.skipped: Dict[str, Dict[str, int]] = skipped or {}
        self.examples: Dict[str, Dict[str, list]] = examples or {}

    def add(self, meta: dict) -> None:
        self.samples += len(meta["_keys"])
        self.repeats += meta["_repeats"]
        for (shard, reason), n in meta["_skipped"].items():
            by = self.skipped.setdefault(shard, {})
            by[reason] = by.get(reason, 0) + n
        for (shard, reason), keys in meta["_examples"].items():
            named = self.examples.setdefault(shard, {}).setdefault(reason, [])
            named.extend(keys[: max(0, 3 - len(named))])

    def as_dict(self) -> dict:
        return {"samples": self.samples, "repeats": self.repeats, "skipped": self.skipped, "examples": self.examples}

    @classmethod
    def from_dict(cls, d: dict) -> "_DataCounts":
        return cls(d["samples"], d["repeats"], {k: dict(v) for k, v in d["skipped"].items()},
                   {k: {r: list(x) for r, x in v.items()} for k, v in d["examples"].items()})

    @classmethod
    def merged(cls, parts: list) -> "_DataCounts":
        out = cls()
        for p in parts:
            out.samples += p["samples"]
            out.repeats += p["repeats"]
            for shard, reasons in p["skipped"].items():
                by = out.skipped.setdefault(shard, {})
                for reason, n in reasons.items():
                    by[reason] = by.get(reason, 0) + n
            for shard, reasons in p["examples"].items():
                for reason, keys in reasons.items():
                    named = out.examples.setdefault(shard, {}).setdefault(reason, [])
                    named.extend(keys[: max(0, 3 - len(named))])
        return out
