"""BLIP's own config files, given verbatim to our entry scripts (``tests/fixtures/blip_configs/``:
salesforce/BLIP's ``configs/*.yaml`` at commit 056a169, BSD-3-Clause) with only the data paths
changed by ``--opts``.

``KEY_SETS`` is a copy of each file's keys: ``tests/test_blip_configs.py`` checks the files against
it and every key against the entry script's schema, so a later change cannot silently drop one.

    python -m tests.scripts.blip_configs --out /tmp/blip_cfg        # the table, at BLIP's sizes (ViT-B)

runs every file's ``--dry_run`` exactly as written — ViT-B, BLIP's image sizes and batch sizes, its
learning rates — except for the data paths: the annotation and image folders (written here from the
test fixtures' images), ``pretrained`` (no download here: '' for the training configs, i.e. random
init; for the two evaluation-only configs a random-weight ViT-B file in the official layout, made
here) and ``tokenizer`` (BLIP loads bert-base-uncased from the hub; offline, a local vocabulary).
``tiny=True`` adds small-model overrides (the suite's fast version of the same runs).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BLIP_CONFIGS = REPO / "tests" / "fixtures" / "blip_configs"
RETRIEVAL_FIX = REPO / "tests" / "fixtures" / "blip_official_tiny"
CAPTION_FIX = REPO / "tests" / "fixtures" / "blip_caption_tiny"

# config file -> the entry script that runs it (BLIP's own script names where we have them).
ENTRY = {
    "retrieval_coco": "train_retrieval.py",
    "retrieval_flickr": "train_retrieval.py",
    "caption_coco": "train_caption.py",
    "nocaps": "eval_nocaps.py",
    "pretrain": "pretrain_blip.py",
    "vqa": "train_vqa.py",
    "nlvr": "train_nlvr.py",
    "retrieval_msrvtt": "eval_retrieval_video.py",
}

# A copy of each file's key set (BLIP's release). Changing a file in tests/fixtures/blip_configs
# without changing this fails the test: these are the keys users' configs hold.
KEY_SETS = {
    "retrieval_coco": ["alpha", "ann_root", "batch_size_test", "batch_size_train", "dataset", "image_root",
                       "image_size", "init_lr", "k_test", "max_epoch", "min_lr", "negative_all_rank", "pretrained",
                       "queue_size", "vit", "vit_ckpt_layer", "vit_grad_ckpt", "weight_decay"],
    "retrieval_flickr": ["alpha", "ann_root", "batch_size_test", "batch_size_train", "dataset", "image_root",
                         "image_size", "init_lr", "k_test", "max_epoch", "min_lr", "negative_all_rank", "pretrained",
                         "queue_size", "vit", "vit_ckpt_layer", "vit_grad_ckpt", "weight_decay"],
    "caption_coco": ["ann_root", "batch_size", "coco_gt_root", "image_root", "image_size", "init_lr", "max_epoch",
                     "max_length", "min_length", "min_lr", "num_beams", "pretrained", "prompt", "vit",
                     "vit_ckpt_layer", "vit_grad_ckpt", "weight_decay"],
    "nocaps": ["ann_root", "batch_size", "image_root", "image_size", "max_length", "min_length", "num_beams",
               "pretrained", "prompt", "vit"],
    "pretrain": ["alpha", "batch_size", "image_size", "init_lr", "laion_path", "lr_decay_rate", "max_epoch", "min_lr",
                 "queue_size", "train_file", "vit", "vit_ckpt_layer", "vit_grad_ckpt", "warmup_lr", "warmup_steps",
                 "weight_decay"],
    "vqa": ["ann_root", "batch_size_test", "batch_size_train", "image_size", "inference", "init_lr", "k_test",
            "max_epoch", "min_lr", "pretrained", "train_files", "vg_root", "vit", "vit_ckpt_layer", "vit_grad_ckpt",
            "vqa_root", "weight_decay"],
    "nlvr": ["ann_root", "batch_size_test", "batch_size_train", "image_root", "image_size", "init_lr", "max_epoch",
             "min_lr", "pretrained", "vit", "vit_ckpt_layer", "vit_grad_ckpt", "weight_decay"],
    "retrieval_msrvtt": ["ann_root", "batch_size", "image_size", "k_test", "num_frm_test", "pretrained", "video_root",
                         "vit"],
}

# The data-path keys each file holds (the only keys the runs change; tokenizer: see the docstring).
DATA_KEYS = {
    "retrieval_coco": ("image_root", "ann_root", "pretrained"),
    "retrieval_flickr": ("image_root", "ann_root", "pretrained"),
    "caption_coco": ("image_root", "ann_root", "coco_gt_root", "pretrained"),
    "nocaps": ("image_root", "ann_root", "pretrained"),
    "pretrain": ("train_file", "laion_path"),
    "vqa": ("vqa_root", "vg_root", "ann_root", "pretrained"),
    "nlvr": ("image_root", "ann_root", "pretrained"),
    "retrieval_msrvtt": ("video_root", "ann_root", "pretrained"),
}

N_PAIRS = 80  # >= every file's train batch (pretrain: 75), so a dry run gets a whole batch


def _images() -> list[str]:
    return sorted(str(p) for p in (RETRIEVAL_FIX / "images").glob("img*.png"))


def _captions() -> list[list[str]]:
    return [e["caption"] for e in json.loads((RETRIEVAL_FIX / "test.json").read_text())]


def _dump(path: Path, value) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return path


def write_data(root: Path) -> dict:
    """Every file's annotation layout under ``root`` (images: the retrieval fixture's; their names
    end in a number, as COCO's ids need). Returns ``{config: {data key: value}}``."""
    images, captions = _images(), _captions()
    n = len(images)
    pairs = [{"image": images[i % n], "caption": captions[i % n][(i // n) % len(captions[i % n])],
              "image_id": f"img{i % n}"} for i in range(N_PAIRS)]
    evals = [{"image": images[i], "caption": captions[i]} for i in range(n)]
    ann = root / "annotation"
    for name in ("coco_karpathy", "flickr30k"):
        _dump(ann / f"{name}_train.json", pairs)
        _dump(ann / f"{name}_val.json", evals)
        _dump(ann / f"{name}_test.json", evals)
    _dump(ann / "nocaps_val.json", [{"image": images[i], "img_id": i} for i in range(n)])
    _dump(ann / "nocaps_test.json", [{"image": images[i], "img_id": i} for i in range(n)])
    _dump(ann / "pretrain_pairs.json", [{"image": p["image"], "caption": p["caption"]} for p in pairs])
    qa = [{"question_id": i, "question": "what color is the shape?", "answer": ["red", "red", "blue"],
           "image": images[i % n], "dataset": "vqa"} for i in range(N_PAIRS)]
    _dump(ann / "vqa_train.json", qa)
    _dump(ann / "vqa_val.json", qa[:8])
    _dump(ann / "vg_qa.json", [{**q, "answer": ["red"], "dataset": "vg"} for q in qa[:8]])
    _dump(ann / "vqa_test.json", [{k: q[k] for k in ("question_id", "question", "image")} for q in qa[:8]])
    _dump(ann / "answer_list.json", ["red", "blue", "green"])
    nlvr = [{"images": [images[i % n], images[(i + 1) % n]], "sentence": "The left image has more shapes.",
             "label": "True" if i % 2 else "False", "identifier": f"dev-{i}"} for i in range(N_PAIRS)]
    for split in ("train", "dev", "test"):
        _dump(ann / f"nlvr_{split}.json", nlvr)
    videos = root / "videos"
    write_clips(videos, images)
    (ann / "msrvtt_test.jsonl").write_text(
        "".join(json.dumps({"clip_name": f"video{i}", "caption": captions[i][0]}) + "\n" for i in range(n)))
    common = {"ann_root": str(ann), "image_root": "/", "pretrained": "''"}
    return {
        "retrieval_coco": common, "retrieval_flickr": common,
        "caption_coco": {**common, "coco_gt_root": str(ann / "coco_gt")},
        "nocaps": common,
        "pretrain": {"train_file": f"[{ann / 'pretrain_pairs.json'}]"},
        "vqa": {"ann_root": str(ann), "vqa_root": "/", "vg_root": "/", "pretrained": "''"},
        "nlvr": common,
        "retrieval_msrvtt": {"ann_root": str(ann), "video_root": str(videos)},
    }


def write_clips(folder: Path, images: list[str], frames: int = 8) -> None:
    """``video<i>.mp4``: image ``i`` held for ``frames`` frames (MPEG-4 Part 2, PyAV)."""
    import av
    import numpy as np
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        picture = np.asarray(Image.open(image).convert("RGB").resize((64, 64)))
        with av.open(str(folder / f"video{i}.mp4"), "w") as container:
            stream = container.add_stream("mpeg4", rate=8)
            stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
            for _ in range(frames):
                for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)


def tiny_overrides(name: str, root: Path) -> dict:
    """Small-model keys for the suite's fast runs (the data keys stay those of ``write_data``); the ViT
    is 4 deep, as retrieval_coco's vit_ckpt_layer 4 needs."""
    med = root / "med_tiny.json"
    if not med.exists():
        from tests.scripts.tiny import TINY_MED
        med.write_text(TINY_MED)
    small = {"vit": "{width: 32, depth: 4, heads: 2, patch_size: 16}", "image_size": 32, "med_config": str(med),
             "tokenizer": str(RETRIEVAL_FIX / "tokenizer"), "num_workers": 0, "device": "cpu"}
    if name in ("retrieval_coco", "retrieval_flickr", "pretrain"):
        small.update(embed_dim=16, queue_size=2400)  # a multiple of BLIP's batch sizes (32 and 75)
    if name == "nocaps":  # evaluation: a real caption checkpoint (the caption fixture)
        small.update(pretrained=str(CAPTION_FIX / "checkpoint.pth"), vit="{width: 64, depth: 2, heads: 4, patch_size: 16}",
                     image_size=64, med_config=str(CAPTION_FIX / "med_config.json"),
                     tokenizer=str(CAPTION_FIX / "tokenizer"))
    if name == "retrieval_msrvtt":  # evaluation: the retrieval fixture
        small.update(pretrained=str(RETRIEVAL_FIX / "checkpoint.pth"),
                     vit="{width: 64, depth: 2, heads: 4, patch_size: 16}", image_size=64, embed_dim=32,
                     med_config=str(RETRIEVAL_FIX / "med_config.json"), k_test=4)
    return small


def command(name: str, data: dict, out: Path, extra: dict | None = None) -> list[str]:
    opts = {**data[name], **(extra or {})}
    return [sys.executable, str(REPO / ENTRY[name]), "--config", str(BLIP_CONFIGS / f"{name}.yaml"), "--dry_run",
            "--output_dir", str(out / name), "--opts", *[f"{k}={v}" for k, v in opts.items()]]


def full_size_files(root: Path) -> dict:
    """Random-weight ViT-B files in the official layouts for the two evaluation-only configs (their
    ``pretrained`` must give every weight), and a local tokenizer."""
    import torch
    from models.factory import create_model
    from tasks.caption import NocapsConfig
    from tasks.retrieval import RetrievalConfig
    from utils.config import load_config
    tok = str(RETRIEVAL_FIX / "tokenizer")
    files = {}
    for name, schema, kind in (("nocaps", NocapsConfig, "caption"), ("retrieval_coco", RetrievalConfig, "blip")):
        path = root / f"{name}_vit_base_random.pth"
        if not path.exists():
            cfg, _ = load_config(BLIP_CONFIGS / f"{name}.yaml", schema, [f"tokenizer={tok}", "pretrained=''"])
            model, _ = create_model(cfg, kind, "cpu", purpose="train")
            torch.save({"model": model.state_dict()}, path)  # no format tag: recognised by layout, as official files
        files[name] = str(path)
    return {"nocaps": files["nocaps"], "retrieval_msrvtt": files["retrieval_coco"], "tokenizer": tok}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--only", default=None, help="comma-separated config names")
    args = ap.parse_args(argv)
    data = write_data(args.out / "data")
    files = full_size_files(args.out)
    rows = []
    for name in (args.only.split(",") if args.only else ENTRY):
        extra = {"tokenizer": files["tokenizer"], "device": "cpu", "num_workers": 0}
        if name in ("nocaps", "retrieval_msrvtt"):
            extra["pretrained"] = files[name]
        t0 = time.perf_counter()
        proc = subprocess.run(command(name, data, args.out / "runs", extra), cwd=REPO, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        last = (proc.stderr.strip().splitlines() or [""])[-1]
        rows.append((name, ENTRY[name], proc.returncode, seconds, last if proc.returncode else ""))
        print(f"| {name}.yaml | {ENTRY[name]} | {proc.returncode} | {seconds:.0f} s | {rows[-1][4][:150]} |", flush=True)
    return 0 if all(r[2] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
