"""The NLVR part: pairs of shape scenes, a sentence about the pair and a True/False label, in BLIP's NLVR2 layout.

Layout under `<out>/nlvr/` (BLIP's `image_root` = this folder, `ann_root` = `annotation`):

    images/<split>_<i>.png                 two scenes per pair, drawn as the other parts draw them
    annotation/nlvr_{train,dev,test}.json  one entry per pair: {"images": ["images/<split>_<2m>.png",
                                           "images/<split>_<2m+1>.png"], "sentence", "label": "True" | "False",
                                           "identifier": "<split>-<sentence>-<pair>-0", "template"}
    scenes_{train,dev,test}.json           the shapes of both images of every pair, in annotation order
    meta.json                              counts, the text-only baseline, vocab size, seed and arguments

`label` is the string "True"/"False", as in BLIP's files (its reader tests `ann['label'] == 'True'`);
image paths are relative to this folder; `template` is an extra field BLIP's reader ignores. BLIP's
split names map `val` -> `nlvr_dev.json`, so the dev split's images are `images/dev_<i>.png`.

Sentences (`TEMPLATES`) compare the two images: some need one image only ("The left image contains
a red circle."), some need both ("Both images contain a blue shape.", "Only one image contains a
triangle.", "The right image has more shapes than the left image."). Sentences that name no side
are symmetric in the two images and the sided ones stay true when the images and the words
left/right are exchanged, so BLIP's training-time swap keeps every label right.

No text-only shortcut: every sentence drawn is written twice, once with a pair that makes it true
and once with a pair that makes it false (as NLVR2 pairs each sentence with true and false image
pairs), so True and False are balanced exactly within each split, each template and each distinct
sentence. Labels are computed from the two scenes (pairs are drawn until the label is the one
wanted). A share `hard_negative_frac` of the false pairs are near misses: what a reading that
ignores the side, or one of the two images, would call true (the other image has the red circle,
only one image has a blue shape, ...). The best text-only predictor (per distinct lower-cased
sentence the majority label on train, the overall train majority for unseen sentences) therefore
scores 50% on dev and test; `meta.json` records it (`text_only_baseline`).
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .captions import NUMBER_WORDS
from .retrieval import PartOutput, _clear_split_images, _write_json
from .scenes import COLOURS, SHAPES, Scene, render_scene, sample_scene, scene_to_json

SPLITS = ("train", "dev", "test")
LABELS = ("True", "False")
MAX_PAIR_TRIES = 20_000  # draws of a pair of scenes before giving up on a wanted label
SIDES = ("left", "right")


@dataclass
class NLVRSpec:
    """Arguments of the NLVR part (all are CLI flags of `python -m data.synthetic`)."""

    n_train_pairs: int = 2000
    n_dev_pairs: int = 200
    n_test_pairs: int = 200
    hard_negative_frac: float = 0.5  # share of false pairs that are near misses
    # Relative weights of 1, 2, 3 shapes per image: even, so counting sentences have both labels often.
    nlvr_count_weights: tuple[float, ...] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        self.nlvr_count_weights = tuple(float(w) for w in self.nlvr_count_weights)
        for name in ("n_train_pairs", "n_dev_pairs", "n_test_pairs"):
            n = getattr(self, name)
            if n < 2 or n % 2:
                raise ValueError(f"{name} must be even and >= 2 (each sentence gets a true and a false pair), got {n}")
        if not 0.0 <= self.hard_negative_frac <= 1.0:
            raise ValueError(f"hard_negative_frac must be in [0, 1], got {self.hard_negative_frac}")
        if not 1 <= len(self.nlvr_count_weights) <= 3:
            raise ValueError(f"nlvr_count_weights must have 1..3 entries, got {self.nlvr_count_weights}")


def nlvr_paths(out_dir: Path) -> dict[str, str]:
    """The files of the NLVR part (fixed by the layout, so a skipped run can report them)."""
    root = out_dir / "nlvr"
    paths = {"root": root, "image_root": root, "images": root / "images", "ann_root": root / "annotation"}
    for split in SPLITS:
        paths[f"{split}_file"] = root / "annotation" / f"nlvr_{split}.json"
        paths[f"{split}_scenes"] = root / f"scenes_{split}.json"
    paths["meta"] = root / "meta.json"
    return {k: str(v) for k, v in paths.items()}


def _rng(seed: int, split: str, stream: str) -> random.Random:
    # One stream per split and purpose, seeded by a string (sha512-hashed: stable across processes).
    return random.Random(f"{seed}/nlvr/{split}/{stream}")


# ----------------------------------------------------------------------------- templates

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _has_colour(scene: Scene, colour: str) -> bool:
    return any(s.colour == colour for s in scene)


def _has_shape(scene: Scene, shape: str) -> bool:
    return any(s.shape == shape for s in scene)


def _has_kind(scene: Scene, colour: str, shape: str) -> bool:
    return any(s.colour == colour and s.shape == shape for s in scene)


def _sides(left: Scene, right: Scene, f: dict) -> tuple[Scene, Scene]:
    """(the image the sentence names, the other one)."""
    return (left, right) if f["side"] == "left" else (right, left)


Check = Callable[[Scene, Scene, dict], bool]


@dataclass(frozen=True)
class Template:
    """A sentence pattern: its slots, when it is true of (left, right), and its near misses."""

    name: str
    text: str  # str.format pattern; slots {side} {other} {a} {colour} {shape} {number} {noun}
    slots: Callable[[random.Random], dict]
    holds: Check
    near: Check  # a false pair a careless reading would call true (only asked of false pairs)

    def sentence(self, f: dict) -> str:
        return self.text.format(**f)


def _side(rng: random.Random) -> dict:
    side = rng.choice(SIDES)
    return {"side": side, "other": "right" if side == "left" else "left"}


def _colour(rng: random.Random) -> dict:
    c = rng.choice(list(COLOURS))
    return {"colour": c, "a": _article(c)}


def _shape(rng: random.Random) -> dict:
    sh = rng.choice(SHAPES)
    return {"shape": sh, "a": _article(sh)}


def _kind(rng: random.Random) -> dict:
    return {**_colour(rng), "shape": rng.choice(SHAPES)}


def _count(rng: random.Random) -> dict:
    n = rng.randint(1, 3)
    return {"n": n, "number": NUMBER_WORDS[n], "noun": "shape" if n == 1 else "shapes"}


TEMPLATES: tuple[Template, ...] = (
    Template("more", "The {side} image has more shapes than the {other} image.", _side,
             lambda l, r, f: len(_sides(l, r, f)[0]) > len(_sides(l, r, f)[1]),
             lambda l, r, f: len(_sides(l, r, f)[1]) > len(_sides(l, r, f)[0])),
    Template("side_count", "The {side} image contains exactly {number} {noun}.",
             lambda rng: {**_side(rng), **_count(rng)},
             lambda l, r, f: len(_sides(l, r, f)[0]) == f["n"],
             lambda l, r, f: len(_sides(l, r, f)[1]) == f["n"]),
    Template("side_colour", "The {side} image contains {a} {colour} shape.", lambda rng: {**_side(rng), **_colour(rng)},
             lambda l, r, f: _has_colour(_sides(l, r, f)[0], f["colour"]),
             lambda l, r, f: _has_colour(_sides(l, r, f)[1], f["colour"])),
    Template("side_kind", "The {side} image contains {a} {colour} {shape}.", lambda rng: {**_side(rng), **_kind(rng)},
             lambda l, r, f: _has_kind(_sides(l, r, f)[0], f["colour"], f["shape"]),
             # the other image has it, or this one has its colour or its shape
             lambda l, r, f: _has_kind(_sides(l, r, f)[1], f["colour"], f["shape"])
             or _has_colour(_sides(l, r, f)[0], f["colour"]) or _has_shape(_sides(l, r, f)[0], f["shape"])),
    Template("both_colour", "Both images contain {a} {colour} shape.", _colour,
             lambda l, r, f: _has_colour(l, f["colour"]) and _has_colour(r, f["colour"]),
             lambda l, r, f: _has_colour(l, f["colour"]) != _has_colour(r, f["colour"])),
    Template("both_shape", "Both images contain {a} {shape}.", _shape,
             lambda l, r, f: _has_shape(l, f["shape"]) and _has_shape(r, f["shape"]),
             lambda l, r, f: _has_shape(l, f["shape"]) != _has_shape(r, f["shape"])),
    Template("same_count", "Both images have the same number of shapes.", lambda rng: {},
             lambda l, r, f: len(l) == len(r),
             lambda l, r, f: abs(len(l) - len(r)) == 1),
    Template("each_one", "Each image contains only one shape.", lambda rng: {},
             lambda l, r, f: len(l) == 1 and len(r) == 1,
             lambda l, r, f: (len(l) == 1) != (len(r) == 1)),
    Template("only_one_shape", "Only one image contains {a} {shape}.", _shape,
             lambda l, r, f: _has_shape(l, f["shape"]) != _has_shape(r, f["shape"]),
             lambda l, r, f: _has_shape(l, f["shape"]) and _has_shape(r, f["shape"])),
    Template("only_one_colour", "Only one image contains {a} {colour} shape.", _colour,
             lambda l, r, f: _has_colour(l, f["colour"]) != _has_colour(r, f["colour"]),
             lambda l, r, f: _has_colour(l, f["colour"]) and _has_colour(r, f["colour"])),
)
TEMPLATE_NAMES = tuple(t.name for t in TEMPLATES)


def normalise_sentence(sentence: str) -> str:
    """Lower-cased, final '.' and surplus spaces removed: how sentences are compared (the text-only
    baseline, template matching); BLIP's `pre_caption` gives the same string for these sentences."""
    return " ".join(sentence.lower().replace(".", " ").split())


