"""BLIP image-text retrieval: fine-tuning and evaluation (COCO, Flickr30k, custom BLIP-json data).

    python train_retrieval.py --config configs/retrieval_coco.yaml --output_dir outputs/coco
    torchrun --nproc_per_node 8 train_retrieval.py --config configs/retrieval_coco.yaml
    python train_retrieval.py --config configs/retrieval_coco.yaml --evaluate --save_scores

Evaluation follows BLIP's protocol exactly (ITC top-k, ITM rerank, recall@K); see
``utils/evaluation.py`` for how it is computed fast.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from data.retrieval import build_retrieval_datasets
from data.transforms import build_test_transform
from models.blip import build_blip_retrieval, load_blip_weights
from models.tokenizer import build_tokenizer
from utils import dist as du
from utils.config import RetrievalConfig, parse_config
from utils.engine import run_entry, start_run
from utils.evaluation import evaluate_retrieval
from utils.logging import append_json_line

logger = logging.getLogger("train_retrieval")


def _extra_args(parser) -> None:
    parser.add_argument("--evaluate", action="store_true", help="only evaluate (no training)")
    parser.add_argument("--eval_splits", default=None,
                        help="comma-separated splits to evaluate with --evaluate (default: val,test "
                             "when a val file is configured, else test)")
    parser.add_argument("--save_scores", action="store_true",
                        help="write scores_<split>.npz with score_i2t [n_img, n_txt] and score_t2i [n_txt, n_img]")
    parser.add_argument("--resume", default=None, help="'auto' (checkpoint_last.pth in output_dir) or a path")
    parser.add_argument("--no_progress", action="store_true", help="disable progress bars")


def build_model(cfg, device, with_momentum: bool = True):
    """Tokenizer and model (with the config's checkpoint loaded); ``with_momentum=False`` for
    inference only: no momentum encoders or queues, half the memory."""
    tokenizer = build_tokenizer(cfg.tokenizer)
    model = build_blip_retrieval(cfg, tokenizer, with_momentum=with_momentum)
    if cfg.pretrained:
        load_blip_weights(model, cfg.pretrained, strict=cfg.strict_load)  # logs its report
    return model.to(device), tokenizer


def _eval_splits(args, cfg) -> tuple:
    if args.eval_splits:
        return tuple(s.strip() for s in args.eval_splits.split(",") if s.strip())
    has_val = cfg.dataset != "custom" or cfg.val_file
    return ("val", "test") if has_val else ("test",)


def run_evaluation(model, tokenizer, datasets, cfg, split: str, progress: bool = True):
    return evaluate_retrieval(model, datasets[split], tokenizer, k_test=cfg.k_test, max_tokens=cfg.max_tokens,
                              batch_size=cfg.batch_size_test, rerank_batch_size=cfg.rerank_batch_size,
                              num_workers=cfg.num_workers, precision=cfg.precision, progress=progress)


def save_scores(output_dir: Path, split: str, out) -> None:
    np.savez(output_dir / f"scores_{split}.npz", score_i2t=out.score_i2t, score_t2i=out.score_t2i)


def evaluate_only(args, cfg, model, tokenizer, output_dir: Path) -> dict:
    splits = _eval_splits(args, cfg)
    datasets = build_retrieval_datasets(cfg, splits=splits, test_transform=build_test_transform(cfg.image_size))
    record = {}
    for split in splits:
        out = run_evaluation(model, tokenizer, datasets, cfg, split, progress=not args.no_progress)
        record.update({f"{split}_{k}": v for k, v in out.metrics.items()})
        if du.is_main_process() and args.save_scores:
            save_scores(output_dir, split, out)
        logger.info("%s: %s", split, {k: round(v, 2) for k, v in out.metrics.items()})
    if du.is_main_process():
        append_json_line(output_dir / "evaluate.txt", record)
    return record


def main(argv=None) -> dict:
    args, cfg, doc = parse_config(RetrievalConfig, argv, description=__doc__.splitlines()[0], extra_args=_extra_args)
    info, output_dir = start_run(cfg, doc)
    model, tokenizer = build_model(cfg, info.device)
    try:
        if args.evaluate:
            return evaluate_only(args, cfg, model, tokenizer, output_dir)
        from utils.retrieval_train import train  # the training loop lives in the shared engine
        return train(args, cfg, model, tokenizer, info, output_dir)
    finally:
        du.cleanup()


if __name__ == "__main__":
    run_entry(main, logger)
