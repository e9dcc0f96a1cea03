"""BLIP retrieval fine-tuning on the shared engine (the loop behind ``train_retrieval.py``).

Each epoch: train, evaluate val (BLIP's protocol), evaluate test on a new best val ``r_mean``, write
``checkpoint_best.pth`` / ``checkpoint_last.pth`` and one ``log.txt`` JSON line with BLIP's keys.
"""
from __future__ import annotations

import logging
from pathlib import Path

from data.collate import RetrievalCollator
from data.retrieval import build_retrieval_datasets
from data.transforms import build_test_transform, build_train_transform
from utils import dist as du
from utils.config import config_to_dict
from utils.engine import Trainer
from utils.evaluation import evaluate_retrieval
from utils.schedule import CosineSchedule, build_adamw

logger = logging.getLogger(__name__)


def retrieval_loss(cfg):
    """The per-batch loss: ITC + ITM, with alpha ramped linearly over the first epoch (BLIP)."""
    def loss_fn(model, batch, ctx):
        alpha = cfg.alpha
        if ctx["epoch"] == 0:
            alpha *= min(1.0, ctx["batch_index"] / ctx["batches_per_epoch"])
        return model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["idx"],
                     alpha=alpha, generator=ctx["generator"])
    return loss_fn


def train_transform(cfg):
    if cfg.train_resize_only:
        return build_test_transform(cfg.image_size)
    return build_train_transform(cfg.image_size, scale=(cfg.train_crop_min_scale, 1.0), hflip=cfg.train_hflip,
                                 randaug=cfg.train_randaug)


def train(args, cfg, model, tokenizer, info: du.DistInfo, output_dir: Path) -> dict:
    # Fail at start-up, not after an hour: the queue takes whole global batches.
    model.check_queue(cfg.batch_size_train * info.world_size)
    has_val = cfg.dataset != "custom" or cfg.val_file is not None
    has_test = cfg.dataset != "custom" or cfg.test_file is not None
    splits = ("train",) + (("val",) if has_val else ()) + (("test",) if has_test else ())
    datasets = build_retrieval_datasets(cfg, splits=splits, train_transform=train_transform(cfg),
                                        test_transform=build_test_transform(cfg.image_size))
    optimizer = build_adamw(model.parameters(), cfg.init_lr, cfg.weight_decay)
    trainer = Trainer(model, optimizer, CosineSchedule(cfg.init_lr, cfg.min_lr, cfg.max_epoch, cfg.warmup_steps),
                      info, output_dir, precision=cfg.precision, grad_accum_steps=cfg.grad_accum_steps,
                      clip_grad_norm=cfg.clip_grad_norm, log_every=cfg.log_every, seed=cfg.seed,
                      ckpt_every_steps=cfg.ckpt_every_steps, config=config_to_dict(cfg),
                      progress=not args.no_progress)
    if args.resume:
        trainer.resume(args.resume)
    # Gathering token ids across ranks (negative_all_rank) needs one fixed length on every rank.
    dynamic = not (cfg.negative_all_rank and info.distributed)
    loader = trainer.loader(datasets["train"], cfg.batch_size_train,
                            RetrievalCollator(tokenizer, cfg.max_tokens, dynamic_padding=dynamic),
                            num_workers=cfg.num_workers)
    logger.info("training: %d captions of %d images, %d batches per epoch per rank", len(datasets["train"]),
                datasets["train"].num_images, len(loader))
    loss_fn = retrieval_loss(cfg)

    def evaluate(split):
        return evaluate_retrieval(model, datasets[split], tokenizer, k_test=cfg.k_test, max_tokens=cfg.max_tokens,
                                  batch_size=cfg.batch_size_test, rerank_batch_size=cfg.rerank_batch_size,
                                  num_workers=cfg.num_workers, precision=cfg.precision,
                                  progress=not args.no_progress).metrics

    while trainer.state.epoch < cfg.max_epoch:
        epoch = trainer.state.epoch
        losses = trainer.train_epoch(loader, loss_fn)
        record = {"train_lr": optimizer.param_groups[0]["lr"], **{f"train_{k}": v for k, v in losses.items()}}
        metric = None
        if has_val and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.max_epoch):
            val = evaluate("val")
            record.update({f"val_{k}": v for k, v in val.items()})
            metric = val["r_mean"]
        new_best = metric is not None and metric > trainer.state.best
        if has_test and (new_best or not has_val and epoch + 1 == cfg.max_epoch):
            record.update({f"test_{k}": v for k, v in evaluate("test").items()})
        trainer.end_epoch(record, metric)
        logger.info("epoch %d: %s", epoch, {k: round(v, 4) for k, v in record.items()})
        if new_best:
            trainer.save("checkpoint_best.pth")
        trainer.save("checkpoint_last.pth")
    return trainer.state.history[-1] if trainer.state.history else {}
