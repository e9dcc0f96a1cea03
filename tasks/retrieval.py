"""BLIP image-text retrieval: its config, its data and loss, and its hooks into the shared loop
(``train_retrieval.py``; the evaluation protocol is ``tasks/retrieval_eval.py``).

Before the model is built, ``build_datasets`` parses every split the run reads and checks its images
(``data/preflight.py``). Each epoch: train (ITC + ITM), evaluate val (BLIP's protocol), evaluate test
on a new best val ``r_mean`` (or after the last epoch when there is no val split); ``log.txt`` gets
one JSON line with BLIP's key names (``train_loss_ita``, ``val_txt_r1``, ``test_r_mean``, ...).
"""
from __future__ import annotations

import logging
from typing import Dict, List, Literal, Optional, Sequence, Tuple, Union

from torch.utils.data import Dataset

from data.collate import RetrievalCollator
from data.preflight import caption_texts, check_splits, log_unk_rate
from data.retrieval import build_retrieval_datasets
from data.transforms import build_test_transform, build_train_transform
from models.accum import feature_cached_step
from models.blip import BlipArch, ITCSettings
from tasks.retrieval_eval import evaluate_retrieval
from utils import dist as du
from utils.config import PosInt
from utils.engine import Trainer
from utils.schedule import CosineSchedule, build_adamw
from utils.settings import (AugmentSettings, ColumnSettings, EvalSettings, LoopSettings, OptimSettings, RunSettings,
                            StreamSettings, TextSettings, WarmupSettings, WeightsSettings)

logger = logging.getLogger(__name__)


class RetrievalData(AugmentSettings, StreamSettings, ColumnSettings):
    image_root: str = ''                        # prefix joined to the annotations' image paths
    ann_root: str = ''                          # folder with the train/val/test files
    dataset: Literal['coco', 'flickr', 'custom'] = 'coco'
    train_file: Optional[Union[str, List[str]]] = None  # None -> the dataset's standard split
    val_file: Optional[str] = None
    test_file: Optional[str] = None
    skip_bad_images: bool = False               # drop entries of missing/unreadable images (logged, counted)

    @property
    def has_val(self) -> bool:
        return self.dataset != 'custom' or self.val_file is not None

    @property
    def has_test(self) -> bool:
        return self.dataset != 'custom' or self.test_file is not None


class RetrievalConfig(BlipArch, ITCSettings, TextSettings, WeightsSettings, RetrievalData, OptimSettings,
                      WarmupSettings, LoopSettings, EvalSettings, RunSettings):
    """Image-text retrieval fine-tuning and evaluation (train_retrieval.py); BLIP's key names."""
    k_test: PosInt = 256                        # candidates re-ranked with ITM at eval
    rerank_batch_size: PosInt = 128             # (query, candidate) pairs per ITM forward


def train_transform(cfg: AugmentSettings, image_size: int, dry_run: bool = False):
    """The train transform of the ``train_*`` augmentation keys (shared by every training stage);
    ``dry_run``: the test transform (``--dry_run`` sees its first batch as evaluation would)."""
    if cfg.train_resize_only or dry_run:
        return build_test_transform(image_size)
    return build_train_transform(image_size, scale=(cfg.train_crop_min_scale, 1.0), hflip=cfg.train_hflip,
                                 randaug=cfg.train_randaug)


def eval_splits(cfg: RetrievalConfig) -> Tuple[str, ...]:
    return (('val',) if cfg.has_val else ()) + (('test',) if cfg.has_test else ())


def build_datasets(cfg: RetrievalConfig, splits: Sequence[str], dry_run: bool = False) -> Dict[str, Dataset]:
    """The datasets of ``splits`` (train: the train transform; ``dry_run``: the test transform),
    parsed and with every image checked (``data/preflight.py``; ``skip_bad_images`` drops bad
    entries up front): call before building a model, so bad input stops the run before its first
    step. A collective under torchrun."""
    datasets = build_retrieval_datasets(cfg, splits=splits,
                                        train_transform=train_transform(cfg, cfg.image_size, dry_run),
                                        test_transform=build_test_transform(cfg.image_size), shuffle=not dry_run)
    check_splits(datasets, cfg.skip_bad_images)
    return datasets


