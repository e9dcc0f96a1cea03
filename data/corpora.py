"""Readers of the public pretraining corpora as users download them (docs/FORMATS.md 2b).

One reader per source format, shared by ``python -m tools pairs`` (which turns them into section 2's
pair lists) and ``data/pretrain.py`` (which reads DLIP's ``all.json`` and the Kaggle Flickr30k
``results.csv`` directly as ``train_file`` entries):

- ``img2dataset``: an img2dataset ``--output_format files`` folder, ``00000/000000015.jpg`` +
  ``000000015.txt`` (caption) + ``000000015.json`` (metadata: ``caption``, ``key``, ``status``).
- ``vg``: Visual Genome ``region_descriptions.json``, ``[{"id", "regions": [{"phrase", "width",
  "height", ...}]}]``: a phrase of more than 4 words over a region above a pixel area becomes a
  caption of the whole image ``<vg_image_root>/<id>.jpg``.
- ``coco``: BLIP's ``coco_karpathy_train.json`` (paths relative to the COCO image folder).
- ``dlip``: DLIP's ``all.json``, ``[{"caption", "image_root": full image path, "id"}]``.
- ``flickr_kaggle``: the Kaggle Flickr30k ``results.csv``, ``image_name| comment_number| comment``.
- ``pairs``: our own pair lists (section 2; also BLIP's ``vg_caption.json``), any caption layout.
- ``csv``: any other CSV/TSV of pairs, one per row, its columns chosen by ``data/columns.py``'s
  ``Columns`` (``tools pairs --image_col / --caption_col / --image_dir_col``; BLIP's names by default).

Every reader returns a ``Corpus``: the candidate pairs (image path, raw caption, where it was read)
and what it skipped, counted by reason. Structural errors (a missing or mistyped field, a file of
another shape) are ``DataError``s naming the file, the entry (or row and line) and the field, in the
style of ``data/entries.py``. What a source legitimately contains (a failed download, a short VG
phrase, a malformed row of the Kaggle file) is skipped and counted; an empty caption is skipped and
counted by the tool (``strict=False``) and an error in pretraining (``strict=True``), as everywhere.
"""
from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .columns import DEFAULT as DEFAULT_COLUMNS, Columns
from .entries import _captions, _require_dict, _require_field, _where
from .utils import pre_caption, read_csv, read_json, read_text, short_repr
from utils.errors import DataError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
KINDS = ("img2dataset", "vg", "coco", "dlip", "flickr_kaggle", "pairs", "csv")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
KAGGLE_HEADER = ["image_name", "comment_number", "comment"]
EXAMPLES = 5  # skipped records named per reason

# Skip reasons (report keys).
EMPTY_CAPTION = "empty caption"
MISSING_IMAGE = "missing image file"
FAILED_DOWNLOAD = "failed download (status)"
FAILED_RESIZE = "failed resize (status)"
STATS_REASONS = {"failed_to_download": FAILED_DOWNLOAD, "failed_to_resize": FAILED_RESIZE}  # img2dataset _stats.json
SHORT_PHRASE = "too-short VG phrase"
SMALL_REGION = "too-small VG region"
MALFORMED_ROW = "malformed row"


@dataclass
class Corpus:
    """The candidate pairs of one source: ``image[i]`` (path, joined to the source's root),
    ``caption[i]`` (raw), ``where[i]`` (``entry K of FILE`` / ``row K (line L) of FILE``);
    ``read`` counts the records met (one per caption; a skipped sample or row counts as one),
    ``skipped`` the records dropped by reason, ``examples`` names the first few of each."""
    kind: str
    path: str
    image: list[str] = field(default_factory=list)
    caption: list[str] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    read: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, image: str, caption: str, where: str) -> None:
        self.read += 1
        self.image.append(image)
        self.caption.append(caption)
        self.where.append(where)

    def skip(self, reason: str, where: str) -> None:
        self.read += 1
        self.skipped[reason] += 1
        named = self.examples.setdefault(reason, [])
        if len(named) < EXAMPLES:
            named.append(where)

    def __len__(self) -> int:
        return len(self.image)


