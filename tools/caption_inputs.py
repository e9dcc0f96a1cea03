"""The inputs of ``tools caption`` (``tools/caption.py``): pair files, image folders and lists, or
img2dataset folders read into one ``Inputs`` (the pairs and their distinct images, in first-seen
order), and the pre-flight check of every image before a model is built.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from data.columns import FLAGS, Columns
from data.pairs import PairTable
from data.preflight import check_images
from data.entries import _join, _require_dict, _require_image, _where
from data.utils import BadImageError, read_csv, read_json, read_text
from tools.common import read_pair_args
from utils import dist as du

logger = logging.getLogger("tools.caption")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class Inputs:
    """The pairs (or bare images, caption ``""``) of every input, and their distinct images.

    ``table`` rows are pairs in input order; ``roots[f]`` is the folder file ``f``'s paths are joined
    to (None: as written). Image ``i`` is the ``i``-th distinct file (normalised joined path) in
    first-seen order: ``first_row[i]`` its first pair, ``load[i]`` the file read; its original
    captions are its pairs with a non-empty caption, in input order (``originals(i)``)."""
    kind: str                       # 'pairs' | 'images' | 'img2dataset'
    table: PairTable
    roots: List[Optional[str]]
    folders: List[bool]             # per file: a folder (its entries are files found in it)
    first_row: List[int]
    load: List[str]
    image_of_row: np.ndarray

    def __post_init__(self):
        order = np.argsort(self.image_of_row, kind="stable")
        self._order = order
        self._starts = np.searchsorted(self.image_of_row[order], np.arange(len(self.first_row) + 1))

    def __len__(self) -> int:
        return len(self.first_row)

    def path(self, i: int) -> str:
        return self.table.image[self.first_row[i]]

    def source(self, i: int) -> str:
        return self.table.source[self.first_row[i]]

    def originals(self, i: int) -> List[int]:
        rows = self._order[self._starts[i]:self._starts[i + 1]].tolist()
        return [r for r in rows if self.table.caption[r].strip()]

    def where(self, i: int) -> str:
        """How a message names image ``i``: its first pair's entry (or row and line) and field."""
        r = self.first_row[i]
        f = self.table.file_index[r]
        if self.folders[f]:
            return f"file {self.table.entry[r]} of folder {self.table.files[f]}"
        return f"{self.table.where(r)}, field {self.table.image_fields[f]!r}"

    def fingerprint(self) -> str:
        return self.table.fingerprint()


def _labels(paths: Sequence[str]) -> List[str]:
    # As data/pairs.py labels sources: the name, unless two inputs share it.
    names = [Path(p).name or str(p) for p in paths]
    return [n if names.count(n) == 1 else str(p) for n, p in zip(names, paths)]