def _pattern(template: Template) -> re.Pattern:
    slot = {"side": "(?:left|right)", "other": "(?:left|right)", "a": "an?", "colour": f"(?:{'|'.join(COLOURS)})",
            "shape": f"(?:{'|'.join(SHAPES)})", "number": f"(?:{'|'.join(NUMBER_WORDS[n] for n in (1, 2, 3))})",
            "noun": "shapes?"}
    text = normalise_sentence(template.text)
    for name, rx in slot.items():
        text = text.replace("{" + name + "}", rx)
    return re.compile(f"^{text}$")


_PATTERNS = tuple((t.name, _pattern(t)) for t in TEMPLATES)


def template_of(sentence: str) -> str | None:
    """The name of the template `sentence` was written from (also after `pre_caption` or BLIP's
    left/right swap), or None for a sentence of no template."""
    text = normalise_sentence(sentence)
    for name, rx in _PATTERNS:
        if rx.match(text):
            return name
    return None


# ----------------------------------------------------------------------------- text-only baseline

def _label_string(label) -> str:
    return "True" if label in ("True", True, 1) else "False"


def train_majorities(train: Iterable[dict]) -> tuple[dict[str, str], str]:
    """Per distinct normalised train sentence its majority label (ties: the overall one), and the
    overall train majority (ties: "True")."""
    votes: dict[str, Counter] = defaultdict(Counter)
    overall: Counter = Counter()
    for e in train:
        label = _label_string(e["label"])
        votes[normalise_sentence(e["sentence"])][label] += 1
        overall[label] += 1
    default = "True" if overall["True"] >= overall["False"] else "False"
    best = {}
    for text, c in votes.items():
        best[text] = default if c["True"] == c["False"] else ("True" if c["True"] > c["False"] else "False")
    return best, default


