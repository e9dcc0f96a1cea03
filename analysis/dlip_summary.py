"""The demo's DLIP comparison: teacher, distilled student and scratch student, each fine-tuned the
same way, on retrieval (R@1 both ways), captioning (CIDEr) and VQA (accuracy), with parameter counts and retrieval
evaluation speed. Writes ``DLIP_DIR/summary.json`` and ``DLIP_DIR/summary.md``.

    python -m analysis.dlip_summary outputs/demo/dlip

Expects ``DLIP_DIR/<model>/{pretrain,retrieval,caption,vqa}/`` for ``teacher``, ``student_distilled``
and ``student_scratch`` (run.sh demo writes them):

- ``test_txt_r1`` / ``test_img_r1``: the retrieval fine-tuning's ``log.txt`` (test split, best epoch);
- ``test_CIDEr``: the caption fine-tuning's ``log.txt`` (pycocoevalcap's value, x100 in papers);
- ``test_vqa_acc``: the VQA fine-tuning's ``log.txt`` (test split VQA accuracy, 0-100);
- ``params``: the pretrained model's parameters without momentum copies and queues (ViT, text
  encoder, the decoder's own self-attention and LM head: tied tensors counted once);
- ``eval_images_per_s``: test-split retrieval evaluation (features + ITM rerank of the top k_test)
  of the fine-tuned retrieval checkpoint, timed here in this process (best of 3), images per second.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

MODELS = ("teacher", "student_distilled", "student_scratch")
SKIP = ("visual_encoder_m.", "vision_proj_m.", "text_encoder_m.", "text_proj_m.", "image_queue", "text_queue",
        "idx_queue", "ptr_queue", "queue_ptr")


def _records(path: Path) -> List[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.is_file() else []


def count_params(checkpoint: Path) -> int:
    """Parameters of a pretraining checkpoint's model, momentum copies and queues left out; tensors
    stored once under two names (the tied decoder) counted once."""
    from utils.checkpoint import load_checkpoint
    from utils.state_dict import extract_state_dict
    state = extract_state_dict(load_checkpoint(checkpoint))
    seen, total = set(), 0
    for key, value in state.items():
        if key.startswith(SKIP) or key.endswith("position_ids"):
            continue
        ptr = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if ptr not in seen:
            seen.add(ptr)
            total += value.numel()
    return total


def eval_images_per_s(checkpoint: Path, repeats: int = 1) -> Optional[float]:
    """Time ``train_retrieval.py --evaluate``'s evaluation of the test split in process."""
    from models.factory import create_model
    from tasks.retrieval import RetrievalConfig, build_datasets, run_evaluation
    from utils.checkpoint import load_checkpoint
    stored = load_checkpoint(checkpoint).get("config")
    if not isinstance(stored, dict):
        return None
    fields = RetrievalConfig.model_fields
    cfg = RetrievalConfig.model_validate({k: v for k, v in stored.items() if k in fields})
    dataset = build_datasets(cfg, ("test",))["test"]
    model, tokenizer = create_model(cfg, "blip_inference", "cpu", pretrained=str(checkpoint), purpose="eval")
    model.eval()
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_evaluation(model, dataset, tokenizer, cfg, progress=False)
        seconds = time.perf_counter() - t0
        best = seconds if best is None else min(best, seconds)
    return len(dataset.image) / best if hasattr(dataset, "image") else None


def summarise(dlip: Path) -> Dict[str, dict]:
    from utils.checkpoint_files import find_checkpoint
    out: Dict[str, dict] = {}
    for name in MODELS:
        root = dlip / name
        entry: dict = {}
        tested = [r for r in _records(root / "retrieval" / "log.txt") if "test_txt_r1" in r]
        if tested:
            entry["test_txt_r1"], entry["test_img_r1"] = tested[-1]["test_txt_r1"], tested[-1]["test_img_r1"]
        captioned = [r for r in _records(root / "caption" / "log.txt") if "test_CIDEr" in r]
        if captioned:
            entry["test_CIDEr"] = captioned[-1]["test_CIDEr"]
        answered = [r for r in _records(root / "vqa" / "log.txt") if "test_acc" in r]
        if answered:
            entry["test_vqa_acc"] = answered[-1]["test_acc"]
        pretrain = find_checkpoint(root / "pretrain", "checkpoint_last")
        if pretrain.is_file():
            entry["params"] = count_params(pretrain)
            log = _records(root / "pretrain" / "log.txt")
            if log:
                entry["pretrain_last_epoch"] = {k: v for k, v in log[-1].items() if k.startswith("train_loss")}
        best = find_checkpoint(root / "retrieval", "checkpoint_best")
        best = best if best.is_file() else find_checkpoint(root / "retrieval", "checkpoint_last")
        if best.is_file():
            rate = eval_images_per_s(best, repeats=3)
            if rate is not None:
                entry["eval_images_per_s"] = round(rate, 2)
        out[name] = entry
    return out


def to_markdown(summary: Dict[str, dict]) -> str:
    def f(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else "-"
    lines = ["| model | params (M) | test R@1 image->text | test R@1 text->image | mean R@1 | test CIDEr | "
             "test VQA acc | eval images/s |", "|---|---|---|---|---|---|---|---|"]
    for name, e in summary.items():
        mean = (e["test_txt_r1"] + e["test_img_r1"]) / 2 if "test_txt_r1" in e else None
        lines.append(f"| {name} | {f(e.get('params', 0) / 1e6 if 'params' in e else None, '.3f')} | "
                     f"{f(e.get('test_txt_r1'), '.1f')} | {f(e.get('test_img_r1'), '.1f')} | {f(mean, '.1f')} | "
                     f"{f(e.get('test_CIDEr'), '.3f')} | {f(e.get('test_vqa_acc'), '.1f')} | "
                     f"{f(e.get('eval_images_per_s'), '.1f')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dlip_dir", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    summary = summarise(args.dlip_dir)
    (args.dlip_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    table = to_markdown(summary)
    (args.dlip_dir / "summary.md").write_text(table)
    print(table)
    return args.dlip_dir / "summary.json"


if __name__ == "__main__":
    main()
