"""The shards of a streamed ``train_file`` (docs/FORMATS.md 2c): which entries are shards
(``classify``, ``split_train_files``), the shards of an entry and their record counts
(``expand_shards``: a tar file, a brace pattern, a glob, a folder, a ``pipe:`` / URL, a parquet file;
``_pair_shards``: a list dataset cut into chunks), and reading one shard's records
(``_shard_records``). ``data/slots.py`` plans which slot reads which records, ``data/stream.py``
decodes them.

**Counts.** The size of each shard comes from img2dataset's metadata, read before training: the
shard's ``_stats.json`` (``successes``, and the failed downloads / resizes, which are reported as
skipped up front), else its metadata ``.parquet`` (rows with ``status`` success), else a
``sizes.json`` in its folder (``{"00000.tar": n}``, webdataset's convention), else (a local tar) the
tar's own member list. For a ``pipe:``/URL shard, its ``_stats.json`` is fetched through the same
opener. In a parquet shard, rows whose ``status`` is not ``success`` are skipped up front.

**Reading.** A tar shard is read with the ``webdataset`` library's tar iterators (members grouped by
key into samples), a parquet shard with ``pyarrow`` in batches of rows. A shard yields exactly its
count of records: one that breaks off mid-read or holds fewer gives placeholders for the rest
(``UNREADABLE_SHARD``, ``SHORT_SHARD``: counted as skipped), one that holds more is not read past its
count, so positions follow the planned counts.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

from .utils import read_json
from utils.errors import DataError

logger = logging.getLogger(__name__)

PARQUET_IMAGE_COLUMNS = ("jpg", "png", "webp", "jpeg", "image", "image_bytes")

# Skip reasons of a shard's own records (log.txt keys; those of a decoded record: data/stream.py).
UNREADABLE_SHARD = "unreadable shard"
SHORT_SHARD = "records missing from shard"


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