def text_only_predictions(train: Iterable[dict], entries: Sequence[dict]) -> list[str]:
    """The best text-only predictor's label for each entry: the train majority of its sentence
    (the overall train majority for sentences train does not hold)."""
    best, default = train_majorities(train)
    return [best.get(normalise_sentence(e["sentence"]), default) for e in entries]


def text_only_accuracy(train: Iterable[dict], entries: Sequence[dict]) -> float:
    """Accuracy (percent) of `text_only_predictions` on `entries`."""
    if not entries:
        raise ValueError("no entries to score")
    preds = text_only_predictions(train, entries)
    return 100.0 * sum(p == _label_string(e["label"]) for p, e in zip(preds, entries)) / len(entries)


# ----------------------------------------------------------------------------- pairs

def _draw_pair(template: Template, f: dict, want: bool, hard: bool, rng: random.Random,
               weights: Sequence[float]) -> tuple[Scene, Scene]:
    for _ in range(MAX_PAIR_TRIES):
        left, right = sample_scene(rng, weights), sample_scene(rng, weights)
        if template.holds(left, right, f) == want and (want or not hard or template.near(left, right, f)):
            return left, right
    raise RuntimeError(f"could not draw a {'true' if want else 'false'} pair for {template.sentence(f)!r} "
                       f"with nlvr_count_weights={tuple(weights)}")


def _template_order(n: int, rng: random.Random) -> list[Template]:
    """`n` templates in shuffled rounds of all of them: counts per template differ by at most one."""
    order: list[Template] = []
    while len(order) < n:
        round_ = list(TEMPLATES)
        rng.shuffle(round_)
        order += round_
    return order[:n]


