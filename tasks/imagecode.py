"""ImageCoDe with ContextBLIP: the config, the evaluation shared by ``zero_shot.py``,
``finetune_imagecode.py`` and ``eval_mmvp.py``, and fine-tuning on the shared loop.

Evaluation: each image set is embedded once for all of its descriptions (1-3 in ImageCoDe); under
torchrun every rank takes a contiguous share of the sets and the results are gathered in dataset
order. Metric: top-1 accuracy over the candidates, per description, overall / video / static
(percent). ``write_outputs`` writes ``predictions.json``, one entry per description ``{"set",
"description", "target" (position or null), "pred", "candidates" (file names in position order),
"scores" (one per candidate), "video"}``, and on the unlabelled test file the leaderboard
submission ``submission.json`` = ``{set: [predicted position of description 0, ...]}``.

Before a model is built, ``build_datasets`` parses the splits a run reads and checks every candidate
image (``data/preflight.py``).

Fine-tuning: stage 1 trains adapter-BLIP and the prediction layer (two learning rates); stage 2
trains only the inter-context encoder on a frozen stage 1. Loss: cross-entropy over each
description's candidates, the mean over descriptions (and over ranks and accumulation steps: the
engine averages). Each epoch: train, evaluate valid, on a new best write ``checkpoint_best.pth`` and
``predictions.json``; always ``checkpoint_last.pth`` and a ``log.txt`` line. Stage 2 with
``cache_features``: the frozen stage-1 features of every train and valid description are computed
once (they cannot change without augmentation), and the encoder trains on them.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Dict, List, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch.utils.data import DataLoader, Dataset, Subset

from data.collate import ImageSetCollator
from data.preflight import check_splits, log_unk_rate
from data.imagecode import (ImageCodeDataset, ImageCodeItem, ImageCodeSetCollator, ImageCodeSets,
                            build_imagecode_dataset)
from data.transforms import build_test_transform
from models.imagecode import ImageCodeArch, candidate_tokens, zero_shot_scores
from tasks.retrieval import train_transform
from utils import dist as du
from utils.config import Config, Fraction, NonNegFloat, NonNegInt, PosFloat, PosInt
from utils.engine import Trainer
from utils.logging import Heartbeat
from utils.precision import autocast
from utils.schedule import WarmupStepSchedule
from utils.settings import (AugmentSettings, DecaySettings, EvalSettings, LoopSettings, OptimSettings,
                            RunSettings, TextSettings, WeightsSettings)

logger = logging.getLogger(__name__)


class ImageCodeData(Config):
    image_root: str = ''                        # the image-sets folder: <image_root>/<set>/img<N>.jpg
    ann_root: str = ''                          # train_data.json, valid_data.json, test_data_unlabeled.json
    split: Literal['valid', 'test'] = 'valid'   # what is scored; test: the leaderboard submission too
    tag_file: str = ''                          # phenomenon tags (manual_annotation_valid.yaml), for analysis
    score: Literal['itm', 'itc', 'itm+itc'] = 'itm'  # zero-shot: match prob | cosine | ITM logit + cosine


class ImageCodeConfig(ImageCodeArch, ImageCodeData, TextSettings, WeightsSettings, AugmentSettings, OptimSettings,
                      DecaySettings, LoopSettings, EvalSettings, RunSettings):
    """ImageCoDe: zero-shot scoring (zero_shot.py) and the two fine-tuning stages
    (finetune_imagecode.py). Defaults are the released stage-1 recipe (docs/CONTEXTBLIP.md)."""
    image_size: PosInt = 224
    max_tokens: PosInt = 30                     # released: padded/truncated to 30 tokens
    cache_features: bool = False                # stage 2: compute the frozen stage-1 features once
    batch_size_train: PosInt = 36               # descriptions (each with its 10 images) per process and step
    batch_size_test: PosInt = 8                 # image sets per forward pass at evaluation
    init_lr: PosFloat = 2e-6                    # stage 1: BLIP + adapter; stage 2: the inter-context encoder
    head_lr: NonNegFloat = 1e-4                 # stage 1: the prediction layer
    lr_decay_rate: Fraction = 0.95              # lr = max(min_lr, init_lr * rate ** epoch)
    optimizer: Literal['adam', 'adamw'] = 'adam'  # released: Adam, weight decay as L2
    betas: List[float] = [0.9, 0.98]
    eps: NonNegFloat = 1e-6
    weight_decay: NonNegFloat = 0.2
    max_epoch: NonNegInt = 40
    train_hflip: bool = False                   # released: true; descriptions say left and right
    train_shared_crop: bool = True              # one augmentation draw for all 10 frames; released: per frame

    @model_validator(mode='after')
    def _checks(self):
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f'betas: must be two numbers in [0, 1), got {self.betas}')
        if self.cache_features and not (self.stage == 2 and self.train_resize_only):
            raise ValueError('cache_features: needs stage: 2 and train_resize_only: true (augmented images give '
                             'new features every epoch)')
        return self


# ---------------------------------------------------------------------- evaluation

@torch.no_grad()
def map_over_sets(fn: Callable[[dict], torch.Tensor], dataset: ImageCodeDataset, tokenizer, max_tokens: int,
                  out_shape: Sequence[int], batch_size: int, device: torch.device, num_workers: int = 0,
                  precision: str = "fp32", progress: bool = False) -> torch.Tensor:
    """``fn(batch) -> [D, *out_shape]`` for every description, batches of ``batch_size`` image sets
    (see ``ImageCodeSetCollator``); returns ``[len(dataset), *out_shape]`` (float32, CPU) on every rank."""
    sets = ImageCodeSets(dataset)
    loader = DataLoader(Subset(sets, list(du.shard_range(len(sets)))), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=ImageCodeSetCollator(dataset, tokenizer, max_tokens))
    if progress and du.is_main_process():
        from tqdm import tqdm
        loader = tqdm(loader, desc="imagecode sets", dynamic_ncols=True, leave=False)
    # Without a progress bar, a line at least every 30 s (this rank's share).
    beat = Heartbeat("imagecode sets", len(loader.dataset), "sets", logger) if not progress else None
    outs, index = [], []
    for batch in loader:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast(device, precision):
            outs.append(fn(batch).float())
        index.append(batch["index"])
        if beat is not None:
            beat.update(batch["pixel_values"].shape[0])
    local = torch.cat(outs) if outs else torch.zeros(0, *out_shape, device=device)
    local_index = torch.cat(index) if index else torch.zeros(0, dtype=torch.long, device=device)
    gathered, gathered_index = du.gather_variable(local), du.gather_variable(local_index)
    result = torch.zeros(len(dataset), *out_shape)
    result[gathered_index.cpu()] = gathered.cpu()
    return result


def accuracy(items: Sequence[ImageCodeItem], preds: Sequence[int]) -> Dict[str, float]:
    """``acc`` / ``acc_video`` / ``acc_static`` (percent) and their counts, over labelled items."""
    out: Dict[str, float] = {}
    for name, keep in (("", lambda it: True), ("_video", lambda it: it.video), ("_static", lambda it: not it.video)):
        hits = [p == it.target for it, p in zip(items, preds) if it.target is not None and keep(it)]
        out[f"n{name}"] = len(hits)
        out[f"acc{name}"] = 100.0 * sum(hits) / len(hits) if hits else float("nan")
    return out


def predictions(items: Sequence[ImageCodeItem], scores: torch.Tensor) -> List[dict]:
    """One ``predictions.json`` entry per description (see the module doc)."""
    preds = scores.argmax(dim=1).tolist()
    return [{"set": it.set_name, "description": it.description, "target": it.target, "pred": p,
             "candidates": list(it.candidates), "scores": [round(float(s), 6) for s in row], "video": it.video}
            for it, p, row in zip(items, preds, scores.tolist())]


def submission(items: Sequence[ImageCodeItem], preds: Sequence[int]) -> Dict[str, List[int]]:
    """The leaderboard file: each set's predicted positions, in the order of its descriptions."""
    out: Dict[str, List[int]] = {}
    for it, p in zip(items, preds):
        out.setdefault(it.set_name, []).append(int(p))
    return out


