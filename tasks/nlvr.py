"""BLIP's NLVR2 (natural language for visual reasoning over an image pair): its config, data, loss,
evaluation and hooks into the shared loop (``train_nlvr.py``).

Data (``data/nlvr.py``): BLIP's split files under ``ann_root`` (``train_file: nlvr_train``,
``val_file: nlvr_dev``, ``test_file: nlvr_test``: names of ``<ann_root>/<name>.json``, or paths),
image paths relative to ``image_root``. Training pairs get BLIP's random swap (the two images
exchanged, and the words left/right, with probability 0.5); the release also swaps at random in
val/test, we do not: evaluation is deterministic (docs/FORMATS.md, "NLVR2").

The recipe is the release's ``train_nlvr.py``: the loss is the cross-entropy of the two-way logits
(mean over the batch), AdamW (``init_lr``, ``weight_decay``) with BLIP's cosine set once per epoch
(``min_lr + (init_lr - min_lr) * (1 + cos(pi * epoch / max_epoch)) / 2``), the train transform of the
``train_*`` keys (BLIP's: RandomResizedCrop(0.5, 1), flip, RandAugment), the test transform
elsewhere. Accuracy is ``100 * correct / pairs`` (``val_acc`` on dev, ``test_acc`` on test; the
release's test file is NLVR2 test-P; its log writes the fraction); a prediction is
``argmax(logits)`` (ties: False, as ``max(1)``). The best epoch is the one of the highest ``val_acc``,
and the test split is evaluated at each new best (or after the last epoch without a val split); the
release evaluates both every epoch.

Evaluation is sharded over the ranks (contiguous blocks) and gathered in pair order; every split
evaluated writes ``nlvr_result_<split>.json``: ``[{"index", "identifier" (when the file has one),
"images", "sentence" (both as written in the file), "label", "prediction" (1 = True),
"logits": [False, True]}]``. Sentences are padded to the longest of their batch (BLIP's
``padding='longest'``), so a result equals one process's bit for bit when every rank's share is
cut into the same batches (shares that are multiples of ``batch_size_test``) and the processes use
the same number of threads, and up to float rounding otherwise.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from data.nlvr import NLVRCollator, NLVRDataset
from data.preflight import check_splits, log_unk_rate
from data.transforms import build_test_transform
from models.nlvr import NLVRArch, tokenize_sentences
from tasks.caption_files import write_results
from tasks.retrieval import train_transform
from utils import dist as du
from utils.config import ConfigError
from utils.engine import Trainer
from utils.logging import Heartbeat
from utils.precision import autocast
from utils.schedule import CosineSchedule, build_adamw
from utils.settings import (AugmentSettings, EvalSettings, LoopSettings, OptimSettings, RunSettings, TextSettings,
                            WarmupSettings, WeightsSettings)

logger = logging.getLogger(__name__)



class NLVRData(AugmentSettings):
    image_root: str = ''                        # the split files' image paths are relative to this
    ann_root: str = ''                          # folder of the named split files
    train_file: str = 'nlvr_train'              # a name (<ann_root>/<name>.json) or a path
    val_file: Optional[str] = 'nlvr_dev'        # evaluated each epoch; best epoch = val accuracy (null: none)
    test_file: Optional[str] = 'nlvr_test'      # BLIP's test split (NLVR2 test-P)
    skip_bad_images: bool = False               # drop the pairs of missing/unreadable images (logged, counted)


class NLVRConfig(NLVRArch, WeightsSettings, NLVRData, OptimSettings, WarmupSettings, LoopSettings, EvalSettings,
                 RunSettings):
    """NLVR2 fine-tuning and evaluation (train_nlvr.py); BLIP's key names (configs/nlvr.yaml)."""

    tokenizer: str = TextSettings.model_fields['tokenizer'].default


def resolve(cfg: NLVRConfig, name: str) -> str:
    """A split file: a bare name (BLIP's ``nlvr_train``) is ``<ann_root>/<name>.json``; a path is
    joined to ``ann_root`` (an absolute one kept)."""
    if not os.path.splitext(name)[1]:
        name = f"{name}.json"
    return os.path.join(cfg.ann_root, name) if cfg.ann_root else name


def split_file(cfg: NLVRConfig, split: str) -> Optional[str]:
    return {'train': cfg.train_file, 'val': cfg.val_file, 'test': cfg.test_file}[split]


def eval_splits(cfg: NLVRConfig) -> tuple:
    return (('val',) if cfg.val_file else ()) + (('test',) if cfg.test_file else ())


def build_datasets(cfg: NLVRConfig, splits: Sequence[str], dry_run: bool = False) -> Dict[str, NLVRDataset]:
    """The datasets of ``splits``, every file parsed and both images of every pair checked before
    any model is built (``data/preflight.py``). A collective."""
    datasets = {}
    for split in splits:
        name = split_file(cfg, split)
        if not name:
            raise ConfigError(f"no {split} file: set {split}_file")
        transform = (train_transform(cfg, cfg.image_size, dry_run) if split == 'train'
                     else build_test_transform(cfg.image_size))
        datasets[split] = NLVRDataset(resolve(cfg, name), cfg.image_root, transform, train=split == 'train',
                                      swap=split == 'train' and not dry_run)
    check_splits(datasets, cfg.skip_bad_images)
    return datasets