def _join(root: Optional[PathLike], path: str) -> str:
    return path if not root else os.path.join(root, path)


def _caption_or_skip(corpus: Corpus, value: Any, where: str, strict: bool, name: str = "caption") -> Optional[str]:
    """A string caption, or None (counted) when it is empty and not ``strict``."""
    if not isinstance(value, str):
        raise DataError(f"{where}: invalid field {name!r}: expected a string, got {short_repr(value)}")
    if value.strip():
        return value
    if strict:
        raise DataError(f"{where}: invalid field {name!r}: the caption is empty or whitespace only ({value!r})")
    corpus.skip(EMPTY_CAPTION, where)
    return None


def _require_path(entry: dict, name: str, where: str) -> str:
    value = _require_field(entry, name, where)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: invalid field {name!r}: expected a non-empty path string, got {short_repr(value)}")
    return value


def _require_list(data: Any, path: PathLike, what: str) -> list:
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a json list of {what}, got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------- detection


def is_kaggle_header(line: str) -> bool:
    return [f.strip() for f in line.split("|")] == KAGGLE_HEADER


def is_kaggle_csv(path: PathLike) -> bool:
    """A ``.csv`` whose header is ``image_name| comment_number| comment`` (Kaggle Flickr30k)."""
    if not str(path).lower().endswith(".csv") or not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        first = f.readline().decode("utf-8", errors="replace").lstrip("\ufeff")
    return is_kaggle_header(first.strip())


def _first_dict(entries: list) -> Optional[dict]:
    return next((e for e in entries if isinstance(e, dict)), None)


def is_dlip_list(entries: Any) -> bool:
    """DLIP's ``all.json``: entries with ``image_root`` and no ``image``."""
    first = _first_dict(entries) if isinstance(entries, list) else None
    return first is not None and "image_root" in first and "image" not in first


def json_kind(path: PathLike, data: Any) -> str:
    """The kind of a json source from its content (and, for COCO, its name or paths)."""
    first = _first_dict(data) if isinstance(data, list) else None
    if first is None:
        return "pairs"  # the pair reader names what is wrong
    if "regions" in first:
        return "vg"
    if is_dlip_list(data):
        return "dlip"
    image = first.get("image")
    if isinstance(image, str) and not os.path.isabs(image) and (
            "coco" in Path(path).name.lower() or re.match(r"(train|val)2014/", image)):
        return "coco"
    return "pairs"


def detect_kind(path: PathLike) -> tuple[str, Any]:
    """``(kind, the json data or None)`` of a source path (a json file is parsed once, here)."""
    path = str(path)
    if os.path.isdir(path):
        return "img2dataset", None
    if path.lower().endswith(".tar"):
        return "img2dataset", None
    if is_kaggle_csv(path):
        return "flickr_kaggle", None
    if path.lower().endswith((".csv", ".tsv")):
        return "csv", None
    data = read_json(path)
    return json_kind(path, data), data


# ----------------------------------------------------------------------------- readers


