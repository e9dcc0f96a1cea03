"""The caption-level retrieval train set over BLIP json / CSV files and img2dataset folders
(docs/FORMATS.md 1): ``RetrievalTrainDataset``, one item per caption -> ``(image [3, H, W], caption,
idx)``, where ``idx`` is the contrastive image index (captions of one image share it);
``data/pretrain.py``'s ``PretrainDataset`` builds on it, ``data/retrieval.py`` builds it for a split.
Its entries are read and checked by ``data/entries.py``; an img2dataset ``files`` folder is read by
``data/corpora.py`` (``img2dataset_entries``).

Accepted train entries (a json list; one file may mix both layouts):

- ``{"image": path, "caption": str, "image_id": str | int}``: one caption (BLIP / COCO Karpathy);
  ``image_id`` is required here.
- ``{"image": path, "caption": [str, ...]}`` (Flickr30k / EasyNLP layout), ``image_id`` optional:
  one training pair per caption, all with the entry's image.

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
"""
from __future__ import annotations

import bisect
import logging
import os
from array import array
from collections.abc import Callable, Collection, Sequence
from typing import Any

from torch.utils.data import Dataset

from .columns import DEFAULT as DEFAULT_COLUMNS, Columns
from .entries import (PathLike, Where, _captions, _is_csv, _join, _read_entries, _require_dict, _require_image,
                      _train_image_id)
from .utils import BadImageError, load_image, pre_caption
from utils.errors import DataError

logger = logging.getLogger(__name__)

Transform = Callable[[Any], Any]


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

