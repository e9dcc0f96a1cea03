"""The VQA part: questions about shape scenes with 10 annotator answers each, in BLIP's VQA json layout.

Layout under `<out>/vqa/` (BLIP's `vqa_root` = this folder, `ann_root` = `annotation`):

    images/<split>_<i>.png              the scenes, drawn as the retrieval part draws them
    annotation/vqa_{train,val,test}.json   one entry per question: {"question_id", "question",
                                        "answer": [10 strings], "image": "images/<split>_<i>.png",
                                        "dataset": "vqa", "answer_type", "question_type"}
    annotation/answer_list.json         the sorted majority answers of all splits (BLIP's candidates)
    meta.json                           counts, vocab size, seed and arguments (written by `generate`)

Question types: count ("How many shapes are there?" -> 1/2/3), colour ("What color is the
circle?" / "... the shape on the left?"), shape ("What shape is at the top?"), position ("Where is
the red circle?" -> left/right/top/bottom/center) and exists ("Is there a blue square?" -> yes/no,
balanced). Only unambiguous questions are asked: a shape referred to by its kind is the only one of
that kind in the scene, and positions are distinct in every scene. Each of the 10 annotators gives
the right answer with probability `annotator_accuracy`, else a plausible wrong one of the same type;
the answers are redrawn until the right one is the strict majority. Answers are stored as VQA v2's
annotation files store them, already normalised: counts are digits ("2"). The standard evaluation
normalises the *prediction* (number words -> digits, articles, punctuation) but the annotators'
answers only for punctuation, so a file holding "two" would never match any prediction. The
test split keeps its answers (BLIP's test reader ignores them), so accuracy can be computed.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .captions import POSITION_PHRASES
from .retrieval import PartOutput, _clear_split_images, _write_json
from .scenes import COLOURS, POSITIONS, SHAPES, Scene, render_scene, sample_scene

SPLITS = ("train", "val", "test")
QUESTION_TYPES = ("count", "colour", "shape", "position", "exists")
ANSWER_TYPES = {"count": "number", "colour": "other", "shape": "other", "position": "other", "exists": "yes/no"}
N_ANSWERS = 10  # annotators per question, as in VQA v2
# Question ids are SPLIT_BASE[split] + running index: unique over the splits, and a split's ids do
# not depend on the other splits' sizes.
SPLIT_BASE = {"train": 0, "val": 100_000_000, "test": 200_000_000}
MAX_ANSWER_TRIES = 100_000

_COUNT_PHRASES = ("how many shapes are there", "how many shapes are in the image", "how many objects are there",
                  "how many shapes can you see")
_COLOUR_BY_POS = ("what color is the shape {pos}", "what color is the object {pos}",
                  "what is the color of the shape {pos}")
_COLOUR_BY_SHAPE = ("what color is the {shape}", "what is the color of the {shape}")
_SHAPE_BY_POS = ("what shape is {pos}", "what is the shape of the object {pos}", "which shape is {pos}")
_POSITION = ("where is the {ref}", "where is the {ref} in the image", "in which part of the image is the {ref}")
_EXISTS = ("is there a {ref}", "is there a {ref} in the image", "do you see a {ref}")


@dataclass
class VQASpec:
    """Arguments of the VQA part (all are CLI flags of `python -m data.synthetic`)."""

    n_train_images: int = 1200
    n_val_images: int = 100
    n_test_images: int = 150
    questions_per_image: int = 4  # train
    eval_questions_per_image: int = 3  # val and test
    annotator_accuracy: float = 0.9  # chance that one annotator gives the right answer
    # Relative weights of 1, 2, 3 shapes per image: even, so "how many" has balanced answers.
    scene_count_weights: tuple[float, ...] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        self.scene_count_weights = tuple(float(w) for w in self.scene_count_weights)
        for name in ("n_train_images", "n_val_images", "n_test_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("questions_per_image", "eval_questions_per_image"):
            if not 1 <= getattr(self, name) <= 8:
                raise ValueError(f"{name} must be in 1..8, got {getattr(self, name)}")
        if not 0.0 < self.annotator_accuracy <= 1.0:
            raise ValueError(f"annotator_accuracy must be in (0, 1], got {self.annotator_accuracy}")
        if not 1 <= len(self.scene_count_weights) <= 3:
            raise ValueError(f"scene_count_weights must have 1..3 entries, got {self.scene_count_weights}")


def vqa_paths(out_dir: Path) -> dict[str, str]:
    """The files of the VQA part (fixed by the layout, so a skipped run can report them)."""
    root = out_dir / "vqa"
    paths = {"root": root, "vqa_root": root, "image_root": root / "images", "ann_root": root / "annotation"}
    for split in SPLITS:
        paths[f"{split}_file"] = root / "annotation" / f"vqa_{split}.json"
    paths["answer_list"] = root / "annotation" / "answer_list.json"
    paths["meta"] = root / "meta.json"
    return {k: str(v) for k, v in paths.items()}


def _rng(seed: int, split: str, stream: str) -> random.Random:
    # One stream per split and purpose, seeded by a string (sha512-hashed: stable across processes).
    return random.Random(f"{seed}/vqa/{split}/{stream}")


# ----------------------------------------------------------------------------- questions

def _candidates(scene: Scene) -> dict[str, list[tuple[tuple, tuple[str, ...], dict, str]]]:
    """Every unambiguous question of `scene` by type: (key, templates, fields, right answer).

    Questions with one key ask the same thing (about one shape, or the count): one per image.
    """
    out: dict[str, list] = {t: [] for t in QUESTION_TYPES if t != "exists"}
    out["count"].append((("count",), _COUNT_PHRASES, {}, str(len(scene))))
    shape_counts = Counter(s.shape for s in scene)
    kind_counts = Counter((s.colour, s.shape) for s in scene)
    for s in scene:
        pos = {"pos": POSITION_PHRASES[s.position]}  # one phrase is drawn per question
        if shape_counts[s.shape] == 1:
            out["colour"].append((("colour", s.position), _COLOUR_BY_SHAPE, {"shape": (s.shape,)}, s.colour))
        else:
            out["colour"].append((("colour", s.position), _COLOUR_BY_POS, pos, s.colour))
        out["shape"].append((("shape", s.position), _SHAPE_BY_POS, pos, s.shape))
        if kind_counts[(s.colour, s.shape)] == 1:
            ref = (f"{s.colour} {s.shape}",) + ((s.shape,) if shape_counts[s.shape] == 1 else ())
            out["position"].append((("position", s.position), _POSITION, {"ref": ref}, s.position))
    return out


def _exists_question(scene: Scene, want_yes: bool, rng: random.Random, used: set) -> tuple | None:
    present = {(s.colour, s.shape) for s in scene}
    if want_yes:
        pool = sorted(present)
    else:
        absent = [(c, sh) for c in COLOURS for sh in SHAPES if (c, sh) not in present]
        # Hard negatives first: an absent kind that shares its colour or its shape with a shape shown.
        near = [k for k in absent if any(k[0] == c or k[1] == sh for c, sh in present)]
        pool = near if near and rng.random() < 0.7 else absent
    pool = [k for k in pool if ("exists", *k) not in used]
    if not pool:
        return None
    colour, shape = rng.choice(pool)
    return (("exists", colour, shape), _EXISTS, {"ref": (f"{colour} {shape}",)}, "yes" if want_yes else "no")


def _phrase(templates: tuple[str, ...], fields: dict, rng: random.Random) -> str:
    text = rng.choice(templates).format(**{k: rng.choice(v) for k, v in fields.items()})
    return text[0].upper() + text[1:] + "?"  # as VQA questions are written


def _questions(scene: Scene, k: int, rng: random.Random, type_counts: Counter, yes_no: Counter) -> list[tuple]:
    """`k` distinct questions (type, text, right answer): the types least asked so far in the split
    first (so the mix stays balanced), a type at most once per image while others are left."""
    cands = _candidates(scene)
    used: set = set()
    chosen: list[tuple] = []
    for _ in range(k):
        open_types = [t for t in QUESTION_TYPES if t == "exists" or any(c[0] not in used for c in cands[t])]
        fresh = [t for t in open_types if t not in {q[0] for q in chosen}] or open_types
        low = min(type_counts[t] for t in fresh)
        qtype = rng.choice([t for t in fresh if type_counts[t] == low])
        if qtype == "exists":
            want_yes = yes_no["yes"] < yes_no["no"] or (yes_no["yes"] == yes_no["no"] and rng.random() < 0.5)
            cand = _exists_question(scene, want_yes, rng, used) or _exists_question(scene, not want_yes, rng, used)
            if cand is None:
                raise RuntimeError(f"no question left for {scene}")
            yes_no[cand[3]] += 1
        else:
            cand = rng.choice([c for c in cands[qtype] if c[0] not in used])
        key, templates, fields, answer = cand
        used.add(key)
        type_counts[qtype] += 1
        chosen.append((qtype, _phrase(templates, fields, rng), answer))
    return chosen


# ----------------------------------------------------------------------------- annotators

def _wrong_answers(qtype: str, scene: Scene, right: str) -> tuple[list[str], list[str]]:
    """Plausible wrong answers of the question's type: (seen in the scene, any other)."""
    if qtype == "colour":
        seen, every = [s.colour for s in scene], list(COLOURS)
    elif qtype == "shape":
        seen, every = [s.shape for s in scene], list(SHAPES)
    elif qtype == "position":
        seen, every = [s.position for s in scene], list(POSITIONS)
    elif qtype == "count":
        seen, every = [], ["1", "2", "3", "4"]
    else:
        seen, every = [], ["yes", "no"]
    return sorted({a for a in seen if a != right}), [a for a in every if a != right]


