"""Pretraining image-text pairs (docs/FORMATS.md 2): COCO + Visual Genome, CC3M, SBU, ... as json lists.

Each file is a json list of ``{"image": path, "caption": str | [str, ...]}``; other keys (such as a
BLIP train file's ``image_id``) are ignored, so BLIP retrieval train files are valid lists too. A
caption list means: pick one at random each time the pair is drawn. Paths are absolute or relative
to ``image_root`` (or, with no root, to the working directory). Several files are concatenated.

``PretrainDataset[i]`` -> ``(image [3, H, W], caption, idx)`` with ``idx`` a contiguous id per
distinct image file, so two captions of one picture are never drawn as each other's ITM negative.
Loading, error messages and ``skip_bad_images`` are those of the retrieval training set.

Two corpora are also read as they are downloaded (``data/corpora.py``, docs/FORMATS.md 2b): DLIP's
``all.json`` (entries with ``image_root``, the image's full path, and no ``image``) and the Kaggle
Flickr30k ``results.csv`` (header ``image_name| comment_number| comment``; images relative to
``image_root``; its malformed rows are skipped with a warning naming them). Any other ``.csv`` /
``.tsv`` is one pair per row, its columns chosen by ``columns`` (the config keys ``image_col``,
``caption_col``, ``image_dir_col``: ``data/columns.py``).

BLIP's ``laion_path`` (``RotatingPairs``): a folder of such json lists (BLIP's LAION-115M split into
files); epoch ``e`` trains on the ``train_file`` pairs plus the pairs of the folder's file
``e mod n``, files sorted by name (BLIP globs ``*.json`` in the file system's order, which differs
between machines). Only the current file is held in memory; every file is read and its images
checked at pre-flight.
"""
from __future__ import annotations

import glob
import logging
import os
import random
from collections.abc import Callable, Sequence
from typing import Any

from torch.utils.data import Dataset

from .columns import DEFAULT as DEFAULT_COLUMNS, Columns
from .corpora import is_kaggle_csv, pretrain_entries
from .entries import PathLike, Where, _captions, _join, _read_entries, _require_dict, _require_image
from .retrieval_train import RetrievalTrainDataset, Transform
from .shards import split_train_files
from .stream import build_stream
from .utils import BadImageError, load_image, pre_caption
from utils.errors import DataError

logger = logging.getLogger(__name__)


class PretrainDataset(RetrievalTrainDataset):
    """Pairs from one or more pretraining json lists.

    Attributes (besides the retrieval set's): ``captions[i]`` is the tuple of cleaned captions of
    entry ``i``; ``img_ids`` maps each resolved image path to its idx.
    """

    def __init__(self, files: Sequence[PathLike] | PathLike, image_root: PathLike | None,
                 transform: Transform | None, max_words: int = 30, skip_bad_images: bool = False,
                 columns: Columns = DEFAULT_COLUMNS) -> None:
        super().__init__(files, image_root or None, transform, max_words=max_words,
                         skip_bad_images=skip_bad_images, columns=columns)

    def _entries(self, ann_file: str) -> tuple[list, Where]:
        # DLIP's all.json and the Kaggle Flickr30k results.csv, read by data/corpora.py into pairs.
        if os.path.isdir(ann_file):
            return super()._entries(ann_file)
        if is_kaggle_csv(ann_file):
            entries, names = pretrain_entries(ann_file)
            return entries, names.__getitem__
        entries, where = _read_entries(ann_file, columns=self.columns)
        converted = pretrain_entries(ann_file, entries)
        return (converted[0], converted[1].__getitem__) if converted else (entries, where)

    def _add(self, entry: Any, ann_file: str, where: str) -> None:
        _require_dict(entry, where)
        image = _require_image(entry, where)
        captions = _captions(entry, where)
        self.annotation.append(entry)
        self.captions.append(tuple(pre_caption(c, self.max_words) for c in captions))
        path = os.path.normpath(_join(self.image_root, image))
        self._idx.append(self.img_ids.setdefault(path, len(self.img_ids)))

    def image_idx(self, index: int) -> int:
        return self._idx[index]

    def _load(self, index: int) -> tuple[Any, str, int]:
        path = self.image_path(index)
        if path in self._bad_images:
            raise BadImageError(f"known bad image: {path} ({self.source(index)})")
        image = load_image(path, context=self.source(index))
        if self.transform is not None:
            image = self.transform(image)
        captions = self.captions[index]
        # Python's `random` is seeded per (seed, epoch, index) by the engine: exact resume holds.
        caption = captions[0] if len(captions) == 1 else random.choice(captions)
        return image, caption, self._idx[index]


