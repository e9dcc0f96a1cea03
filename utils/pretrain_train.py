"""ContextBLIP adapter pretraining on the shared engine (the loop behind ``pretrain.py``).

Each epoch: train (ITM + TMIM, BLIP frozen), write one ``log.txt`` JSON line (``train_lr``,
``train_loss_itm``, ``train_loss_tmim``), ``checkpoint_last.pth`` (atomic; trainable parts + config)
and the mask picture ``masks/epoch_NN.png``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

import torch

from data.collate import RetrievalCollator
from data.pretrain import build_pretrain_dataset
from data.transforms import build_test_transform
from data.utils import load_image
from utils import dist as du
from utils.config import config_to_dict
from utils.engine import Trainer, autocast
from utils.retrieval_train import train_transform
from utils.schedule import WarmupStepSchedule, build_adamw
from utils.visualize import caption_with_guide, save_mask_grid

logger = logging.getLogger(__name__)

# The pictures use their own generator: the same guide tokens every epoch (so the grids show how
# the mask moves as the adapter learns), and the training stream is left untouched.
VIS_SEED = 1234


def pretrain_loss(model, batch, ctx):
    return model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["idx"],
                 generator=ctx["generator"])


def collator(cfg, tokenizer) -> RetrievalCollator:
    # The released guide token is drawn from all max_tokens positions, padding included: pad fully
    # then. With real-word guides dynamic padding changes no result and saves compute.
    return RetrievalCollator(tokenizer, cfg.max_tokens, dynamic_padding=cfg.guide_token != "any")


def visual_batch(dataset, n: int, image_size: int, collate) -> Optional[dict]:
    """The first ``n`` distinct images of ``dataset`` (test transform, first caption) as a batch."""
    transform, seen, items = build_test_transform(image_size), set(), []
    for i in range(len(dataset)):
        if len(items) == n:
            break
        if dataset.image_idx(i) in seen:
            continue
        seen.add(dataset.image_idx(i))
        image = load_image(dataset.image_path(i), context=dataset.source(i))
        items.append((transform(image), dataset.captions[i][0], dataset.image_idx(i)))
    return collate(items) if items else None


@torch.no_grad()
def draw_masks(model, tokenizer, batch: dict, path: Path, title: str, precision: str = "fp32") -> Path:
    """Draw the masks ``model`` picks for ``batch`` (a collated batch) into ``path``."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(VIS_SEED)
    with autocast(device, precision):
        m = model.compute_mask(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], gen)
    model.train(was_training)
    captions: List[str] = []
    guides: List[Optional[str]] = []
    for b in range(batch["input_ids"].shape[0]):
        length = int(batch["attention_mask"][b].sum())
        tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][b, :length].tolist())
        g = int(m.guide[b])
        guides.append(None if g < 0 else tokens[g])
        captions.append(caption_with_guide(tokens[1:-1], g - 1))
    return save_mask_grid(path, batch["pixel_values"], m.mask, model.vit.arch.patch_size, captions, guides, title)


def train(args, cfg, model, tokenizer, info: du.DistInfo, output_dir: Path) -> dict:
    dataset = build_pretrain_dataset(cfg, train_transform(cfg))
    optimizer = build_adamw(model.parameters(), cfg.init_lr, cfg.weight_decay)
    schedule = WarmupStepSchedule(cfg.init_lr, cfg.min_lr, cfg.lr_decay_rate, cfg.warmup_steps, cfg.warmup_lr)
    trainer = Trainer(model, optimizer, schedule, info, output_dir, precision=cfg.precision,
                      grad_accum_steps=cfg.grad_accum_steps, clip_grad_norm=cfg.clip_grad_norm,
                      log_every=cfg.log_every, seed=cfg.seed, ckpt_every_steps=cfg.ckpt_every_steps,
                      config=config_to_dict(cfg), progress=not args.no_progress)
    if args.resume:
        trainer.resume(args.resume)
    collate = collator(cfg, tokenizer)
    loader = trainer.loader(dataset, cfg.batch_size_train, collate, num_workers=cfg.num_workers)
    logger.info("pretraining on %d pairs of %d images, %d batches per epoch per rank; trainable parameters: %d",
                len(dataset), dataset.num_images, len(loader),
                sum(p.numel() for p in model.parameters() if p.requires_grad))
    vis = visual_batch(dataset, cfg.visualize_samples, cfg.image_size, collate) \
        if info.is_main and cfg.visualize_samples else None

    while trainer.state.epoch < cfg.max_epoch:
        epoch = trainer.state.epoch
        losses = trainer.train_epoch(loader, pretrain_loss)
        record = {"train_lr": optimizer.param_groups[0]["lr"], **{f"train_{k}": v for k, v in losses.items()}}
        trainer.end_epoch(record)
        logger.info("epoch %d: %s", epoch, {k: round(v, 5) for k, v in record.items()})
        trainer.save("checkpoint_last.pth")
        if vis is not None:
            draw_masks(model, tokenizer, vis, output_dir / "masks" / f"epoch_{epoch:02d}.png",
                       f"epoch {epoch}: {cfg.mask_strategy} mask, rate {cfg.mask_rate}", cfg.precision)
    return trainer.state.history[-1] if trainer.state.history else {}
