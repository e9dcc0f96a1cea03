"""Streamed training pairs: img2dataset / webdataset tar shards and parquet shards, read as a stream
(docs/FORMATS.md 2c), optionally mixed with json/CSV lists and img2dataset ``files`` folders.

A config's ``train_file`` may name, in any mix:

- json lists and CSV files (docs/FORMATS.md 2), DLIP's ``all.json``, the Kaggle ``results.csv``;
- an img2dataset ``files`` folder (``00000/000000015.jpg`` + ``.txt`` + ``.json``);
- tar shards: a file, a brace pattern (``cc3m/{00000..00331}.tar``), a glob, a folder of ``*.tar``
  (img2dataset ``--output_format webdataset``), or a ``pipe:`` / URL for an object store;
- parquet shards with the image bytes in a column (img2dataset ``--output_format parquet``): a file,
  a pattern, or a folder of them.

As soon as one tar or parquet shard is named, the run streams (:class:`PairStream`); otherwise the
lists and folders are read into memory as before (``data/pretrain.py``, ``data/retrieval.py``).

The shards, their counts and how their records are read are ``data/shards.py``'s; which slot reads
which records, ``data/slots.py``'s; the loader and collator the trainer iterates,
``data/stream_loader.py``'s. This module is the dataset between them: ``PairStream`` and
``build_stream``.

**One epoch.** The shards are shuffled per epoch (seed, epoch) and laid end to end; the resulting
sequence of records is cut into one contiguous, equal range per *slot* (rank x dataloader worker),
so no record is read by two slots and every rank takes the same number of steps. Each slot reads
its range with the ``webdataset`` library (``pyarrow`` for parquet; a shard is opened at most by the
slots whose ranges touch it), shuffles it in blocks of ``shuffle_buffer`` records, decodes and
augments, and yields exactly ``quota`` batches. An epoch is ``train_num_samples`` samples (default:
every record once; what does not fill a last batch per slot is left for the next epoch's shuffle).
With ``train_num_samples`` above the data, a slot goes round its range again.

**Resume** is exact: a slot's state is (records of its range consumed up to its current block,
position in that block, samples yielded), carried by every batch to the trainer and saved in the
checkpoint; on resume, each slot skips to its block (reading without decoding) and continues with
the same permutation and per-sample augmentation seeds. The state is per slot, so resume needs the
same number of ranks and workers (checked).

**Bad records** (undecodable image, empty caption, no image in the sample, a missing file of a list
entry, an unreadable shard) are skipped and counted per shard; the trainer writes the counts into
``log.txt``. A slot that skipped records completes its quota from the start of its own range (the
repeats are counted too), so ranks stay in step; a shard that broke off mid-read is not opened again
on those later passes. When more than ``max_bad_fraction`` of the first ``BAD_CHECK_AFTER`` records
a slot read from one source are bad (or of all its records in the slot's range, for a source with
fewer: judged at its end), the run stops with a DataError naming the source and the reasons: a wrong
root or a wrong format is a configuration problem, not noise.
"""
from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .shards import (UNREADABLE_SHARD, Record, Shard, _pair_shards, _shard_records, describe, expand_shards,
                     split_train_files)
from .slots import SlotPlan, _mix, _range_records, plan_epoch, range_sources
from .stream_loader import StreamFailure, StreamLoader
from .utils import BadImageError, decode_image, load_image, pre_caption
from utils.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
PAIRS_PER_SHARD = 1000  # list items per chunk when lists are streamed with shards
BAD_CHECK_AFTER = 1000   # records of one source a slot reads before max_bad_fraction is applied
EXAMPLES = 3             # records named per (shard, reason) in the log

# Skip reasons (log.txt keys; a shard's own, UNREADABLE_SHARD and SHORT_SHARD: data/shards.py).
UNDECODABLE = "undecodable image"
EMPTY_CAPTION = "empty caption"
NO_IMAGE = "no image in sample"
NO_CAPTION = "no caption in sample"
MISSING_FILE = "missing image file"