def build_pretrain_dataset(cfg_like: Any, transform: Transform | None, shuffle: bool = True):
    """From a config with ``train_file`` (str or list), ``image_root``, ``max_words``,
    ``skip_bad_images`` (and the CSV column keys of ``ColumnSettings``, if any): a
    :class:`PretrainDataset` (with BLIP's ``laion_path``, if set: a :class:`RotatingPairs`), or,
    when ``train_file`` names tar or parquet shards, a streamed
    ``data.stream.PairStream`` (with the ``StreamSettings`` keys and ``seed``; ``shuffle`` False:
    shards and records in order, for ``--dry_run``)."""
    files = cfg_like.train_file
    files = [files] if isinstance(files, str) else list(files)

    def lists(names):
        return PretrainDataset(names, cfg_like.image_root or None, transform, max_words=cfg_like.max_words,
                               skip_bad_images=cfg_like.skip_bad_images, columns=Columns.of(cfg_like))

    laion_path = getattr(cfg_like, "laion_path", "")
    if not split_train_files(files)[1]:
        base = lists(files)
        return RotatingPairs(base, laion_files(laion_path), lambda f: lists([f])) if laion_path else base
    if laion_path:
        raise DataError("laion_path (BLIP's per-epoch json lists) goes with json train files; with tar/parquet shards "
                        "list the LAION shards in train_file instead")
    return build_stream(files, transform, cfg_like.max_words, list_builder=lists, seed=cfg_like.seed,
                        shuffle=shuffle, shuffle_buffer=cfg_like.shuffle_buffer,
                        num_samples=cfg_like.train_num_samples, max_bad_fraction=cfg_like.max_bad_fraction)


def laion_files(laion_path: str) -> list[str]:
    """The json lists of BLIP's ``laion_path`` folder, sorted by name; an error names the folder
    when it is missing or holds none."""
    if not os.path.isdir(laion_path):
        raise DataError(f"laion_path: {laion_path!r} is not a folder (BLIP's laion_path: a folder of json lists of "
                        "pairs, one added to train_file's pairs per epoch in turn)")
    files = sorted(glob.glob(os.path.join(glob.escape(laion_path), "*.json")))
    if not files:
        raise DataError(f"laion_path: no *.json file in {laion_path}")
    return files


class RotatingPairs(Dataset):
    """``base`` (the ``train_file`` pairs) + the pairs of one of ``files`` per epoch, in turn: epoch
    ``e`` holds file ``e mod len(files)`` (BLIP's ``reload_laion``). ``build(file)`` reads one file as
    a :class:`PretrainDataset`. The engine calls :meth:`select_epoch` before each epoch (also on
    resume), so epoch ``e`` of a resumed run sees the same pairs. An item's ``idx`` is the base's, or
    the file's offset past every base id (two files never share an epoch)."""

    def __init__(self, base: PretrainDataset, files: Sequence[str], build: Callable[[str], PretrainDataset]):
        self.base, self.files, self._build = base, list(files), build
        self._dropped: set[str] = set()  # images dropped at pre-flight (skip_bad_images)
        self._current: int | None = None
        self.extra: PretrainDataset | None = None
        self.select_epoch(0)

    def preflight(self, check: Callable[[dict], Any]) -> None:
        """``check({name: dataset})`` (``data.preflight.check_splits``) on the base and on every file
        in turn (one in memory at a time); images it drops stay dropped when a file is reloaded."""
        def checked(name: str, dataset: PretrainDataset) -> None:
            before = set(dataset.image_checks()[0])
            check({name: dataset})
            self._dropped |= before - set(dataset.image_checks()[0])
        checked("train", self.base)
        for k, path in enumerate(self.files):
            checked(f"laion_path file {path}", self.extra if k == self._current else self._build(path))

    def select_epoch(self, epoch: int) -> None:
        k = epoch % len(self.files)
        if k == self._current:
            return
        self.extra, self._current = self._build(self.files[k]), k
        if self._dropped:
            self.extra.drop_images(self._dropped)
        logger.info("epoch %d: %d train_file pairs + %d pairs of %s", epoch, len(self.base), len(self.extra),
                    self.files[k])

    def __len__(self) -> int:
        return len(self.base) + len(self.extra)

    def _item(self, index: int) -> tuple[PretrainDataset, int]:
        n = len(self.base)
        return (self.base, index) if index < n else (self.extra, index - n)

    def __getitem__(self, index: int):
        dataset, i = self._item(index)
        image, caption, idx = dataset[i]
        return image, caption, idx if dataset is self.base else idx + len(self.base.img_ids)

    @property
    def captions(self) -> list:
        return self.base.captions + self.extra.captions

    @property
    def num_images(self) -> int:
        return self.base.num_images + self.extra.num_images

    def source(self, index: int) -> str:
        dataset, i = self._item(index)
        return dataset.source(i)

    def image_path(self, index: int) -> str:
        dataset, i = self._item(index)
        return dataset.image_path(i)
