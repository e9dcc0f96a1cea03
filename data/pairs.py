"""Flat tables of (image, caption) pairs, read from the annotation files users already have.

Formats (docs/FORMATS.md sections 1 and 2):
- BLIP-json, train layout ``[{"image", "caption": str, "image_id"}, ...]``: one pair per entry;
- BLIP-json val/test layout and pretraining json ``[{"image", "caption": str | [str, ...]}]``: one
  pair per caption (a list holds several captions of one image);
- CSV with a header row: the image and caption columns are chosen by name, the image path may be
  joined from a folder column and a file column (``data/columns.py``).

Every pair remembers where it came from (file, entry or row and line, position in a caption list),
so a message names the exact line a user must fix, and a filtered copy of a file is written in the
file's own format (``write_filtered``). Image paths are joined to ``image_root`` unless absolute.
Empty or whitespace-only captions and images, CSV rows with more or fewer fields than the header,
text that is not UTF-8 and files without pairs are errors naming the file and the entry or line.

``PairBatches`` loads batches of pairs for the tools: each distinct image of a batch is decoded once,
and an image that is missing or unreadable (known from the pre-flight check, or failing to decode)
is reported for its rows instead of failing the batch.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from .columns import FLAGS, Columns
from .entries import _captions, _join, _require_dict, _require_image, _where
from .utils import BadImageError, csv_delimiter, load_image, pre_caption, read_csv, read_json
from utils.errors import DataError

PathLike = str | os.PathLike
FORMATS = ("auto", "json", "csv")


def _file_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return "csv" if path.lower().endswith((".csv", ".tsv")) else "json"


@dataclass
class PairTable:
    """Parallel per-pair lists; pair ``r`` is ``(image[r], caption[r])``."""
    files: list[str]
    formats: list[str]                                         # per file: 'json' | 'csv'
    image_fields: list[str]                                    # per file: the image field / column
    image: list[str] = field(default_factory=list)            # path as written in the file
    caption: list[str] = field(default_factory=list)          # raw caption (cleaned when tokenized)
    source: list[str] = field(default_factory=list)           # file label, or the source column/field
    file_index: list[int] = field(default_factory=list)
    entry: list[int] = field(default_factory=list)            # json entry / csv data row, 0-based
    caption_index: list[int] = field(default_factory=list)    # position in a caption list, -1: a string
    line: array = field(default_factory=lambda: array("l"))   # csv: the row's first line; json: -1
    key: list = field(default_factory=list)                   # the id column's value (id_col), else None

    @classmethod
    def from_images(cls, paths: Sequence[str]) -> "PairTable":
        """A table of bare image files (empty captions), e.g. query images."""
        table = cls(files=["<image files>"], formats=["json"], image_fields=["image"])
        for i, path in enumerate(paths):
            table._add(str(path), "", "", 0, i, -1, -1)
        return table

    def __len__(self) -> int:
        return len(self.image)

    def where(self, row: int) -> str:
        """``"entry 3 of a.json (caption 1)"`` or ``"row 3 (line 5) of a.csv"`` for pair ``row``."""
        f, e = self.file_index[row], self.entry[row]
        if self.formats[f] == "csv":
            return f"row {e} (line {self.line[row]}) of {self.files[f]}"
        k = self.caption_index[row]
        return _where(self.files[f], e) + (f" (caption {k})" if k >= 0 else "")

    def fingerprint(self) -> str:
        """A hash of every pair's image and caption, to recognise the same inputs on a restart."""
        h = hashlib.sha1()
        for image, caption in zip(self.image, self.caption):
            h.update(f"{image}\t{caption}\n".encode("utf-8"))
        return h.hexdigest()

    def first_rows_of_images(self) -> list[int]:
        """The first pair of each distinct image path, in first-seen order."""
        seen: dict[str, int] = {}
        for r, image in enumerate(self.image):
            seen.setdefault(image, r)
        return list(seen.values())

    def image_checks(self, image_root: Optional[PathLike]) -> tuple[list[str], Callable[[int], str]]:
        """The distinct image paths (joined to ``image_root``) and how to name the k-th in a message
        (its first pair and the field); for ``data/preflight.py``."""
        rows = self.first_rows_of_images()
        root = str(image_root) if image_root else None
        return ([_join(root, self.image[r]) for r in rows],
                lambda k: f"{self.where(rows[k])}, field {self.image_fields[self.file_index[rows[k]]]!r}")

    def _add(self, image: str, caption: str, source: str, f: int, entry: int, k: int, line: int,
             key: Optional[str] = None) -> None:
        self.image.append(image)
        self.caption.append(caption)
        self.source.append(source)
        self.file_index.append(f)
        self.entry.append(entry)
        self.caption_index.append(k)
        self.line.append(line)
        self.key.append(key)


