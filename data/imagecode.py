"""ImageCoDe (docs/FORMATS.md section 3): a description and its 10 candidate images.

- ``read_imagecode(ann_root, split, image_root)`` -> one ``ImageCodeItem`` per description, in file
  order (sets in json order, descriptions in their key/list order), candidates in NUMERIC frame
  order (img9 before img10): the label is a position in that order, as in every official script.
- ``ImageCodeDataset``: item ``i`` -> ``(images [10, 3, H, W], description, target, i)``; target is
  -1 on the unlabelled test file. In training, one draw of the augmentation's randomness can be
  shared by the 10 frames (one crop for the whole set).

Bad input fails when the dataset is built (or, for undecodable pixels, when the image is loaded)
with a message naming the file, the set and the field; a file without descriptions is an error.
Every candidate image's existence and header are checked before a model is built
(``image_checks``, ``data/preflight.py``).
"""
from __future__ import annotations

import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.utils.data import Dataset

from .utils import load_image, pre_caption, read_json
from utils.errors import DataError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
SPLIT_FILES = {"train": "train_data.json", "valid": "valid_data.json", "test": "test_data_unlabeled.json"}
NUM_CANDIDATES = 10
_FRAME = re.compile(r"^img(\d+)\.(jpe?g|png)$", re.IGNORECASE)


def is_video(set_name: str) -> bool:
    """A set is static iff its name contains ``open-images`` (docs/FORMATS.md section 3)."""
    return "open-images" not in set_name


def candidate_files(set_dir: Path, where: str, num_candidates: int = NUM_CANDIDATES) -> list[str]:
    """The ``img<N>`` files of a set folder sorted by the integer N; exactly ``num_candidates``."""
    try:
        names = os.listdir(set_dir)
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: no image folder {set_dir}") from None
    except NotADirectoryError:
        raise NotADirectoryError(f"{where}: {set_dir} is not a folder") from None
    frames: dict[int, str] = {}
    for name in names:
        m = _FRAME.match(name)
        if not m:
            continue  # .DS_Store, thumbnails, ...
        n = int(m.group(1))
        if n in frames:
            raise DataError(f"{where}: two files for frame {n} in {set_dir}: {frames[n]}, {name}")
        frames[n] = name
    if len(frames) != num_candidates:
        shown = ", ".join(frames[n] for n in sorted(frames)) or "none"
        raise DataError(f"{where}: expected {num_candidates} images img<N>.jpg in {set_dir}, "
                         f"found {len(frames)} ({shown})")
    return [frames[n] for n in sorted(frames)]


@dataclass
class ImageCodeItem:
    set_name: str
    description: str                 # as written in the json file
    target: Optional[int]            # position in numeric frame order; None on the test file
    candidates: list[str]            # file names in position order
    video: bool

    @property
    def key(self) -> tuple[str, str]:
        return self.set_name, self.description


def _position(key: Any, where: str, num_candidates: int) -> int:
    try:
        pos = int(str(key).strip())
    except ValueError:
        raise DataError(f"{where}: target position {key!r} is not an integer") from None
    if not 0 <= pos < num_candidates:
        raise DataError(f"{where}: target position {pos} is out of range 0-{num_candidates - 1}")
    return pos