def read_img2dataset(folder: PathLike) -> Corpus:
    """An img2dataset ``files`` output folder: one sample per key in the shard subfolders.

    A sample whose ``.json`` has a ``status`` other than ``"success"`` is skipped (failed
    download), so is one without image file; the caption is the ``.txt`` (stripped), else the
    ``.json``'s ``caption``. img2dataset writes no files for a failed download: those are counted
    from the shard's ``NNNNN_stats.json`` (``failed_to_download``, ``failed_to_resize``) where it
    exists. webdataset ``.tar`` shards are streamed by training (``data/stream.py``), not listed
    here (an error when the folder has nothing else).
    """
    folder = str(folder)
    corpus = Corpus("img2dataset", folder)
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: not a folder; {_TAR_HINT}" if folder.lower().endswith(".tar")
                        else f"{folder}: not a folder (an img2dataset source is its output folder)")
    tars = []
    with_stats = set()  # shard folders whose failures come from NNNNN_stats.json
    for name in sorted(os.listdir(folder)):
        m = re.fullmatch(r"(\d+)_stats\.json", name)
        if not m:
            continue
        stats = read_json(os.path.join(folder, name))
        if not isinstance(stats, dict):
            continue
        with_stats.add(m.group(1))
        failed = {reason: int(stats.get(key) or 0) for key, reason in STATS_REASONS.items()}
        if not any(k in stats for k in STATS_REASONS) and isinstance(stats.get("count"), int) \
                and isinstance(stats.get("successes"), int):
            failed = {FAILED_DOWNLOAD: stats["count"] - stats["successes"]}  # no breakdown: count - successes
        for reason, n in failed.items():
            for _ in range(n):
                corpus.skip(reason, f"shard {m.group(1)} ({name})")
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        samples: dict[str, dict[str, str]] = {}
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            stem, ext = os.path.splitext(name)
            ext = ext.lower()
            if ext == ".tar":
                tars.append(os.path.join(dirpath, name))
            elif dirpath == folder and name.endswith("_stats.json"):
                continue  # 00000_stats.json (and 00000.parquet): shard metadata, not samples
            elif ext in IMAGE_EXTENSIONS:
                samples.setdefault(stem, {}).setdefault("image", os.path.join(dirpath, name))
            elif ext in (".txt", ".json"):
                samples.setdefault(stem, {})[ext[1:]] = os.path.join(dirpath, name)
        for stem, files in samples.items():
            where = f"sample {stem!r} of {dirpath}"
            meta = read_json(files["json"]) if "json" in files else {}
            if not isinstance(meta, dict):
                raise DataError(f"{files['json']}: expected a json object (img2dataset metadata), "
                                f"got {type(meta).__name__}")
            status = meta.get("status")
            if status is not None and status != "success":
                if os.path.basename(dirpath) not in with_stats:  # else counted from its stats
                    corpus.skip(FAILED_DOWNLOAD, f"{where} (status {status!r})")
                continue
            if "image" not in files:
                corpus.skip(MISSING_IMAGE, where)
                continue
            caption = read_text(files["txt"]) if "txt" in files else meta.get("caption")
            caption = "" if caption is None else str(caption)
            if _caption_or_skip(corpus, caption, where, strict=False) is not None:
                corpus.add(files["image"], caption.strip(), where)
    if tars:
        if corpus.read == 0:
            raise DataError(f"{folder}: webdataset .tar shards ({len(tars)}, e.g. {tars[0]}) are not supported by "
                            f"`tools pairs` yet; {_TAR_HINT}")
        corpus.notes.append(f"{len(tars)} .tar shard(s) not read (not supported yet)")
    if corpus.read == 0:
        raise DataError(f"{folder}: no img2dataset samples (NNNNN/KEY.jpg + KEY.txt / KEY.json) below it")
    return corpus


_TAR_HINT = ("a pair list cannot point into a tar; name the shards in train_file instead (they are streamed: "
             "docs/FORMATS.md 2c), or extract them (`tar -xf`) into shard folders")


def read_vg_regions(path: PathLike, image_root: Optional[PathLike], min_words: int = 5,
                    min_area: float = 5000, data: Any = None) -> Corpus:
    """Visual Genome ``region_descriptions.json``: each region's phrase with at least ``min_words``
    words (after ``pre_caption``) over a region of more than ``min_area`` pixels (width x height)
    is a caption of image ``<image_root>/<id>.jpg``."""
    path = str(path)
    corpus = Corpus("vg", path)
    entries = _require_list(read_json(path) if data is None else data, path, "images with 'regions'")
    for k, entry in enumerate(entries):
        where = _where(path, k)
        _require_dict(entry, where)
        regions = _require_field(entry, "regions", where)
        if not isinstance(regions, list):
            raise DataError(f"{where}: invalid field 'regions': expected a list, got {short_repr(regions)}")
        image_id = entry.get("id", entry.get("image_id"))
        for j, region in enumerate(regions):
            rwhere = f"{where}, region {j}"
            _require_dict(region, rwhere)
            rid = region.get("image_id", image_id) if image_id is None else image_id
            if isinstance(rid, bool) or not isinstance(rid, (int, str)) or str(rid).strip() == "":
                raise DataError(f"{rwhere}: missing field 'id' (the image id; has {sorted(entry)})")
            phrase = _caption_or_skip(corpus, _require_field(region, "phrase", rwhere), rwhere, strict=False,
                                      name="phrase")
            if phrase is None:
                continue
            if len(pre_caption(phrase, 10 ** 9).split()) < min_words:
                corpus.skip(SHORT_PHRASE, rwhere)
                continue
            size = [_require_field(region, name, rwhere) for name in ("width", "height")]
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in size):
                raise DataError(f"{rwhere}: invalid field 'width'/'height': expected numbers, got {size}")
            if size[0] * size[1] <= min_area:
                corpus.skip(SMALL_REGION, rwhere)
                continue
            corpus.add(_join(image_root, f"{rid}.jpg"), phrase.strip(), rwhere)
    return corpus


