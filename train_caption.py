"""BLIP image captioning: fine-tuning and evaluation (COCO Karpathy, Flickr30k, custom json/CSV).

    python train_caption.py --config configs/caption_coco.yaml --output_dir outputs/caption_coco
    torchrun --nproc_per_node 8 train_caption.py --config configs/caption_coco.yaml
    python train_caption.py --config configs/caption_coco.yaml --evaluate
    python train_caption.py --config configs/caption_coco.yaml --resume auto
    python train_caption.py --config configs/caption_coco.yaml --dry_run      # check a config: dry_run.json

Each evaluated split writes ``captions_<split>.json`` (COCO results format) and its COCO caption
metrics (pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE when available; Java required);
``--evaluate`` appends them as one JSON line to ``evaluate.txt``. The task's wiring is
``tasks/caption.py``. Every split is parsed, its images and references checked, and Java found
before the model is built.
"""
from __future__ import annotations

import utils  # noqa: F401  (first: one clear line on an unsupported Python)

import logging

from models.factory import create_model
from tasks.caption import CaptionConfig, build_datasets, eval_splits, evaluate_split, train
from utils import dist as du
from utils.cli import add_train_eval_args, evaluate_splits, run_splits, unused_when_evaluating
from utils.config import parse_config
from utils.dry_run import refuse_dry_run_with
from utils.rundir import run_entry, start_run

logger = logging.getLogger("train_caption")


def _extra_args(parser) -> None:
    add_train_eval_args(parser)


def main(argv=None) -> dict:
    args, cfg, doc = parse_config(CaptionConfig, argv, description=__doc__.splitlines()[0],
                                  extra_args=_extra_args, unused_keys=unused_when_evaluating)
    refuse_dry_run_with(args, "--evaluate")
    info, output_dir = start_run(cfg, doc, args, trains=not (args.evaluate or args.dry_run))
    try:
        datasets = build_datasets(cfg, run_splits(args, eval_splits(cfg)), dry_run=args.dry_run)
        model, tokenizer = create_model(cfg, "caption", info.device, purpose="eval" if args.evaluate else "train")
        if args.evaluate:  # eval_metrics: false -> captions files only, no evaluate.txt
            return evaluate_splits(datasets, lambda split, ds: evaluate_split(model, ds, cfg, split, output_dir),
                                   output_dir, logger)
        return train(cfg, model, tokenizer, info, datasets, resume=args.resume, progress=not args.no_progress,
                     dry_run=args.dry_run)
    finally:
        du.cleanup()


if __name__ == "__main__":
    run_entry(main, logger)
