"""ImageCoDe fine-tuning on the shared engine (the loop behind ``finetune_imagecode.py``).

Stage 1 trains adapter-BLIP and the prediction layer (two learning rates); stage 2 trains only the
inter-context encoder on a frozen stage 1. Loss: cross-entropy over each description's candidates,
the mean over descriptions (and over ranks and accumulation steps: the engine averages). Each
epoch: train, evaluate valid, on a new best write ``checkpoint_best.pth`` and ``predictions.json``;
always ``checkpoint_last.pth`` and a ``log.txt`` line.

Stage 2 with ``cache_features``: the frozen stage-1 features of every train and valid description
are computed once (they cannot change without augmentation), and the encoder trains on them.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from data.collate import ImageSetCollator
from data.imagecode import build_imagecode_dataset
from data.transforms import build_test_transform
from utils import dist as du
from utils.config import config_to_dict
from utils.engine import Trainer
from utils.imagecode_eval import evaluate_model, format_accuracy, map_over_sets, write_outputs
from utils.retrieval_train import train_transform  # same keys: crop scale, flip, RandAugment, resize-only
from utils.schedule import StepSchedule

logger = logging.getLogger(__name__)


class CachedFeatures(Dataset):
    """Item ``i`` -> ``(features [K, D], target, i)``: precomputed frozen stage-1 features."""

    def __init__(self, features: torch.Tensor, targets: list):
        self.features = features
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.features[i], self.targets[i], i


def _collate_features(batch):
    feats, target, index = zip(*batch)
    return {"features": torch.stack(feats), "target": torch.as_tensor(target), "index": torch.as_tensor(index)}


def param_groups(model, cfg) -> list:
    """Stage 1: adapter-BLIP at ``init_lr``, the prediction layer at ``head_lr``; stage 2: the encoder."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.stage == 2:
        return [{"params": [p for _, p in trainable], "lr_scale": 1.0}]
    head = [p for n, p in trainable if n.startswith("prediction.")]
    body = [p for n, p in trainable if not n.startswith("prediction.")]
    return [{"params": body, "lr_scale": 1.0}, {"params": head, "lr_scale": cfg.head_lr / cfg.init_lr}]


def build_optimizer(groups: list, cfg) -> torch.optim.Optimizer:
    kind = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return kind(groups, lr=cfg.init_lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def imagecode_loss(video_of: torch.Tensor):
    """Cross-entropy over the candidates, mean over the batch's descriptions."""
    def loss_fn(model, batch, ctx):
        video = video_of.to(batch["index"].device)[batch["index"]]
        if "features" in batch:
            logits = model(features=batch["features"], video=video)
        else:
            logits = model(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"],
                           video=video)
        return {"loss": F.cross_entropy(logits.float(), batch["target"])}
    return loss_fn


def _stage1_features(model, dataset, tokenizer, cfg, device, progress):
    logger.info("computing frozen stage-1 features of %d descriptions", len(dataset))
    model.eval()
    return map_over_sets(lambda b: model.features(b["input_ids"], b["attention_mask"],
                                                  image_embeds=model.embed_candidates(b["pixel_values"])[b["set_index"]]),
                         dataset, tokenizer, cfg.max_tokens, (len(dataset.items[0].candidates), model.width),
                         cfg.batch_size_test, device, cfg.num_workers, cfg.precision, progress)


def train(args, cfg, model, tokenizer, info: du.DistInfo, output_dir: Path) -> dict:
    test_tf = build_test_transform(cfg.image_size)
    cache = cfg.stage == 2 and cfg.cache_features
    train_ds = build_imagecode_dataset(cfg, "train", test_tf if cache else train_transform(cfg),
                                       shared_randomness=cfg.train_shared_crop)
    valid_ds = build_imagecode_dataset(cfg, "valid", test_tf)
    video_of = torch.tensor([it.video for it in train_ds.items])
    optimizer = build_optimizer(param_groups(model, cfg), cfg)
    trainer = Trainer(model, optimizer, StepSchedule(cfg.init_lr, cfg.lr_decay_rate, cfg.min_lr), info, output_dir,
                      precision=cfg.precision, grad_accum_steps=cfg.grad_accum_steps, clip_grad_norm=cfg.clip_grad_norm,
                      log_every=cfg.log_every, seed=cfg.seed, ckpt_every_steps=cfg.ckpt_every_steps,
                      config=config_to_dict(cfg), progress=not args.no_progress)
    if args.resume:
        trainer.resume(args.resume)
    valid_feats = None
    if cache:
        progress = not args.no_progress
        train_feats = _stage1_features(model, train_ds, tokenizer, cfg, info.device, progress)
        valid_feats = _stage1_features(model, valid_ds, tokenizer, cfg, info.device, progress)
        loader = trainer.loader(CachedFeatures(train_feats, [it.target for it in train_ds.items]),
                                cfg.batch_size_train, _collate_features, num_workers=0)
    else:
        loader = trainer.loader(train_ds, cfg.batch_size_train, ImageSetCollator(tokenizer, cfg.max_tokens),
                                num_workers=cfg.num_workers)
    logger.info("stage %d: %d train descriptions, %d batches per epoch per rank; %d valid descriptions",
                cfg.stage, len(train_ds), len(loader), len(valid_ds))
    loss_fn = imagecode_loss(video_of)
    while trainer.state.epoch < cfg.max_epoch:
        epoch = trainer.state.epoch
        losses = trainer.train_epoch(loader, loss_fn)
        record = {"train_lr": optimizer.param_groups[0]["lr"], **{f"train_{k}": v for k, v in losses.items()}}
        metric, scores = None, None
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.max_epoch:
            scores = evaluate_model(model, valid_ds, tokenizer, cfg, info.device, not args.no_progress, valid_feats)
            val = write_outputs(output_dir, valid_ds, scores, name="predictions_last.json")
            record.update({f"valid_{k}": v for k, v in val.items()})
            metric = val["acc"]
            logger.info("epoch %d: %s", epoch, format_accuracy(val, "valid "))
        new_best = metric is not None and metric > trainer.state.best
        trainer.end_epoch(record, metric)
        if new_best:
            write_outputs(output_dir, valid_ds, scores)
            trainer.save("checkpoint_best.pth")
        trainer.save("checkpoint_last.pth")
    return trainer.state.history[-1] if trainer.state.history else {}