def _description(text: Any, where: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: description must be a non-empty string, got {text!r}")
    return text


def read_imagecode(ann_file: PathLike, image_root: PathLike, labelled: Optional[bool] = None,
                   num_candidates: int = NUM_CANDIDATES) -> list[ImageCodeItem]:
    """Parse a train/valid file (``{set: {"<position>": description}}``) or the unlabelled test file
    (``{set: [description, ...]}``) and list every set's candidates. ``labelled`` None: from the
    file's shape."""
    ann_file, image_root = Path(ann_file), Path(image_root)
    data = read_json(ann_file)
    if not isinstance(data, dict):
        raise DataError(f"{ann_file}: expected a json object {{set_name: descriptions}}, got {type(data).__name__}")
    items: list[ImageCodeItem] = []
    for set_name, entry in data.items():
        where = f"{ann_file}, set {set_name!r}"
        is_labelled = isinstance(entry, dict) if labelled is None else labelled
        if is_labelled and not isinstance(entry, dict):
            raise DataError(f"{where}: expected {{\"<position>\": description}}, got {type(entry).__name__}")
        if not is_labelled and not isinstance(entry, list):
            raise DataError(f"{where}: expected a list of descriptions, got {type(entry).__name__}")
        candidates = candidate_files(image_root / set_name, where, num_candidates)
        video = is_video(set_name)
        if is_labelled:
            for key, text in entry.items():
                here = f"{where}, position {key!r}"
                items.append(ImageCodeItem(set_name, _description(text, here),
                                           _position(key, here, num_candidates), candidates, video))
        else:
            for i, text in enumerate(entry):
                items.append(ImageCodeItem(set_name, _description(text, f"{where}, description {i}"), None,
                                           candidates, video))
    if not items:
        raise DataError(f"{ann_file}: no descriptions (an empty file, or sets without descriptions); the split "
                         "needs at least one")
    return items


class ImageCodeDataset(Dataset):
    """Item ``i`` -> ``(images [K, 3, H, W], cleaned description, target (-1: unknown), i)``.

    ``shared_randomness``: every frame of a set is transformed with the same random draws (same
    crop, flip and RandAugment ops for same-size frames), so a description's "left" or "the
    second frame" stays true across the set. Off: each frame draws its own (the released recipe).
    """

    def __init__(self, ann_file: PathLike, image_root: PathLike, transform: Callable, max_words: int = 30,
                 shared_randomness: bool = True, labelled: Optional[bool] = None):
        self.ann_file = Path(ann_file)
        self.image_root = Path(image_root)
        self.items = read_imagecode(self.ann_file, self.image_root, labelled)
        self.transform = transform
        self.max_words = max_words
        self.shared_randomness = shared_randomness
        self.text = [pre_caption(it.description, max_words) for it in self.items]
        n_static = sum(not it.video for it in self.items)
        logger.info("%s: %d descriptions of %d sets (%d video, %d static descriptions)", self.ann_file,
                    len(self.items), len({it.set_name for it in self.items}), len(self.items) - n_static, n_static)

    @property
    def labelled(self) -> bool:
        return all(it.target is not None for it in self.items)

    def __len__(self) -> int:
        return len(self.items)

    def image_paths(self, index: int) -> list[Path]:
        it = self.items[index]
        return [self.image_root / it.set_name / name for name in it.candidates]

    def _where(self, it: ImageCodeItem, pos: int) -> str:
        return f"set {it.set_name!r}, candidate {pos} of {self.ann_file}"

    def _load(self, index: int) -> list:
        it = self.items[index]
        return [load_image(p, context=self._where(it, pos)) for pos, p in enumerate(self.image_paths(index))]

    def image_checks(self) -> tuple[list[str], Callable[[int], str]]:
        """Every candidate of every set (each set once) and how to name the k-th in a message."""
        first: dict[str, int] = {}
        for i, it in enumerate(self.items):
            first.setdefault(it.set_name, i)
        refs = [(i, pos) for i in first.values() for pos in range(len(self.items[i].candidates))]
        items = self.items
        return ([str(self.image_root / items[i].set_name / items[i].candidates[pos]) for i, pos in refs],
                lambda k: self._where(items[refs[k][0]], refs[k][1]))

    def _transform_all(self, images: list) -> torch.Tensor:
        if not self.shared_randomness:
            return torch.stack([self.transform(img) for img in images])
        seed = random.getrandbits(62)
        out = []
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            for img in images:
                random.seed(seed)
                torch.manual_seed(seed)
                out.append(self.transform(img))
        random.setstate(py_state)
        return torch.stack(out)

    def images(self, index: int) -> torch.Tensor:
        """The transformed candidates of item ``index``: ``[K, 3, H, W]``."""
        return self._transform_all(self._load(index))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, int, int]:
        it = self.items[index]
        target = -1 if it.target is None else it.target
        return self.images(index), self.text[index], target, index


class ImageCodeSets(Dataset):
    """The image sets of an ImageCodeDataset, each once: item ``g`` -> ``(images [K, 3, H, W], item
    indices of the set's descriptions)``. Evaluation embeds a set's images once for all of them."""

    def __init__(self, dataset: ImageCodeDataset):
        self.dataset = dataset
        groups: dict[str, list[int]] = {}
        for i, it in enumerate(dataset.items):
            groups.setdefault(it.set_name, []).append(i)
        self.groups = list(groups.values())

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, g: int) -> tuple[torch.Tensor, list[int]]:
        return self.dataset.images(self.groups[g][0]), self.groups[g]


class ImageCodeSetCollator:
    """``[(images, item indices), ...]`` -> ``pixel_values`` ``[S, K, 3, H, W]``, the descriptions'
    ``input_ids`` / ``attention_mask`` ``[D, T]``, ``set_index`` ``[D]`` (row of ``pixel_values``),
    ``index`` ``[D]`` (dataset items) and ``video`` ``[D]``."""

    def __init__(self, dataset: ImageCodeDataset, tokenizer, max_tokens: int):
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens

    def __call__(self, batch: list[tuple]) -> dict[str, torch.Tensor]:
        from .collate import tokenize

        images, groups = zip(*batch)
        index = [i for g in groups for i in g]
        input_ids, attention_mask = tokenize(self.tokenizer, [self.dataset.text[i] for i in index],
                                             self.max_tokens, dynamic=True)
        return {"pixel_values": torch.stack(images), "input_ids": input_ids, "attention_mask": attention_mask,
                "set_index": torch.tensor([s for s, g in enumerate(groups) for _ in g]),
                "index": torch.tensor(index),
                "video": torch.tensor([self.dataset.items[i].video for i in index])}


def build_imagecode_dataset(cfg_like: Any, split: str, transform: Callable, shared_randomness: bool = True):
    """``split`` in train/valid/test -> the dataset of ``ann_root/<official file name>``."""
    if split not in SPLIT_FILES:
        raise DataError(f"unknown ImageCoDe split {split!r}; expected one of {sorted(SPLIT_FILES)}")
    for key, value in (("ann_root", cfg_like.ann_root), ("image_root", cfg_like.image_root)):
        if not value:
            raise DataError(f"config key {key!r} must be set for ImageCoDe")
    return ImageCodeDataset(Path(cfg_like.ann_root) / SPLIT_FILES[split], cfg_like.image_root, transform,
                            max_words=cfg_like.max_words, shared_randomness=shared_randomness,
                            labelled=split != "test")
