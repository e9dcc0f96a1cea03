"""BLIP-json image-text retrieval datasets: COCO Karpathy, Flickr30k, custom (docs/FORMATS.md 1).

- ``RetrievalTrainDataset``: one item per caption -> ``(image [3, H, W], caption, idx)``, where
  ``idx`` is the contrastive image index (captions of one image share it).
- ``RetrievalEvalDataset``: one item per image -> ``(image [3, H, W], i)``, with the flattened
  captions in ``text`` and the ``img2txt`` / ``txt2img`` maps the retrieval metrics need.
- ``build_retrieval_datasets``: config-like object -> ``{split: dataset}``. Nothing is downloaded:
  the annotation json files must already be in ``ann_root``.

Accepted train entries (a json list; one file may mix both layouts):

- ``{"image": path, "caption": str, "image_id": str | int}``: one caption (BLIP / COCO Karpathy);
  ``image_id`` is required here.
- ``{"image": path, "caption": [str, ...]}`` (Flickr30k / EasyNLP layout), ``image_id`` optional:
  one training pair per caption, all with the entry's image.

Every caption is cleaned with ``pre_caption``; an empty or whitespace-only caption, an empty list or
a non-string list item is an error naming the file, the entry and the field, in train and val/test
files alike. Val/test entries are ``{"image": path, "caption": [str, ...] | str}``, one per image. A
file without entries (``[]``, a CSV with only its header) is an error naming the file.

Contrastive index of a train item: captions with the same image key share one ``idx`` (contiguous,
in first-seen order over all train files together). The key is the entry's explicit ``image_id``
when it has one (explicit wins, as in BLIP: ``"7"`` and ``7`` are two images). An entry without one
(a list entry, or a CSV row with a blank ``image_id``) takes the ``image_id`` that the other entries
of the same image path (as written) give explicitly, in any train file and in any order; if none
does, the key is the image path itself, so it joins an entry whose explicit ``image_id`` equals that
path. The image is thus grouped consistently across layouts and files. Two errors, both naming the
entry and the field ``'image_id'``, stop an ambiguous grouping: the image has several explicit
``image_id`` values elsewhere (which one?), or its path is the explicit ``image_id`` of a different
image (the two would merge). Give that entry an explicit ``image_id`` to settle it.

A ``.csv`` / ``.tsv`` annotation file (columns ``image``, ``caption``, optional ``image_id``; one row
per caption) is read as the equivalent BLIP-json entries, for ``dataset: custom``; a message names a
CSV row as ``row k (line L) of FILE`` (k 0-based among the data rows, L the file's line). Other
column names, and an image path joined from a folder column and a file column, are chosen with
``columns`` (``data/columns.py``; the config keys ``image_col``, ``caption_col``, ``image_dir_col``,
``image_id_col``).

The datasets only parse: whether every image exists and has a readable header is checked once, in
parallel and before any model is built, by ``data/preflight.py`` through ``image_checks`` and
``drop_images`` (``skip_bad_images``: drop those entries up front).
"""
from __future__ import annotations

import bisect
import logging
import os
from array import array
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from .columns import DEFAULT as DEFAULT_COLUMNS, Columns
from .transforms import build_test_transform, build_train_transform
from .utils import BadImageError, load_image, pre_caption, read_csv, read_json, short_repr
from utils.errors import DataError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
Transform = Callable[[Any], Any]

