"""BLIP-json image-text retrieval datasets: COCO Karpathy, Flickr30k, custom (docs/FORMATS.md 1).

- ``RetrievalTrainDataset`` (``data/retrieval_train.py``, with the train entries it accepts and how
  their captions are grouped into images): one item per caption -> ``(image [3, H, W], caption, idx)``,
  where ``idx`` is the contrastive image index (captions of one image share it).
- ``RetrievalEvalDataset``: one item per image -> ``(image [3, H, W], i)``, with the flattened
  captions in ``text`` and the ``img2txt`` / ``txt2img`` maps the retrieval metrics need.
- ``build_retrieval_datasets``: config-like object -> ``{split: dataset}``. Nothing is downloaded:
  the annotation json files must already be in ``ann_root``.

Every caption is cleaned with ``pre_caption``; an empty or whitespace-only caption, an empty list or
a non-string list item is an error naming the file, the entry and the field, in train and val/test
files alike. Val/test entries are ``{"image": path, "caption": [str, ...] | str}``, one per image. A
file without entries (``[]``, a CSV with only its header) is an error naming the file.

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

import logging
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from .columns import DEFAULT as DEFAULT_COLUMNS, Columns
from .entries import PathLike, Where, _captions, _is_csv, _join, _read_entries, _require_dict, _require_image
from .retrieval_train import RetrievalTrainDataset, Transform
from .shards import is_remote, split_train_files
from .stream import build_stream
from .transforms import build_test_transform, build_train_transform
from .utils import BadImageError, load_image, pre_caption
from utils.errors import DataError

logger = logging.getLogger(__name__)

DEFAULT_FILES = {
    "coco": {"train": "coco_karpathy_train.json", "val": "coco_karpathy_val.json",
             "test": "coco_karpathy_test.json"},
    "flickr": {"train": "flickr30k_train.json", "val": "flickr30k_val.json",
               "test": "flickr30k_test.json"},
    "nocaps": {"val": "nocaps_val.json", "test": "nocaps_test.json"},  # images only (eval_nocaps.py)
    "custom": {},
}
SPLITS = ("train", "val", "test")


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
        return [n if is_remote(str(n)) else _resolve(ann_root, n) for n in names]

    def transform_for(given: Transform | None, builder: Callable[[int], Transform]) -> Transform:
        if given is not None:
            return given
        return builder(cfg_like.image_size)

    datasets: dict[str, Dataset] = {}
    for split in splits:
        files = files_for(split)
        if split == "train":
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