def _image_files(folder: str) -> List[str]:
    """Image files below ``folder`` (recursively, hidden ones skipped), sorted by relative path,
    as ``folder/relative/path``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(os.path.relpath(os.path.join(dirpath, n), folder) for n in filenames
                     if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS))
    if not found:
        raise ValueError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in it or below it")
    return [os.path.join(folder, rel) for rel in sorted(found, key=lambda p: Path(p).parts)]


def _read_image_list(table: PairTable, path: str, f: int, label: str, columns: Columns) -> None:
    """Bare image paths of a CSV/TSV (``columns``: ``--image_col``, ``--image_dir_col``), ``.txt`` or
    json list into ``table``."""
    lower = path.lower()
    if lower.endswith((".csv", ".tsv")):
        header, rows = read_csv(path)
        col = columns.require(header, path, ("image",))
        for row in rows:
            table._add(columns.image_of(row.fields, col, row.where(path)), "", label, f, row.index, -1, row.line)
    elif lower.endswith(".txt"):
        n = 0
        for line, text in enumerate(read_text(path).splitlines(), start=1):
            if text.strip():
                table._add(text.strip(), "", label, f, n, -1, line)
                n += 1
    else:
        entries = read_json(path)
        if not isinstance(entries, list):
            raise ValueError(f"{path}: expected a json list of image paths or of {{'image': ...}} objects, "
                             f"got {type(entries).__name__}")
        for k, entry in enumerate(entries):
            where = _where(path, k)
            if isinstance(entry, str):
                if not entry.strip():
                    raise ValueError(f"{where}: empty image path")
                image = entry
            else:
                _require_dict(entry, where)
                image = _require_image(entry, where)
            table._add(image, "", label, f, k, -1, -1)


def _read_img2dataset(table: PairTable, folder: str, f: int, label: str) -> int:
    """The images of an img2dataset output folder with their ``.txt`` captions; returns how many
    have no (or an empty) caption."""
    without = 0
    for k, image in enumerate(_image_files(folder)):
        txt = os.path.splitext(image)[0] + ".txt"
        caption = read_text(txt).strip() if os.path.isfile(txt) else ""
        without += not caption
        table._add(image, caption, label, f, k, -1, -1)
    return without


def read_inputs(args, cfg) -> Inputs:
    """The pairs or images of exactly one of ``--input`` / ``--images`` / ``--img2dataset``; a bad
    file ends the command with its message (file, entry or row and line, field)."""
    given = [name for name in ("input", "images", "img2dataset") if getattr(args, name)]
    if len(given) != 1:
        raise SystemExit("error: give exactly one of --input (pair files), --images (folders or image lists), "
                         "--img2dataset (img2dataset folders)")
    root = cfg.image_root or None
    kind = {"input": "pairs", "images": "images", "img2dataset": "img2dataset"}[given[0]]
    if kind == "pairs":
        table = read_pair_args(args)
        roots, folders = [root] * len(table.files), [False] * len(table.files)
    else:
        paths = [str(p) for p in getattr(args, given[0])]
        columns = Columns(image=args.image_col, image_dir=getattr(args, "image_dir_col", None), named_by=FLAGS)
        folders = [os.path.isdir(p) for p in paths]
        table = PairTable(files=paths, formats=["csv" if p.lower().endswith((".csv", ".tsv", ".txt")) and not d
                                                else "json" for p, d in zip(paths, folders)],
                          image_fields=[columns.image_field if p.lower().endswith((".csv", ".tsv")) else "image"
                                        for p in paths])
        roots = [None if d else root for d in folders]
        try:
            for f, (path, label, folder) in enumerate(zip(paths, _labels(paths), folders)):
                before = len(table)
                if kind == "img2dataset":
                    if not folder:
                        raise ValueError(f"{path}: not a folder (--img2dataset takes img2dataset output folders)")
                    without = _read_img2dataset(table, path, f, label)
                    if without:
                        logger.warning("%s: %d of %d images have no .txt caption (or an empty one): they get "
                                       "generated captions only", path, without, len(table) - before)
                elif folder:
                    for k, image in enumerate(_image_files(path)):
                        table._add(image, "", label, f, k, -1, -1)
                else:
                    _read_image_list(table, path, f, label, columns)
                if len(table) == before:
                    raise ValueError(f"{path}: no images")
        except (ValueError, FileNotFoundError) as err:
            raise SystemExit(f"error: {err}") from None
    seen: Dict[str, int] = {}
    first_row, load = [], []
    image_of_row = np.empty(len(table), dtype=np.int64)
    for r, image in enumerate(table.image):
        path = _join(roots[table.file_index[r]], image)
        key = os.path.normpath(path)
        i = seen.get(key)
        if i is None:
            i = seen[key] = len(first_row)
            first_row.append(r)
            load.append(path)
        image_of_row[r] = i
    return Inputs(kind, table, roots, folders, first_row, load, image_of_row)


def check_input_images(inputs: Inputs, cfg) -> Dict[str, str]:
    """Pre-flight check of every image (a collective), before any model is built: a bad one ends the
    command naming its row, unless ``skip_bad_images`` (then ``{load path: message}``)."""
    try:
        bad = check_images(inputs.load, inputs.where, "the inputs", cfg.skip_bad_images,
                           hint="pass --opts skip_bad_images=true to report them as not captioned")
    except (FileNotFoundError, BadImageError) as err:
        raise SystemExit(f"error: {err}") from None
    if bad and du.is_main_process():
        logger.warning("%d of %d images are missing or unreadable (skip_bad_images): reported, not captioned",
                       len(bad), len(inputs))
    return {path: b.message for path, b in bad.items()}
