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

**Counts.** The size of each shard comes from img2dataset's metadata, read before training: the
shard's ``_stats.json`` (``successes``, and the failed downloads / resizes, which are reported as
skipped up front), else its metadata ``.parquet`` (rows with ``status`` success), else a
``sizes.json`` in its folder (``{"00000.tar": n}``, webdataset's convention), else (a local tar) the
tar's own member list. For a ``pipe:``/URL shard, its ``_stats.json`` is fetched through the same
opener. In a parquet shard, rows whose ``status`` is not ``success`` are skipped up front.

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

import glob
import json
import logging
import os
import random
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .utils import BadImageError, decode_image, load_image, pre_caption, read_json
from utils.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
PARQUET_IMAGE_COLUMNS = ("jpg", "png", "webp", "jpeg", "image", "image_bytes")
PAIRS_PER_SHARD = 1000  # list items per chunk when lists are streamed with shards
BAD_CHECK_AFTER = 1000   # records of one source a slot reads before max_bad_fraction is applied
EXAMPLES = 3             # records named per (shard, reason) in the log

# Skip reasons (log.txt keys).
UNDECODABLE = "undecodable image"
EMPTY_CAPTION = "empty caption"
NO_IMAGE = "no image in sample"
NO_CAPTION = "no caption in sample"
MISSING_FILE = "missing image file"
UNREADABLE_SHARD = "unreadable shard"
SHORT_SHARD = "records missing from shard"


def _mix(*values: int) -> int:
    return hash(tuple(values)) & 0x7FFF_FFFF_FFFF_FFFF


# ----------------------------------------------------------------------------- sources


@dataclass
class Shard:
    """One unit of streamed records: a tar (``url``: path, ``pipe:`` or URL), a parquet file, or a
    chunk of an in-memory pair list (``pairs``: item indices of the list dataset)."""
    url: str
    kind: str                      # "tar" | "parquet" | "pairs"
    count: int                     # records (good ones expected; parquet: rows with status success)
    source: str                    # the train_file entry it comes from
    skipped_up_front: dict = field(default_factory=dict)   # img2dataset's failures, by reason
    pairs: Optional[range] = None

    @property
    def name(self) -> str:
        return self.url if self.kind != "pairs" else f"{self.source}[{self.pairs.start}:{self.pairs.stop}]"


def is_remote(name: str) -> bool:
    return name.startswith("pipe:") or "://" in name


def _expand(name: str) -> list[str]:
    """Brace patterns (``{00000..00331}``, ``{a,b}``) then, for local names, globs."""
    from braceexpand import braceexpand
    names = list(braceexpand(name))
    if is_remote(name):
        return names
    out: list[str] = []
    for n in names:
        out.extend(sorted(glob.glob(n)) if glob.has_magic(n) else [n])
    return out


def _stem(url: str, suffix: str) -> str:
    return url[: -len(suffix)] if url.endswith(suffix) else url


def _status_counts(path: str) -> Optional[Counter]:
    """``status`` counts of an img2dataset metadata parquet (only that column is read)."""
    import pyarrow.parquet as pq
    try:
        table = pq.read_table(path, columns=["status"])
    except Exception:  # noqa: BLE001 - no such column / not a parquet file: no counts from it
        return None
    return Counter(table.column("status").to_pylist())


def _up_front(stats: dict) -> dict:
    from .corpora import FAILED_DOWNLOAD, STATS_REASONS
    if not any(k in stats for k in STATS_REASONS) and isinstance(stats.get("count"), int):
        failed = stats["count"] - int(stats.get("successes") or 0)  # no breakdown
        return {FAILED_DOWNLOAD: failed} if failed else {}
    return {reason: int(stats[key]) for key, reason in STATS_REASONS.items() if stats.get(key)}


def _failed_rows(status: Counter) -> dict:
    """Skip counts (by reason) from the ``status`` column of an img2dataset parquet."""
    from .corpora import STATS_REASONS
    return {STATS_REASONS.get(k, f"status {k}"): v for k, v in status.items() if k != "success"}


def _read_remote_json(url: str) -> Optional[dict]:
    import webdataset as wds
    try:
        with wds.gopen(url) as stream:
            return json.loads(stream.read().decode("utf-8"))
    except Exception:  # noqa: BLE001 - reported by the caller as "no count"
        return None


def _tar_count(url: str, source: str) -> tuple[int, dict]:
    """(records, skipped up front) of a tar shard from its metadata (module docstring)."""
    stem = _stem(url, ".tar")
    if is_remote(url):
        # The same opener, the last "NAME.tar" in the command or URL replaced by "NAME_stats.json".
        stats_url = re.sub(r"([^/\s]+)\.tar(?!.*\.tar)", r"\1_stats.json", url)
        stats = _read_remote_json(stats_url) if stats_url != url else None
        if not isinstance(stats, dict) or not isinstance(stats.get("successes"), int):
            raise DataError(f"train_file entry {source!r}: no record count for shard {url} ({stats_url} could not "
                            "be read); streaming needs each shard's count: keep img2dataset's _stats.json beside "
                            "the shards")
        return stats["successes"], _up_front(stats)
    if not os.path.isfile(url):
        raise DataError(f"train_file entry {source!r}: shard {url} does not exist")
    if os.path.isfile(stem + "_stats.json"):
        stats = read_json(stem + "_stats.json")
        if isinstance(stats, dict) and isinstance(stats.get("successes"), int):
            return stats["successes"], _up_front(stats)
    if os.path.isfile(stem + ".parquet"):
        status = _status_counts(stem + ".parquet")
        if status is not None:
            return status.get("success", 0), _failed_rows(status)
    sizes = os.path.join(os.path.dirname(url), "sizes.json")
    if os.path.isfile(sizes):
        table = read_json(sizes)
        if isinstance(table, dict) and isinstance(table.get(os.path.basename(url)), int):
            return table[os.path.basename(url)], {}
    # No metadata: count the samples (distinct keys) from the member headers.
    try:
        with tarfile.open(url) as tar:
            # A sample's key as webdataset groups members: the path up to the first dot of the name.
            keys = {m.group(1) for m in (re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", t.name) for t in tar if t.isreg())
                    if m}
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"train_file entry {source!r}: shard {url} is not a readable tar file: {exc}") from None
    return len(keys), {}


def _parquet_image_column(names: Sequence[str]) -> Optional[str]:
    return next((c for c in PARQUET_IMAGE_COLUMNS if c in names), None)


def _parquet_shard(path: str, source: str) -> Shard:
    import pyarrow.parquet as pq
    if not os.path.isfile(path):
        raise DataError(f"train_file entry {source!r}: parquet shard {path} does not exist")
    try:
        names = pq.read_schema(path).names
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"train_file entry {source!r}: {path} is not a readable parquet file: {exc}") from None
    if _parquet_image_column(names) is None:
        raise DataError(f"train_file entry {source!r}: {path} has no image column (one of "
                        f"{list(PARQUET_IMAGE_COLUMNS)}; columns: {names}); img2dataset's metadata parquet of a "
                        "files/webdataset download is not a shard: name the .tar shards or the folder")
    if "caption" not in names:
        raise DataError(f"train_file entry {source!r}: {path} has no 'caption' column (columns: {names})")
    status = _status_counts(path) if "status" in names else None
    if status is not None:
        count, skipped = status.get("success", 0), _failed_rows(status)
    else:
        count, skipped = pq.ParquetFile(path).metadata.num_rows, {}
    return Shard(path, "parquet", count, source, skipped)


