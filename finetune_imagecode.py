"""ImageCoDe fine-tuning of ContextBLIP, stage 1 and stage 2 (docs/CONTEXTBLIP.md), and evaluation;
the task's code is ``tasks/imagecode.py``.

    python finetune_imagecode.py --config configs/imagecode_stage1.yaml --opts pretrained=PRETRAIN_CKPT
    python finetune_imagecode.py --config configs/imagecode_stage2.yaml --opts pretrained=STAGE1_CKPT
    torchrun --nproc_per_node 4 finetune_imagecode.py --config configs/imagecode_stage1.yaml --resume auto
    python finetune_imagecode.py --config configs/imagecode_stage2.yaml --evaluate --opts split=test
    python finetune_imagecode.py --config configs/imagecode_stage1.yaml --dry_run   # check a config: dry_run.json

Stage 1 (``stage: 1``) starts from a ContextBLIP pretraining checkpoint, a merged export or a plain
BLIP checkpoint (``pretrained``) and trains adapter-BLIP + the prediction layer; stage 2 starts from
a stage-1 checkpoint, freezes it and trains the inter-context encoder. ``--evaluate`` scores
``split`` with ``--checkpoint`` (default ``output_dir/checkpoint_best.pth``) and writes
``predictions.json`` (+ ``submission.json`` on test). Every split the run reads is parsed and its
candidate images checked before the model is built.
"""
from __future__ import annotations

import utils  # noqa: F401  (first: one clear line on an unsupported Python)

import logging
from pathlib import Path

from data.preflight import log_unk_rate
from models.factory import create_model, load_weights
from tasks.imagecode import ImageCodeConfig, build_datasets, evaluate_model, format_accuracy, train, write_outputs
from utils import dist as du
from utils.checkpoint_files import find_checkpoint
from utils.config import parse_config
from utils.cli import NOT_TRAINING
from utils.dry_run import add_dry_run_arg, refuse_dry_run_with
from utils.rundir import commit_run, run_entry, start_run
from utils.logging import append_json_line

logger = logging.getLogger("finetune_imagecode")


def _extra_args(parser) -> None:
    parser.add_argument("--evaluate", action="store_true", help="only evaluate `split` (no training)")
    parser.add_argument("--checkpoint", default=None,
                        help="with --evaluate: the fine-tuned checkpoint (default output_dir/checkpoint_best.pth)")
    parser.add_argument("--resume", default=None, help="'auto' (checkpoint_last.pth in output_dir) or a path")
    parser.add_argument("--no_progress", action="store_true", help="disable progress bars")
    add_dry_run_arg(parser)


def _unused(args) -> tuple:
    return NOT_TRAINING if args.evaluate else ()


def evaluate_only(args, cfg, model, tokenizer, info, dataset, output_dir: Path) -> dict:
    source = args.checkpoint or find_checkpoint(output_dir, "checkpoint_best")
    load_weights(model, source, strict=True)
    commit_run()  # checked and loaded: the run's files are written from here on
    log_unk_rate(tokenizer, dataset.text, f"the {cfg.split} descriptions")
    scores = evaluate_model(model, dataset, tokenizer, cfg, info.device, progress=not args.no_progress)
    metrics = write_outputs(output_dir, dataset, scores)
    record = {"split": cfg.split, "checkpoint": str(source), **{f"{cfg.split}_{k}": v for k, v in metrics.items()}}
    if info.is_main:
        append_json_line(output_dir / "evaluate.txt", record)
        print(f"stage {cfg.stage} on {cfg.split}: {format_accuracy(metrics)}", flush=True)
    return record


def main(argv=None) -> dict:
    args, cfg, doc = parse_config(ImageCodeConfig, argv, description=__doc__.splitlines()[0],
                                  extra_args=_extra_args, unused_keys=_unused)
    refuse_dry_run_with(args, "--evaluate")
    info, output_dir = start_run(cfg, doc, args, trains=not (args.evaluate or args.dry_run))
    try:
        splits = (cfg.split,) if args.evaluate else ("train",) if args.dry_run else ("train", "valid")
        datasets = build_datasets(cfg, splits, dry_run=args.dry_run)
        # Stage 1 starts from `pretrained` (ContextBLIP/BLIP weights), stage 2 from a stage-1
        # checkpoint; --evaluate loads the fine-tuned checkpoint itself.
        model, tokenizer = create_model(cfg, "imagecode", info.device, load=not args.evaluate)
        if args.evaluate:
            return evaluate_only(args, cfg, model, tokenizer, info, datasets[cfg.split], output_dir)
        return train(cfg, model, tokenizer, info, datasets, resume=args.resume, progress=not args.no_progress,
                     dry_run=args.dry_run)
    finally:
        du.cleanup()


if __name__ == "__main__":
    run_entry(main, logger)
