"""The retrieval part: shape scenes with captions in the BLIP retrieval json format.

Layout under `<out>/retrieval/` (docs/FORMATS.md section 1, `image_root` = `images`, `ann_root` =
`annotation`):

    images/{train,val,test}/<split>_<i>.png
    annotation/synthetic_train.json   one entry per caption: {"image", "caption", "image_id"}
    annotation/synthetic_{val,test}.json   one entry per image: {"image", "caption": [...]}
    scenes_{train,val,test}.json      the shapes of every image, in annotation order (for analysis)
    meta.json                         counts, vocab size, seed and arguments (written by `generate`)

Val and test are unambiguous: no two images of one split share an attribute signature and every
caption names every attribute of every shape, so each caption singles out one image. Train
captions are mostly complete, some partial. Signatures may repeat across splits (as object
categories do in COCO): the task is to bind words to pixels, not to generalise to new combinations.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .captions import captions_for
from .scenes import Scene, render_scene, sample_scene, sample_unique_scenes, scene_to_json

SPLITS = ("train", "val", "test")


@dataclass
class RetrievalSpec:
    """Arguments of the retrieval part (all are CLI flags of `python -m data.synthetic`)."""

    n_train: int = 2000
    n_val: int = 100
    n_test: int = 100
    # Relative weights of 1, 2, 3 shapes per image: mostly simple scenes, so a tiny model trained
    # from scratch for minutes gets R@1 >= 50.
    count_weights: tuple[float, ...] = (0.6, 0.3, 0.1)
    train_captions: int = 3  # per train image
    eval_captions: int = 2  # per val/test image (COCO has 5 for far more images)
    partial_frac: float = 0.2  # share of train captions that leave out size and/or position

    def __post_init__(self) -> None:
        self.count_weights = tuple(float(w) for w in self.count_weights)
        for name in ("n_train", "n_val", "n_test", "train_captions", "eval_captions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.partial_frac <= 1.0:
            raise ValueError(f"partial_frac must be in [0, 1], got {self.partial_frac}")


@dataclass
class PartOutput:
    """What a part writer returns to `generate`."""

    paths: dict[str, str]
    captions: list[str]  # every caption written, for the tokenizer vocab
    meta: dict = field(default_factory=dict)


def retrieval_paths(out_dir: Path) -> dict[str, str]:
    """The files of the retrieval part (fixed by the layout, so a skipped run can report them)."""
    root = out_dir / "retrieval"
    paths = {
        "root": root,
        "image_root": root / "images",
        "ann_root": root / "annotation",
        "meta": root / "meta.json",
    }
    for split in SPLITS:
        paths[f"{split}_file"] = root / "annotation" / f"synthetic_{split}.json"
        paths[f"{split}_scenes"] = root / f"scenes_{split}.json"
    return {k: str(v) for k, v in paths.items()}


def _rng(seed: int, split: str, stream: str) -> random.Random:
    # String seeds are hashed with sha512 by `random`: stable across runs and Python processes.
    # One stream per split and purpose, so e.g. n_train does not change the test images.
    return random.Random(f"{seed}/retrieval/{split}/{stream}")


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def _clear_split_images(folder: Path, split: str) -> None:
    """Remove images of an earlier run (only files named the way this module names them)."""
    if folder.is_dir():
        for old in folder.glob(f"{split}_*.png"):
            old.unlink()


def write_retrieval(out_dir: Path, seed: int, image_size: int, spec: RetrievalSpec) -> PartOutput:
    """Render and caption every split; return the paths, all captions and per-split counts."""
    paths = retrieval_paths(out_dir)
    image_root = Path(paths["image_root"])
    sizes = {"train": spec.n_train, "val": spec.n_val, "test": spec.n_test}
    all_captions: list[str] = []
    counts: dict[str, dict] = {}
    for split in SPLITS:
        n = sizes[split]
        scene_rng = _rng(seed, split, "scenes")
        if split == "train":
            scenes: list[Scene] = [sample_scene(scene_rng, spec.count_weights) for _ in range(n)]
        else:
            scenes = sample_unique_scenes(scene_rng, n, spec.count_weights)
        caption_rng = _rng(seed, split, "captions")
        render_rng = _rng(seed, split, "render")
        split_dir = image_root / split
        _clear_split_images(split_dir, split)
        split_dir.mkdir(parents=True, exist_ok=True)

        entries, scene_rows, n_captions = [], [], 0
        width = max(5, len(str(n - 1)))
        for i, scene in enumerate(scenes):
            rel = f"{split}/{split}_{i:0{width}d}.png"
            render_scene(scene, image_size, render_rng).save(image_root / rel, format="PNG")
            if split == "train":
                caps = captions_for(scene, spec.train_captions, caption_rng, spec.partial_frac)
                entries += [{"image": rel, "caption": c, "image_id": f"synth_train_{i}"} for c in caps]
            else:
                caps = captions_for(scene, spec.eval_captions, caption_rng, partial_frac=0.0)
                entries.append({"image": rel, "caption": caps})
            scene_rows.append({"image": rel, "shapes": scene_to_json(scene)})
            all_captions += caps
            n_captions += len(caps)
        _write_json(Path(paths[f"{split}_file"]), entries)
        _write_json(Path(paths[f"{split}_scenes"]), scene_rows)
        shapes_per_image = Counter(len(s) for s in scenes)
        counts[split] = {
            "images": n,
            "captions": n_captions,
            "shapes_per_image": {str(k): shapes_per_image[k] for k in sorted(shapes_per_image)},
        }
    return PartOutput(paths=paths, captions=all_captions, meta={"splits": counts})
