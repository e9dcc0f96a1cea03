"""NLVR2 data: BLIP's json layout (``nlvr_train.json``, ``nlvr_dev.json``, ``nlvr_test.json``) as
the release's ``data/nlvr_dataset.py`` reads it (docs/FORMATS.md, "NLVR2").

One entry per (image pair, sentence)::

    {"images": ["dev-850-0-img0.png", "dev-850-0-img1.png"], "sentence": "...", "label": "True",
     "identifier": "dev-850-0-0"}

- ``images``: exactly two paths, joined to ``image_root`` (an absolute path is kept); the first is
  the *left* image, the second the *right* one.
- ``sentence``: cleaned by BLIP's ``pre_caption(sentence, 40)``.
- ``label``: the *string* ``"True"`` / ``"False"`` in BLIP's files (the release tests
  ``label == 'True'``, so anything else silently reads as False there); we also take JSON booleans
  and refuse anything else. 1 = True.
- ``identifier`` (optional, NLVR2's): kept for the prediction files.

Training items get BLIP's random swap (:func:`swap_sides`): with probability 0.5 the two images are
exchanged and the words ``left`` / ``right`` of the sentence swapped, which keeps the label right.
The release swaps in every split; we swap only in training, so evaluation is deterministic. The
draw is python's ``random.random()``, which the training loader seeds per sample from (seed, epoch,
index) (``utils.sampling.SeededItems``): a resumed run draws the same swaps.

Every problem is one line naming the file, the entry and the field (``images[1]`` for the second
image), raised before any model is built.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from data.utils import load_image, pre_caption, read_json, short_repr
from utils.errors import DataError

MAX_WORDS = 40                       # the release's pre_caption(sentence, 40)
SPLIT_FILES = {"train": "nlvr_train", "val": "nlvr_dev", "test": "nlvr_test"}  # BLIP's names under ann_root
LABELS = {"True": 1, "False": 0, True: 1, False: 0}


@dataclass
class NLVREntry:
    images: Tuple[str, str]          # as written in the file (left, right)
    paths: Tuple[str, str]           # joined to image_root
    text: str                        # the sentence as written
    sentence: str                    # after pre_caption(text, 40): what the model reads
    label: int                       # 1 = True, 0 = False
    identifier: Optional[object] = None


def swap_sides(sentence: str) -> str:
    """BLIP's swap of the words ``left`` and ``right`` (words split on single spaces, as the release
    does: ``left,`` or ``left's`` is not the word ``left``)."""
    side = {"left": "right", "right": "left"}
    return " ".join(side.get(w, w) for w in sentence.split(" "))


def _label(value, where: str) -> int:
    if isinstance(value, (str, bool)) and value in LABELS:
        return LABELS[value]
    raise DataError(f"{where}, field 'label': expected \"True\" or \"False\" (BLIP's strings; a JSON boolean is "
                    f"also taken), got {short_repr(value)}")


def _images(value, where: str) -> Tuple[str, str]:
    if not isinstance(value, list) or len(value) != 2:
        got = f"{len(value)} ({short_repr(value)})" if isinstance(value, list) else short_repr(value)
        raise DataError(f"{where}, field 'images': expected a list of exactly 2 image paths (left, right), got {got}")
    for j, path in enumerate(value):
        if not isinstance(path, str) or not path.strip():
            raise DataError(f"{where}, field 'images[{j}]': expected a non-empty image path, got {short_repr(path)}")
    return value[0], value[1]