def read_pair_list(path: PathLike, image_root: Optional[PathLike], kind: str = "pairs", strict: bool = False,
                   data: Any = None) -> Corpus:
    """A section 2 pair list (also COCO Karpathy train, BLIP's ``vg_caption.json``): one pair per
    caption, ``image`` joined to ``image_root``."""
    path = str(path)
    corpus = Corpus(kind, path)
    entries = _require_list(read_json(path) if data is None else data, path, "{'image', 'caption'} entries")
    for k, entry in enumerate(entries):
        where = _where(path, k)
        _require_dict(entry, where)
        image = _require_path(entry, "image", where)
        caption = _require_field(entry, "caption", where)
        items = [caption] if isinstance(caption, str) else caption
        if not isinstance(items, list) or not items:
            _captions(entry, where)  # raises the reader's own message
        for j, item in enumerate(items):
            c = _caption_or_skip(corpus, item, where if isinstance(caption, str) else f"{where} (caption {j})",
                                 strict)
            if c is not None:
                corpus.add(_join(image_root, image), c, where)
    return corpus


def read_csv_pairs(path: PathLike, image_root: Optional[PathLike], columns: Columns = DEFAULT_COLUMNS,
                   strict: bool = False) -> Corpus:
    """A CSV/TSV of pairs, one per row: the image path from ``columns`` (a folder column joined to a
    file column with ``image_dir``) joined to ``image_root``, the caption from ``columns.caption``.
    A missing column is an error naming the file, the column and the file's columns; an empty
    image cell is an error naming the row; an empty caption is skipped and counted (an error when
    ``strict``)."""
    path = str(path)
    corpus = Corpus("csv", path)
    header, rows = read_csv(path)
    col = columns.require(header, path)
    for row in rows:
        where = row.where(path)
        image = columns.image_of(row.fields, col, where)
        caption = _caption_or_skip(corpus, row.fields[col["caption"]], where, strict, name=columns.caption)
        if caption is not None:
            corpus.add(_join(image_root, image), caption, where)
    if not rows:
        raise DataError(f"{path}: no entries (only its header)")
    return corpus


def read_dlip(path: PathLike, strict: bool = False, data: Any = None) -> Corpus:
    """DLIP's ``all.json``: ``[{"caption": str, "image_root": the image's full path, "id"}]``."""
    path = str(path)
    corpus = Corpus("dlip", path)
    entries = _require_list(read_json(path) if data is None else data, path,
                            "{'caption', 'image_root'} entries (DLIP's all.json)")
    for k, entry in enumerate(entries):
        where = _where(path, k)
        _require_dict(entry, where)
        image = _require_path(entry, "image_root", where)
        caption = _caption_or_skip(corpus, _require_field(entry, "caption", where), where, strict)
        if caption is not None:
            corpus.add(image, caption, where)
    return corpus


