"""The MMVP part: MMVP-VLM-style pairs of shape images in the release's exact layout (docs/FORMATS.md 4).

Layout under `<out>/mmvp/` (the folder `eval_mmvp.py` takes as `data_root`):

    Questions.csv                          Question ID,Type,Statement; rows 2k-1, 2k form pair k
    MLLM_VLM Images/<Type>/<qid>.jpg       the nine Type folders of the release ("Camera Perspective", ...)
    meta.json                              counts, vocab size, seed and arguments (written by `generate`)

Pairs come pattern by pattern in the release's order, `pairs_per_pattern` each (15, as released), so
`PATTERNS[p // 15]` names the pattern of pair p. The two images of a pair differ only in their
pattern and each statement is true of its own image only; which variant comes first is random.
Statements reuse the retrieval captions' words where the pattern allows (colour, shape, size,
count, position), so a BLIP trained on the retrieval part has a fair chance there; orientation,
presence, state, text and viewpoint need words and pixels the retrieval part never shows.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

from PIL import Image, ImageDraw

from data.mmvp import IMAGE_FOLDER, PATTERNS, PROMPT_PREFIX, QUESTIONS_FILE, TYPE_FOLDERS

from .captions import NUMBER_WORDS, POSITION_PHRASES
from .retrieval import PartOutput
from .scenes import (COLOUR_JITTER, COLOURS, SHAPES, Scene, Shape, _canvas, _draw_shape, _jitter, _SUPERSAMPLE,
                     half_extent, render_scene)

JPEG_QUALITY = 95

# A painter draws one image on a supersampled canvas: painter(image, its draw handle, rng).
Painter = Callable[[Image.Image, ImageDraw.ImageDraw, random.Random], None]
# (statement, what to draw): a painter, or a scene of shapes drawn as the retrieval part draws them.
Variant = tuple[str, Union[Painter, Scene]]


@dataclass
class MMVPSpec:
    """Arguments of the MMVP part (CLI flag of `python -m data.synthetic`)."""

    pairs_per_pattern: int = 15  # the release: 15 pairs x 9 patterns = 270 images

    def __post_init__(self) -> None:
        if self.pairs_per_pattern < 1:
            raise ValueError(f"pairs_per_pattern must be >= 1, got {self.pairs_per_pattern}")


def mmvp_paths(out_dir: Path) -> dict[str, str]:
    root = out_dir / "mmvp"
    return {"root": str(root), "data_root": str(root), "questions": str(root / QUESTIONS_FILE),
            "image_folder": str(root / IMAGE_FOLDER), "meta": str(root / "meta.json")}


# ----------------------------------------------------------------------------- drawing

def _colour(name: str, rng: random.Random) -> tuple[int, ...]:
    return _jitter(rng, COLOURS[name], COLOUR_JITTER)


def _centre(side: int) -> tuple[float, float, float]:
    """Centre and half extent (canvas pixels) of one big object in the middle of the image."""
    return side / 2, side / 2, half_extent("big") * side * 1.4


def _triangle(colour: str, direction: str) -> Painter:
    turns = {"up": 0, "right": 1, "down": 2, "left": 3}[direction]

    def paint(img, draw, rng):
        side = img.size[0]
        cx, cy, h = _centre(side)
        points = [(0.0, -1.0), (0.7, 1.0), (-0.7, 1.0)]  # a pointed triangle: its tip shows the way
        for _ in range(turns):
            points = [(-y, x) for x, y in points]  # a quarter turn clockwise (y grows downwards)
        draw.polygon([(cx + h * x, cy + h * y) for x, y in points], fill=_colour(colour, rng))
    return paint


def _with_dot(colour: str, shape: str, dot: str | None) -> Painter:
    def paint(img, draw, rng):
        side = img.size[0]
        cx, cy, h = _centre(side)
        _draw_shape(draw, shape, cx, cy, h, _colour(colour, rng))
        if dot is not None:
            _draw_shape(draw, "circle", cx, cy + (0.25 * h if shape == "triangle" else 0), 0.3 * h, _colour(dot, rng))
    return paint


def _filled(colour: str, shape: str, hollow: bool) -> Painter:
    def paint(img, draw, rng):
        side = img.size[0]
        cx, cy, h = _centre(side)
        _draw_shape(draw, shape, cx, cy, h, _colour(colour, rng))
        if hollow:  # cut the inside out again with the background's own tint
            inner = 0.55 if shape == "triangle" else 0.7
            _draw_shape(draw, shape, cx, cy + (0.2 * h if shape == "triangle" else 0), inner * h,
                        img.getpixel((0, 0)))
    return paint


# Seven-segment digits: a top, b top right, c bottom right, d bottom, e bottom left, f top left, g middle.
_SEGMENTS = {"0": "abcdef", "1": "bc", "2": "abged", "3": "abgcd", "4": "fgbc", "5": "afgcd",
             "6": "afgedc", "7": "abc", "8": "abcdefg", "9": "abcdfg"}


def _sign(colour: str, digit: str) -> Painter:
    def paint(img, draw, rng):
        side = img.size[0]
        cx, cy = side / 2, side / 2
        draw.rounded_rectangle((cx - 0.3 * side, cy - 0.36 * side, cx + 0.3 * side, cy + 0.36 * side),
                               radius=0.06 * side, fill=_colour(colour, rng))
        w, hh, t = 0.13 * side, 0.22 * side, 0.05 * side  # half width, half height, stroke
        boxes = {"a": (-w, -hh, w, -hh + t), "g": (-w, -t / 2, w, t / 2), "d": (-w, hh - t, w, hh),
                 "f": (-w, -hh, -w + t, 0), "b": (w - t, -hh, w, 0), "e": (-w, 0, -w + t, hh), "c": (w - t, 0, w, hh)}
        ink = _colour("black", rng)
        for seg in _SEGMENTS[digit]:
            x0, y0, x1, y1 = boxes[seg]
            draw.rectangle((cx + x0, cy + y0, cx + x1, cy + y1), fill=ink)
    return paint


def _can(colour: str, view: str) -> Painter:
    def paint(img, draw, rng):
        side = img.size[0]
        cx, cy, h = _centre(side)
        body = _colour(colour, rng)
        lid = tuple((c + 255) // 2 for c in body)
        if view == "above":  # a disc with its lid's rim
            draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=body)
            draw.ellipse((cx - 0.75 * h, cy - 0.75 * h, cx + 0.75 * h, cy + 0.75 * h), fill=lid)
        else:  # an upright cylinder: body, rounded bottom, flat elliptic lid
            w, e = 0.7 * h, 0.25 * h
            draw.ellipse((cx - w, cy + h - 2 * e, cx + w, cy + h), fill=body)
            draw.rectangle((cx - w, cy - h + e, cx + w, cy + h - e), fill=body)
            draw.ellipse((cx - w, cy - h, cx + w, cy - h + 2 * e), fill=lid)
    return paint


# ----------------------------------------------------------------------------- the nine patterns

_OBJECT_COLOURS = [c for c in COLOURS if c not in ("white", "black")]


def _two(rng: random.Random, options) -> tuple:
    return tuple(rng.sample(list(options), 2))


def _orientation(rng: random.Random) -> list[Variant]:
    colour = rng.choice(_OBJECT_COLOURS)
    a, b = rng.choice([("up", "down"), ("left", "right")])
    return [(f"A {colour} triangle pointing {d}.", _triangle(colour, d)) for d in (a, b)]


def _presence(rng: random.Random) -> list[Variant]:
    colour, shape = rng.choice(_OBJECT_COLOURS), rng.choice(("circle", "square"))
    dot = rng.choice([c for c in ("white", "black") if c != colour])
    return [(f"A big {colour} {shape} with a {dot} dot.", _with_dot(colour, shape, dot)),
            (f"A big {colour} {shape} without a dot.", _with_dot(colour, shape, None))]


def _state(rng: random.Random) -> list[Variant]:
    colour, shape = rng.choice(_OBJECT_COLOURS), rng.choice(SHAPES)
    return [(f"A filled {colour} {shape}.", _filled(colour, shape, False)),
            (f"A hollow {colour} {shape}.", _filled(colour, shape, True))]


def _quantity(rng: random.Random) -> list[Variant]:
    colour, shape, size = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(("small", "big"))
    out = []
    for n in _two(rng, (1, 2, 3)):
        scene = tuple(Shape(colour, shape, size, p) for p in rng.sample(list(POSITION_PHRASES), n))
        noun = shape + ("s" if n > 1 else "")
        out.append((f"{NUMBER_WORDS[n].capitalize()} {size} {colour} {noun}.", scene))
    return out


def _spatial(rng: random.Random) -> list[Variant]:
    (c1, c2), (s1, s2) = _two(rng, COLOURS), (rng.choice(SHAPES), rng.choice(SHAPES))
    p1, p2 = rng.choice([("left", "right"), ("top", "bottom")])
    out = []
    for a, b in ((p1, p2), (p2, p1)):
        scene = (Shape(c1, s1, "big", a), Shape(c2, s2, "big", b))
        text = f"A {c1} {s1} {POSITION_PHRASES[a][0]} and a {c2} {s2} {POSITION_PHRASES[b][0]}."
        out.append((text, scene))
    return out


def _color(rng: random.Random) -> list[Variant]:
    shape = rng.choice(SHAPES)
    return [(f"A big {c} {shape}.", (Shape(c, shape, "big", "center"),)) for c in _two(rng, COLOURS)]


def _structure(rng: random.Random) -> list[Variant]:
    colour = rng.choice(list(COLOURS))
    return [(f"A big {colour} {s}.", (Shape(colour, s, "big", "center"),)) for s in _two(rng, SHAPES)]


def _text(rng: random.Random) -> list[Variant]:
    colour = rng.choice(("white", "yellow", "orange"))
    return [(f"A sign with the number {d}.", _sign(colour, d)) for d in _two(rng, _SEGMENTS)]


def _viewpoint(rng: random.Random) -> list[Variant]:
    colour = rng.choice(_OBJECT_COLOURS)
    return [(f"A {colour} can seen from the side.", _can(colour, "side")),
            (f"A {colour} can seen from above.", _can(colour, "above"))]


# In PATTERNS order (data/mmvp.py).
_MAKERS = (_orientation, _presence, _state, _quantity, _spatial, _color, _structure, _text, _viewpoint)


def _render(painter: Painter | Scene, image_size: int, rng: random.Random):
    if isinstance(painter, tuple):
        return render_scene(painter, image_size, rng)
    img, draw = _canvas(image_size, rng)
    painter(img, draw, rng)
    return img.reduce(_SUPERSAMPLE)


def write_mmvp(out_dir: Path, seed: int, image_size: int, spec: MMVPSpec) -> PartOutput:
    """Render every pair and write Questions.csv; return the paths, all prompts and counts."""
    paths = mmvp_paths(out_dir)
    folder = Path(paths["image_folder"])
    rows, texts, qid = [], [], 0
    for pattern, type_name, make in zip(PATTERNS, TYPE_FOLDERS, _MAKERS):
        content = random.Random(f"{seed}/mmvp/{type_name}/content")
        render = random.Random(f"{seed}/mmvp/{type_name}/render")
        type_dir = folder / type_name
        type_dir.mkdir(parents=True, exist_ok=True)
        for old in type_dir.glob("*.jpg"):  # images of an earlier run (only ours: <qid>.jpg)
            if old.stem.isdigit():
                old.unlink()
        for _ in range(spec.pairs_per_pattern):
            variants = make(content)
            content.shuffle(variants)  # which variant is the pair's first row carries no signal
            for statement, painter in variants:
                qid += 1
                _render(painter, image_size, render).save(type_dir / f"{qid}.jpg", format="JPEG", quality=JPEG_QUALITY)
                rows.append((qid, type_name, statement))
                texts.append(PROMPT_PREFIX + statement)
    with open(paths["questions"], "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["Question ID", "Type", "Statement"])
        writer.writerows(rows)
    meta = {"pairs_per_pattern": spec.pairs_per_pattern, "pairs": len(rows) // 2, "images": len(rows),
            "types": dict(zip(PATTERNS, TYPE_FOLDERS))}
    return PartOutput(paths=paths, captions=texts, meta=meta)