def read_nlvr_file(path, image_root: str = "") -> Tuple[List[NLVREntry], Callable[[int], str]]:
    """The entries of one NLVR json file and how a message names entry k."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a json list of sentence/image-pair entries, got {type(data).__name__}")
    if not data:
        raise DataError(f"{path}: no entries; a split without entries would run on nothing")

    def where(k: int) -> str:
        return f"entry {k} of {path}"

    entries = []
    for k, raw in enumerate(data):
        w = where(k)
        if not isinstance(raw, dict):
            raise DataError(f"{w}: expected an object with images, sentence, label, got {short_repr(raw)}")
        for field in ("images", "sentence", "label"):
            if field not in raw:
                raise DataError(f"{w}: missing field {field!r}")
        images = _images(raw["images"], w)
        text = raw["sentence"]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{w}, field 'sentence': expected a non-empty string, got {short_repr(text)}")
        sentence = pre_caption(text, MAX_WORDS)
        if not sentence:
            raise DataError(f"{w}, field 'sentence': {short_repr(text)} is empty once cleaned (pre_caption)")
        label = _label(raw["label"], w)
        identifier = raw.get("identifier")
        if identifier is not None and (not isinstance(identifier, (str, int)) or isinstance(identifier, bool)):
            raise DataError(f"{w}, field 'identifier': expected a string or an integer, got {short_repr(identifier)}")
        paths = tuple(os.path.join(image_root, p) if image_root else p for p in images)
        entries.append(NLVREntry(images, paths, text, sentence, label, identifier))
    return entries, where


class NLVRDataset(Dataset):
    """The pairs of one split. Items: ``(image0, image1, sentence, label)`` (BLIP's
    ``nlvr_dataset``), with BLIP's random swap when ``swap`` (default: ``train``)."""

    def __init__(self, path, image_root: str, transform, train: bool, swap: Optional[bool] = None):
        self.file = str(path)
        self.transform = transform
        self.train = train
        self.swap = train if swap is None else swap
        self.entries, where = read_nlvr_file(path, image_root)
        self._where = [where(k) for k in range(len(self.entries))]

    def __len__(self) -> int:
        return len(self.entries)

    def source(self, index: int) -> str:
        return self._where[index]

    def __getitem__(self, index: int):
        e = self.entries[index]
        image0, image1 = (self.transform(load_image(p, context=f"{self.source(index)}, field 'images[{j}]'"))
                          for j, p in enumerate(e.paths))
        if self.swap and random.random() >= 0.5:  # the release keeps the order when random() < 0.5
            return image1, image0, swap_sides(e.sentence), e.label
        return image0, image1, e.sentence, e.label

    def image_checks(self):
        """Every distinct image of both sides and how a message names its first use (for
        ``data/preflight.py``: entry and field ``images[0]`` / ``images[1]``)."""
        first: Dict[str, Tuple[int, int]] = {}
        for i, e in enumerate(self.entries):
            for j, p in enumerate(e.paths):
                first.setdefault(p, (i, j))
        uses = list(first.values())
        return list(first), lambda k: f"{self.source(uses[k][0])}, field 'images[{uses[k][1]}]'"

    def drop_images(self, bad: Collection[str]) -> int:
        """Drop the pairs with a bad image on either side (``skip_bad_images``)."""
        keep = [i for i, e in enumerate(self.entries) if not any(p in bad for p in e.paths)]
        dropped = len(self.entries) - len(keep)
        self.entries = [self.entries[i] for i in keep]
        self._where = [self._where[i] for i in keep]
        return dropped

    def texts(self) -> List[str]:
        return [e.sentence for e in self.entries]

    @property
    def labels(self) -> List[int]:
        return [e.label for e in self.entries]


class NLVRCollator:
    """BLIP's default collate of ``(image0, image1, sentence, label)`` items with the sentences
    tokenized: ``pixel_values0`` / ``pixel_values1`` ``[B, 3, H, W]`` (left / right images; the
    model runs them through the ViT as one batch), ``input_ids`` / ``attention_mask`` from
    ``tokenize(sentences)`` (the model's ``tokenize_sentences``: padded to the longest, ``[ENC]``
    first) and ``labels`` ``[B]``."""

    def __init__(self, tokenize: Callable[[Sequence[str]], Tuple[torch.Tensor, torch.Tensor]]):
        self.tokenize = tokenize

    def __call__(self, batch):
        input_ids, attention_mask = self.tokenize([b[2] for b in batch])
        return {"pixel_values0": torch.stack([b[0] for b in batch]),
                "pixel_values1": torch.stack([b[1] for b in batch]),
                "input_ids": input_ids, "attention_mask": attention_mask,
                "labels": torch.tensor([b[3] for b in batch], dtype=torch.long)}