def read_kaggle_flickr(path: PathLike, image_root: Optional[PathLike], strict: bool = False) -> Corpus:
    """The Kaggle Flickr30k ``results.csv``: ``image_name| comment_number| comment``, '|'-separated
    with a space after each '|'. Split by hand, not as CSV: the comments hold quote characters.
    A row without three fields (the released file has one: ``2199200615.jpg| 4   A dog runs ...``)
    or with an empty image name is skipped and counted as malformed; an empty comment is an empty
    caption (an error when ``strict``)."""
    path = str(path)
    corpus = Corpus("flickr_kaggle", path)
    lines = read_text(path).splitlines()
    if not lines or not is_kaggle_header(lines[0]):
        raise DataError(f"{path}, line 1: expected the Kaggle Flickr30k header "
                        f"{'| '.join(KAGGLE_HEADER)!r}, got {short_repr(lines[0] if lines else '')}")
    row = 0
    for line_no, text in enumerate(lines[1:], start=2):
        if not text.strip():
            continue
        where = f"row {row} (line {line_no}) of {path}"
        row += 1
        fields = [f.strip() for f in text.split("|", 2)]
        if len(fields) != 3 or not fields[0]:
            corpus.skip(MALFORMED_ROW, where)
            continue
        caption = _caption_or_skip(corpus, fields[2], where, strict, name="comment")
        if caption is not None:
            corpus.add(_join(image_root, fields[0]), caption, where)
    if row == 0:
        raise DataError(f"{path}: no entries (only its header)")
    return corpus


def read_source(kind: Optional[str], path: PathLike, *, roots: Optional[dict] = None, vg_min_words: int = 5,
                vg_min_area: float = 5000, columns: Columns = DEFAULT_COLUMNS) -> Corpus:
    """Read one source of ``kind`` (None: detected); ``roots`` maps a kind to its image folder
    (``vg`` is required, ``coco`` required too, the others optional; ``csv`` files use the
    ``pairs`` root); ``columns``: the columns of a ``csv`` source."""
    roots = roots or {}
    data = None
    if kind is None:
        kind, data = detect_kind(path)
    elif kind not in KINDS:
        raise DataError(f"unknown source kind {kind!r} for {path}; valid: {', '.join(KINDS)}")
    if kind == "img2dataset":
        return read_img2dataset(path)
    if kind == "flickr_kaggle":
        return read_kaggle_flickr(path, roots.get("flickr_kaggle"))
    if kind == "csv":
        return read_csv_pairs(path, roots.get("csv", roots.get("pairs")), columns)
    for needed in ("vg", "coco"):
        if kind == needed and not roots.get(needed):
            raise DataError(f"{path} is a {'Visual Genome region_descriptions' if needed == 'vg' else 'COCO Karpathy'} "
                            f"file: give its image folder with --{needed}_image_root")
    if kind == "vg":
        return read_vg_regions(path, roots["vg"], vg_min_words, vg_min_area, data=data)
    if kind == "dlip":
        return read_dlip(path, data=data)
    return read_pair_list(path, roots.get(kind), kind=kind, data=data)


def pretrain_entries(path: PathLike, entries: Any = None) -> Optional[tuple[list[dict], list[str]]]:
    """For ``data/pretrain.py``: ``(entries, where)`` of a Kaggle Flickr30k ``results.csv`` or of a
    DLIP ``all.json`` (its parsed ``entries`` when already read) as ``{"image", "caption"}`` entries,
    images as written (the dataset joins its ``image_root``), strictly checked (an empty caption is
    an error); None for any other file (a pair list, read as it is). Malformed Kaggle rows are
    skipped with a warning naming them."""
    if entries is None and is_kaggle_csv(path):
        corpus = read_kaggle_flickr(path, None, strict=True)
    elif entries is not None and is_dlip_list(entries):
        corpus = read_dlip(path, strict=True, data=entries)
    else:
        return None
    if corpus.skipped:
        logger.warning("%s: skipped %s: %s", path, ", ".join(f"{n} {r}(s)" for r, n in corpus.skipped.items()),
                       "; ".join(w for ws in corpus.examples.values() for w in ws))
    if not corpus.image:
        raise DataError(f"{path}: no pairs (every row skipped)")
    return [{"image": i, "caption": c} for i, c in zip(corpus.image, corpus.caption)], corpus.where
