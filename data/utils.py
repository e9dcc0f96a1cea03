"""Small, dependency-free helpers shared by the datasets: caption cleaning, image, text, json and CSV
reading, and time-based progress lines for long loops.

Every error raised here names the file it is about, and ``context`` (for example
``"entry 17 of /x/coco_karpathy_test.json"``) so that a user with 500k annotation entries can find
the one that is broken without a debugger.
"""
from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from utils.errors import DataError, json_error

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

# The punctuation BLIP strips from captions (docs/FORMATS.md section 1).
_CAPTION_PUNCT = re.compile(r"[.!\"()*#:;~]")
_WHITESPACE_RUN = re.compile(r"\s+")

# Transparent pixels are composited onto this colour. BLIP's own loader does `.convert("RGB")`,
# which drops alpha and shows whatever colour the encoder left under it (often black); white is what
# image viewers and web pages show for transparent PNG logos and product shots. COCO/Flickr are
# JPEGs without alpha, so this never changes results on the standard benchmarks.
ALPHA_BACKGROUND = (255, 255, 255)

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


class BadImageError(DataError):
    """An image file exists but cannot be decoded (corrupt, truncated, unsupported mode, bomb)."""


def pre_caption(caption: str, max_words: int = 30) -> str:
    """Clean a caption the way BLIP does (docs/FORMATS.md section 1).

    Lowercase; each of ``. ! " ( ) * # : ; ~`` becomes a space; every run of whitespace becomes one
    space; strip; keep the first ``max_words`` words.
    """
    caption = _CAPTION_PUNCT.sub(" ", caption.lower())
    caption = _WHITESPACE_RUN.sub(" ", caption).strip()
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def _describe(path: PathLike, context: str) -> str:
    return f"{path} ({context})" if context else f"{path}"


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Round and clip a float array to uint8."""
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _minmax_to_uint8(values: np.ndarray) -> np.ndarray:
    """Stretch the finite range of ``values`` onto 0..255; NaN/inf and constant images become 0."""
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, np.uint8)
    lo, hi = float(values[finite].min()), float(values[finite].max())
    out = np.zeros(values.shape, np.float64)
    if hi > lo:
        out[finite] = (values[finite] - lo) * (255.0 / (hi - lo))
    return _to_uint8(out)


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """Map a 16/32-bit integer or float single-channel image to 8-bit "L".

    PIL's own ``convert("L")`` clips these modes instead of scaling them, which turns most 16-bit
    photographs white. The rules:

    - ``I;16*`` (0..65535): divide by 257, so 65535 -> 255 and 257*k -> k exactly.
    - ``I`` (int32): older Pillow versions open 16-bit PNGs as ``I``, so values that fit in
      0..65535 are treated as 16-bit (divide by 257); anything else is stretched from the image's
      min..max onto 0..255.
    - ``F`` (float32): values inside [0, 1] are taken as normalised intensities (times 255);
      anything else (depth maps, HDR) is stretched from the image's finite min..max onto 0..255.
    """
    values = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16"):
        out = _to_uint8(values / 257.0)
    elif img.mode == "I":
        if values.size and values.min() >= 0 and values.max() <= 65535:
            out = _to_uint8(values / 257.0)
        else:
            out = _minmax_to_uint8(values)
    else:  # "F"
        finite = np.isfinite(values)
        if finite.all() and values.size and values.min() >= 0.0 and values.max() <= 1.0:
            out = _to_uint8(values * 255.0)
        else:
            out = _minmax_to_uint8(values)
    return Image.fromarray(out, mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB (see ``load_image`` for the rules)."""
    if img.mode.startswith("I") or img.mode == "F":
        img = _high_depth_to_l(img)
    has_alpha = img.mode in _ALPHA_MODES or "transparency" in img.info
    if has_alpha:
        # P/L/RGB with a tRNS chunk carry their transparency in `info`; convert("RGBA") applies it.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _check_exists(path: PathLike, context: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file missing: {_describe(path, context)}")


def load_image(path: PathLike, *, context: str = "") -> Image.Image:
    """Open and fully decode an image file as an 8-bit RGB PIL image.

    - L, 1, P, CMYK, YCbCr, ...: PIL's ``convert("RGB")``.
    - Anything with transparency (RGBA, LA, PA, P/L/RGB with a transparency entry): composited onto
      white (``ALPHA_BACKGROUND``); BLIP drops alpha instead (identical on COCO/Flickr: no alpha).
    - 16/32-bit integer and float images: scaled to 8 bit, see ``_high_depth_to_l``.
    - Multi-frame files (GIF, TIFF): the first frame. EXIF orientation is NOT applied (neither does
      BLIP, and the published numbers come from unrotated pixels).

    Raises:
        FileNotFoundError: the file does not exist ("image file missing: <path> (<context>)").
        BadImageError: it exists but cannot be decoded
            ("unreadable image: <path> (<context>): ...").
    """
    _check_exists(path, context)
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # OSError covers UnidentifiedImageError and truncated data; SyntaxError is what some PIL
        # plugins raise on malformed headers.
        raise BadImageError(f"unreadable image: {_describe(path, context)}: {exc}") from exc