def _split_pairs(split: str, n_pairs: int, spec: NLVRSpec, seed: int) -> list[dict]:
    """The split's pairs in annotation order: sentence, label, template, identifier, the two scenes."""
    sentence_rng, scene_rng, order_rng = (_rng(seed, split, s) for s in ("sentences", "scenes", "order"))
    pairs = []
    for k, template in enumerate(_template_order(n_pairs // 2, sentence_rng)):
        f = template.slots(sentence_rng)
        wants = [True, False]
        sentence_rng.shuffle(wants)  # the pair number says nothing about the label
        for j, want in enumerate(wants):
            hard = not want and sentence_rng.random() < spec.hard_negative_frac
            left, right = _draw_pair(template, f, want, hard, scene_rng, spec.nlvr_count_weights)
            pairs.append({"sentence": template.sentence(f), "label": "True" if want else "False",
                          "identifier": f"{split}-{k}-{j}-0", "template": template.name, "hard": hard,
                          "scenes": (left, right)})
    order_rng.shuffle(pairs)  # the two pairs of a sentence are not neighbours
    return pairs


# ----------------------------------------------------------------------------- writer

def write_nlvr(out_dir: Path, seed: int, image_size: int, spec: NLVRSpec) -> PartOutput:
    """Draw, render and write every split; return the paths, every sentence and per-split counts."""
    paths = nlvr_paths(out_dir)
    root, image_dir = Path(paths["root"]), Path(paths["images"])
    sizes = {"train": spec.n_train_pairs, "dev": spec.n_dev_pairs, "test": spec.n_test_pairs}
    image_dir.mkdir(parents=True, exist_ok=True)
    sentences: list[str] = []
    counts: dict[str, dict] = {}
    annotations: dict[str, list[dict]] = {}
    for split in SPLITS:
        pairs = _split_pairs(split, sizes[split], spec, seed)
        render_rng = _rng(seed, split, "render")
        _clear_split_images(image_dir, split)
        width = max(5, len(str(2 * len(pairs) - 1)))
        entries, scene_rows = [], []
        shapes: Counter = Counter()
        for m, pair in enumerate(pairs):
            rels = [f"images/{split}_{2 * m + side:0{width}d}.png" for side in (0, 1)]
            for rel, scene in zip(rels, pair["scenes"]):
                render_scene(scene, image_size, render_rng).save(root / rel, format="PNG")
                shapes[len(scene)] += 1
            entries.append({"images": rels, "sentence": pair["sentence"], "label": pair["label"],
                            "identifier": pair["identifier"], "template": pair["template"]})
            scene_rows.append({"identifier": pair["identifier"], "images": rels,
                               "shapes": [scene_to_json(s) for s in pair["scenes"]]})
        _write_json(Path(paths[f"{split}_file"]), entries)
        _write_json(Path(paths[f"{split}_scenes"]), scene_rows)
        annotations[split] = entries
        sentences += [e["sentence"] for e in entries]
        by_template = {name: {label: 0 for label in LABELS} for name in TEMPLATE_NAMES}
        for e in entries:
            by_template[e["template"]][e["label"]] += 1
        counts[split] = {
            "pairs": len(entries),
            "images": 2 * len(entries),
            "distinct_sentences": len({normalise_sentence(e["sentence"]) for e in entries}),
            "labels": {label: sum(e["label"] == label for e in entries) for label in LABELS},
            "hard_negatives": sum(p["hard"] for p in pairs),
            "templates": by_template,
            "shapes_per_image": {str(k): shapes[k] for k in sorted(shapes)},
        }
    baseline = {split: round(text_only_accuracy(annotations["train"], annotations[split]), 2)
                for split in ("dev", "test")}
    for split, acc in baseline.items():
        # Exactly 50 by construction (every sentence has a true and a false pair): a guard.
        if abs(acc - 50.0) > 5.0:
            raise RuntimeError(f"text-only baseline on {split} is {acc:.1f}%, not about 50%: the sentences leak labels")
    meta = {"splits": counts, "templates": {t.name: t.text for t in TEMPLATES}, "chance": 50.0,
            "text_only_baseline": {**baseline, "train_majority": train_majorities(annotations["train"])[1],
                                   "rule": "per lower-cased train sentence its majority label, "
                                           "unseen sentences the overall train majority"},
            "hard_negative_frac": spec.hard_negative_frac}
    return PartOutput(paths=paths, captions=sentences, meta=meta)
