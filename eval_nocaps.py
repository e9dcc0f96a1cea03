"""NoCaps captioning with a BLIP caption checkpoint (BLIP's ``eval_nocaps.py`` and ``configs/nocaps.yaml``).

    python eval_nocaps.py --config configs/nocaps.yaml --output_dir outputs/nocaps
    torchrun --nproc_per_node 8 eval_nocaps.py --config configs/nocaps.yaml
    python eval_nocaps.py --config configs/nocaps.yaml --dry_run     # check: one batch, dry_run.json

Captions every image of ``<ann_root>/nocaps_val.json`` and ``nocaps_test.json`` (BLIP's files:
``{"image", "img_id"}``, images under ``image_root``) with the config's decoding (BLIP: 3 beams,
max 20, min 5, repetition penalty 1.1, prompt ``a picture of ``) and writes ``captions_val.json`` /
``captions_test.json`` (``[{"image_id": img_id, "caption"}]``, what the NoCaps evaluation server
takes; BLIP writes the same lists as ``result/val.json``, ``result/test.json``). The references are
not public: nothing is scored. The wiring is ``tasks/caption.py``; every image is checked before the
model is built.
"""
from __future__ import annotations

import utils  # noqa: F401  (first: one clear line on an unsupported Python)

import logging

from torch.utils.data import Subset

from models.factory import create_model
from tasks.caption import NocapsConfig, build_datasets, eval_splits, evaluate_split, generate_captions
from utils import dist as du
from utils.cli import NOT_TRAINING, evaluate_splits
from utils.config import ConfigError, parse_config
from utils.dry_run import add_dry_run_arg, write_dry_run
from utils.rundir import run_entry, start_run

logger = logging.getLogger("eval_nocaps")


def _extra_args(parser) -> None:
    add_dry_run_arg(parser, "check the evaluation: pre-flight, build, load, caption the first batch of the "
                            "first split; writes output_dir/dry_run.json and exits")
    parser.add_argument("--eval_splits", default=None, help="comma-separated splits (default: val,test)")


def main(argv=None) -> dict:
    args, cfg, doc = parse_config(NocapsConfig, argv, description=__doc__.splitlines()[0],
                                  extra_args=_extra_args, unused_keys=lambda args: NOT_TRAINING)
    args.evaluate = True  # this script only evaluates (config_evaluate.yaml in a training run's folder)
    info, output_dir = start_run(cfg, doc, args, trains=False)
    try:
        configured = eval_splits(cfg)
        splits = tuple(s.strip() for s in args.eval_splits.split(",")) if args.eval_splits else configured
        unknown = [s for s in splits if s not in configured]
        if unknown:
            raise ConfigError(f"--eval_splits: {unknown} not configured (NoCaps: {', '.join(configured)})")
        datasets = build_datasets(cfg, splits[:1] if args.dry_run else splits)
        model, _ = create_model(cfg, "caption", info.device, purpose="eval")
        if args.dry_run:
            split, dataset = next(iter(datasets.items()))
            captions = generate_captions(model, Subset(dataset, range(min(cfg.batch_size_test, len(dataset)))), cfg)
            return write_dry_run(output_dir, {"split": split, "images": len(dataset), "batch": len(captions),
                                              "captions": captions[:4], "world_size": info.world_size}, logger)
        return evaluate_splits(datasets, lambda split, ds: evaluate_split(model, ds, cfg, split, output_dir),
                               output_dir, logger)
    finally:
        du.cleanup()


if __name__ == "__main__":
    run_entry(main, logger)