def decode_image(data: bytes, *, context: str) -> Image.Image:
    """``load_image`` for image bytes held in memory (a tar member, a parquet cell): the same
    conversions; ``BadImageError`` naming ``context`` when they do not decode."""
    import io
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadImageError(f"unreadable image: {context}: {exc}") from exc


def check_image(path: PathLike, *, context: str = "") -> None:
    """Cheap validity check: the file exists and PIL recognises its header (no pixel decode).

    Catches missing, empty and non-image files; a file truncated in the middle of its pixel data is
    only caught by ``load_image``. Raises the same exceptions as ``load_image``.
    """
    _check_exists(path, context)
    try:
        with Image.open(path) as img:
            width, height = img.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadImageError(f"unreadable image: {_describe(path, context)}: {exc}") from exc
    if width <= 0 or height <= 0:
        raise BadImageError(f"unreadable image: {_describe(path, context)}: size {width}x{height}")


def read_text(path: PathLike) -> str:
    """The text of a UTF-8 file (a leading BOM is dropped).

    Raises:
        FileNotFoundError: naming the path.
        ValueError: a byte that is not UTF-8, naming the file, the line and the column (a bare
            UnicodeDecodeError names only a byte offset, useless in a 500k-line file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}, line {line}: not valid UTF-8 (byte "
                         f"0x{data[exc.start]:02x} at column {exc.start - line_start + 1}: {exc.reason}); "
                         "save the file as UTF-8") from None


def read_json(path: PathLike) -> Any:
    """Read a json file (UTF-8, a leading BOM is tolerated).

    Raises:
        FileNotFoundError: naming the path.
        ValueError: malformed json, naming the file, line, column and character offset; a file
            that is not UTF-8, naming the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"json file not found: {path}")
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: {json_error(exc)} (char {exc.pos})") from exc


@dataclass(frozen=True)
class CsvRow:
    """One data row of a CSV file: its 0-based index among the data rows (blank lines not
    counted), the 1-based line it starts on, and its fields in header order."""
    index: int
    line: int
    fields: list[str]

    def where(self, path: PathLike) -> str:
        return f"row {self.index} (line {self.line}) of {path}"


def csv_delimiter(path: PathLike) -> str:
    """Tab for a ``.tsv`` file, comma otherwise."""
    return "\t" if str(path).lower().endswith(".tsv") else ","


def read_csv(path: PathLike, delimiter: Optional[str] = None) -> tuple[list[str], list[CsvRow]]:
    """The header and the data rows of a UTF-8 CSV file (TSV: ``delimiter`` tab, the default for
    a ``.tsv`` file). Quoted fields may hold the delimiter and line breaks; blank lines are skipped.

    Raises:
        FileNotFoundError: naming the path.
        ValueError: naming the file and the line: not UTF-8, no header, malformed quoting, or a row
            with more or fewer fields than the header (an unquoted comma inside a caption would
            otherwise shift every later field of the row silently).
    """
    delimiter = delimiter or csv_delimiter(path)
    reader = csv.reader(io.StringIO(read_text(path), newline=""), delimiter=delimiter)
    rows: list[CsvRow] = []
    line = 1
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty file; a CSV file needs a header row naming its columns")
        line = reader.line_num + 1
        for fields in reader:
            if fields and not (len(fields) == 1 and not fields[0].strip()):  # not a blank line
                if len(fields) != len(header):
                    hint = (f"; a field that contains {delimiter!r} must be quoted" if len(fields) > len(header)
                            else "")
                    raise DataError(f"{path}, line {line}: row {len(rows)} has {len(fields)} fields but the header "
                                     f"has {len(header)} ({delimiter.join(header)}): {short_repr(fields)}{hint}")
                rows.append(CsvRow(len(rows), line, fields))
            line = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(f"{path}, line {line}: malformed CSV: {exc}") from None
    return header, rows


def short_repr(value: Any, limit: int = 200) -> str:
    """``repr(value)``, cut to ``limit`` characters for a message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
