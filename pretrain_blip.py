"""BLIP pretraining: ITC + ITM + LM with the decoder tied to the text encoder (``model_base.pth`` layout).

    python pretrain_blip.py --config configs/pretrain_blip.yaml --output_dir outputs/pretrain_blip
    torchrun --nproc_per_node 8 pretrain_blip.py --config configs/pretrain_blip.yaml
    python pretrain_blip.py --config configs/pretrain_blip.yaml --resume auto     # continue exactly
    python pretrain_blip.py --config configs/dlip_pretrain.yaml --opts teacher=model_base.pth   # DLIP
    python pretrain_blip.py --config configs/dlip_pretrain.yaml --dry_run   # check a config: dry_run.json

Its ``checkpoint_last.pth`` is a ``blip`` file in the official pretraining layout: it feeds
``train_retrieval.py``, ``train_caption.py`` and ContextBLIP's ``pretrain.py`` unchanged. The wiring
is ``tasks/blip_pretrain.py``. Pairs are parsed and their images checked before the model is built.
"""
from __future__ import annotations

import utils  # noqa: F401  (first: one clear line on an unsupported Python)

import logging

from models.factory import create_model, create_teacher
from tasks.blip_pretrain import BlipPretrainConfig, build_dataset, train
from utils import dist as du
from utils.config import parse_config
from utils.dry_run import add_dry_run_arg
from utils.rundir import run_entry, start_run

logger = logging.getLogger("pretrain_blip")


def _extra_args(parser) -> None:
    parser.add_argument("--resume", default=None, help="'auto' (checkpoint_last.pth in output_dir) or a path")
    parser.add_argument("--no_progress", action="store_true", help="disable progress bars")
    add_dry_run_arg(parser)


def main(argv=None) -> dict:
    args, cfg, doc = parse_config(BlipPretrainConfig, argv, description=__doc__.splitlines()[0],
                                  extra_args=_extra_args)
    info, _ = start_run(cfg, doc, args, trains=not args.dry_run)
    try:
        dataset = build_dataset(cfg, dry_run=args.dry_run)
        model, tokenizer = create_model(cfg, "blip_pretrain", info.device)
        teacher = create_teacher(cfg, tokenizer, info.device) if cfg.teacher else None
        return train(cfg, model, tokenizer, info, dataset, resume=args.resume, progress=not args.no_progress,
                     teacher=teacher, dry_run=args.dry_run)
    finally:
        du.cleanup()


if __name__ == "__main__":
    run_entry(main, logger)
