"""ImageCoDe zero-shot: score each description's 10 candidates with a BLIP or ContextBLIP checkpoint.

    python zero_shot.py --config configs/imagecode_zeroshot.yaml --opts pretrained=model_base.pth
    python zero_shot.py --config configs/imagecode_zeroshot.yaml --score itc
    python zero_shot.py --config configs/imagecode_zeroshot.yaml --opts split=test   # + submission.json
    torchrun --nproc_per_node 8 zero_shot.py --config configs/imagecode_zeroshot.yaml

Scores (``--score``): ``itm`` softmax(itm_head)[:, 1] (default, as released), ``itc`` cosine of the
ITC projections, ``itm+itc`` ITM logit + cosine. A plain BLIP checkpoint is scored as BLIP (no
adapter); a ContextBLIP pretraining checkpoint or merged export with its adapter. Writes
``predictions.json``, ``evaluate.txt`` (accuracy overall / video / static) and, on the unlabelled
test file, the leaderboard ``submission.json``. The split is parsed and every candidate image checked
before the model is built.
"""
from __future__ import annotations

import utils  # noqa: F401  (first: one clear line on an unsupported Python)

import logging

import torch

from data.preflight import log_unk_rate
from models.factory import create_model
from models.imagecode import ZERO_SHOT_SCORES
from tasks.imagecode import (ImageCodeConfig, build_datasets, format_accuracy, map_over_sets, write_outputs,
                             zero_shot_scorer)
from utils import dist as du
from utils.config import parse_config
from utils.cli import NOT_TRAINING
from utils.rundir import commit_run, run_entry, start_run
from utils.logging import append_json_line

logger = logging.getLogger("zero_shot")


def _extra_args(parser) -> None:
    parser.add_argument("--score", choices=ZERO_SHOT_SCORES, default=None,
                        help="candidate score (overrides the config's `score`; default itm)")
    parser.add_argument("--no_progress", action="store_true", help="disable progress bars")


def main(argv=None) -> dict:
    args, cfg, doc = parse_config(ImageCodeConfig, argv, description=__doc__.splitlines()[0],
                                  extra_args=_extra_args, unused_keys=lambda _: NOT_TRAINING)
    if args.score:
        cfg.score = doc["score"] = args.score
    info, output_dir = start_run(cfg, doc, args, trains=False)
    try:
        dataset = build_datasets(cfg, (cfg.split,))[cfg.split]
        model, tokenizer = create_model(cfg, "zero_shot", info.device, purpose="eval")
        if model.use_adapter != cfg.use_adapter:  # a plain BLIP checkpoint: record what was run
            doc["use_adapter"] = model.use_adapter
        commit_run(doc)  # checked and loaded: the run's files are written from here on
        log_unk_rate(tokenizer, dataset.text, f"the {cfg.split} descriptions")
        k = len(dataset.items[0].candidates) if len(dataset) else 10
        with torch.no_grad():
            scores = map_over_sets(zero_shot_scorer(model, cfg.score), dataset, tokenizer, cfg.max_tokens, (k,),
                                   cfg.batch_size_test, info.device, cfg.num_workers, cfg.precision,
                                   progress=not args.no_progress)
        metrics = write_outputs(output_dir, dataset, scores)
        record = {"split": cfg.split, "score": cfg.score, **{f"{cfg.split}_{k}": v for k, v in metrics.items()}}
        if info.is_main:
            append_json_line(output_dir / "evaluate.txt", record)
            print(f"zero-shot ({cfg.score}) on {cfg.split}: {format_accuracy(metrics)}", flush=True)
        return record
    finally:
        du.cleanup()


if __name__ == "__main__":
    run_entry(main, logger)
