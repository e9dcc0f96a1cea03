"""BLIP image-text retrieval: fine-tuning and evaluation (COCO, Flickr30k, custom BLIP-json data).

    python train_retrieval.py --config configs/retrieval_coco.yaml --output_dir outputs/coco
    torchrun --nproc_per_node 8 train_retrieval.py --config configs/retrieval_coco.yaml
    python train_retrieval.py --config configs/retrieval_coco.yaml --evaluate --save_scores
    python train_retrieval.py --config configs/retrieval_coco.yaml --dry_run    # check a config: dry_run.json

Evaluation follows BLIP's protocol exactly (ITC top-k, ITM rerank, recall@K); see
``tasks/retrieval_eval.py`` for how it is computed fast; the training wiring is ``tasks/retrieval.py``.
Every split the run reads is parsed and its images checked before the model is built.
"""
from __future__ import annotations

import utils  # noqa: F401  (first: one clear line on an unsupported Python)

import logging
from pathlib import Path

import numpy as np

from data.preflight import log_unk_rate
from models.factory import create_model
from tasks.retrieval import RetrievalConfig, build_datasets, eval_splits, run_evaluation, train
from utils import dist as du
from utils.cli import add_train_eval_args, evaluate_splits, run_splits, unused_when_evaluating
from utils.config import parse_config
from utils.dry_run import refuse_dry_run_with
from utils.rundir import run_entry, start_run

logger = logging.getLogger("train_retrieval")


def _extra_args(parser) -> None:
    add_train_eval_args(parser)
    parser.add_argument("--save_scores", action="store_true",
                        help="write scores_<split>.npz with score_i2t [n_img, n_txt] and score_t2i [n_txt, n_img]")


def evaluate_only(args, cfg, model, tokenizer, datasets, output_dir: Path) -> dict:
    def one(split, dataset) -> dict:
        log_unk_rate(tokenizer, dataset.text, f"the {split} captions")
        out = run_evaluation(model, dataset, tokenizer, cfg, progress=not args.no_progress)
        if du.is_main_process() and args.save_scores:
            np.savez(output_dir / f"scores_{split}.npz", score_i2t=out.score_i2t, score_t2i=out.score_t2i,
                     **out.index_arrays())
        return {f"{split}_{k}": v for k, v in out.metrics.items()}
    return evaluate_splits(datasets, one, output_dir, logger)


def main(argv=None) -> dict:
    args, cfg, doc = parse_config(RetrievalConfig, argv, description=__doc__.splitlines()[0],
                                  extra_args=_extra_args, unused_keys=unused_when_evaluating)
    refuse_dry_run_with(args, "--evaluate")
    info, output_dir = start_run(cfg, doc, args, trains=not (args.evaluate or args.dry_run))
    try:
        datasets = build_datasets(cfg, run_splits(args, eval_splits(cfg)), dry_run=args.dry_run)
        # Evaluation needs no momentum encoders or queues: half the memory.
        model, tokenizer = create_model(cfg, "blip_inference" if args.evaluate else "blip", info.device,
                                        purpose="eval" if args.evaluate else "train")
        if args.evaluate:
            return evaluate_only(args, cfg, model, tokenizer, datasets, output_dir)
        return train(cfg, model, tokenizer, info, datasets, resume=args.resume, progress=not args.no_progress,
                     dry_run=args.dry_run)
    finally:
        du.cleanup()


if __name__ == "__main__":
    run_entry(main, logger)