class PairStream(IterableDataset):
    """The streamed training pairs of a ``train_file`` list (module docstring).

    Yields ``(image, caption, idx, meta)``: ``idx`` is unique per record (its own contrastive
    class; a list item keeps its dataset's image idx), ``meta`` the key, the slot's state after
    this sample and the skip counts since the previous sample. ``set_epoch`` / ``set_state`` /
    ``configure`` are called by the trainer before each epoch's iterator is created.
    """

    def __init__(self, shards: Sequence[Shard], transform: Optional[Callable], max_words: int = 30, *,
                 list_dataset=None, seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 1000,
                 num_samples: Optional[int] = None, max_bad_fraction: float = 0.01):
        if not shards:
            raise DataError("a streamed train_file needs at least one shard")
        self.shards = list(shards)
        self.transform = transform
        self.max_words = max_words
        self.list_dataset = list_dataset
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, max(1, shuffle_buffer)
        self.num_samples = num_samples
        self.max_bad_fraction = max_bad_fraction
        self.epoch = 0
        self.rotate = 0
        self.states: dict[int, dict] = {}
        self.rank, self.world_size, self.num_workers, self.batch_size = 0, 1, 0, 1
        self.total = sum(s.count for s in self.shards)
        self.pairs_per_shard = PAIRS_PER_SHARD

    # -- what the trainer sets
    def configure(self, rank: int, world_size: int, num_workers: int, batch_size: int) -> None:
        self.rank, self.world_size, self.num_workers, self.batch_size = rank, world_size, num_workers, batch_size
        if self.batches_per_epoch() < 1:
            raise DataError(f"the streamed train data has {self.total} records: fewer than one batch of "
                            f"{batch_size} per slot ({self.slots} slots = {world_size} rank(s) x "
                            f"{max(1, num_workers)} worker(s)); lower batch_size_train or num_workers")

    @property
    def slots(self) -> int:
        return self.world_size * max(1, self.num_workers)

    def plan(self, epoch: int) -> list[SlotPlan]:
        return plan_epoch([s.count for s in self.shards], self.slots, self.batch_size, self.seed, epoch,
                          self.shuffle, self.num_samples)

    def batches_per_epoch(self) -> int:
        """Batches each rank takes per epoch (the same on every rank)."""
        return self.plan(0)[0].quota * max(1, self.num_workers)

    @property
    def captions(self) -> list[str]:
        """A sample of captions (the first shard's, at most 1000) for the tokenizer's UNK check."""
        out = []
        for rec in _shard_records(self.shards, 0):
            if len(out) >= 1000:
                break
            caption = self._caption(rec)
            if caption:
                out.append(caption)
        return out

    def peek(self, n: int) -> list[tuple]:
        """The first ``n`` usable records in shard order, undecorated: ``(PIL image, caption, idx)``."""
        out = []
        for idx in range(len(self.shards)):
            for rec in _shard_records(self.shards, idx):
                if len(out) >= n:
                    return out
                image, caption, reason = self._decode(rec)
                if reason is None:
                    out.append((image, caption, self._idx(rec)))
        return out

    @property
    def skipped_up_front(self) -> dict:
        """{shard or list file: {reason: count}} of the records the sources mark as failed."""
        out = {s.name: dict(s.skipped_up_front) for s in self.shards if s.skipped_up_front}
        if self.list_dataset is not None:
            out.update(getattr(self.list_dataset, "skipped_up_front", {}))
        return out

    # -- pre-flight of the list part (data/preflight.py)
    def image_checks(self):
        if self.list_dataset is None:
            return [], (lambda k: "")
        return self.list_dataset.image_checks()

    def drop_images(self, bad) -> int:
        """``skip_bad_images``: drop the list items of ``bad`` images and re-cut the list's chunks."""
        dropped = self.list_dataset.drop_images(bad)
        self.shards = [s for s in self.shards if s.kind != "pairs"] + _pair_shards(self.list_dataset,
                                                                                    self.pairs_per_shard)
        self.total = sum(s.count for s in self.shards)
        return dropped

    @property
    def num_images(self) -> int:
        return self.total

    def __len__(self) -> int:
        return self.total

    # -- decoding
    def _caption(self, rec: Record) -> Optional[str]:
        data = rec.data
        if isinstance(data, str):
            return None
        if self.shards[rec.shard].kind == "pairs":
            captions = self.list_dataset.captions[data]
            return captions if isinstance(captions, str) else (captions[0] if len(captions) == 1
                                                                 else random.choice(captions))
        if self.shards[rec.shard].kind == "parquet":
            text = data["__caption__"]
        elif "txt" in data:
            text = data["txt"].decode("utf-8", "replace") if isinstance(data["txt"], bytes) else data["txt"]
        elif "json" in data:
            try:
                text = json.loads(data["json"]).get("caption")
            except (ValueError, AttributeError):
                text = None
        else:
            text = None
        return pre_caption(text, self.max_words) if isinstance(text, str) and text.strip() else None

    def _decode(self, rec: Record) -> tuple[Any, Optional[str], Optional[str]]:
        """(image, caption, skip reason)."""
        if isinstance(rec.data, str):
            return None, None, rec.data
        shard = self.shards[rec.shard]
        where = f"sample {rec.key} of {shard.name}"
        if shard.kind == "pairs":
            ds = self.list_dataset
            path = ds.image_path(rec.data)
            if not os.path.isfile(path):
                return None, None, MISSING_FILE
            try:
                image = load_image(path, context=ds.source(rec.data))
            except BadImageError:
                return None, None, UNDECODABLE
            return image, self._caption(rec), None
        caption = self._caption(rec)
        if caption is None:
            has_text = shard.kind == "parquet" or "txt" in rec.data or "json" in rec.data
            return None, None, EMPTY_CAPTION if has_text else NO_CAPTION
        if shard.kind == "parquet":
            data = rec.data["__image__"]
        else:
            data = next((rec.data[s] for s in IMAGE_SUFFIXES if s in rec.data), None)
        if not data:
            return None, None, NO_IMAGE
        try:
            return decode_image(data, context=where), caption, None
        except BadImageError:
            return None, None, UNDECODABLE

    def _idx(self, rec: Record) -> int:
        if self.shards[rec.shard].kind == "pairs":
            return self.list_dataset.image_idx(rec.data) if hasattr(self.list_dataset, "image_idx") \
                else self.list_dataset._idx[rec.data]
        # Its own class, above every list item's image idx.
        return (1 << 40) + _mix(rec.shard, rec.index) % (1 << 40)

    def make_loader(self, batch_size: int, collate_fn: Callable, num_workers: int, rank: int, world_size: int,
                    pin_memory: bool = False) -> "StreamLoader":
        """The trainer's loader for this stream (``utils/engine.py`` calls it for any dataset that has it)."""
        return StreamLoader(self, batch_size, collate_fn, num_workers, rank, world_size, pin_memory)

    # -- iteration
    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        workers = max(1, self.num_workers)
        # The DataLoader takes batches from its workers in turn, starting with worker 0, and every
        # slot has the same quota: after `rotate` batches (a resume), worker 0 serves the slot whose
        # turn is next, so the batch order is the uninterrupted run's.
        slot = self.rank * workers + (worker + self.rotate) % workers
        plan = self.plan(self.epoch)[slot]
        state = dict(self.states.get(slot) or {"pass": 0, "pos": 0, "item": 0, "yielded": 0})
        state["failed"] = list(state.get("failed", []))  # shards that broke off this epoch: not re-read
        sizes = range_sources(plan, self.shards)
        target = plan.quota * self.batch_size
        size = plan.stop - plan.start
        pending: Counter = Counter()
        examples: dict = {}
        read: Counter = Counter()   # per source: records read by this slot (this epoch)
        bad: Counter = Counter()
        while state["yielded"] < target:
            good_this_pass = 0
            records = _range_records(plan, self.shards, state["pos"], set(state["failed"]))
            while state["pos"] < size and state["yielded"] < target:
                block = []
                for rec in records:
                    block.append(rec)
                    if len(block) == min(self.shuffle_buffer, size - state["pos"]):
                        break
                if not block:
                    break
                perm = list(range(len(block)))
                if self.shuffle:
                    random.Random(_mix(self.seed, self.epoch, slot, state["pass"], state["pos"])).shuffle(perm)
                while state["item"] < len(block) and state["yielded"] < target:
                    m = state["item"]
                    rec = block[perm[m]]
                    sample_seed = _mix(self.seed, self.epoch, slot, state["pass"], state["pos"], m)
                    py_state = random.getstate()
                    with torch.random.fork_rng(devices=[]):
                        random.seed(sample_seed)
                        torch.default_generator.manual_seed(sample_seed)  # CPU only (see SeededItems)
                        try:
                            image, caption, reason = self._decode(rec)
                            if reason is None and self.transform is not None:
                                image = self.transform(image)
                        finally:
                            random.setstate(py_state)
                    state["item"] = m + 1
                    shard = self.shards[rec.shard]
                    read[shard.source] += 1
                    if reason is not None and state["pass"] > 0:
                        continue  # skipped and counted on the first pass
                    if reason is not None:
                        if reason == UNREADABLE_SHARD and rec.shard not in state["failed"]:
                            state["failed"].append(rec.shard)
                        bad[shard.source] += 1
                        pending[(shard.name, reason)] += 1
                        named = examples.setdefault((shard.name, reason), [])
                        if len(named) < EXAMPLES:
                            named.append(rec.key)
                        failure = self._check_bad(shard.source, read, bad, sizes)
                        if failure is not None:
                            yield failure
                            return
                        continue
                    if state["pass"] == 0 and read[shard.source] == sizes[shard.source]:
                        failure = self._check_bad(shard.source, read, bad, sizes)  # the source's end
                        if failure is not None:
                            yield failure
                            return
                    state["yielded"] += 1
                    good_this_pass += 1
                    meta = {"key": f"{shard.name}/{rec.key}", "slot": slot,
                            "state": {**state, "failed": list(state["failed"])},
                            "skipped": dict(pending), "examples": examples, "repeat": state["pass"] > 0}
                    pending, examples = Counter(), {}
                    yield image, caption, self._idx(rec), meta
                if state["item"] >= len(block):
                    state["pos"] += len(block)
                    state["item"] = 0
            if state["yielded"] < target:
                if good_this_pass == 0 and state["pos"] >= size:
                    yield StreamFailure(f"slot {slot} (rank {self.rank}, worker {worker}) read its whole range of "
                                        f"{size} records in epoch {self.epoch} and none was usable "
                                        f"(skipped: {dict(pending)}); check the shards and image_root")
                    return
                # Short of the quota (skipped records): go round the range again.
                state["pass"] += 1
                state["pos"], state["item"] = 0, 0

    def _check_bad(self, source: str, read: Counter, bad: Counter, sizes: Counter) -> Optional[StreamFailure]:
        """After ``BAD_CHECK_AFTER`` records of a source, or all of them where the slot's range holds
        fewer (a small source is judged too), too many bad ones stop the run."""
        n = read[source]
        if n >= min(BAD_CHECK_AFTER, sizes[source] or BAD_CHECK_AFTER) and bad[source] > self.max_bad_fraction * n:
            return StreamFailure(
                f"train_file entry {source!r}: {bad[source]} of the first {n} records read were bad "
                f"({100 * bad[source] / n:.1f}% > max_bad_fraction {self.max_bad_fraction:g}); a wrong image_root, "
                "a wrong format or broken shards? (raise max_bad_fraction to train on anyway)")
        return None


