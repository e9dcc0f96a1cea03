"""ContextBLIP adapter pretraining: its config, loss, mask pictures and hooks into the shared loop
(``pretrain.py``).

Before the model is built, ``build_dataset`` parses the pairs and checks their images
(``data/preflight.py``). Each epoch: train (ITM + TMIM, BLIP frozen), write one ``log.txt`` JSON line
(``train_lr``, ``train_loss_itm``, ``train_loss_tmim``), ``checkpoint_last.pth`` (atomic; trainable
parts + config) and the mask picture ``masks/epoch_NN.png``: images with their caption, the guide
token and the masked patches tinted red.
"""
from __future__ import annotations

import logging
import textwrap
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from pydantic import model_validator

from data.collate import RetrievalCollator
from data.preflight import caption_texts, check_splits, log_unk_rate
from data.pretrain import PretrainDataset, build_pretrain_dataset
from data.transforms import IMAGE_MEAN, IMAGE_STD, build_test_transform
from data.utils import load_image
from models.contextblip import ContextBLIPArch, PretrainSettings, TMIMArch
from tasks.retrieval import train_transform
from utils import dist as du
from utils.config import Fraction, NonNegFloat, NonNegInt, PosFloat, PosInt
from utils.engine import Trainer
from utils.precision import autocast
from utils.schedule import WarmupStepSchedule, build_adamw
from utils.settings import (AugmentSettings, ColumnSettings, DecaySettings, LoopSettings, OptimSettings, RunSettings,
                            StreamSettings, TextSettings, WarmupSettings, WeightsSettings)

logger = logging.getLogger(__name__)

# The pictures use their own generator: the same guide tokens every epoch (so the grids show how
# the mask moves as the adapter learns), and the training stream is left untouched.
VIS_SEED = 1234


class PretrainConfig(ContextBLIPArch, TMIMArch, PretrainSettings, TextSettings, WeightsSettings, AugmentSettings,
                     StreamSettings, ColumnSettings, OptimSettings, WarmupSettings, DecaySettings, LoopSettings,
                     RunSettings):
    """ContextBLIP adapter pretraining (pretrain.py). Defaults are the released recipe
    (configs/pretrain.yaml, docs/CONTEXTBLIP.md); BLIP stays frozen."""
    image_size: PosInt = 224
    max_tokens: PosInt = 30                     # released: padded/truncated to 30 tokens
    train_file: Union[str, List[str]] = ''      # json/CSV lists, img2dataset folders, tar/parquet shards (FORMATS.md 2-2c)
    image_root: str = ''                        # prefix for relative image paths ('' = as written)
    skip_bad_images: bool = False               # drop pairs of missing/unreadable images (logged, counted)
    batch_size_train: PosInt = 256              # per GPU (released: 4 GPUs x 256)
    init_lr: PosFloat = 3e-4
    min_lr: NonNegFloat = 1e-6
    warmup_steps: NonNegInt = 3000              # linear per-step warm-up in epoch 0
    warmup_lr: NonNegFloat = 1e-6
    max_epoch: NonNegInt = 20
    train_crop_min_scale: Fraction = 0.2           # RandomResizedCrop scale=(min, 1)
    visualize_samples: NonNegInt = 4            # images in the per-epoch mask grid (0: none)

    @model_validator(mode='after')
    def _pretraining_checks(self):
        if not self.train_file:
            raise ValueError('train_file: must name at least one pretraining json file')
        n = (self.image_size // self.vit_arch.patch_size) ** 2
        if not 1 <= int(self.mask_rate * n) < n:
            raise ValueError(f'mask_rate: masks int({self.mask_rate} * {n}) patches; need 1 to {n - 1}')
        return self


def pretrain_loss(model, batch, ctx):
    return model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["idx"],
                 generator=ctx["generator"])


def collator(cfg: PretrainConfig, tokenizer) -> RetrievalCollator:
    # The released guide token is drawn from all max_tokens positions, padding included: pad fully
    # then. With real-word guides dynamic padding changes no result and saves compute.
    return RetrievalCollator(tokenizer, cfg.max_tokens, dynamic_padding=cfg.guide_token != "any")

def visual_batch(dataset, n: int, image_size: int, collate) -> Optional[dict]:
    """The first ``n`` distinct images of ``dataset`` (test transform, first caption) as a batch."""
    transform, seen, items = build_test_transform(image_size), set(), []
    if hasattr(dataset, "peek"):  # streamed: the first n usable records of the first shards
        items = [(transform(image), caption, idx) for image, caption, idx in dataset.peek(n)]
        return collate(items) if items else None
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


def build_dataset(cfg: PretrainConfig, dry_run: bool = False) -> PretrainDataset:
    """The pairs of ``train_file`` (train transform; ``dry_run``: the test transform), parsed and
    with their images checked (``skip_bad_images`` drops bad pairs up front): call before building
    a model. A collective."""
    dataset = build_pretrain_dataset(cfg, train_transform(cfg, cfg.image_size, dry_run), shuffle=not dry_run)
    check_splits({"train": dataset}, cfg.skip_bad_images)
    return dataset


