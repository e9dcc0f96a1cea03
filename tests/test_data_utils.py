"""Data utilities (data/utils.py): caption cleaning (pre_caption), image loading (load_image: every
mode to RGB, missing and corrupt files), json reading (read_json)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.utils import BadImageError, load_image, pre_caption, read_json
from tests.scripts.data_files import _rgb, _write_json


# ---------------------------------------------------------------- pre_caption
@pytest.mark.parametrize("raw, expected", [
    ("A Man riding a Horse.", "a man riding a horse"),
    ('"Hi!" (said) *the* #dog: ok; ~yes', "hi said the dog ok yes"),
    ("  lots   of\t\tspace \n here \n", "lots of space here"),
    ("keep, commas & hyphens-too?", "keep, commas & hyphens-too?"),
    ("...", ""),
])
def test_pre_caption_cleans_like_blip(raw, expected):
    assert pre_caption(raw) == expected


def test_pre_caption_truncates_to_max_words():
    caption = " ".join(f"w{i}" for i in range(40))
    assert pre_caption(caption).split() == [f"w{i}" for i in range(30)]
    assert pre_caption("one. two three", max_words=2) == "one two"


# ---------------------------------------------------------------- load_image
def _roundtrip(tmp_path: Path, img: Image.Image, name: str) -> Image.Image:
    path = tmp_path / name
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == img.size
    return out


def test_load_image_grayscale_and_bilevel(tmp_path):
    gray = _roundtrip(tmp_path, Image.new("L", (4, 3), 77), "l.png")
    assert gray.getpixel((0, 0)) == (77, 77, 77)
    bilevel = Image.new("1", (4, 3), 0)
    bilevel.putpixel((1, 1), 1)
    out = _roundtrip(tmp_path, bilevel, "one.png")
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 1)) == (255, 255, 255)


def test_load_image_alpha_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 3), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (10, 20, 30, 255))
    rgba.putpixel((2, 2), (0, 0, 0, 128))
    out = _roundtrip(tmp_path, rgba, "rgba.png")
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == (10, 20, 30)
    assert all(abs(c - 127) <= 1 for c in out.getpixel((2, 2)))  # half-transparent black

    la = Image.new("LA", (4, 3), (0, 0))
    la.putpixel((1, 1), (40, 255))
    out = _roundtrip(tmp_path, la, "la.png")
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (40, 40, 40)


def test_load_image_palette_with_and_without_transparency(tmp_path):
    pal = Image.new("P", (4, 3), 0)
    pal.putpalette([0, 0, 0, 250, 10, 20] + [0] * 762)
    pal.putpixel((1, 1), 1)
    out = _roundtrip(tmp_path, pal, "p.png")
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 1)) == (250, 10, 20)

    path = tmp_path / "p_trns.png"
    pal.save(path, transparency=0)
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" in check.info
    out = load_image(path)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (250, 10, 20)


def test_load_image_cmyk(tmp_path):
    cmyk = Image.new("CMYK", (4, 3), (0, 0, 0, 0))
    cmyk.putpixel((1, 1), (0, 255, 255, 0))  # full magenta + yellow = red
    out = _roundtrip(tmp_path, cmyk, "cmyk.tif")
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (255, 0, 0)


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_load_image_16bit_scales_by_257(tmp_path, mode):
    img = Image.new(mode, (4, 1))
    for x, value in enumerate([0, 257, 25700, 65535]):
        img.putpixel((x, 0), value)
    path = tmp_path / "g16.png"
    img.save(path)
    out = load_image(path)
    assert [out.getpixel((x, 0))[0] for x in range(4)] == [0, 1, 100, 255]


def test_load_image_int32_and_float(tmp_path):
    # int32 values inside 0..65535 are 16-bit data (older Pillow opens 16-bit PNGs as "I").
    i32 = Image.fromarray(np.array([[0, 25700, 65535]], dtype=np.int32))
    assert i32.mode == "I"
    out = _roundtrip(tmp_path, i32, "i32.tif")
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 100, 255]
    # float in [0, 1] is a normalised intensity; anything else is stretched min..max.
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    out = _roundtrip(tmp_path, unit, "unit.tif")
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    depth = Image.fromarray(np.array([[-10.0, 10.0, 41.0]], dtype=np.float32))
    out = _roundtrip(tmp_path, depth, "depth.tif")
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 100, 255]


def test_load_image_missing_and_corrupt_messages(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing") as err:
        load_image(tmp_path / "nope.jpg", context="entry 17 of ann.json")
    assert "nope.jpg" in str(err.value) and "entry 17 of ann.json" in str(err.value)

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(BadImageError, match="unreadable") as err:
        load_image(bad, context="entry 3 of x.json")
    assert isinstance(err.value, ValueError)
    assert str(bad) in str(err.value) and "entry 3 of x.json" in str(err.value)

    truncated = tmp_path / "trunc.jpg"
    _rgb(tmp_path / "full.jpg", size=(64, 64))
    truncated.write_bytes((tmp_path / "full.jpg").read_bytes()[:200])
    with pytest.raises(BadImageError, match="trunc.jpg"):
        load_image(truncated)


# ---------------------------------------------------------------- read_json
def test_read_json_errors_name_file_and_position(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.json"):
        read_json(tmp_path / "absent.json")
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"image": "a.jpg",\n   "caption": "x" oops}\n]')
    with pytest.raises(ValueError) as err:
        read_json(broken)
    message = str(err.value)
    assert str(broken) in message and "line 3" in message
    assert "column" in message and "char" in message
    assert read_json(_write_json(tmp_path / "ok.json", [1, 2])) == [1, 2]
