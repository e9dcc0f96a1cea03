"""Scenes of coloured shapes: the attribute vocabulary, random sampling and rendering.

A scene is a tuple of 1-3 `Shape`s, each in its own image region. Everything here is shared by
the benchmark parts (retrieval now; ImageCoDe-style sets and MMVP-style pairs later build
near-duplicate scenes from the same pieces).

Geometry is chosen for a ViT with patch 16 at the default 64 px (a 4x4 patch grid): a 'small'
shape is ~12 px across (most of one patch), a 'big' one ~19 px (> one patch in every placement),
and the five regions are laid out so that no two shapes of one scene overlap.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Sequence

from PIL import Image, ImageDraw

# Fill colours, all far from the grey background and from each other (orange vs yellow vs red
# differ by >80 in some channel even after jitter), so colour is learnable from a few pixels.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 225),
    "yellow": (245, 225, 30),
    "purple": (140, 45, 185),
    "orange": (250, 135, 10),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "big")
POSITIONS = ("left", "right", "top", "bottom", "center")

BACKGROUND = (128, 128, 128)
BACKGROUND_JITTER = 10  # one brightness offset per image: still plain grey, never one constant
COLOUR_JITTER = 12  # per channel, per shape: colour words must not map to one exact RGB

# Region centres as fractions of the image side (x, y).
_CENTRES = {
    "left": (0.2, 0.5),
    "right": (0.8, 0.5),
    "top": (0.5, 0.2),
    "bottom": (0.5, 0.8),
    "center": (0.5, 0.5),
}
# Half extent as a fraction of the side. left/right centres are 0.3 away from the centre region:
# two big shapes (0.145 + 0.145) plus their jitter (2 x 0.005) still leave a gap.
_HALF_EXTENT = {"small": 0.095, "big": 0.145}
_CENTRE_JITTER = {"small": 0.03, "big": 0.005}
_SUPERSAMPLE = 4  # draw at 4x and box-downsample: anti-aliased edges, still deterministic


@dataclass(frozen=True)
class Shape:
    """One shape of a scene; every field is one of the attribute words above."""

    colour: str
    shape: str
    size: str
    position: str

    @property
    def kind(self) -> tuple[str, str, str]:
        """What a caption can group by: 'two big red circles' share (size, colour, shape)."""
        return (self.size, self.colour, self.shape)


Scene = tuple[Shape, ...]


def signature(scene: Scene) -> frozenset[Shape]:
    """The attribute signature of a scene: the set of its shapes (positions are distinct)."""
    return frozenset(scene)


def scene_to_json(scene: Scene) -> list[dict[str, str]]:
    return [asdict(s) for s in scene]


def sample_scene(
    rng: random.Random,
    count_weights: Sequence[float] = (0.6, 0.3, 0.1),
    same_kind_prob: float = 0.25,
) -> Scene:
    """Draw a scene of 1..len(count_weights) shapes in distinct regions.

    `count_weights[k]` is the relative weight of k+1 shapes: the default favours one-shape
    scenes so a tiny model trained from scratch learns the attribute words first.
    `same_kind_prob`: chance that a further shape copies the first one's (size, colour, shape),
    so that counted captions ("two big red circles ...") occur.
    """
    if not 1 <= len(count_weights) <= len(POSITIONS):
        raise ValueError(f"count_weights must have 1..{len(POSITIONS)} entries, got {count_weights}")
    n = rng.choices(range(1, len(count_weights) + 1), weights=count_weights)[0]
    positions = rng.sample(POSITIONS, n)
    first = (rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(SIZES))
    shapes = []
    for i, position in enumerate(positions):
        if i == 0 or rng.random() < same_kind_prob:
            colour, shape, size = first
        else:
            colour, shape, size = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(SIZES)
        shapes.append(Shape(colour, shape, size, position))
    return tuple(shapes)


def sample_unique_scenes(
    rng: random.Random, n: int, count_weights: Sequence[float], max_tries_per_scene: int = 1000
) -> list[Scene]:
    """`n` scenes with pairwise distinct signatures, so complete captions single out one image."""
    scenes: list[Scene] = []
    seen: set[frozenset[Shape]] = set()
    for _ in range(n):
        for _ in range(max_tries_per_scene):
            scene = sample_scene(rng, count_weights)
            if signature(scene) not in seen:
                break
        else:
            raise ValueError(
                f"could not draw {n} scenes with distinct signatures (count_weights={count_weights}); "
                "lower the split size or give more weight to multi-shape scenes"
            )
        seen.add(signature(scene))
        scenes.append(scene)
    return scenes


def _jitter(rng: random.Random, rgb: tuple[int, int, int], amount: int) -> tuple[int, ...]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)


def render_scene(scene: Scene, image_size: int, rng: random.Random) -> Image.Image:
    """Draw `scene` as an RGB image of `image_size` x `image_size` pixels.

    `rng` only adds small jitter (background tint, fill colour, exact centre); the attribute
    words stay true for every draw.
    """
    img, draw = _canvas(image_size, rng)
    side = img.size[0]
    # Big shapes first: should regions ever touch, the small one stays fully visible.
    for s in sorted(scene, key=lambda s: s.size != "big"):
        cx, cy = _CENTRES[s.position]
        j = _CENTRE_JITTER[s.size]
        cx = (cx + rng.uniform(-j, j)) * side
        cy = (cy + rng.uniform(-j, j)) * side
        _draw_shape(draw, s.shape, cx, cy, _HALF_EXTENT[s.size] * side, _jitter(rng, COLOURS[s.colour], COLOUR_JITTER))
    return img.reduce(_SUPERSAMPLE)


@dataclass(frozen=True)
class PlacedShape:
    """A shape at an explicit centre (fractions of the image side): frames of moving shapes."""

    colour: str
    shape: str
    size: str
    x: float
    y: float


def render_placed(shapes: Sequence[PlacedShape], image_size: int, rng: random.Random,
                  centre_jitter: float = 0.0) -> Image.Image:
    """Draw shapes at given centres (big ones first), with the same jitter of tint and colour as
    `render_scene` plus up to `centre_jitter` (fraction of the side) on each centre."""
    img, draw = _canvas(image_size, rng)
    side = img.size[0]
    for s in sorted(shapes, key=lambda s: s.size != "big"):
        cx = (s.x + rng.uniform(-centre_jitter, centre_jitter)) * side
        cy = (s.y + rng.uniform(-centre_jitter, centre_jitter)) * side
        _draw_shape(draw, s.shape, cx, cy, _HALF_EXTENT[s.size] * side, _jitter(rng, COLOURS[s.colour], COLOUR_JITTER))
    return img.reduce(_SUPERSAMPLE)


def region_centre(position: str) -> tuple[float, float]:
    """The centre (x, y) of a region, as fractions of the image side, before jitter."""
    return _CENTRES[position]


def half_extent(size: str) -> float:
    """Half the drawn extent of a shape of `size`, as a fraction of the image side."""
    return _HALF_EXTENT[size]


def _canvas(image_size: int, rng: random.Random) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """A supersampled grey canvas with this image's background tint."""
    side = image_size * _SUPERSAMPLE
    shade = rng.randint(-BACKGROUND_JITTER, BACKGROUND_JITTER)
    img = Image.new("RGB", (side, side), tuple(c + shade for c in BACKGROUND))
    return img, ImageDraw.Draw(img)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, h: float,
                fill: tuple[int, ...]) -> None:
    """One filled shape of half extent `h` centred at (cx, cy), in canvas pixels."""
    if shape == "circle":
        draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "square":
        # A square of the same half extent looks bigger than the circle; shrink it a bit.
        q = 0.9 * h
        draw.rectangle((cx - q, cy - q, cx + q, cy + q), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
