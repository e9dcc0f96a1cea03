"""ImageCoDe fine-tuning of ContextBLIP, stage 1 and stage 2 (CONTEXTBLIP.md), and evaluation.

    python finetune_imagecode.py --config configs/imagecode_stage1.yaml --opts pretrained=PRETRAIN_CKPT
    python finetune_imagecode.py --config configs/imagecode_stage2.yaml --opts pretrained=STAGE1_CKPT
    torchrun --nproc_per_node 4 finetune_imagecode.py --config configs/imagecode_stage1.yaml --resume auto
    python finetune_imagecode.py --config configs/imagecode_stage2.yaml --evaluate --opts split=test

Stage 1 (``stage: 1``) starts from a ContextBLIP pretraining checkpoint, a merged export or a plain
BLIP checkpoint (``pretrained``) and trains adapter-BLIP + the prediction layer; stage 2 starts from
a stage-1 checkpoint, freezes it and trains the inter-context encoder. ``--evaluate`` scores
``split`` with ``--checkpoint`` (default ``output_dir/checkpoint_best.pth``) and writes
``predictions.json`` (+ ``submission.json`` on test).
"""
from __future__ import annotations

import logging
from pathlib import Path

from data.imagecode import build_imagecode_dataset
from data.transforms import build_test_transform
from models.contextblip import load_contextblip
from models.imagecode import build_imagecode_model
from models.tokenizer import build_tokenizer
from utils import dist as du
from utils.checkpoint import extract_state_dict, load_checkpoint, load_state_dict_with_report
from utils.config import ImageCodeConfig, parse_config
from utils.engine import run_entry, start_run
from utils.imagecode_eval import evaluate_model, format_accuracy, write_outputs
from utils.logging import append_json_line

logger = logging.getLogger("finetune_imagecode")


def _extra_args(parser) -> None:
    parser.add_argument("--evaluate", action="store_true", help="only evaluate `split` (no training)")
    parser.add_argument("--checkpoint", default=None,
                        help="with --evaluate: the fine-tuned checkpoint (default output_dir/checkpoint_best.pth)")
    parser.add_argument("--resume", default=None, help="'auto' (checkpoint_last.pth in output_dir) or a path")
    parser.add_argument("--no_progress", action="store_true", help="disable progress bars")


def _load_full(model, source, strict=True) -> None:
    load_state_dict_with_report(model, extract_state_dict(load_checkpoint(source)), strict=strict)


def build_model(cfg, device, evaluate: bool = False):
    """Stage 1 on ``pretrained`` (ContextBLIP/BLIP weights); stage 2 on a stage-1 checkpoint."""
    tokenizer = build_tokenizer(cfg.tokenizer)
    model = build_imagecode_model(cfg, tokenizer)
    if evaluate:
        pass  # the fine-tuned checkpoint is loaded by the caller
    elif cfg.stage == 1 and cfg.pretrained:
        load_contextblip(model.backbone, cfg.pretrained, strict=cfg.strict_load)
        if cfg.head_init == "itm":
            model.init_prediction_from_itm()
    elif cfg.stage == 1:
        logger.warning("stage 1 without `pretrained`: adapter-BLIP starts from random weights")
    else:
        if not cfg.pretrained:
            raise SystemExit("stage 2 needs `pretrained`: the stage-1 checkpoint (finetune_imagecode.py, stage: 1)")
        # The whole of stage 1 must load: stage 2 trains on top of exactly it.
        _load_full(model.stage1, cfg.pretrained, strict=True)
    return model.to(device), tokenizer


def evaluate_only(args, cfg, model, tokenizer, info, output_dir: Path) -> dict:
    source = args.checkpoint or output_dir / "checkpoint_best.pth"
    _load_full(model, source, strict=True)
    dataset = build_imagecode_dataset(cfg, cfg.split, build_test_transform(cfg.image_size))
    scores = evaluate_model(model, dataset, tokenizer, cfg, info.device, progress=not args.no_progress)
    metrics = write_outputs(output_dir, dataset, scores)
    record = {"split": cfg.split, "checkpoint": str(source), **{f"{cfg.split}_{k}": v for k, v in metrics.items()}}
    if info.is_main:
        append_json_line(output_dir / "evaluate.txt", record)
        print(f"stage {cfg.stage} on {cfg.split}: {format_accuracy(metrics)}", flush=True)
    return record


def main(argv=None) -> dict:
    args, cfg, doc = parse_config(ImageCodeConfig, argv, description=__doc__.splitlines()[0], extra_args=_extra_args)
    info, output_dir = start_run(cfg, doc)
    try:
        model, tokenizer = build_model(cfg, info.device, evaluate=args.evaluate)
        if args.evaluate:
            return evaluate_only(args, cfg, model, tokenizer, info, output_dir)
        from utils.imagecode_train import train  # the training loop lives in the shared engine
        return train(args, cfg, model, tokenizer, info, output_dir)
    finally:
        du.cleanup()


if __name__ == "__main__":
    run_entry(main, logger)