def train(cfg: PretrainConfig, model, tokenizer, info: du.DistInfo, dataset: PretrainDataset,
          resume: Optional[str] = None, progress: bool = True, dry_run: bool = False) -> dict:
    """Pretrain on ``dataset`` (from ``build_dataset``). ``dry_run``: one eval-mode forward of the
    first batch (file order), ``dry_run.json``, no step, no mask picture (``Trainer.dry_run``). The
    loss has no ramp; its guide tokens, mask noise and hard negatives are drawn from the trainer's
    generator (seeded by ``seed``), so a dry run repeats exactly."""
    log_unk_rate(tokenizer, caption_texts(dataset), "the train captions")
    optimizer = build_adamw(model.parameters(), cfg.init_lr, cfg.weight_decay)
    schedule = WarmupStepSchedule(cfg.init_lr, cfg.min_lr, cfg.lr_decay_rate, cfg.warmup_steps, cfg.warmup_lr)
    trainer = Trainer(model, optimizer, schedule, info, cfg, progress=progress)
    collate = collator(cfg, tokenizer)
    loader = trainer.loader(dataset, cfg.batch_size_train, collate, num_workers=cfg.num_workers,
                            shuffle=not dry_run)
    if dry_run:
        return trainer.dry_run(loader, pretrain_loss,
                               extra={"mask_strategy": cfg.mask_strategy, "mask_rate": cfg.mask_rate,
                                      "itm_weight": cfg.itm_weight, "tmim_weight": cfg.tmim_weight})
    logger.info("pretraining on %d pairs of %d images, %d batches per epoch per rank; trainable parameters: %d",
                len(dataset), dataset.num_images, len(loader),
                sum(p.numel() for p in model.parameters() if p.requires_grad))
    vis = visual_batch(dataset, cfg.visualize_samples, cfg.image_size, collate) \
        if info.is_main and cfg.visualize_samples else None

    def after_epoch(epoch: int, is_best: bool, is_last: bool) -> None:
        if vis is not None:
            path = draw_masks(model, tokenizer, vis, trainer.output_dir / "masks" / f"epoch_{epoch:02d}.png",
                              f"epoch {epoch}: {cfg.mask_strategy} mask, rate {cfg.mask_rate}", cfg.precision)
            trainer.report_picture("masks", path, epoch)

    return trainer.fit(loader, pretrain_loss, cfg.max_epoch, after_epoch=after_epoch, resume=resume)


# ---------------------------------------------------------------------- pictures

MASK_COLOUR = (1.0, 0.1, 0.1)
MASK_ALPHA = 0.55


def denormalize(pixel_values: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` mean/std-normalised -> ``[B, H, W, 3]`` floats in [0, 1]."""
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    x = pixel_values.detach().float().cpu() * std + mean
    return x.clamp(0, 1).permute(0, 2, 3, 1).numpy()


def overlay_mask(image: np.ndarray, mask: np.ndarray, patch_size: int) -> np.ndarray:
    """Tint the masked patches of ``image`` ``[H, W, 3]``; ``mask`` ``[N]`` bool in row-major patch order."""
    out = image.copy()
    grid = image.shape[1] // patch_size
    for n in np.flatnonzero(mask):
        r, c = divmod(int(n), grid)
        tile = out[r * patch_size:(r + 1) * patch_size, c * patch_size:(c + 1) * patch_size]
        tile[:] = (1 - MASK_ALPHA) * tile + MASK_ALPHA * np.array(MASK_COLOUR)
    return out


def caption_with_guide(tokens: Sequence[str], guide: int) -> str:
    """WordPiece tokens of a caption (no special tokens) with the guide token in [brackets]."""
    words = [f"[{t}]" if i == guide else t for i, t in enumerate(tokens)]
    return " ".join(words).replace(" ##", "")


def save_mask_grid(path: str | Path, pixel_values: torch.Tensor, mask: torch.Tensor, patch_size: int,
                   captions: Sequence[str], guides: Sequence[Optional[str]], title: str = "",
                   columns: int = 4) -> Path:
    """Write the grid: per image its caption, the guide token (``None``: random mask), and the
    masked patches tinted red; the original picture on the left of each cell for comparison."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = denormalize(pixel_values)
    masks = mask.detach().cpu().numpy().astype(bool)
    n = len(images)
    cols = min(columns, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(3.0 * cols, 2.0 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        r, c = divmod(i, cols)
        axes[r, 2 * c].imshow(images[i], interpolation="nearest")
        axes[r, 2 * c + 1].imshow(overlay_mask(images[i], masks[i], patch_size), interpolation="nearest")
        guide = "random mask" if guides[i] is None else f"guide: {guides[i]}"
        text = "\n".join(textwrap.wrap(captions[i], 38)[:4])
        axes[r, 2 * c].set_title(text, fontsize=6, loc="left")
        axes[r, 2 * c + 1].set_title(f"{guide}\n{int(masks[i].sum())}/{masks[i].size} masked", fontsize=6)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    logger.info("wrote mask grid %s", path)
    return path
