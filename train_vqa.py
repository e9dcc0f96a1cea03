"""BLIP visual question answering: fine-tuning and evaluation (VQA v2, Visual Genome QA, OK-VQA, custom json/CSV).

    python train_vqa.py --config configs/vqa.yaml --output_dir outputs/vqa
    torchrun --nproc_per_node 8 train_vqa.py --config configs/vqa.yaml
    python train_vqa.py --config configs/vqa.yaml --evaluate          # answer the test split: vqa_result.json
    python train_vqa.py --config configs/vqa.yaml --resume auto
    python train_vqa.py --config configs/vqa.yaml --dry_run           # check a config: dry_run.json

``inference: rank`` (BLIP's default: the best of the top ``k_test`` candidates of ``answer_list``)
or ``generate`` (beam search). The test split's answers go to ``vqa_result.json``
(``[{"question_id", "answer"}]``, what the VQA v2 evaluation server takes); a split whose entries
carry their annotators' answers is also scored (VQA accuracy, overall and per answer type;
``--evaluate`` appends it to ``evaluate.txt``). The task's wiring is ``tasks/vqa.py``. Every split
is parsed and its images checked before the model is built.
"""
from __future__ import annotations

import utils  # noqa: F401  (first: one clear line on an unsupported Python)

import logging

from models.factory import create_model
from tasks.vqa import VQAConfig, build_datasets, eval_splits, evaluate_split, train
from utils import dist as du
from utils.cli import add_train_eval_args, evaluate_splits, run_splits, unused_when_evaluating
from utils.config import parse_config
from utils.dry_run import refuse_dry_run_with
from utils.rundir import run_entry, start_run

logger = logging.getLogger("train_vqa")


def main(argv=None) -> dict:
    args, cfg, doc = parse_config(VQAConfig, argv, description=__doc__.splitlines()[0],
                                  extra_args=add_train_eval_args, unused_keys=unused_when_evaluating)
    refuse_dry_run_with(args, "--evaluate")
    info, output_dir = start_run(cfg, doc, args, trains=not (args.evaluate or args.dry_run))
    try:
        datasets = build_datasets(cfg, run_splits(args, eval_splits(cfg)), dry_run=args.dry_run)
        model, tokenizer = create_model(cfg, "vqa", info.device, purpose="eval" if args.evaluate else "train")
        if args.evaluate:
            return evaluate_splits(datasets, lambda split, ds: evaluate_split(model, ds, cfg, split, output_dir),
                                   output_dir, logger)
        return train(cfg, model, tokenizer, info, datasets, resume=args.resume, progress=not args.no_progress,
                     dry_run=args.dry_run)
    finally:
        du.cleanup()


if __name__ == "__main__":
    run_entry(main, logger)