def _source_labels(files: Sequence[str]) -> list[str]:
    # The file name is enough unless two inputs share it (coco/train.json, vg/train.json).
    names = [Path(f).name for f in files]
    return [n if names.count(n) == 1 else f for n, f in zip(names, files)]


def _source_of(record: dict, source_key: Optional[str], default: str, where: str) -> str:
    if not source_key:
        return default
    if source_key not in record:
        raise DataError(f"{where}: missing field '{source_key}' (the source key; has {sorted(record)})")
    return str(record[source_key])


def _read_json_pairs(table: PairTable, path: str, f: int, label: str, source_key: Optional[str],
                     id_col: Optional[str], need_image: bool, need_caption: bool) -> None:
    entries = read_json(path)
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a json list of entries, got {type(entries).__name__}")
    for index, entry in enumerate(entries):
        where = _where(path, index)
        _require_dict(entry, where)
        image = _require_image(entry, where) if need_image or "image" in entry else ""
        if need_caption or "caption" in entry:
            captions, single = _captions(entry, where), isinstance(entry["caption"], str)
        else:  # bare images (a gallery): one row per entry
            captions, single = [""], True
        source = _source_of(entry, source_key, label, where)
        key = _key_of(entry, id_col, where)
        for k, caption in enumerate(captions):
            # A single caption is written back as a string, not a list.
            table._add(image, caption, source, f, index, -1 if single else k, -1, key)


def _key_of(record: dict, id_col: Optional[str], where: str) -> Optional[str]:
    if not id_col:
        return None
    value = record.get(id_col)
    if value is None or isinstance(value, (dict, list)) or not str(value).strip():
        raise DataError(f"{where}: missing or empty field {id_col!r} (the id column; has {sorted(record)})")
    return str(value)


def _read_csv_pairs(table: PairTable, path: str, f: int, label: str, columns: Columns,
                    source_key: Optional[str], id_col: Optional[str], need_image: bool, need_caption: bool) -> None:
    header, rows = read_csv(path)
    roles = [r for r, needed in (("image", need_image), ("caption", need_caption)) if needed]
    extra = [(source_key, "--source_key")] if source_key else []
    extra += [(id_col, "the id column")] if id_col else []
    col = columns.require(header, path, roles, extra)
    # A column a table does not need (a query file's image, a gallery's caption) is read when present.
    if not need_image and columns.image in header and (columns.image_dir is None or columns.image_dir in header):
        col.update(columns.require(header, path, ("image",)))
    if not need_caption and columns.caption in header:
        col["caption"] = header.index(columns.caption)
    for row in rows:
        where = row.where(path)
        record = dict(zip(header, row.fields))
        image = (columns.image_of(row.fields, col, where)
                 if need_image or ("image" in col and row.fields[col["image"]].strip()) else "")
        caption = row.fields[col["caption"]] if "caption" in col else ""
        if need_caption and not caption.strip():
            raise DataError(f"{where}: empty field {columns.caption!r}")
        table._add(image, caption, _source_of(record, source_key, label, where), f, row.index, -1, row.line,
                   _key_of(record, id_col, where))


def read_pairs(files: Sequence[PathLike] | PathLike, fmt: str = "auto", image_col: str = "image",
               caption_col: str = "caption", source_key: Optional[str] = None, image_dir_col: Optional[str] = None,
               id_col: Optional[str] = None, need_image: bool = True, need_caption: bool = True) -> PairTable:
    """Read every (image, caption) pair of the given files, in file order.

    Args:
        files: BLIP-json / pretraining-json / CSV (or TSV) files.
        fmt: 'auto' (by extension: .csv/.tsv are CSV, anything else json), 'json' or 'csv'.
        image_col, caption_col: CSV column names; ``image_dir_col``: a CSV folder column, the image
            path then being ``folder/file`` (``file`` from ``image_col``; ``data/columns.py``).
        source_key: json field / CSV column naming each pair's source (default: the file name).
        id_col: json field / CSV column of each pair's id (``table.key``; a submission names items by it).
        need_image, need_caption: False for bare captions (text queries) or bare images (a gallery):
            that column may be absent (image / caption ``""``), and is read when present.
    Raises:
        ValueError naming the file, entry (or row and line) and field of the first bad record, or the
        file, the missing column and the file's columns.
    """
    if fmt not in FORMATS:
        raise DataError(f"unknown annotation format {fmt!r}; valid: {FORMATS}")
    files = [str(files)] if isinstance(files, (str, os.PathLike)) else [str(f) for f in files]
    if not files:
        raise DataError("no annotation files given")
    columns = Columns(image=image_col, caption=caption_col, image_dir=image_dir_col or None, named_by=FLAGS)
    formats = [_file_format(f, fmt) for f in files]
    table = PairTable(files=files, formats=formats,
                      image_fields=[columns.image_field if kind == "csv" else "image" for kind in formats])
    for f, (path, kind, label) in enumerate(zip(files, formats, _source_labels(files))):
        before = len(table)
        if kind == "csv":
            _read_csv_pairs(table, path, f, label, columns, source_key, id_col, need_image, need_caption)
        else:
            _read_json_pairs(table, path, f, label, source_key, id_col, need_image, need_caption)
        if len(table) == before:
            raise DataError(f"{path}: no pairs (an empty json list, or a CSV with only its header)")
    return table