def retrieval_loss(cfg: RetrievalConfig):
    """The per-batch loss: ITC + ITM, with alpha ramped linearly over the first epoch (BLIP); in a
    dry run ``alpha`` is the config's (no ramp)."""
    def alpha_of(ctx):
        alpha = cfg.alpha
        if ctx['epoch'] == 0 and not ctx.get('dry_run'):
            alpha *= min(1.0, ctx['batch_index'] / ctx['batches_per_epoch'])
        return alpha

    def loss_fn(model, batch, ctx):
        return model(batch['pixel_values'], batch['input_ids'], batch['attention_mask'], batch['idx'],
                     alpha=alpha_of(ctx), generator=ctx['generator'])

    def accumulated(model, micro, ctx, backward):
        # accum_freq: the micro-batches as one virtual batch (models/accum.py).
        return feature_cached_step(model, micro, alpha_of(ctx), ctx['generator'], backward)

    loss_fn.accumulated = accumulated
    return loss_fn


def run_evaluation(model, dataset, tokenizer, cfg: RetrievalConfig, progress: bool = True):
    return evaluate_retrieval(model, dataset, tokenizer, k_test=cfg.k_test, max_tokens=cfg.max_tokens,
                              batch_size=cfg.batch_size_test, rerank_batch_size=cfg.rerank_batch_size,
                              num_workers=cfg.num_workers, precision=cfg.precision, progress=progress)


def train(cfg: RetrievalConfig, model, tokenizer, info: du.DistInfo, datasets: Dict[str, Dataset],
          resume: Optional[str] = None, progress: bool = True, dry_run: bool = False) -> dict:
    """Fine-tune on ``datasets`` (from ``build_datasets(cfg, ('train',) + eval_splits(cfg))``).
    ``dry_run``: one eval-mode forward of the first batch (file order), ``dry_run.json``, no step
    (``Trainer.dry_run``; only ``datasets['train']`` is needed)."""
    # Fail at start-up, not after an hour: the queue takes whole global batches.
    model.check_queue(cfg.batch_size_train * info.world_size * cfg.accum_freq)
    log_unk_rate(tokenizer, caption_texts(datasets['train']), 'the train captions')
    optimizer = build_adamw(model.parameters(), cfg.init_lr, cfg.weight_decay)
    trainer = Trainer(model, optimizer, CosineSchedule(cfg.init_lr, cfg.min_lr, cfg.max_epoch, cfg.warmup_steps,
                                                       cfg.warmup_lr),
                      info, cfg, progress=progress)
    # Gathering token ids across ranks (negative_all_rank) needs one fixed length on every rank.
    dynamic = not (cfg.negative_all_rank and info.distributed)
    loader = trainer.loader(datasets['train'], cfg.batch_size_train,
                            RetrievalCollator(tokenizer, cfg.max_tokens, dynamic_padding=dynamic),
                            num_workers=cfg.num_workers, shuffle=not dry_run)
    if dry_run:
        return trainer.dry_run(loader, retrieval_loss(cfg), extra={'alpha': cfg.alpha})
    logger.info('training: %d captions of %d images, %d batches per epoch per rank', len(datasets['train']),
                datasets['train'].num_images, len(loader))

    def evaluate_split(split: str) -> dict:
        metrics = run_evaluation(model, datasets[split], tokenizer, cfg, progress).metrics
        return {f'{split}_{k}': v for k, v in metrics.items()}

    def evaluate(epoch: int):
        record = evaluate_split('val')
        return record, record['val_r_mean']

    def after_epoch(epoch: int, is_best: bool, is_last: bool) -> dict:
        if cfg.has_test and (is_best or not cfg.has_val and is_last):
            return evaluate_split('test')
        return {}

    return trainer.fit(loader, retrieval_loss(cfg), cfg.max_epoch, evaluate=evaluate if cfg.has_val else None,
                       eval_every=cfg.eval_every, after_epoch=after_epoch, resume=resume)
