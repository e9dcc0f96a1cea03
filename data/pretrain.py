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
"""
from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import Any

from .columns import DEFAULT as DEFAULT_COLUMNS, Columns
from .corpora import is_kaggle_csv, pretrain_entries
from .stream import build_stream, split_train_files
from .retrieval import (PathLike, RetrievalTrainDataset, Transform, Where, _captions, _join, _read_entries,
                        _require_dict, _require_image)
from .utils import BadImageError, load_image, pre_caption


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
    :class:`PretrainDataset`, or, when ``train_file`` names tar or parquet shards, a streamed
    ``data.stream.PairStream`` (with the ``StreamSettings`` keys and ``seed``; ``shuffle`` False:
    shards and records in order, for ``--dry_run``)."""
    files = cfg_like.train_file
    files = [files] if isinstance(files, str) else list(files)

    def lists(names):
        return PretrainDataset(names, cfg_like.image_root or None, transform, max_words=cfg_like.max_words,
                               skip_bad_images=cfg_like.skip_bad_images, columns=Columns.of(cfg_like))

    if not split_train_files(files)[1]:
        return lists(files)
    return build_stream(files, transform, cfg_like.max_words, list_builder=lists, seed=cfg_like.seed,
                        shuffle=shuffle, shuffle_buffer=cfg_like.shuffle_buffer,
                        num_samples=cfg_like.train_num_samples, max_bad_fraction=cfg_like.max_bad_fraction)
