"""The ImageCoDe part: sets of 10 near-identical images and contextual descriptions.

Layout under `<out>/imagecode/`, exactly as the official release (docs/FORMATS.md section 3):

    image-sets/<set_name>/img<N>.jpg      10 per set; video sets: N = frame numbers, not contiguous
    data/train_data.json                  {set_name: {"<position>": description, ...}}
    data/valid_data.json                  same
    data/test_data_unlabeled.json         {set_name: [description, ...]}
    data/analysis/manual_annotation_valid.yaml   phenomenon tags of every valid description
    meta.json                             counts, vocab size, seed and arguments (written by `generate`)

Video sets (`MSR-VTT-`, `video-storytelling-`, `YouCook-` names) are 10 frames of a clip in which one
shape moves along a line to a turning point, reached at a random frame, and back (straight
through when that frame is the first or last), and may change colour once; a static shape may
stand aside. Target positions are spread over all 10 (no position prior to exploit). Static sets (`open-images-` names) are one scene of 2-3 shapes and 9 variants,
each changing one attribute (colour, shape, size, position, one shape more or less).

Descriptions (1-3 per set, each for a different target):
- video, comparative: "the frame where the circle is furthest to the left" (tags `s,cmp`), "the last
  frame before the square turns green" / "the square has just turned green" (`t,col,cmp`). The first
  can be solved by scoring each frame on its own (leftness); the temporal ones cannot: the frames
  before a colour change look alike, only their order tells which is the last.
- static: half of them the shortest combination of facts ("a red circle on the left", "two blue
  squares", "three shapes") true of the target and of none of the other 9 (contextual: only what
  tells it apart), half a complete caption naming every shape (as the retrieval captions do). Tags
  name what tells the target apart: `col` colour, `s` position, `n` size (a nuance), `q` counts.
`cmp` (comparative) is this benchmark's own code, added to the official ones so that analysis can
single out the descriptions that need the other candidates.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .captions import NUMBER_WORDS, POSITION_PHRASES, captions_for, join_list
from .retrieval import PartOutput
from .scenes import (COLOURS, POSITIONS, SHAPES, SIZES, PlacedShape, Scene, Shape,
                     render_placed, render_scene, sample_scene, signature)

SPLITS = ("train", "valid", "test")
SPLIT_FILES = {"train": "train_data.json", "valid": "valid_data.json", "test": "test_data_unlabeled.json"}
TAG_FILE = "analysis/manual_annotation_valid.yaml"
VIDEO_PREFIXES = ("MSR-VTT-", "video-storytelling-", "YouCook-")
STATIC_PREFIX = "open-images-"
N_CANDIDATES = 10
# Our set folders, and only those, are removed when the part is written again.
_OWN_SET = re.compile(r"^(MSR-VTT-|video-storytelling-|YouCook-|open-images-)synth-(train|valid|test)-\d+$")
JPEG_OPTIONS = {"format": "JPEG", "quality": 95, "subsampling": 0}  # 4:4:4: small shapes keep their colour


@dataclass
class ImageCodeSpec:
    """Arguments of the ImageCoDe part (CLI flags of `python -m data.synthetic`)."""

    n_train_sets: int = 1500
    n_valid_sets: int = 150
    n_test_sets: int = 80
    static_frac: float = 0.3  # share of static (open-images) sets
    max_descriptions: int = 3  # per set (1..3 as in ImageCoDe)

    def __post_init__(self) -> None:
        for name in ("n_train_sets", "n_valid_sets", "n_test_sets"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.static_frac <= 1.0:
            raise ValueError(f"static_frac must be in [0, 1], got {self.static_frac}")
        if not 1 <= self.max_descriptions <= 3:
            raise ValueError(f"max_descriptions must be in [1, 3], got {self.max_descriptions}")


@dataclass
class ImageSet:
    name: str
    frames: list[int]  # the N of img<N>.jpg, in candidate (numeric) order
    images: list[Image.Image]
    descriptions: list[tuple[int, str, str]]  # (target position, text, comma-separated tags)


def imagecode_paths(out_dir: Path) -> dict[str, str]:
    root = out_dir / "imagecode"
    paths = {"root": root, "image_root": root / "image-sets", "ann_root": root / "data",
             "tag_file": root / "data" / TAG_FILE, "meta": root / "meta.json"}
    for split, name in SPLIT_FILES.items():
        paths[f"{split}_file"] = root / "data" / name
    return {k: str(v) for k, v in paths.items()}


def _rng(seed: int, split: str, stream: str) -> random.Random:
    return random.Random(f"{seed}/imagecode/{split}/{stream}")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ----------------------------------------------------------------------------- video sets

_LO, _HI = 0.22, 0.78  # centre range of a moving shape (a big one stays inside the image)
_FREE_TRIES = 200  # draws of a clip or a variant before giving up
_EDGE_KEEP = 0.3  # chance of describing an extreme on the first or last frame
_MIN_MARGIN = 0.04  # an extreme frame must beat the runner-up by this much (2.5 px at 64 px)
_EXTREME_PHRASES = {
    ("x", "min"): ("the frame where the {np} is furthest to the left", "the {np} is as far left as it gets",
                   "the {np} is furthest left"),
    ("x", "max"): ("the frame where the {np} is furthest to the right", "the {np} is as far right as it gets",
                   "the {np} is furthest right"),
    ("y", "min"): ("the frame where the {np} is closest to the top", "the {np} is at its highest",
                   "the {np} is as high as it gets"),
    ("y", "max"): ("the frame where the {np} is closest to the bottom", "the {np} is at its lowest",
                   "the {np} is as low as it gets"),
}
_BEFORE_PHRASES = ("the last frame before the {shape} turns {new}", "the {shape} is still {old}, just before it turns {new}",
                   "the {old} {shape} right before it turns {new}")
_AFTER_PHRASES = ("the first frame where the {shape} is {new}", "the {shape} has just turned {new}",
                  "the {shape} has just turned from {old} to {new}")


def _frame_numbers(rng: random.Random) -> list[int]:
    """10 increasing, non-contiguous frame numbers; most runs cross 9 -> 10 (text order breaks)."""
    frames = [rng.randint(0, 8)]
    for _ in range(N_CANDIDATES - 1):
        frames.append(frames[-1] + rng.randint(2, 7))
    return frames


def _coords(rng: random.Random, times: list[float]) -> list[float]:
    """The moving shape's coordinate at each frame time: it travels to a turning point reached at
    a uniformly chosen frame (the first or last one: a straight pass), then back. The turning
    point is the strict extreme, so "furthest ..." targets are spread over all positions."""
    peak = rng.randrange(N_CANDIDATES)
    high = rng.random() < 0.5
    top = rng.uniform(_HI - 0.08, _HI) if high else rng.uniform(_LO, _LO + 0.08)
    def far() -> float:  # a point well on the other side of the turning point
        return rng.uniform(_LO, top - 0.3) if high else rng.uniform(top + 0.3, _HI)
    start, end = far(), far()
    t_peak = times[peak]
    out = []
    for t in times:
        if t <= t_peak:
            out.append(top if t_peak == 0 else start + (top - start) * t / t_peak)
        else:
            out.append(top + (end - top) * (t - t_peak) / (1 - t_peak))
    return out


@dataclass
class _Clip:
    shape: str
    size: str
    old: str
    new: str
    axis: str
    frames: list[int]
    coords: list[float]  # the moving shape's coordinate along `axis`, per frame
    other: float  # its fixed coordinate
    change: int | None  # first position in the new colour
    still: list[PlacedShape]


def _clip(rng: random.Random) -> _Clip:
    shape, size, old = rng.choice(SHAPES), rng.choice(SIZES), rng.choice(list(COLOURS))
    axis = rng.choice(("x", "y"))
    frames = _frame_numbers(rng)
    coords = _coords(rng, [(f - frames[0]) / (frames[-1] - frames[0]) for f in frames])
    other = 0.5 + rng.uniform(-0.02, 0.02)
    change = rng.randint(2, N_CANDIDATES - 2) if rng.random() < 0.7 else None
    new = rng.choice([c for c in COLOURS if c != old]) if change is not None else old
    still: list[PlacedShape] = []
    if rng.random() < 0.5:  # a shape standing aside, off the moving shape's line
        side, along = rng.choice((0.18, 0.82)), rng.uniform(0.3, 0.7)
        colour = rng.choice([c for c in COLOURS if c not in (old, new)])
        sx, sy = (along, side) if axis == "x" else (side, along)
        still.append(PlacedShape(colour, rng.choice(SHAPES), "small", sx, sy))
    return _Clip(shape, size, old, new, axis, frames, coords, other, change, still)


def _clip_descriptions(clip: _Clip, rng: random.Random) -> list[tuple[int, str, str]]:
    """Every (target, text, tags) the clip supports: strict extremes and the colour change."""
    options = []
    np_ = clip.shape if clip.change is not None else f"{clip.old} {clip.shape}"
    if rng.random() < 0.3:
        np_ = f"{clip.size} {np_}"
    for end in ("min", "max"):
        order = sorted(range(N_CANDIDATES), key=lambda i: clip.coords[i], reverse=end == "max")
        # The first and last frames are the extremes of most clips: describe them less often, so
        # that the target position says little on its own.
        edge = order[0] in (0, N_CANDIDATES - 1) and rng.random() > _EDGE_KEEP
        if abs(clip.coords[order[0]] - clip.coords[order[1]]) >= _MIN_MARGIN and not edge:
            options.append((order[0], rng.choice(_EXTREME_PHRASES[(clip.axis, end)]).format(np=np_), "s,cmp"))
    if clip.change is not None:
        fill = {"shape": clip.shape, "old": clip.old, "new": clip.new}
        options.append((clip.change - 1, rng.choice(_BEFORE_PHRASES).format(**fill), "t,col,cmp"))
        options.append((clip.change, rng.choice(_AFTER_PHRASES).format(**fill), "t,col,cmp"))
    return options


def _video_set(name: str, rng: random.Random, render_rng: random.Random, image_size: int,
               max_desc: int) -> ImageSet:
    for _ in range(_FREE_TRIES):
        clip = _clip(rng)
        options = _clip_descriptions(clip, rng)
        if options:
            break
    else:
        raise RuntimeError("could not draw a clip with an unambiguous description")
    images = []
    for i, c in enumerate(clip.coords):
        colour = clip.new if clip.change is not None and i >= clip.change else clip.old
        x, y = (c, clip.other) if clip.axis == "x" else (clip.other, c)
        moving = PlacedShape(colour, clip.shape, clip.size, x, y)
        images.append(render_placed([moving, *clip.still], image_size, render_rng, centre_jitter=0.004))
    rng.shuffle(options)
    n_desc, chosen, used = rng.randint(1, max_desc), [], set()
    for target, text, tags in options:
        if target not in used and len(chosen) < n_desc:
            chosen.append((target, text, tags))
            used.add(target)
    return ImageSet(name, clip.frames, images, chosen)


# ----------------------------------------------------------------------------- static sets

_COMPLETE_FRAC = 0.5  # static descriptions that name every shape in full (as retrieval captions do)
_ATTRS = ("size", "colour", "position")  # what a fact may add to the shape noun
_TAG_OF = {"colour": "col", "position": "s", "size": "n"}


def _mutate(scene: Scene, rng: random.Random) -> Scene:
    """One attribute of one shape changed, or one shape added or removed."""
    shapes = list(scene)
    free = [p for p in POSITIONS if p not in {s.position for s in scene}]
    kind = rng.choice(["colour", "shape", "size", "position", "count"])
    k = rng.randrange(len(shapes))
    s = shapes[k]
    if kind == "colour":
        shapes[k] = Shape(rng.choice([c for c in COLOURS if c != s.colour]), s.shape, s.size, s.position)
    elif kind == "shape":
        shapes[k] = Shape(s.colour, rng.choice([x for x in SHAPES if x != s.shape]), s.size, s.position)
    elif kind == "size":
        shapes[k] = Shape(s.colour, s.shape, "small" if s.size == "big" else "big", s.position)
    elif kind == "position" and free:
        shapes[k] = Shape(s.colour, s.shape, s.size, rng.choice(free))
    elif len(shapes) > 2 and rng.random() < 0.5:
        del shapes[k]
    elif free:
        copy = rng.random() < 0.5  # often a second shape of the same kind: counting matters
        base = s if copy else Shape(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(SIZES), "")
        shapes.append(Shape(base.colour, base.shape, base.size, rng.choice(free)))
    return tuple(shapes)


Fact = tuple  # ("count", n) or (spec, n): exactly n shapes match the spec
# A spec is a sorted tuple of (attribute, value) pairs: sets would order by string hashes, which
# change from one Python process to the next (and with them the generated descriptions).


def _matches(shape: Shape, spec: tuple) -> bool:
    return all(getattr(shape, k) == v for k, v in spec)


def _holds(fact: Fact, scene: Scene) -> bool:
    if fact[0] == "count":
        return len(scene) == fact[1]
    return sum(_matches(s, fact[0]) for s in scene) == fact[1]


def _facts(scene: Scene) -> list[Fact]:
    facts = {("count", len(scene))}
    for s in scene:
        for r in range(len(_ATTRS) + 1):
            for attrs in itertools.combinations(_ATTRS, r):
                spec = tuple(sorted([("shape", s.shape), *((a, getattr(s, a)) for a in attrs)]))
                facts.add((spec, sum(_matches(x, spec) for x in scene)))
    return sorted(facts, key=repr)  # a fixed order: set iteration order is not reproducible


def _cost(fact: Fact) -> int:
    return 1 if fact[0] == "count" else len(fact[0])


def _describe_fact(fact: Fact, rng: random.Random) -> str:
    if fact[0] == "count":
        return rng.choice(("there are {n} shapes", "only {n} shapes", "{n} shapes in total")).format(
            n=NUMBER_WORDS[fact[1]])
    spec, n = dict(fact[0]), fact[1]
    words = [spec[a] for a in ("size", "colour") if a in spec] + [spec["shape"] + ("s" if n > 1 else "")]
    det = NUMBER_WORDS[n] if n > 1 else _article(words[0])
    text = " ".join([det, *words])
    if "position" in spec:
        text += " " + rng.choice(POSITION_PHRASES[spec["position"]])
    return text


def _tags(facts: tuple[Fact, ...]) -> str:
    tags = set()
    for fact in facts:
        if fact[0] == "count" or fact[1] > 1:
            tags.add("q")
        if fact[0] != "count":
            tags.update(_TAG_OF[k] for k, _ in fact[0] if k in _TAG_OF)
    return ",".join(t for t in ("col", "q", "n", "s") if t in tags)


def _distinguishing(target: Scene, others: list[Scene], rng: random.Random) -> tuple[Fact, ...]:
    """The cheapest (fewest words) combination of up to 3 facts that holds for `target` only."""
    facts = _facts(target)
    for r in (1, 2, 3):
        combos = [c for c in itertools.combinations(facts, r) if not any(all(_holds(f, o) for f in c) for o in others)]
        if combos:
            best = min(sum(map(_cost, c)) for c in combos)
            return rng.choice([c for c in combos if sum(map(_cost, c)) == best])
    # Every shape in full plus the count: distinct signatures make this unique.
    full = tuple((tuple(sorted([("shape", s.shape), *((a, getattr(s, a)) for a in _ATTRS)])), 1) for s in target)
    return full + (("count", len(target)),)


def _static_set(name: str, rng: random.Random, render_rng: random.Random, image_size: int,
                max_desc: int) -> ImageSet:
    base = sample_scene(rng, count_weights=(0.0, 0.6, 0.4))
    scenes, seen = [base], {signature(base)}
    for _ in range(_FREE_TRIES):
        if len(scenes) == N_CANDIDATES:
            break
        variant = _mutate(base, rng)
        if signature(variant) not in seen:
            seen.add(signature(variant))
            scenes.append(variant)
    else:
        raise RuntimeError(f"could not draw {N_CANDIDATES} distinct variants of {base}")
    rng.shuffle(scenes)
    images = [render_scene(s, image_size, render_rng) for s in scenes]
    targets = rng.sample(range(N_CANDIDATES), rng.randint(1, max_desc))
    descriptions = []
    for t in targets:
        # Tags: what must be understood to single out the target, whichever way it is described.
        facts = list(_distinguishing(scenes[t], scenes[:t] + scenes[t + 1:], rng))
        if rng.random() < _COMPLETE_FRAC:
            text = captions_for(scenes[t], 1, rng)[0]
        else:
            rng.shuffle(facts)
            text = join_list([_describe_fact(f, rng) for f in facts])
            text = rng.choice(("{}", "the image with {}", "the picture where there is {}")).format(text)
        descriptions.append((t, text, _tags(tuple(facts))))
    return ImageSet(name, list(range(N_CANDIDATES)), images, descriptions)


# ----------------------------------------------------------------------------- writer

def _clear_own_sets(image_root: Path) -> None:
    if image_root.is_dir():
        for folder in image_root.iterdir():
            if folder.is_dir() and _OWN_SET.match(folder.name):
                shutil.rmtree(folder)


def _tag_yaml(tags: dict[str, dict[str, dict[str, str]]]) -> str:
    """The official annotation file's shape; json strings are valid YAML scalars."""
    lines = []
    for set_name, by_pos in tags.items():
        lines.append(f"{set_name}:")
        for pos, entry in by_pos.items():
            lines.append(f"  '{pos}':")
            lines += [f"    {k}: {json.dumps(v)}" for k, v in entry.items()]
    return "\n".join(lines) + "\n"