def write_outputs(output_dir: Path, dataset: ImageCodeDataset, scores: torch.Tensor,
                  name: str = "predictions.json") -> Dict[str, float]:
    """Write ``predictions.json`` (and ``submission.json`` for an unlabelled file) from rank 0;
    return the accuracies (empty for an unlabelled file)."""
    preds = scores.argmax(dim=1).tolist()
    metrics = accuracy(dataset.items, preds) if dataset.labelled else {}
    if du.is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / name).write_text(json.dumps(predictions(dataset.items, scores), indent=1) + "\n")
        if not dataset.labelled:
            (output_dir / "submission.json").write_text(json.dumps(submission(dataset.items, preds), indent=1) + "\n")
            logger.info("wrote the leaderboard submission %s", output_dir / "submission.json")
    return metrics


def format_accuracy(metrics: Dict[str, float], label: str = "") -> str:
    if not metrics:
        return f"{label}unlabelled (no accuracy)"
    return (f"{label}accuracy {metrics['acc']:.2f} (n={metrics['n']}) | video {metrics['acc_video']:.2f} "
            f"(n={metrics['n_video']}) | static {metrics['acc_static']:.2f} (n={metrics['n_static']})")


def model_scores(model, batch: dict) -> torch.Tensor:
    """A fine-tuned scorer's logits ``[D, K]`` for a batch of image sets (each set embedded once)."""
    image_embeds = model.embed_candidates(batch["pixel_values"])[batch["set_index"]]
    return model(batch["input_ids"], batch["attention_mask"], image_embeds=image_embeds, video=batch["video"])


