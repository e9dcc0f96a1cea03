"""One annotation entry of a BLIP-style json list or CSV/TSV file (docs/FORMATS.md 1, 2): reading a
file's entries, naming an entry in a message, and checking its fields.

The readers of BLIP-style entries (``data/retrieval.py``, ``data/retrieval_train.py``,
``data/pretrain.py``, ``data/corpora.py``, ``data/pairs.py``, ``data/video.py``, the caption tools)
read and check them here, so that every message names the file, the entry (``entry K of FILE``, a CSV
row as ``row K (line L) of FILE``) and the field in one style. It imports no other reader: it is the
module below them all.

- ``_read_entries``: the entries of a json list or of a CSV/TSV file (``_csv_entries``, its columns
  chosen by ``data/columns.py``'s ``Columns``) and how a message names entry k (``Where``); a file
  without entries is an error.
- ``_require_dict``, ``_require_field``, ``_require_image``, ``_captions``, ``_train_image_id``: the
  field checks, each failing with a ``DataError`` that names the entry and the field.
- ``_is_csv`` (a ``.csv`` / ``.tsv`` name) and ``_join`` (an entry's image path under an image root).
"""
from __future__ import annotations

import os
from array import array
from collections.abc import Callable
from typing import Any

from .columns import DEFAULT as DEFAULT_COLUMNS, Columns
from .utils import read_csv, read_json, short_repr
from utils.errors import DataError

PathLike = str | os.PathLike

Where = Callable[[int], str]  # entry index -> "entry 3 of FILE" / "row 3 (line 5) of FILE"


def _where(ann_file: PathLike, index: int) -> str:
    return f"entry {index} of {ann_file}"


def _read_entries(ann_file: PathLike, one_per_image: bool = False,
                  columns: Columns = DEFAULT_COLUMNS) -> tuple[list, Where]:
    """The entries of an annotation file and how a message names entry k (a CSV's columns: ``columns``).
    An empty file is an error: a split without entries would train or evaluate on nothing."""
    if _is_csv(ann_file):
        entries, where = _csv_entries(ann_file, one_per_image, columns)
    else:
        entries, where = read_json(ann_file), (lambda k: _where(ann_file, k))
        if not isinstance(entries, list):
            raise DataError(f"{ann_file}: expected a json list of entries, got {type(entries).__name__}")
    if not entries:
        raise DataError(f"{ann_file}: no entries (an empty json list, or a CSV with only its header); every "
                         "annotation file a run reads needs at least one")
    return entries, where


def _csv_entries(ann_file: PathLike, one_per_image: bool, columns: Columns = DEFAULT_COLUMNS) -> tuple[list, Where]:
    """BLIP-json entries from a CSV (TSV: ``.tsv``) with a header row: the image path (``columns.image``,
    joined to ``columns.image_dir``'s folder when set), the caption (``columns.caption``) and
    optionally the image id (``columns.image_id``; BLIP's names by default: ``image``, ``caption``,
    ``image_id``). One entry per row for training, without ``image_id`` where the column is absent
    or blank (the train set then resolves it like a caption-list entry's: see ``data/retrieval_train.py``;
    alone, that is the image path); with ``one_per_image`` (evaluation) one per distinct image path,
    its captions in row order, named by its first row. Every row's image and caption are checked
    here, where its line is known; a missing column names the file, the column and the file's columns."""
    header, rows = read_csv(ann_file)
    col = columns.require(header, ann_file)
    if columns.image_id in header:
        col["image_id"] = header.index(columns.image_id)
    entries: list[dict] = []
    first_row: dict[str, int] = {}  # one_per_image: image -> its entry
    # Per entry, the data row and line that name it (not the rows themselves: they hold every field).
    named_row, named_line = array("l"), array("l")
    for row in rows:
        where = row.where(ann_file)
        caption = row.fields[col["caption"]]
        if not caption.strip():
            raise DataError(f"{where}: invalid field {columns.caption!r}: the caption is empty or whitespace only "
                            f"({caption!r})")
        entry = {"image": columns.image_of(row.fields, col, where), "caption": caption}
        image_id = row.fields[col["image_id"]] if "image_id" in col else ""
        if image_id.strip():
            entry["image_id"] = image_id
        if one_per_image and entry["image"] in first_row:
            entries[first_row[entry["image"]]]["caption"].append(entry["caption"])
            continue
        if one_per_image:
            first_row[entry["image"]] = len(entries)
            entry = {"image": entry["image"], "caption": [entry["caption"]]}
        entries.append(entry)
        named_row.append(row.index)
        named_line.append(row.line)
    return entries, lambda k: f"row {named_row[k]} (line {named_line[k]}) of {ann_file}"


def _require_dict(entry: Any, where: str) -> None:
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object, got {type(entry).__name__}")


def _require_field(entry: dict, field: str, where: str) -> Any:
    if field not in entry:
        raise DataError(f"{where}: missing field '{field}' (has {sorted(entry)})")
    return entry[field]


def _require_image(entry: dict, where: str) -> str:
    image = _require_field(entry, "image", where)
    if not isinstance(image, str) or not image.strip():
        raise DataError(f"{where}: invalid field 'image': expected a non-empty path string, got {image!r}")
    return image


def _captions(entry: dict, where: str) -> list[str]:
    """The raw captions of an entry: ``[caption]`` for a string, the list itself for a list.

    Rejects what would train or evaluate on nothing: an empty or whitespace-only caption, an empty
    list (an image without captions has no image->text rank), a non-string list item (the message
    names the item's position in the list)."""
    caption = _require_field(entry, "caption", where)
    bad = f"{where}: invalid field 'caption'"
    if isinstance(caption, str):
        if not caption.strip():
            raise DataError(f"{bad}: the caption is empty or whitespace only ({caption!r})")
        return [caption]
    if not isinstance(caption, list):
        raise DataError(f"{bad}: expected a string or a non-empty list of strings, got "
                         f"{type(caption).__name__} {short_repr(caption)}")
    if not caption:
        raise DataError(f"{bad}: the caption list is empty (a list needs at least one caption)")
    for k, item in enumerate(caption):
        if not isinstance(item, str):
            raise DataError(f"{bad}: item {k} of the caption list is {type(item).__name__} "
                             f"{short_repr(item)}, expected a string")
        if not item.strip():
            raise DataError(f"{bad}: item {k} of the caption list is empty or whitespace only "
                             f"({item!r})")
    return caption


def _train_image_id(entry: dict, where: str, required: bool) -> str | int | None:
    """The entry's explicit ``image_id``, or None when it has none and none is ``required``."""
    if "image_id" not in entry and not required:
        return None
    image_id = _require_field(entry, "image_id", where)
    # bool is an int subclass in Python; a json true/false id is certainly a mistake.
    if isinstance(image_id, bool) or not isinstance(image_id, (str, int)):
        raise DataError(f"{where}: invalid field 'image_id': expected a string or an integer, "
                         f"got {short_repr(image_id)}")
    return image_id


def _is_csv(ann_file: PathLike) -> bool:
    return str(ann_file).lower().endswith((".csv", ".tsv"))


def _join(image_root: PathLike | None, image: str) -> str:
    # os.path.join keeps an absolute `image` as is, so absolute entries work with any root.
    return image if image_root is None else os.path.join(image_root, image)