def _is_files_folder(path: str) -> bool:
    return any(re.fullmatch(r"\d+", d) and os.path.isdir(os.path.join(path, d)) for d in os.listdir(path))


def classify(name: str) -> str:
    """``'stream'`` for a tar/parquet shard (file, pattern, URL, or a folder of them), ``'list'``
    for a json/CSV list or an img2dataset ``files`` folder."""
    if is_remote(name) or re.search(r"\.(tar|parquet)$", name) or ("{" in name and ".." in name):
        return "stream"
    if os.path.isdir(name) and not _is_files_folder(name):
        if glob.glob(os.path.join(name, "*.tar")) or glob.glob(os.path.join(name, "*.parquet")):
            return "stream"
    return "list"


def expand_shards(name: str) -> list[Shard]:
    """The shards of one ``train_file`` entry classified ``'stream'``, with their counts."""
    if not is_remote(name) and os.path.isdir(name):
        tars = sorted(glob.glob(os.path.join(name, "*.tar")))
        names = tars or sorted(glob.glob(os.path.join(name, "*.parquet")))
    else:
        names = _expand(name)
    if not names:
        raise DataError(f"train_file entry {name!r}: matches no shard")
    missing = [n for n in names if not is_remote(n) and not os.path.isfile(n)]
    if missing:
        raise DataError(f"train_file entry {name!r}: {len(missing)} of its {len(names)} shards do not exist: "
                        f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    shards = []
    for url in names:
        if url.endswith(".parquet"):
            if is_remote(url):
                raise DataError(f"train_file entry {name!r}: parquet shards are read from local or mounted "
                                "storage only; stream tar shards from an object store with pipe:")
            shards.append(_parquet_shard(url, name))
        else:
            count, skipped = _tar_count(url, name)
            shards.append(Shard(url, "tar", count, name, skipped))
    return shards


def split_train_files(files: Sequence[str]) -> tuple[list[str], list[str]]:
    """``train_file`` entries -> (list entries, stream entries)."""
    lists, streams = [], []
    for f in files:
        (streams if classify(str(f)) == "stream" else lists).append(str(f))
    return lists, streams


# ----------------------------------------------------------------------------- the epoch plan


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


# ----------------------------------------------------------------------------- reading records


@dataclass
class Record:
    shard: int          # index into the stream's shards
    index: int          # record number within the shard
    key: str
    data: Any           # tar: the sample dict; parquet: (image bytes, caption, ...); pairs: item index


class _ShardError(Exception):
    pass


def _tar_records(url: str) -> Iterator[dict]:
    import webdataset.tariterators as wt
    errors: list[Exception] = []

    def handler(exc: Exception) -> bool:
        errors.append(exc)
        return False  # stop this shard

    for sample in wt.group_by_keys(wt.tar_file_expander(wt.url_opener([{"url": url}], handler=handler),
                                                        handler=handler), handler=handler):
        yield sample
    if errors:
        raise _ShardError(str(errors[0]))


def _parquet_records(path: str) -> Iterator[dict]:
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    image_col = _parquet_image_column(names)
    cols = [c for c in (image_col, "caption", "key", "status") if c in names]
    row = 0
    for batch in pf.iter_batches(columns=cols, batch_size=256):
        data = batch.to_pydict()
        for i in range(batch.num_rows):
            if "status" in data and data["status"][i] != "success":
                continue  # skipped up front (counted from the metadata)
            key = data["key"][i] if "key" in data and data["key"][i] is not None else str(row)
            row += 1
            yield {"__key__": key, "__image__": data[image_col][i], "__caption__": data["caption"][i]}


def _shard_records(shards: Sequence[Shard], idx: int) -> Iterator[Record]:
    """Exactly ``shards[idx].count`` records: a shard with fewer yields placeholders (counted as
    missing), extra records are not read (a warning says how many), so positions follow the
    planned counts."""
    shard = shards[idx]
    n = 0
    try:
        if shard.kind == "pairs":
            for item in shard.pairs:
                yield Record(idx, n, str(item), item)
                n += 1
            return
        it = _tar_records(shard.url) if shard.kind == "tar" else _parquet_records(shard.url)
        extra = 0
        for sample in it:
            if n >= shard.count:
                extra += 1
                continue
            yield Record(idx, n, sample.get("__key__", str(n)), sample)
            n += 1
        if extra:
            logger.warning("shard %s holds %d record(s) beyond its count of %d (from its metadata): not read",
                           shard.name, extra, shard.count)
    except (_ShardError, OSError, tarfile.TarError, Exception) as exc:  # noqa: BLE001 - counted, reported
        logger.warning("shard %s: read error after %d record(s): %s", shard.name, n, exc)
        reason = UNREADABLE_SHARD
    else:
        reason = SHORT_SHARD
    while n < shard.count:
        yield Record(idx, n, f"#{n}", reason)
        n += 1


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


# ----------------------------------------------------------------------------- the dataset


class StreamFailure:
    """Yielded by a worker instead of a sample when the run must stop (``max_bad_fraction``): the
    collator turns it into a batch the trainer raises on, so the message reaches the user intact."""

    def __init__(self, message: str):
        self.message = message


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

    def __init__(self, stream: PairStream, batch_size: int, collate_fn: Callable, num_workers: int, rank: int,
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


def describe(shards: Sequence[Shard]) -> str:
    kinds = Counter(s.kind for s in shards)
    up_front: Counter = Counter()
    for s in shards:
        up_front.update(s.skipped_up_front)
    text = f"{sum(s.count for s in shards)} records in {len(shards)} shard(s) ({dict(kinds)})"
    if up_front:
        text += f"; skipped up front from img2dataset's metadata: {dict(up_front)}"
    return text


def _pair_shards(dataset, per_shard: int) -> list[Shard]:
    source = ",".join(str(f) for f in dataset.ann_files)
    n = len(dataset)
    return [Shard(f"pairs:{start}", "pairs", min(n, start + per_shard) - start, source,
                  pairs=range(start, min(n, start + per_shard))) for start in range(0, n, per_shard)]


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