def evaluate_model(model, dataset: ImageCodeDataset, tokenizer, cfg, device, progress: bool = False,
                   features: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Scores ``[N, K]`` of a stage-1/2 model; ``features`` ``[N, K, D]``: precomputed stage-1
    features (stage 2 with cached features)."""
    model.eval()
    if features is not None:
        video = torch.tensor([it.video for it in dataset.items])
        with torch.no_grad():
            return torch.cat([model(features=features[s:s + 256].to(device), video=video[s:s + 256].to(device)).float().cpu()
                              for s in range(0, len(dataset), 256)])
    k = len(dataset.items[0].candidates) if len(dataset) else 10
    return map_over_sets(lambda b: model_scores(model, b), dataset, tokenizer, cfg.max_tokens, (k,),
                         cfg.batch_size_test, device, cfg.num_workers, cfg.precision, progress)


def zero_shot_scorer(model, score: str) -> Callable[[dict], torch.Tensor]:
    """Scores ``[D, K]`` of a ContextBLIP (or BLIP, ``use_adapter`` off) for a batch of image sets."""
    def fn(batch: dict) -> torch.Tensor:
        plain, adapted = candidate_tokens(model, batch["pixel_values"])
        s = batch["set_index"]
        return zero_shot_scores(model, plain[s], adapted[s], batch["input_ids"], batch["attention_mask"], score)
    return fn


# ---------------------------------------------------------------------- fine-tuning

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


def build_datasets(cfg: ImageCodeConfig, splits: Sequence[str], dry_run: bool = False) -> Dict[str, ImageCodeDataset]:
    """The datasets of ``splits`` ('train': the training transform, unless stage 2 caches its
    features or ``dry_run``; others: the test transform), parsed and with every candidate image
    checked: call before building a model. A collective under torchrun."""
    # Cached features are computed once, unaugmented; a dry run sees its batch as evaluation would.
    augment = not (cfg.stage == 2 and cfg.cache_features) and not dry_run

    def transform(split: str):
        if split == "train" and augment:
            return train_transform(cfg, cfg.image_size)
        return build_test_transform(cfg.image_size)

    datasets = {split: build_imagecode_dataset(cfg, split, transform(split), shared_randomness=cfg.train_shared_crop)
                for split in splits}
    check_splits(datasets, skip=False, hint="")
    return datasets


def train(cfg: ImageCodeConfig, model, tokenizer, info: du.DistInfo, datasets: Dict[str, ImageCodeDataset],
          resume: Optional[str] = None, progress: bool = True, dry_run: bool = False) -> dict:
    """Fine-tune on ``datasets`` (from ``build_datasets(cfg, ("train", "valid"))``). ``dry_run``:
    one eval-mode forward of the first batch (file order), ``dry_run.json``, no step
    (``Trainer.dry_run``; only ``datasets["train"]`` is needed). A stage-2 dry run with
    ``cache_features`` computes its batch's stage-1 features from the images rather than caching
    the whole train split: the loss training computes from the cache (up to float rounding), since
    stage 1 is frozen and in eval mode either way."""
    cache = cfg.stage == 2 and cfg.cache_features
    train_ds = datasets["train"]
    log_unk_rate(tokenizer, train_ds.text, "the train descriptions")
    video_of = torch.tensor([it.video for it in train_ds.items])
    optimizer = build_optimizer(param_groups(model, cfg), cfg)
    trainer = Trainer(model, optimizer, WarmupStepSchedule(cfg.init_lr, cfg.min_lr, cfg.lr_decay_rate), info, cfg,
                      progress=progress)
    if dry_run:
        loader = trainer.loader(train_ds, cfg.batch_size_train, ImageSetCollator(tokenizer, cfg.max_tokens),
                                num_workers=cfg.num_workers, shuffle=False)
        return trainer.dry_run(loader, imagecode_loss(video_of), extra={"stage": cfg.stage})
    valid_ds = datasets["valid"]
    valid_feats = None
    if cache:
        train_feats = _stage1_features(model, train_ds, tokenizer, cfg, info.device, progress)
        valid_feats = _stage1_features(model, valid_ds, tokenizer, cfg, info.device, progress)
        loader = trainer.loader(CachedFeatures(train_feats, [it.target for it in train_ds.items]),
                                cfg.batch_size_train, _collate_features, num_workers=0)
    else:
        loader = trainer.loader(train_ds, cfg.batch_size_train, ImageSetCollator(tokenizer, cfg.max_tokens),
                                num_workers=cfg.num_workers)
    logger.info("stage %d: %d train descriptions, %d batches per epoch per rank; %d valid descriptions",
                cfg.stage, len(train_ds), len(loader), len(valid_ds))
    last_scores = {}

    def evaluate(epoch: int):
        scores = evaluate_model(model, valid_ds, tokenizer, cfg, info.device, progress, valid_feats)
        val = write_outputs(trainer.output_dir, valid_ds, scores, name="predictions_last.json")
        logger.info("epoch %d: %s", epoch, format_accuracy(val, "valid "))
        last_scores["valid"] = scores
        return {f"valid_{k}": v for k, v in val.items()}, val["acc"]

    def after_epoch(epoch: int, is_best: bool, is_last: bool) -> None:
        if is_best:
            write_outputs(trainer.output_dir, valid_ds, last_scores["valid"])

    return trainer.fit(loader, imagecode_loss(video_of), cfg.max_epoch, evaluate=evaluate,
                       eval_every=cfg.eval_every, after_epoch=after_epoch, resume=resume)
