"""Captions for shape scenes from varied templates.

A *complete* caption names colour, shape, size and position of every shape, so with distinct
scene signatures it singles out its image (val/test use only these). A *partial* caption drops
size and/or position (train only: more variety, like real captions that leave things out).
Captions are mostly lowercase words; some get a capital letter, a final '.' or '!', or a double
space, so that `pre_caption` cleaning is exercised exactly as on COCO.
"""

from __future__ import annotations

import random
from typing import Sequence

from .scenes import Scene, Shape
from .vocab import basic_tokenize

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}

# Several phrasings per region: the model must learn the region, not one fixed string.
POSITION_PHRASES = {
    "left": ("on the left", "on the left side", "at the left"),
    "right": ("on the right", "on the right side", "at the right"),
    "top": ("at the top", "near the top", "at the top of the picture"),
    "bottom": ("at the bottom", "near the bottom", "at the bottom of the image"),
    "center": ("in the center", "in the middle", "in the center of the image"),
}

_ONE_SHAPE_TEMPLATES = (
    "{item}",
    "there is {item}",
    "an image with {item}",
    "a picture of {item}",
    "a photo of {item}",
    "{pos}, there is {np}",
    "{np} is {pos}",
    "{item} on a gray background",
)
_MULTI_SHAPE_TEMPLATES = (
    "{items}",
    "{count} shapes: {items}",
    "{count} shapes, {items}",
    "there are {count} shapes: {items}",
    "an image with {items}",
    "a picture of {items}",
    "{items} on a gray background",
)


# Retrieval keeps the first 30 words after cleaning and pads/truncates to 35 tokens ([CLS] and
# [SEP] included): a longer caption would lose the attributes of its last shape.
MAX_WORDS = 30
MAX_TOKENS = 33


def clean(text: str) -> str:
    """What BLIP's `pre_caption` does to a caption (without truncation)."""
    text = text.lower()
    for ch in '.!"()*#:;~':
        text = text.replace(ch, " ")
    return " ".join(text.split())


def fits(text: str) -> bool:
    """True when the whole caption survives `pre_caption` truncation and tokenization to 35."""
    cleaned = clean(text)
    # Every caption word is a whole vocab word, so BERT pieces = basic tokens (words and commas).
    return len(cleaned.split()) <= MAX_WORDS and len(basic_tokenize(cleaned)) <= MAX_TOKENS


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def join_list(parts: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _noun_phrase(n: int, shape: Shape, with_size: bool, rng: random.Random) -> str:
    """'a big red circle', 'an orange square', 'two small blue triangles'."""
    words = ([shape.size] if with_size else []) + [shape.colour, shape.shape + ("s" if n > 1 else "")]
    if n > 1:
        det = NUMBER_WORDS[n]
    else:
        det = "one" if rng.random() < 0.15 else _article(words[0])
    return " ".join([det, *words])


def _items(scene: Scene, with_size: bool, with_pos: bool, rng: random.Random) -> list[str]:
    """One phrase per group of shapes a caption would name together ('two red circles ...')."""
    groups: dict[tuple, list[Shape]] = {}
    for s in scene:
        key = s.kind if with_size else (s.colour, s.shape)
        groups.setdefault(key, []).append(s)
    members = list(groups.values())
    rng.shuffle(members)
    items = []
    for group in members:
        group = rng.sample(group, len(group))
        phrase = _noun_phrase(len(group), group[0], with_size, rng)
        if with_pos:
            phrase += " " + join_list([rng.choice(POSITION_PHRASES[s.position]) for s in group])
        items.append(phrase)
    return items


def _style(text: str, rng: random.Random) -> str:
    """Surface noise that `pre_caption` removes: capitals, final punctuation, extra spaces."""
    if rng.random() < 0.25:
        text = text[0].upper() + text[1:]
    r = rng.random()
    if r < 0.25:
        text += "."
    elif r < 0.3:
        text += "!"
    if rng.random() < 0.05:
        text = text.replace(" ", "  ", 1)
    return text


def caption(scene: Scene, rng: random.Random, complete: bool = True) -> str:
    """One caption of `scene`; `complete=False` drops size and/or position."""
    if complete:
        with_size, with_pos = True, True
    else:
        with_size, with_pos = rng.choice([(False, True), (True, False), (False, False)])
    return _style(_compose(scene, rng, with_size, with_pos), rng)


def caption_with(scene: Scene, rng: random.Random, with_size: bool, with_pos: bool, suffix: str = "") -> str:
    """One caption of `scene` naming exactly the chosen attributes (colour and shape always), in the
    grammar of `caption`; `suffix` (e.g. ' moving to the left') is added before the surface noise."""
    return _style(_compose(scene, rng, with_size, with_pos) + suffix, rng)


def _compose(scene: Scene, rng: random.Random, with_size: bool, with_pos: bool) -> str:
    """The caption text before `_style`."""
    if len(scene) == 1:
        (shape,) = scene
        np_ = _noun_phrase(1, shape, with_size, rng)
        pos = rng.choice(POSITION_PHRASES[shape.position])
        templates = [t for t in _ONE_SHAPE_TEMPLATES if with_pos or "{pos}" not in t]
        item = f"{np_} {pos}" if with_pos else np_
        text = rng.choice(templates).format(item=item, np=np_, pos=pos)
    else:
        items = join_list(_items(scene, with_size, with_pos, rng))
        text = rng.choice(_MULTI_SHAPE_TEMPLATES).format(items=items, count=NUMBER_WORDS[len(scene)])
    return text


def captions_for(
    scene: Scene, n: int, rng: random.Random, partial_frac: float = 0.0, max_tries: int = 200
) -> list[str]:
    """`n` distinct captions of `scene` that fit the text length; each is partial with
    probability `partial_frac`."""
    out: list[str] = []
    for _ in range(max_tries):
        text = caption(scene, rng, complete=rng.random() >= partial_frac)
        if text not in out and fits(text):
            out.append(text)
            if len(out) == n:
                return out
    raise RuntimeError(f"could not write {n} distinct captions for {scene}")