# ----------------------------------------------------------------------------- writing


def _filtered_json(entries: list, kept: dict[int, set[int]]) -> list:
    out = []
    for index, entry in enumerate(entries):
        ks = kept.get(index)
        if not ks:
            continue
        if isinstance(entry["caption"], str):
            out.append(entry)
        else:
            out.append({**entry, "caption": [c for k, c in enumerate(entry["caption"]) if k in ks]})
    return out


def filtered_names(table: PairTable) -> list[str]:
    """The file names :func:`write_filtered` gives each input (two inputs with one name, e.g.
    coco/train.json and vg/train.json, get their position as a prefix)."""
    names = [Path(f).name for f in table.files]
    return [n if names.count(n) == 1 else f"{f}_{n}" for f, n in enumerate(names)]


def write_filtered(table: PairTable, keep: np.ndarray, out_dir: PathLike) -> list[Path]:
    """Write each input file with only the kept pairs to ``out_dir/<file name>``, same format.

    A json entry with a caption list keeps the kept captions (in order) and is dropped when none is
    left; every other field of an entry, and every CSV column, is written unchanged.
    """
    keep = np.asarray(keep, dtype=bool)
    if keep.shape != (len(table),):
        raise DataError(f"keep mask has shape {keep.shape}, expected ({len(table)},)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kept: list[dict[int, set[int]]] = [{} for _ in table.files]
    for r in np.flatnonzero(keep):
        kept[table.file_index[r]].setdefault(table.entry[r], set()).add(table.caption_index[r])
    written = []
    names = filtered_names(table)
    for f, (path, kind) in enumerate(zip(table.files, table.formats)):
        dest = out_dir / names[f]
        if kind == "csv":
            # The rows as read_pairs numbered them (blank lines skipped), so kept indices match.
            header, rows = read_csv(path)
            with open(dest, "w", newline="", encoding="utf-8") as dst:
                writer = csv.writer(dst, delimiter=csv_delimiter(path))
                writer.writerow(header)
                writer.writerows(row.fields for row in rows if row.index in kept[f])
        else:
            dest.write_text(json.dumps(_filtered_json(read_json(path), kept[f]), ensure_ascii=False))
        written.append(dest)
    return written


# ----------------------------------------------------------------------------- loading


class PairBatches(Dataset):
    """Item ``i`` is batch ``batches[i]`` (a list of pair rows), loaded for a model.

    Returns a dict: ``rows`` [n], ``captions`` [n] (``pre_caption`` applied), ``pixel_values``
    ``[U, 3, H, W]`` of the batch's U distinct loadable images (None when U == 0), ``image_index``
    ``[n]`` (row -> its image in ``pixel_values``; -1 when the image could not be loaded) and
    ``errors`` {row: message naming the row, the file entry and the image path}. Use with
    ``DataLoader(batch_size=None)``: the batches are formed here. ``bad_images`` {joined path:
    message}: images the pre-flight check found missing or unreadable, reported without a try.
    """

    def __init__(self, table: PairTable, batches: Sequence[Sequence[int]], image_root: Optional[PathLike],
                 transform: Callable[[Any], torch.Tensor], max_words: int = 30,
                 bad_images: Optional[dict[str, str]] = None):
        self.table = table
        self.batches = [list(b) for b in batches]
        self.image_root = str(image_root) if image_root else None
        self.transform = transform
        self.max_words = max_words
        self.bad_images = bad_images or {}

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        rows = self.batches[i]
        images: list[torch.Tensor] = []
        slot: dict[str, int] = {}
        failed: dict[str, str] = {}
        index, errors = [], {}
        for r in rows:
            path = _join(self.image_root, self.table.image[r])
            if path in self.bad_images:
                failed[path] = self.bad_images[path]
            elif path not in slot and path not in failed:
                try:
                    images.append(self.transform(load_image(path)))
                    slot[path] = len(images) - 1
                except (FileNotFoundError, BadImageError) as exc:
                    failed[path] = str(exc)
            if path in failed:
                errors[r] = f"pair {r} ({self.table.where(r)}): {failed[path]}"
            index.append(slot.get(path, -1))
        return {"rows": rows, "captions": [pre_caption(self.table.caption[r], self.max_words) for r in rows],
                "pixel_values": torch.stack(images) if images else None,
                "image_index": torch.tensor(index, dtype=torch.long), "errors": errors}
