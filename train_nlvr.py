"""BLIP NLVR2 (a sentence true or false of an image pair): fine-tuning and evaluation.

    python train_nlvr.py --config configs/nlvr.yaml --output_dir outputs/nlvr
    torchrun --nproc_per_node 8 train_nlvr.py --config configs/nlvr.yaml
    python train_nlvr.py --config configs/nlvr.yaml --evaluate          # dev + test: nlvr_result_<split>.json
    python train_nlvr.py --config configs/nlvr.yaml --resume auto
    python train_nlvr.py --config configs/nlvr.yaml --dry_run           # check a config: dry_run.json

Every split (``nlvr_train``, ``nlvr_dev``, ``nlvr_test`` under ``ann_root``) is parsed and both
images of every pair checked before the model is built. Training chooses the best epoch by dev
accuracy (``val_acc``) and evaluates the test split (``test_acc``) at it; ``--evaluate`` writes the
predictions of every split (``nlvr_result_<split>.json``) and appends the accuracies to
``evaluate.txt``. The task's wiring is ``tasks/nlvr.py``.
"""
from __future__ import annotations

import utils  # noqa: F401  (first: one clear line on an unsupported Python)

import logging

from models.factory import create_model
from tasks.nlvr import NLVRConfig, build_datasets, eval_splits, evaluate_split, train
from utils import dist as du
from utils.cli import add_train_eval_args, evaluate_splits, run_splits, unused_when_evaluating
from utils.config import parse_config
from utils.dry_run import refuse_dry_run_with
from utils.rundir import run_entry, start_run

logger = logging.getLogger("train_nlvr")


def main(argv=None) -> dict:
    args, cfg, doc = parse_config(NLVRConfig, argv, description=__doc__.splitlines()[0],
                                  extra_args=add_train_eval_args, unused_keys=unused_when_evaluating)
    refuse_dry_run_with(args, "--evaluate")
    info, output_dir = start_run(cfg, doc, args, trains=not (args.evaluate or args.dry_run))
    try:
        datasets = build_datasets(cfg, run_splits(args, eval_splits(cfg)), dry_run=args.dry_run)
        model, tokenizer = create_model(cfg, "nlvr", info.device, purpose="eval" if args.evaluate else "train")
        if args.evaluate:
            return evaluate_splits(datasets, lambda split, ds: evaluate_split(model, ds, cfg, split, output_dir),
                                   output_dir, logger)
        return train(cfg, model, tokenizer, info, datasets, resume=args.resume, progress=not args.no_progress,
                     dry_run=args.dry_run)
    finally:
        du.cleanup()


if __name__ == "__main__":
    run_entry(main, logger)