def _annotate(qtype: str, scene: Scene, right: str, accuracy: float, rng: random.Random) -> list[str]:
    """10 answers whose most common string is `right`, strictly (redrawn until it is)."""
    seen, other = _wrong_answers(qtype, scene, right)
    for _ in range(MAX_ANSWER_TRIES):
        answers = []
        for _ in range(N_ANSWERS):
            answer = right if rng.random() < accuracy else rng.choice(seen if seen and rng.random() < 0.5 else other)
            answers.append(answer)
        top = Counter(answers).most_common(2)
        if top[0][0] == right and (len(top) == 1 or top[1][1] < top[0][1]):
            return answers
    raise RuntimeError(f"annotator_accuracy {accuracy} is too low to draw a right majority answer")


# ----------------------------------------------------------------------------- writer

def write_vqa(out_dir: Path, seed: int, image_size: int, spec: VQASpec) -> PartOutput:
    """Render, ask and annotate every split; return the paths, every question and answer, counts."""
    paths = vqa_paths(out_dir)
    root, image_root = Path(paths["root"]), Path(paths["image_root"])
    sizes = {"train": spec.n_train_images, "val": spec.n_val_images, "test": spec.n_test_images}
    per_image = {"train": spec.questions_per_image, "val": spec.eval_questions_per_image,
                 "test": spec.eval_questions_per_image}
    image_root.mkdir(parents=True, exist_ok=True)
    texts: list[str] = []
    majority: set[str] = set()
    counts: dict[str, dict] = {}
    for split in SPLITS:
        n = sizes[split]
        if n * per_image[split] >= SPLIT_BASE["val"]:
            raise ValueError(f"too many {split} questions for unique question ids")
        scene_rng, question_rng = _rng(seed, split, "scenes"), _rng(seed, split, "questions")
        answer_rng, render_rng = _rng(seed, split, "answers"), _rng(seed, split, "render")
        _clear_split_images(image_root, split)
        type_counts, yes_no, shapes = Counter(), Counter(), Counter()
        entries = []
        width = max(5, len(str(n - 1)))
        for i in range(n):
            scene = sample_scene(scene_rng, spec.scene_count_weights)
            rel = f"images/{split}_{i:0{width}d}.png"
            render_scene(scene, image_size, render_rng).save(root / rel, format="PNG")
            shapes[len(scene)] += 1
            for qtype, question, right in _questions(scene, per_image[split], question_rng, type_counts, yes_no):
                answers = _annotate(qtype, scene, right, spec.annotator_accuracy, answer_rng)
                entries.append({
                    "question_id": SPLIT_BASE[split] + len(entries),
                    "question": question,
                    "answer": answers,
                    "image": rel,
                    "dataset": "vqa",
                    "answer_type": ANSWER_TYPES[qtype],
                    "question_type": qtype,
                })
                majority.add(right)
                texts += [question, *answers]
        _write_json(Path(paths[f"{split}_file"]), entries)
        counts[split] = {
            "images": n,
            "questions": len(entries),
            "question_types": {t: type_counts[t] for t in QUESTION_TYPES},
            "exists_answers": {a: yes_no[a] for a in ("yes", "no")},
            "shapes_per_image": {str(k): shapes[k] for k in sorted(shapes)},
        }
    answer_list = sorted(majority)
    _write_json(Path(paths["answer_list"]), answer_list)
    meta = {"splits": counts, "answers_per_question": N_ANSWERS, "annotator_accuracy": spec.annotator_accuracy,
            "answer_list_size": len(answer_list)}
    return PartOutput(paths=paths, captions=texts, meta=meta)