def build_stream(files: Sequence[str], transform: Optional[Callable], max_words: int, *, list_builder: Callable,
                 seed: int, shuffle: bool, shuffle_buffer: int, num_samples: Optional[int], max_bad_fraction: float,
                 pairs_per_shard: int = PAIRS_PER_SHARD) -> PairStream:
    """A :class:`PairStream` over ``files``' shards, the list entries (``list_builder(lists)`` -> a
    train dataset with ``image_path``, ``source``, ``captions``) cut into chunks of
    ``pairs_per_shard`` items."""
    lists, streams = split_train_files(files)
    shards: list[Shard] = []
    for name in streams:
        shards.extend(expand_shards(name))
    list_dataset = list_builder(lists) if lists else None
    if list_dataset is not None:
        shards.extend(_pair_shards(list_dataset, pairs_per_shard))
    stream = PairStream(shards, transform, max_words, list_dataset=list_dataset, seed=seed, shuffle=shuffle,
                        shuffle_buffer=shuffle_buffer, num_samples=num_samples, max_bad_fraction=max_bad_fraction)
    stream.pairs_per_shard = pairs_per_shard
    if stream.total == 0:
        raise DataError(f"train_file {list(files)}: the shards hold no usable record ({describe(shards)})")
    logger.info("streaming train data: %s", describe(shards))
    return stream
