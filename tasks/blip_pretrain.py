"""BLIP's own pretraining (ITC + ITM + LM with the tied decoder): its config, data and loss, and its
hooks into the shared loop (``pretrain_blip.py``).

Pairs are docs/FORMATS.md 2 json lists (``train_file``: one file or a list, as BLIP's
``configs/pretrain.yaml``). Every pair is its own contrastive class (BLIP's diagonal targets): the
loss gives each row of a step a unique id, and queued features are never positives. ``alpha``
ramps from 0 over the first ``alpha_ramp_epochs`` (2) epochs, per step. Schedule: linear warm-up from
``warmup_lr`` to ``init_lr`` over ``warmup_steps``, then ``init_lr * lr_decay_rate ** epoch`` down to
``min_lr``. BLIP's ``laion_path`` adds one json list of its folder per epoch, in turn
(``data/pretrain.py`` ``RotatingPairs``). ``log.txt`` gets ``train_loss_ita``, ``train_loss_itm``, ``train_loss_lm``.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Union

import torch
from pydantic import model_validator

from data.collate import RetrievalCollator
from data.preflight import caption_texts, check_splits, log_unk_rate
from data.pretrain import PretrainDataset, RotatingPairs, build_pretrain_dataset
from data.transforms import build_test_transform
from models.blip import BlipArch, ITCSettings
from models.distill import DistillSettings, check_teacher
from tasks.retrieval import train_transform
from utils import dist as du
from utils.config import Fraction, NonNegFloat, NonNegInt, PosFloat, PosInt
from utils.engine import Trainer
from utils.schedule import WarmupStepSchedule, build_adamw
from utils.settings import (AugmentSettings, batch_size_alias, ColumnSettings, DecaySettings, LoopSettings, OptimSettings, RunSettings,
                            StreamSettings, TextSettings, WarmupSettings, WeightsSettings)

logger = logging.getLogger(__name__)


class BlipPretrainConfig(BlipArch, ITCSettings, DistillSettings, TextSettings, WeightsSettings, AugmentSettings,
                         StreamSettings, ColumnSettings, OptimSettings, WarmupSettings, DecaySettings, LoopSettings,
                         RunSettings):
    """BLIP pretraining (pretrain_blip.py), and DLIP distillation when ``teacher`` is set. Defaults
    are BLIP's released recipe (docs/BLIP.md); configs/dlip_pretrain.yaml is DLIP's."""
    train_file: Union[str, List[str]] = ''      # json/CSV lists, img2dataset folders, tar/parquet shards (FORMATS.md 2-2c)
    image_root: str = ''                        # prefix for relative image paths ('' = as written)
    skip_bad_images: bool = False               # drop pairs of missing/unreadable images (logged, counted)
    image_size: PosInt = 224
    max_tokens: PosInt = 30                     # BLIP pads/truncates pretraining text to 30 tokens
    batch_size_train: PosInt = 75               # per GPU
    batch_size: Optional[PosInt] = None         # BLIP's pretraining key: batch_size_train (which wins if both)
    laion_path: str = ''                        # BLIP's: a folder of json lists, one added to train_file per epoch
    init_lr: PosFloat = 3e-4
    min_lr: NonNegFloat = 1e-6
    warmup_steps: NonNegInt = 3000
    warmup_lr: NonNegFloat = 1e-6
    max_epoch: NonNegInt = 20
    train_crop_min_scale: Fraction = 0.2
    alpha_ramp_epochs: NonNegInt = 2            # alpha grows linearly from 0 over these epochs (per step)

    @model_validator(mode='before')
    @classmethod
    def _batch_size_alias(cls, data):
        return batch_size_alias(data, ('batch_size_train',))

    @model_validator(mode='after')
    def _has_pairs(self):
        if not self.train_file:
            raise ValueError('train_file: must name at least one pretraining json file')
        return self


def build_dataset(cfg: BlipPretrainConfig, dry_run: bool = False) -> PretrainDataset:
    """The pairs of ``train_file`` (train transform; ``dry_run``: the test transform), parsed and
    with their images checked before any model is built. A collective under torchrun."""
    transform = build_test_transform(cfg.image_size) if dry_run else train_transform(cfg, cfg.image_size)
    dataset = build_pretrain_dataset(cfg, transform, shuffle=not dry_run)
    if isinstance(dataset, RotatingPairs):  # laion_path: train_file + every file of the folder, one at a time
        dataset.preflight(lambda split: check_splits(split, cfg.skip_bad_images))
    else:
        check_splits({"train": dataset}, cfg.skip_bad_images)
    return dataset


def pretrain_loss(cfg: BlipPretrainConfig, teacher=None):
    """ITC + ITM + LM (+ with a ``teacher`` the distillation terms, each times its weight); each row
    of a step its own class (ids unique over every rank's rows). In a dry run ``alpha`` is the
    config's (no ramp) and the terms are returned unweighted."""
    weights = cfg.distill_weights()

    def alpha_of(ctx):
        ramp = cfg.alpha_ramp_epochs * ctx['batches_per_epoch']
        return cfg.alpha * (min(1.0, (ctx['epoch'] * ctx['batches_per_epoch'] + ctx['batch_index']) / ramp)
                            if ramp and not ctx.get('dry_run') else 1.0)

    def loss_fn(model, batch, ctx):
        B = batch['input_ids'].shape[0]
        ids = torch.arange(B, device=batch['input_ids'].device) + du.get_rank() * B
        losses = model(batch['pixel_values'], batch['input_ids'], batch['attention_mask'], ids, alpha=alpha_of(ctx),
                       generator=ctx['generator'], teacher=teacher, distill=cfg)
        if ctx.get('dry_run'):
            return losses
        return {k: v * weights[k] if k in weights else v for k, v in losses.items()}

    def accumulated(model, micro, ctx, backward):
        # accum_freq: the micro-batches as one virtual batch (models/accum.py), each pair its own
        # class over every rank's virtual batch.
        V = sum(b['input_ids'].shape[0] for b in micro)
        start = du.get_rank() * V
        for b in micro:
            n = b['input_ids'].shape[0]
            b['idx'] = torch.arange(start, start + n, device=b['input_ids'].device)
            start += n
        return model.accumulated(micro, alpha_of(ctx), ctx['generator'], backward, teacher=teacher, distill=cfg)

    loss_fn.accumulated = accumulated
    return loss_fn


def train(cfg: BlipPretrainConfig, model, tokenizer, info: du.DistInfo, dataset: PretrainDataset,
          resume: Optional[str] = None, progress: bool = True, teacher=None, dry_run: bool = False) -> dict:
    """Pretrain on ``dataset`` (from ``build_dataset``), distilling ``teacher`` if given
    (``models.factory.create_teacher``). ``dry_run``: one eval-mode forward of the first batch
    (file order), ``dry_run.json``, no step (``Trainer.dry_run``)."""
    model.check_queue(cfg.batch_size_train * info.world_size * cfg.accum_freq)
    log_unk_rate(tokenizer, caption_texts(dataset), "the train captions")
    if teacher is not None:
        check_teacher(model, teacher, cfg)
    optimizer = build_adamw(model.parameters(), cfg.init_lr, cfg.weight_decay)
    schedule = WarmupStepSchedule(cfg.init_lr, cfg.min_lr, cfg.lr_decay_rate, cfg.warmup_steps, cfg.warmup_lr)
    trainer = Trainer(model, optimizer, schedule, info, cfg, progress=progress)
    # Text is padded to max_tokens, as BLIP and DLIP do, when distilling (the logit and attention
    # terms average over every position, padding included) or when token ids are gathered across
    # ranks (negative_all_rank); otherwise only to the batch's longest (no result changes).
    dynamic = teacher is None and not (cfg.negative_all_rank and info.distributed)
    loader = trainer.loader(dataset, cfg.batch_size_train, RetrievalCollator(tokenizer, cfg.max_tokens, dynamic),
                            num_workers=cfg.num_workers, shuffle=not dry_run)
    if dry_run:
        return trainer.dry_run(loader, pretrain_loss(cfg, teacher),
                               extra={"alpha": cfg.alpha, "teacher": cfg.teacher or None,
                                      "distill_weights": cfg.distill_weights() if teacher is not None else None})
    logger.info("%s on %d pairs of %d images, %d batches per epoch per rank",
                "DLIP distillation" if teacher is not None else "BLIP pretraining", len(dataset),
                dataset.num_images, len(loader))
    return trainer.fit(loader, pretrain_loss(cfg, teacher), cfg.max_epoch, resume=resume)