def write_imagecode(out_dir: Path, seed: int, image_size: int, spec: ImageCodeSpec) -> PartOutput:
    """Render every split's sets, write the json files and the tag file; return all descriptions."""
    paths = imagecode_paths(out_dir)
    image_root = Path(paths["image_root"])
    _clear_own_sets(image_root)
    sizes = {"train": spec.n_train_sets, "valid": spec.n_valid_sets, "test": spec.n_test_sets}
    texts: list[str] = []
    counts: dict[str, dict] = {}
    tags: dict[str, dict[str, dict[str, str]]] = {}
    for split in SPLITS:
        rng, render_rng = _rng(seed, split, "sets"), _rng(seed, split, "render")
        data: dict = {}
        kinds: Counter = Counter()
        for i in range(sizes[split]):
            static = rng.random() < spec.static_frac
            prefix = STATIC_PREFIX if static else rng.choice(VIDEO_PREFIXES)
            name = f"{prefix}synth-{split}-{i:05d}"
            make = _static_set if static else _video_set
            s = make(name, rng, render_rng, image_size, spec.max_descriptions)
            folder = image_root / name
            folder.mkdir(parents=True, exist_ok=True)
            for n, img in zip(s.frames, s.images):
                img.save(folder / f"img{n}.jpg", **JPEG_OPTIONS)
            ordered = sorted(s.descriptions)
            if split == "test":
                data[name] = [text for _, text, _ in ordered]
            else:
                data[name] = {str(t): text for t, text, _ in ordered}
            if split == "valid":
                tags[name] = {str(t): {"description": text, "annotation": tag, "visualization_id": "0"}
                              for t, text, tag in ordered}
            texts += [text for _, text, _ in ordered]
            kinds.update(("static" if static else "video") + ":" + tag for _, _, tag in ordered)
        Path(paths[f"{split}_file"]).parent.mkdir(parents=True, exist_ok=True)
        Path(paths[f"{split}_file"]).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        n_static = sum("open-images" in k for k in data)
        counts[split] = {"sets": len(data), "static_sets": n_static, "video_sets": len(data) - n_static,
                         "descriptions": sum(len(v) for v in data.values()),
                         "by_kind_and_tags": dict(sorted(kinds.items()))}
    Path(paths["tag_file"]).parent.mkdir(parents=True, exist_ok=True)
    Path(paths["tag_file"]).write_text(_tag_yaml(tags), encoding="utf-8")
    return PartOutput(paths=paths, captions=texts, meta={"splits": counts})