def collator(model, tokenizer) -> NLVRCollator:
    """The release's text input (padded to the longest sentence of the batch, ``[ENC]`` first). It does
    not truncate (``pre_caption`` keeps 40 words); we cut at the text encoder's
    ``max_position_embeddings`` (BERT's 512), where the release would fail on an index error."""
    model = getattr(model, 'module', model)
    return NLVRCollator(functools.partial(tokenize_sentences, tokenizer,
                                          max_tokens=model.text_encoder.config.max_position_embeddings))


def nlvr_loss(model, batch, ctx) -> Dict[str, torch.Tensor]:
    """The release's training loss: cross-entropy of the two-way logits, mean over the batch."""
    logits = model(batch['pixel_values0'], batch['pixel_values1'], batch['input_ids'], batch['attention_mask'])
    return {'loss': F.cross_entropy(logits.float(), batch['labels'])}


@torch.no_grad()
def predict(model, dataset: NLVRDataset, cfg: NLVRConfig) -> List[List[float]]:
    """The logits ``[False, True]`` of every pair of ``dataset``, in dataset order (sharded over the
    ranks in contiguous blocks, gathered to every rank)."""
    model = getattr(model, 'module', model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    mine = list(du.shard_range(len(dataset)))
    loader = DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=cfg.batch_size_test,
                        num_workers=cfg.num_workers, shuffle=False, collate_fn=collator(model, model.tokenizer))
    logits: List[List[float]] = []
    beat = Heartbeat("NLVR evaluation", len(mine), "pairs", logger)
    for batch in loader:
        with autocast(device, cfg.precision):
            out = model(batch['pixel_values0'].to(device, non_blocking=True),
                        batch['pixel_values1'].to(device, non_blocking=True),
                        batch['input_ids'].to(device), batch['attention_mask'].to(device))
        logits += out.float().cpu().tolist()
        beat.update(len(out))
    model.train(was_training)
    return [row for part in du.all_gather_object(logits) for row in part]


def result_name(split: str) -> str:
    return f'nlvr_result_{split}.json'


def evaluate_split(model, dataset: NLVRDataset, cfg: NLVRConfig, split: str, output_dir: Path) -> Dict[str, float]:
    """Predict ``split``, write ``nlvr_result_<split>.json`` (rank 0) and return its accuracy
    ``{<split>_acc: 0-100}`` (the same on every rank)."""
    logits = predict(model, dataset, cfg)
    results = []
    for i, (e, (no, yes)) in enumerate(zip(dataset.entries, logits)):
        row = {'index': i}
        if e.identifier is not None:
            row['identifier'] = e.identifier
        row.update(images=list(e.images), sentence=e.text, label=e.label, prediction=int(yes > no), logits=[no, yes])
        results.append(row)
    if du.is_main_process():
        write_results(output_dir / result_name(split), results)
    correct = sum(r['prediction'] == r['label'] for r in results)
    return {f'{split}_acc': 100.0 * correct / len(results)}


def train(cfg: NLVRConfig, model, tokenizer, info: du.DistInfo, datasets: Dict[str, NLVRDataset],
          resume: Optional[str] = None, progress: bool = True, dry_run: bool = False) -> dict:
    """Fine-tune on ``datasets['train']``; val (when given) every ``eval_every`` epochs, best = val
    accuracy; the test split evaluated on a new best, or after the last epoch without val."""
    output_dir = Path(cfg.output_dir)
    log_unk_rate(tokenizer, datasets['train'].texts(), 'the train sentences')
    optimizer = build_adamw(model.parameters(), cfg.init_lr, cfg.weight_decay)
    schedule = CosineSchedule(cfg.init_lr, cfg.min_lr, cfg.max_epoch, cfg.warmup_steps, cfg.warmup_lr)
    trainer = Trainer(model, optimizer, schedule, info, cfg, progress=progress)
    loader = trainer.loader(datasets['train'], cfg.batch_size_train, collator(model, tokenizer),
                            num_workers=cfg.num_workers, shuffle=not dry_run)
    if dry_run:
        return trainer.dry_run(loader, nlvr_loss)
    logger.info('training: %d pairs, %d batches per epoch per rank', len(datasets['train']), len(loader))
    has_val = 'val' in datasets

    def evaluate(epoch: int):
        record = evaluate_split(model, datasets['val'], cfg, 'val', output_dir)
        return record, record['val_acc']

    def after_epoch(epoch: int, is_best: bool, is_last: bool) -> dict:
        if 'test' in datasets and (is_best or not has_val and is_last):
            return evaluate_split(model, datasets['test'], cfg, 'test', output_dir)
        return {}

    return trainer.fit(loader, nlvr_loss, cfg.max_epoch, evaluate=evaluate if has_val else None,
                       eval_every=cfg.eval_every, after_epoch=after_epoch, resume=resume)