DEFAULT_FILES = {
    "coco": {"train": "coco_karpathy_train.json", "val": "coco_karpathy_val.json",
             "test": "coco_karpathy_test.json"},
    "flickr": {"train": "flickr30k_train.json", "val": "flickr30k_val.json",
               "test": "flickr30k_test.json"},
    "nocaps": {"val": "nocaps_val.json", "test": "nocaps_test.json"},  # images only (eval_nocaps.py)
    "custom": {},
}
SPLITS = ("train", "val", "test")


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
    or blank (the train set then resolves it like a caption-list entry's: see the module docstring;
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


def img2dataset_entries(folder: PathLike) -> tuple[list, Where, dict]:
    """``(entries, where, skipped by reason)`` of an img2dataset ``files`` folder: entries
    ``{"image": absolute path, "caption"}``."""
    from .corpora import read_img2dataset
    corpus = read_img2dataset(folder)
    if corpus.skipped:
        logger.warning("%s: skipped %s (img2dataset samples: %d usable)", folder,
                       ", ".join(f"{n} {reason}" for reason, n in corpus.skipped.items()), len(corpus))
    if not corpus.image:
        raise DataError(f"{folder}: no usable img2dataset sample (skipped: {dict(corpus.skipped)})")
    entries = [{"image": os.path.abspath(i), "caption": c} for i, c in zip(corpus.image, corpus.caption)]
    return entries, corpus.where.__getitem__, dict(corpus.skipped)


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


class RetrievalTrainDataset(Dataset):
    """Caption-level training set over one or more BLIP train json (or CSV) files.

    Entries: ``{"image": rel_path, "caption": str, "image_id": str | int}`` (one item) or
    ``{"image": rel_path, "caption": [str, ...], "image_id"?: str | int}`` (one item per caption);
    a file may mix them. Each distinct image key (the explicit ``image_id``, else the one resolved
    from the image path: see the module docstring) gets a contiguous int in first-seen order across
    the files (the raw value is the key: ``"7"`` and ``7`` are two images, as in BLIP).

    Attributes:
        annotation: per item, the json entry it comes from, as read (captions not cleaned; a list
            entry appears once per caption, the same object each time).
        captions: the cleaned caption of each item (``pre_caption`` applied at construction).
        img_ids: image key (explicit ``image_id``, or the resolved default) -> idx.
        num_images: number of distinct image keys among the items.
        num_skipped: distinct unreadable images met so far *in this process* (each DataLoader
            worker counts its own) when ``skip_bad_images`` is on.

    ``__getitem__(i)`` -> ``(transform(image), caption, idx)``; image is ``[3, H, W]`` for the
    usual transforms (the PIL image itself when ``transform`` is None).
    With ``skip_bad_images`` an image that fails to load (one the pre-flight check could not see:
    pixel data truncated past the header) is logged once, remembered, and replaced by the next item
    (wrapping around) whose image loads; without it the error names the path and the entry.
    """

    def __init__(self, ann_files: Sequence[PathLike] | PathLike, image_root: PathLike | None,
                 transform: Transform | None, max_words: int = 30,
                 skip_bad_images: bool = False, columns: Columns = DEFAULT_COLUMNS) -> None:
        if isinstance(ann_files, (str, os.PathLike)):
            ann_files = [ann_files]
        self.ann_files = [str(f) for f in ann_files]
        if not self.ann_files:
            raise DataError("RetrievalTrainDataset needs at least one annotation file")
        self.image_root = image_root
        self.transform = transform
        self.max_words = max_words
        self.skip_bad_images = skip_bad_images
        self.columns = columns  # of CSV/TSV files
        # Records a source itself marks as failed (img2dataset folders), skipped while reading:
        # {file: {reason: count}}, reported in log.txt as data_skipped_up_front.
        self.skipped_up_front: dict[str, dict[str, int]] = {}

        self.annotation: list[dict] = []
        self.captions: list[str] = []
        self.img_ids: dict[str | int, int] = {}
        self._idx: list[int] = []
        # Item index where each file's items start, and each item's entry index in its file: maps an
        # item back to (file, entry) for error messages (a compact int array: 566k items on COCO).
        self._file_starts: list[int] = []
        self._entry_of = array("l")
        self._where_in_file: list[Where] = []
        # Until _assign_idx: per item (explicit?, image_id or image path), and the explicit ids seen
        # per image path and the image paths seen per explicit id (each -> its first item).
        self._keys: list[tuple[bool, str | int]] = []
        self._ids_of_image: dict[str, dict[str | int, int]] = {}
        self._images_of_id: dict[str | int, dict[str, int]] = {}
        for ann_file in self.ann_files:
            self._file_starts.append(len(self.annotation))
            entries, where = self._entries(ann_file)
            self._where_in_file.append(where)
            for index, entry in enumerate(entries):
                before = len(self.annotation)
                self._add(entry, ann_file, where(index))
                self._entry_of.extend([index] * (len(self.annotation) - before))
        self._assign_idx()

        self.num_skipped = 0
        self._bad_images: set[str] = set()

    def _entries(self, ann_file: str) -> tuple[list, Where]:
        """The entries of one annotation file and how to name entry k (a subclass may read more
        formats: ``data/pretrain.py``). A folder is an img2dataset ``files`` download
        (``data/corpora.py``): its failed downloads and caption-less samples are skipped, with a
        warning that counts them."""
        if os.path.isdir(ann_file):
            entries, where, skipped = img2dataset_entries(ann_file)
            if skipped:
                self.skipped_up_front[ann_file] = skipped
            return entries, where
        return _read_entries(ann_file, columns=self.columns)

    def _add(self, entry: Any, ann_file: str, where: str) -> None:
        _require_dict(entry, where)
        image = _require_image(entry, where)
        captions = _captions(entry, where)
        # A single-caption json entry needs its image_id (BLIP's layout); a caption list or a CSV row
        # may leave it out.
        required = isinstance(entry["caption"], str) and not _is_csv(ann_file) and not os.path.isdir(ann_file)
        image_id = _train_image_id(entry, where, required)
        item = len(self.annotation)
        if image_id is not None:
            self._ids_of_image.setdefault(image, {}).setdefault(image_id, item)
            self._images_of_id.setdefault(image_id, {}).setdefault(image, item)
        key = (True, image_id) if image_id is not None else (False, image)
        for caption in captions:
            self.annotation.append(entry)
            self.captions.append(pre_caption(caption, self.max_words))
            self._keys.append(key)

    def _assign_idx(self) -> None:
        """``_idx`` from the collected keys, once every file is read (an explicit image_id may come
        after an entry that needs it)."""
        defaults: dict[str, str | int] = {}
        for item, (explicit, key) in enumerate(self._keys):
            if not explicit:
                if key not in defaults:
                    defaults[key] = self._default_image_id(key, item)
                key = defaults[key]
            self._idx.append(self.img_ids.setdefault(key, len(self.img_ids)))
        del self._keys, self._ids_of_image, self._images_of_id

    def _default_image_id(self, image: str, item: int) -> str | int:
        """The image key of an item without explicit image_id (first such item of ``image``)."""
        ids = self._ids_of_image.get(image, {})
        if len(ids) == 1:
            return next(iter(ids))
        if ids:
            seen = "; ".join(f"{i!r} ({self.source(first)})" for i, first in list(ids.items())[:3])
            raise DataError(f"{self.source(item)}: missing field 'image_id': needed because image "
                             f"{image!r} has {len(ids)} different explicit image_ids elsewhere "
                             f"({seen}), so its group is ambiguous")
        owners = self._images_of_id.get(image, {})
        if owners:  # not `image` itself: that would have put an id in `ids`
            other, first = next(iter(owners.items()))
            raise DataError(f"{self.source(item)}: missing field 'image_id': its default, the image "
                             f"path {image!r}, is the explicit image_id of another image, {other!r} "
                             f"({self.source(first)}); the two would share one contrastive index")
        return image

    @property
    def num_images(self) -> int:
        return len(set(self._idx))

    def __len__(self) -> int:
        return len(self.annotation)

    def source(self, index: int) -> str:
        """``"entry <k> of <file>"`` (json) or ``"row <k> (line <L>) of <file>"`` (CSV) for dataset
        item ``index``."""
        file_pos = bisect.bisect_right(self._file_starts, index) - 1
        return self._where_in_file[file_pos](self._entry_of[index])

    def image_path(self, index: int) -> str:
        return _join(self.image_root, self.annotation[index]["image"])

    def image_checks(self) -> tuple[list[str], Where]:
        """The distinct image paths, in first-seen order, and how to name the k-th in a message
        (the entry of its first item, and the field); for ``data/preflight.py``."""
        first: dict[str, int] = {}
        for i in range(len(self)):
            first.setdefault(self.image_path(i), i)
        items = list(first.values())
        return list(first), lambda k: f"{self.source(items[k])}, field {self._image_field(items[k])!r}"

    def _image_field(self, index: int) -> str:
        """The image field of item ``index``'s file: ``image``, or a CSV's image column(s)."""
        ann_file = self.ann_files[bisect.bisect_right(self._file_starts, index) - 1]
        return self.columns.image_field if _is_csv(ann_file) else "image"

    def drop_images(self, bad: Collection[str]) -> int:
        """Drop every item whose image path is in ``bad`` (``skip_bad_images`` at pre-flight);
        returns how many items were dropped. The other items keep their ``idx``."""
        keep = [i for i in range(len(self)) if self.image_path(i) not in bad]
        dropped = len(self) - len(keep)
        if dropped:
            # A file's items stay contiguous and in order: each file now starts at the number of
            # kept items before its old start.
            self._file_starts = [bisect.bisect_left(keep, start) for start in self._file_starts]
            self.annotation = [self.annotation[i] for i in keep]
            self.captions = [self.captions[i] for i in keep]
            self._idx = [self._idx[i] for i in keep]
            self._entry_of = array("l", (self._entry_of[i] for i in keep))
        return dropped

    def _load(self, index: int) -> tuple[Any, str, int]:
        path = self.image_path(index)
        if path in self._bad_images:
            raise BadImageError(f"known bad image: {path} ({self.source(index)})")
        image = load_image(path, context=self.source(index))
        if self.transform is not None:
            image = self.transform(image)
        return image, self.captions[index], self._idx[index]

    def __getitem__(self, index: int) -> tuple[Any, str, int]:
        if not self.skip_bad_images:
            return self._load(index)
        n = len(self)
        for step in range(n):
            j = (index + step) % n
            try:
                return self._load(j)
            except (FileNotFoundError, BadImageError) as exc:
                path = self.image_path(j)
                if path not in self._bad_images:
                    self._bad_images.add(path)
                    self.num_skipped += 1
                    logger.warning("skipping bad image (%d so far in this process): %s",
                                   self.num_skipped, exc)
        raise RuntimeError(f"no image of the {n} entries in {self.ann_files} could be loaded "
                           f"(image_root={self.image_root})")


class RetrievalEvalDataset(Dataset):
    """Image-level val/test set over one BLIP json (or CSV) file.

    Entries: ``{"image": rel_path, "caption": [str, ...] | str}``.

    Attributes:
        annotation: the kept json entries, as read.
        image: relative image path of each kept entry.
        text: cleaned captions, flattened in file order.
        img2txt: dict image i -> list of its caption indices into ``text``.
        txt2img: dict caption t -> its image index (dicts, as BLIP's evaluation expects).

    ``drop_images`` removes entries together with their captions (``skip_bad_images`` at
    pre-flight), so every index stays consistent.

    ``__getitem__(i)`` -> ``(transform(image), i)``; image ``[3, H, W]`` for the usual transforms.
    An image that passed the pre-flight header check but fails to decode raises at load time,
    naming its path and entry; with ``skip_bad_images`` it is logged and the item is
    ``(transform(blank image), -1)`` instead: the evaluation leaves that image and its captions out
    (``tasks/retrieval_eval.py``) and counts them.
    """

    def __init__(self, ann_file: PathLike, image_root: PathLike | None,
                 transform: Transform | None, max_words: int = 30,
                 skip_bad_images: bool = False, columns: Columns = DEFAULT_COLUMNS,
                 need_captions: bool = True) -> None:
        self.ann_file = str(ann_file)
        self.image_root = image_root
        self.transform = transform
        self.max_words = max_words
        self.skip_bad_images = skip_bad_images
        self.columns = columns  # of a CSV/TSV file

        entries, self._where = _read_entries(self.ann_file, one_per_image=True, columns=columns)
        self.annotation: list[dict] = []
        self.image: list[str] = []
        self._captions: list[list[str]] = []   # cleaned, per image
        self._entry_index: list[int] = []      # kept item -> its index in the file, for messages
        for index, entry in enumerate(entries):
            where = self._where(index)
            _require_dict(entry, where)
            self.annotation.append(entry)
            self.image.append(_require_image(entry, where))
            # need_captions False (NoCaps: its references stay on the evaluation server): images only.
            raw = _captions(entry, where) if need_captions or "caption" in entry else []
            self._captions.append([pre_caption(c, max_words) for c in raw])
            self._entry_index.append(index)
        self._flatten()

    def _flatten(self) -> None:
        self.text: list[str] = []
        self.img2txt: dict[int, list[int]] = {}
        self.txt2img: dict[int, int] = {}
        for img_i, captions in enumerate(self._captions):
            self.img2txt[img_i] = list(range(len(self.text), len(self.text) + len(captions)))
            self.txt2img.update({t: img_i for t in self.img2txt[img_i]})
            self.text.extend(captions)

    def source(self, index: int) -> str:
        """``"entry <k> of <file>"`` (json) or ``"row <k> (line <L>) of <file>"`` (CSV) of image ``index``."""
        return self._where(self._entry_index[index])

    def image_checks(self) -> tuple[list[str], Where]:
        """The image paths and how to name the k-th in a message (its entry and the field); for
        ``data/preflight.py``."""
        field = self.columns.image_field if _is_csv(self.ann_file) else "image"
        return [_join(self.image_root, image) for image in self.image], lambda k: f"{self.source(k)}, field {field!r}"

    def drop_images(self, bad: Collection[str]) -> int:
        """Drop the entries whose image path is in ``bad``, with their captions; returns how many."""
        keep = [i for i, image in enumerate(self.image) if _join(self.image_root, image) not in bad]
        dropped = len(self.image) - len(keep)
        if dropped:
            for name in ("annotation", "image", "_captions", "_entry_index"):
                values = getattr(self, name)
                setattr(self, name, [values[i] for i in keep])
            self._flatten()
        return dropped

    def __len__(self) -> int:
        return len(self.image)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path = _join(self.image_root, self.image[index])
        try:
            image = load_image(path, context=self.source(index))
        except (FileNotFoundError, BadImageError) as exc:
            if not self.skip_bad_images:
                raise
            logger.warning("left out of the evaluation with its %d captions (skip_bad_images): %s",
                           len(self.img2txt[index]), exc)
            # Any size: the transform resizes. Index -1 tells the evaluation to leave it out.
            image, index = Image.new("RGB", (16, 16)), -1
        if self.transform is not None:
            image = self.transform(image)
        return image, index


def _resolve(ann_root: PathLike | None, name: PathLike) -> Path:
    path = Path(name)
    return path if path.is_absolute() or ann_root is None else Path(ann_root) / path


def build_retrieval_datasets(cfg_like: Any, splits: Sequence[str] = SPLITS,
                             train_transform: Transform | None = None,
                             test_transform: Transform | None = None, shuffle: bool = True) -> dict[str, Dataset]:
    """Build ``{split: dataset}`` from a retrieval config (``tasks.retrieval.RetrievalConfig``).

    Reads ``dataset`` ('coco' | 'flickr' | 'nocaps' | 'custom'), ``ann_root``, ``image_root``, ``train_file``
    (str or list of str), ``val_file``, ``test_file``, ``max_words``, ``skip_bad_images`` and
    ``image_size`` (only when a transform is not given). An explicit ``*_file``
    overrides the coco/flickr default; 'custom' requires one for each requested split. Relative
    file names are under ``ann_root``. A ``train_file`` list that names tar or parquet shards gives a
    streamed train split (``data.stream.PairStream``, with the ``StreamSettings`` keys; ``shuffle``
    False: in order, for ``--dry_run``); a ``pipe:`` command or URL is used as written.
    """
    name = cfg_like.dataset
    if name not in DEFAULT_FILES:
        raise DataError(f"unknown retrieval dataset {name!r}; valid: {sorted(DEFAULT_FILES)}")
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise DataError(f"unknown split(s) {unknown}; valid: {list(SPLITS)}")

    ann_root, image_root = cfg_like.ann_root, cfg_like.image_root
    max_words, skip = cfg_like.max_words, cfg_like.skip_bad_images
    columns = Columns.of(cfg_like)  # of CSV/TSV files (image_col, caption_col, image_dir_col, image_id_col)

    def files_for(split: str) -> list[Path]:
        given = {"train": cfg_like.train_file, "val": cfg_like.val_file, "test": cfg_like.test_file}[split]
        given = given if given is not None else DEFAULT_FILES[name].get(split)
        if given is None or (isinstance(given, (list, tuple)) and not given):
            raise DataError(f"dataset '{name}' needs '{split}_file' for split '{split}' "
                             f"(file name relative to ann_root, or an absolute path)")
        names = list(given) if isinstance(given, (list, tuple)) else [given]
        if split != "train" and len(names) != 1:
            raise DataError(f"'{split}_file' must be a single file, got {names}")
        from .stream import is_remote
        return [n if is_remote(str(n)) else _resolve(ann_root, n) for n in names]

    def transform_for(given: Transform | None, builder: Callable[[int], Transform]) -> Transform:
        if given is not None:
            return given
        return builder(cfg_like.image_size)

    datasets: dict[str, Dataset] = {}
    for split in splits:
        files = files_for(split)
        if split == "train":
            from .stream import build_stream, split_train_files
            transform = transform_for(train_transform, build_train_transform)

            def lists(names, transform=transform):
                return RetrievalTrainDataset(names, image_root, transform, max_words=max_words, skip_bad_images=skip,
                                             columns=columns)

            names = [str(f) for f in files]
            if split_train_files(names)[1]:
                datasets[split] = build_stream(
                    names, transform, max_words, list_builder=lists, seed=cfg_like.seed, shuffle=shuffle,
                    shuffle_buffer=cfg_like.shuffle_buffer, num_samples=cfg_like.train_num_samples,
                    max_bad_fraction=cfg_like.max_bad_fraction)
            else:
                datasets[split] = lists(files)
        else:
            datasets[split] = RetrievalEvalDataset(
                files[0], image_root, transform_for(test_transform, build_test_transform),
                max_words=max_words, skip_bad_images=skip, columns=columns, need_captions=name != "nocaps")
    return datasets
