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
a non-string list item is an error naming the file, the entry and the field. Val/test entries are
``{"image": path, "caption": [str, ...] | str}``, one per image.

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
per caption) is read as the equivalent BLIP-json entries, for ``dataset: custom``; "entry k" of a
CSV is its k-th data row (0-based, header not counted).
"""
from __future__ import annotations

import bisect
import csv
import logging
import os
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from .transforms import build_test_transform, build_train_transform
from .utils import BadImageError, check_image, load_image, pre_caption, read_json

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
Transform = Callable[[Any], Any]

DEFAULT_FILES = {
    "coco": {"train": "coco_karpathy_train.json", "val": "coco_karpathy_val.json",
             "test": "coco_karpathy_test.json"},
    "flickr": {"train": "flickr30k_train.json", "val": "flickr30k_val.json",
               "test": "flickr30k_test.json"},
    "custom": {},
}
SPLITS = ("train", "val", "test")


def _where(ann_file: PathLike, index: int) -> str:
    return f"entry {index} of {ann_file}"


def _read_entries(ann_file: PathLike, one_per_image: bool = False) -> list:
    if _is_csv(ann_file):
        return _csv_entries(ann_file, one_per_image)
    data = read_json(ann_file)
    if not isinstance(data, list):
        raise ValueError(f"{ann_file}: expected a json list of entries, got {type(data).__name__}")
    return data


def _csv_entries(ann_file: PathLike, one_per_image: bool) -> list:
    """BLIP-json entries from a CSV (TSV: ``.tsv``) with a header row and the columns ``image``,
    ``caption`` and optionally ``image_id``. One entry per row for training, without ``image_id``
    where the column is absent or blank (the train set then resolves it like a caption-list
    entry's: see the module docstring; alone, that is the image path); with ``one_per_image``
    (evaluation) one per distinct image, its captions in row order."""
    if not os.path.isfile(ann_file):
        raise FileNotFoundError(f"annotation file not found: {ann_file}")
    with open(ann_file, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter="\t" if str(ann_file).lower().endswith(".tsv") else ",")
        missing = [c for c in ("image", "caption") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{ann_file}: no column {missing} (columns: {reader.fieldnames}); a retrieval "
                             "CSV needs 'image' and 'caption', and may have 'image_id'")
        rows = [{"image": r["image"], "caption": r["caption"],
                 **({"image_id": r["image_id"]} if r.get("image_id") else {})} for r in reader]
    if not one_per_image:
        return rows
    images: dict[str, dict] = {}
    for r in rows:
        images.setdefault(r["image"], {"image": r["image"], "caption": []})["caption"].append(r["caption"])
    return list(images.values())


def _require_dict(entry: Any, ann_file: PathLike, index: int) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"{_where(ann_file, index)}: expected an object, "
                         f"got {type(entry).__name__}")


def _require_field(entry: dict, field: str, ann_file: PathLike, index: int) -> Any:
    if field not in entry:
        raise ValueError(f"{_where(ann_file, index)}: missing field '{field}' "
                         f"(has {sorted(entry)})")
    return entry[field]


def _require_image(entry: dict, ann_file: PathLike, index: int) -> str:
    image = _require_field(entry, "image", ann_file, index)
    if not isinstance(image, str) or not image:
        raise ValueError(f"{_where(ann_file, index)}: invalid field 'image': expected a non-empty "
                         f"path string, got {image!r}")
    return image


def _require_captions(entry: dict, ann_file: PathLike, index: int) -> list[str]:
    """The entry's ``caption``, a string or a non-empty list of strings, as a list."""
    captions = _require_field(entry, "caption", ann_file, index)
    if isinstance(captions, str):
        return [captions]
    if (not isinstance(captions, list) or not captions
            or not all(isinstance(c, str) for c in captions)):
        # An image without captions has no image->text rank: reject rather than skew recall.
        raise ValueError(f"{_where(ann_file, index)}: invalid field 'caption': expected a "
                         f"string or a non-empty list of strings, got {captions!r}")
    return captions


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _train_captions(entry: dict, ann_file: PathLike, index: int) -> list[str]:
    """The raw captions of a train entry: ``[caption]`` for a string, the list itself for a list.

    Rejects what would train on nothing: an empty or whitespace-only caption, an empty list, a
    non-string list item (the message names the item's position in the list)."""
    caption = _require_field(entry, "caption", ann_file, index)
    bad = f"{_where(ann_file, index)}: invalid field 'caption'"
    if isinstance(caption, str):
        if not caption.strip():
            raise ValueError(f"{bad}: the caption is empty or whitespace only ({caption!r})")
        return [caption]
    if not isinstance(caption, list):
        raise ValueError(f"{bad}: expected a string or a non-empty list of strings, got "
                         f"{type(caption).__name__} {_short(caption)}")
    if not caption:
        raise ValueError(f"{bad}: the caption list is empty (a list needs at least one caption)")
    for k, item in enumerate(caption):
        if not isinstance(item, str):
            raise ValueError(f"{bad}: item {k} of the caption list is {type(item).__name__} "
                             f"{_short(item)}, expected a string")
        if not item.strip():
            raise ValueError(f"{bad}: item {k} of the caption list is empty or whitespace only "
                             f"({item!r})")
    return caption


def _train_image_id(entry: dict, ann_file: PathLike, index: int, required: bool) -> str | int | None:
    """The entry's explicit ``image_id``, or None when it has none and none is ``required``."""
    if "image_id" not in entry and not required:
        return None
    image_id = _require_field(entry, "image_id", ann_file, index)
    # bool is an int subclass in Python; a json true/false id is certainly a mistake.
    if isinstance(image_id, bool) or not isinstance(image_id, (str, int)):
        raise ValueError(f"{_where(ann_file, index)}: invalid field 'image_id': expected a "
                         f"string or an integer, got {_short(image_id)}")
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
        num_images: number of distinct image keys.
        num_skipped: distinct unreadable images met so far *in this process* (each DataLoader
            worker counts its own) when ``skip_bad_images`` is on.

    ``__getitem__(i)`` -> ``(transform(image), caption, idx)``; image is ``[3, H, W]`` for the
    usual transforms (the PIL image itself when ``transform`` is None).
    With ``skip_bad_images`` an unreadable image is logged once, remembered, and replaced by the
    next item (wrapping around) whose image loads; without it the error names the path and the
    entry.
    """

    def __init__(self, ann_files: Sequence[PathLike] | PathLike, image_root: PathLike | None,
                 transform: Transform | None, max_words: int = 30,
                 skip_bad_images: bool = False) -> None:
        if isinstance(ann_files, (str, os.PathLike)):
            ann_files = [ann_files]
        self.ann_files = [str(f) for f in ann_files]
        if not self.ann_files:
            raise ValueError("RetrievalTrainDataset needs at least one annotation file")
        self.image_root = image_root
        self.transform = transform
        self.max_words = max_words
        self.skip_bad_images = skip_bad_images

        self.annotation: list[dict] = []
        self.captions: list[str] = []
        self.img_ids: dict[str | int, int] = {}
        self._idx: list[int] = []
        # Item index where each file's items start, and each item's entry index in its file: maps an
        # item back to (file, entry) for error messages (a compact int array: 566k items on COCO).
        self._file_starts: list[int] = []
        self._entry_of = array("l")
        # Until _assign_idx: per item (explicit?, image_id or image path), and the explicit ids seen
        # per image path and the image paths seen per explicit id (each -> its first item).
        self._keys: list[tuple[bool, str | int]] = []
        self._ids_of_image: dict[str, dict[str | int, int]] = {}
        self._images_of_id: dict[str | int, dict[str, int]] = {}
        for ann_file in self.ann_files:
            self._file_starts.append(len(self.annotation))
            for index, entry in enumerate(_read_entries(ann_file)):
                before = len(self.annotation)
                self._add(entry, ann_file, index)
                self._entry_of.extend([index] * (len(self.annotation) - before))
        self._assign_idx()

        self.num_skipped = 0
        self._bad_images: set[str] = set()

    def _add(self, entry: Any, ann_file: str, index: int) -> None:
        _require_dict(entry, ann_file, index)
        image = _require_image(entry, ann_file, index)
        captions = _train_captions(entry, ann_file, index)
        # A single-caption json entry needs its image_id (BLIP's layout); a caption list or a CSV row
        # may leave it out.
        required = isinstance(entry["caption"], str) and not _is_csv(ann_file)
        image_id = _train_image_id(entry, ann_file, index, required)
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
            raise ValueError(f"{self.source(item)}: missing field 'image_id': needed because image "
                             f"{image!r} has {len(ids)} different explicit image_ids elsewhere "
                             f"({seen}), so its group is ambiguous")
        owners = self._images_of_id.get(image, {})
        if owners:  # not `image` itself: that would have put an id in `ids`
            other, first = next(iter(owners.items()))
            raise ValueError(f"{self.source(item)}: missing field 'image_id': its default, the image "
                             f"path {image!r}, is the explicit image_id of another image, {other!r} "
                             f"({self.source(first)}); the two would share one contrastive index")
        return image

    @property
    def num_images(self) -> int:
        return len(self.img_ids)

    def __len__(self) -> int:
        return len(self.annotation)

    def source(self, index: int) -> str:
        """``"entry <k> of <file>"`` for dataset item ``index``."""
        file_pos = bisect.bisect_right(self._file_starts, index) - 1
        return _where(self.ann_files[file_pos], self._entry_of[index])

    def _load(self, index: int) -> tuple[Any, str, int]:
        path = _join(self.image_root, self.annotation[index]["image"])
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
                path = _join(self.image_root, self.annotation[j]["image"])
                if path not in self._bad_images:
                    self._bad_images.add(path)
                    self.num_skipped += 1
                    logger.warning("skipping bad image (%d so far in this process): %s",
                                   self.num_skipped, exc)
        raise RuntimeError(f"no image of the {n} entries in {self.ann_files} could be loaded "
                           f"(image_root={self.image_root})")


class RetrievalEvalDataset(Dataset):
    """Image-level val/test set over one BLIP json file.

    Entries: ``{"image": rel_path, "caption": [str, ...] | str}``.

    Attributes:
        annotation: the kept json entries, as read.
        image: relative image path of each kept entry.
        text: cleaned captions, flattened in file order.
        img2txt: dict image i -> list of its caption indices into ``text``.
        txt2img: dict caption t -> its image index (dicts, as BLIP's evaluation expects).
        num_skipped: entries dropped because their image is missing or its header unreadable
            (only with ``skip_bad_images``; checked once at construction, captions dropped with them
            so every index stays consistent).

    ``__getitem__(i)`` -> ``(transform(image), i)``; image ``[3, H, W]`` for the usual transforms.
    An image that passed the header check but fails to decode still raises at load time, naming its
    path and entry: an eval set cannot drop an image after its captions were counted.
    """

    def __init__(self, ann_file: PathLike, image_root: PathLike | None,
                 transform: Transform | None, max_words: int = 30,
                 skip_bad_images: bool = False) -> None:
        self.ann_file = str(ann_file)
        self.image_root = image_root
        self.transform = transform
        self.max_words = max_words
        self.skip_bad_images = skip_bad_images

        self.annotation: list[dict] = []
        self.image: list[str] = []
        self.text: list[str] = []
        self.img2txt: dict[int, list[int]] = {}
        self.txt2img: dict[int, int] = {}
        self._entry_index: list[int] = []  # kept item -> its index in the file, for messages
        self.num_skipped = 0

        for index, entry in enumerate(_read_entries(self.ann_file, one_per_image=True)):
            image, captions = self._validate(entry, index)
            if skip_bad_images and not self._image_ok(image, index):
                continue
            img_i = len(self.image)
            self.annotation.append(entry)
            self.image.append(image)
            self._entry_index.append(index)
            self.img2txt[img_i] = []
            for caption in captions:
                self.txt2img[len(self.text)] = img_i
                self.img2txt[img_i].append(len(self.text))
                self.text.append(pre_caption(caption, max_words))

    def _validate(self, entry: Any, index: int) -> tuple[str, list[str]]:
        _require_dict(entry, self.ann_file, index)
        image = _require_image(entry, self.ann_file, index)
        return image, _require_captions(entry, self.ann_file, index)

    def _image_ok(self, image: str, index: int) -> bool:
        try:
            check_image(_join(self.image_root, image), context=_where(self.ann_file, index))
        except (FileNotFoundError, BadImageError) as exc:
            self.num_skipped += 1
            logger.warning("dropping eval image and its captions: %s", exc)
            return False
        return True

    def __len__(self) -> int:
        return len(self.image)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path = _join(self.image_root, self.image[index])
        image = load_image(path, context=_where(self.ann_file, self._entry_index[index]))
        if self.transform is not None:
            image = self.transform(image)
        return image, index


def _resolve(ann_root: PathLike | None, name: PathLike) -> Path:
    path = Path(name)
    return path if path.is_absolute() or ann_root is None else Path(ann_root) / path


def build_retrieval_datasets(cfg_like: Any, splits: Sequence[str] = SPLITS,
                             train_transform: Transform | None = None,
                             test_transform: Transform | None = None) -> dict[str, Dataset]:
    """Build ``{split: dataset}`` from a retrieval config (``tasks.retrieval.RetrievalConfig``).

    Reads ``dataset`` ('coco' | 'flickr' | 'custom'), ``ann_root``, ``image_root``, ``train_file``
    (str or list of str), ``val_file``, ``test_file``, ``max_words``, ``skip_bad_images`` and
    ``image_size`` (only when a transform is not given). An explicit ``*_file``
    overrides the coco/flickr default; 'custom' requires one for each requested split. Relative
    file names are under ``ann_root``.
    """
    name = cfg_like.dataset
    if name not in DEFAULT_FILES:
        raise ValueError(f"unknown retrieval dataset {name!r}; valid: {sorted(DEFAULT_FILES)}")
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; valid: {list(SPLITS)}")

    ann_root, image_root = cfg_like.ann_root, cfg_like.image_root
    max_words, skip = cfg_like.max_words, cfg_like.skip_bad_images

    def files_for(split: str) -> list[Path]:
        given = {"train": cfg_like.train_file, "val": cfg_like.val_file, "test": cfg_like.test_file}[split]
        given = given if given is not None else DEFAULT_FILES[name].get(split)
        if given is None or (isinstance(given, (list, tuple)) and not given):
            raise ValueError(f"dataset '{name}' needs '{split}_file' for split '{split}' "
                             f"(file name relative to ann_root, or an absolute path)")
        names = list(given) if isinstance(given, (list, tuple)) else [given]
        if split != "train" and len(names) != 1:
            raise ValueError(f"'{split}_file' must be a single file, got {names}")
        return [_resolve(ann_root, n) for n in names]

    def transform_for(given: Transform | None, builder: Callable[[int], Transform]) -> Transform:
        if given is not None:
            return given
        return builder(cfg_like.image_size)

    datasets: dict[str, Dataset] = {}
    for split in splits:
        files = files_for(split)
        if split == "train":
            datasets[split] = RetrievalTrainDataset(
                files, image_root, transform_for(train_transform, build_train_transform),
                max_words=max_words, skip_bad_images=skip)
        else:
            datasets[split] = RetrievalEvalDataset(
                files[0], image_root, transform_for(test_transform, build_test_transform),
                max_words=max_words, skip_bad_images=skip)
    return datasets
