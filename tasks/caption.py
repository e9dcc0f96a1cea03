"""BLIP image captioning: its config, data, loss, evaluation and hooks into the shared loop
(``train_caption.py``).

Data: BLIP's caption annotations (train: one caption per entry with ``image_id``, as
``coco_karpathy_train.json``; val/test: one entry per image with a caption list), Flickr30k and
custom json/CSV, read by the same readers as retrieval (``data/retrieval.py``). Training text is
``prompt + pre_caption(caption, max_words)``, tokenised to at most ``max_tokens`` (40) tokens.

Evaluation of a split: captions are generated for every image, sharded over the ranks and gathered
back in dataset order, written as ``captions_<split>.json`` (COCO results format, ``image_id`` as
:func:`tasks.caption_files.image_id_for` gives it) and scored with pycocoevalcap against the
split's references (from the annotation file, or BLIP's ``*_gt.json`` in ``coco_gt_root``).
``log.txt`` gets BLIP's key names (``train_loss``, ``val_CIDEr``, ``test_Bleu_4``, ...); the best
epoch is the one of the highest val CIDEr.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Literal, Optional, Sequence, Union

import torch
from pydantic import model_validator
from torch.utils.data import DataLoader, Dataset

from data.collate import CaptionCollator
from data.preflight import caption_texts, check_splits, log_unk_rate
from data.retrieval import build_retrieval_datasets
from data.transforms import build_test_transform
from models.caption import CaptionArch, GenerationConfig, check_prompt
from models.tokenizer import build_tokenizer
from tasks.caption_files import ground_truth, image_id_for, read_gt_file, write_results
from tasks.caption_java import require_java
from tasks.caption_metrics import caption_scores
from utils.errors import DataError
from tasks.retrieval import RetrievalData, train_transform
from utils import dist as du
from utils.config import ConfigError, PosFloat, PosInt
from utils.engine import Trainer
from utils.logging import Heartbeat
from utils.precision import autocast
from utils.schedule import CosineSchedule, build_adamw
from utils.settings import (EvalSettings, batch_size_alias, LoopSettings, OptimSettings, RunSettings, TextSettings,
                            WarmupSettings, WeightsSettings)

logger = logging.getLogger(__name__)

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")


class CaptionConfig(CaptionArch, GenerationConfig, TextSettings, WeightsSettings, RetrievalData, OptimSettings,
                    WarmupSettings, LoopSettings, EvalSettings, RunSettings):
    """Caption fine-tuning and evaluation (train_caption.py); BLIP's key names."""

    max_tokens: PosInt = 40                     # BLIP truncates prompt + caption at 40 tokens
    batch_size: Optional[PosInt] = None         # BLIP's caption key: train and test batch per process
    coco_gt_root: Optional[str] = None          # folder of BLIP's <split file stem>_gt.json references
                                                # (default: references from the annotation files)
    spice: Union[bool, Literal['auto']] = 'auto'  # SPICE: 'auto' = when its models are available
    eval_metrics: bool = True                   # score the captions; false (--evaluate only): just write
                                                # captions_<split>.json (e.g. for an evaluation server)

    @model_validator(mode='before')
    @classmethod
    def _batch_size_alias(cls, data):
        return batch_size_alias(data)  # BLIP's caption configs give one `batch_size`


class NocapsConfig(CaptionConfig):
    """NoCaps (``eval_nocaps.py``, BLIP's ``configs/nocaps.yaml``): captions for ``nocaps_val.json`` /
    ``nocaps_test.json`` (``{"image", "img_id"}`` entries; the references stay on the evaluation
    server, so nothing is scored here). BLIP's eval_nocaps decodes with repetition_penalty 1.1."""
    dataset: Literal['nocaps', 'custom'] = 'nocaps'
    eval_metrics: bool = False                  # NoCaps' references are not public: captions files only
    repetition_penalty: PosFloat = 1.1          # BLIP's eval_nocaps.py

    @model_validator(mode='after')
    def _no_references(self):
        if self.dataset == 'nocaps' and self.eval_metrics:
            raise ValueError("eval_metrics: NoCaps' references are held by its evaluation server; the nocaps "
                             "files have none to score against (write the captions, submit them)")
        return self


def eval_splits(cfg: CaptionConfig) -> tuple:
    return (('val',) if cfg.has_val else ()) + (('test',) if cfg.has_test else ())


def build_datasets(cfg: CaptionConfig, splits: Sequence[str], dry_run: bool = False) -> Dict[str, Dataset]:
    """The datasets of ``splits`` (train: the train transform; ``dry_run``: the test transform),
    parsed and with every image checked before any model is built (``data/preflight.py``), then the
    prompt against ``max_length`` (and, for training, ``max_tokens``). A collective under torchrun."""
    datasets = build_retrieval_datasets(cfg, splits=splits,
                                        train_transform=train_transform(cfg, cfg.image_size, dry_run),
                                        test_transform=build_test_transform(cfg.image_size), shuffle=not dry_run)
    check_splits(datasets, cfg.skip_bad_images)
    check_prompt(build_tokenizer(cfg.tokenizer), cfg.prompt, cfg.max_length,
                 cfg.max_tokens if 'train' in splits else None)
    if 'train' in datasets and not cfg.eval_metrics and cfg.has_val:
        raise ConfigError("eval_metrics: false leaves nothing to choose the best epoch by; it is for --evaluate")
    for split in [split for split in datasets if split != 'train']:
        image_ids(cfg, datasets[split])  # every results id (NoCaps: img_id) before the model is built
    evaluated = [split for split in datasets if split != 'train'] if cfg.eval_metrics else []
    for split in evaluated:
        references(cfg, split, datasets[split])  # bad references stop the run now, not after an epoch
    if evaluated:
        logger.info('caption metrics run on %s', require_java())  # no Java: one clear line, now
    return datasets


def image_ids(cfg: CaptionConfig, dataset) -> List:
    """The results' ``image_id`` of each image of an eval dataset (``coco``/``flickr``: the number
    ending the file name; ``custom``: the entry's ``image_id``, else its ``image`` as written). Two
    entries with one id are an error naming both: each image gets one generated caption."""
    ids, first = [], {}
    for i, entry in enumerate(dataset.annotation):
        try:
            image_id = image_id_for(entry, cfg.dataset)
        except DataError as exc:
            raise DataError(f"{dataset.source(i)}: {exc}") from None
        if image_id in first:
            raise DataError(f"{dataset.source(i)}, field 'image_id': image id {image_id!r} is also the id of "
                            f"{dataset.source(first[image_id])}; caption evaluation needs one entry per image")
        first[image_id] = i
        ids.append(image_id)
    return ids


def references(cfg: CaptionConfig, split: str, dataset) -> Dict:
    """``{image_id: [reference captions]}``: BLIP's ``*_gt.json`` when ``coco_gt_root`` is set,
    else the raw captions of the split's annotation file."""
    ids = image_ids(cfg, dataset)
    if cfg.coco_gt_root:
        gt_file = Path(cfg.coco_gt_root) / f"{Path(dataset.ann_file).stem}_gt.json"
        gts = read_gt_file(gt_file)
        missing = [i for i in ids if i not in gts]
        if missing:
            raise ValueError(f"{gt_file}: no references for {len(missing)} image(s) of {dataset.ann_file}, "
                             f"e.g. image_id {missing[0]!r}")
        return {i: gts[i] for i in ids}
    by_entry = {id(entry): i for i, entry in zip(ids, dataset.annotation)}
    return ground_truth(dataset.annotation, lambda entry: by_entry[id(entry)], source=dataset.ann_file)


def caption_loss(model, batch, ctx) -> Dict[str, torch.Tensor]:
    """The LM loss, logged as BLIP's ``train_loss``."""
    return {'loss': model(batch['pixel_values'], batch['input_ids'], batch['attention_mask'])['loss_lm']}


@torch.no_grad()
def generate_captions(model, dataset, cfg: CaptionConfig, use_cache: bool = True) -> List[str]:
    """One caption per image of ``dataset``, in dataset order. The images are sharded over the
    ranks (contiguous blocks) and the captions gathered back to every rank."""
    model = getattr(model, 'module', model)  # generation does not go through DDP
    was_training = model.training
    model.eval()
    mine = list(du.shard_range(len(dataset)))
    loader = DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=cfg.batch_size_test,
                        num_workers=cfg.num_workers, shuffle=False)
    device = next(model.parameters()).device
    settings = cfg.generation_settings()
    captions: List[str] = []
    beat = Heartbeat("captioning", len(mine), "images", logger)
    for images, _ in loader:
        with autocast(device, cfg.precision):
            ids = model.generate_ids(images.to(device, non_blocking=True), settings, use_cache=use_cache)
        captions.extend(model.decode(ids))
        beat.update(len(images))
    model.train(was_training)
    gathered = du.all_gather_object(captions)
    return [c for part in gathered for c in part]


def evaluate_split(model, dataset, cfg: CaptionConfig, split: str, output_dir: Path) -> Dict[str, float]:
    """Caption ``split``, write ``captions_<split>.json`` and score it; ``{<split>_<metric>: value}``
    (pycocoevalcap's scores as it returns them, 0-1 (CIDEr up to 10), as BLIP's caption logs; the
    same on every rank)."""
    captions = generate_captions(model, dataset, cfg)
    ids = image_ids(cfg, dataset)
    results = [{"image_id": i, "caption": c} for i, c in zip(ids, captions)]
    scores: Dict[str, float] = {}
    if du.is_main_process():
        write_results(output_dir / f"captions_{split}.json", results)
        if cfg.eval_metrics:
            scores = caption_scores(results, references(cfg, split, dataset), spice=cfg.spice)
    scores = du.broadcast_object(scores)
    return {f"{split}_{k}": v for k, v in scores.items()}


def train(cfg: CaptionConfig, model, tokenizer, info: du.DistInfo, datasets: Dict[str, Dataset],
          resume: Optional[str] = None, progress: bool = True, dry_run: bool = False) -> dict:
    """Fine-tune on ``datasets['train']``; val each ``eval_every`` epochs (best = val CIDEr), test on
    a new best (or after the last epoch when there is no val split). ``dry_run``: one eval-mode
    forward of the first batch (file order), ``dry_run.json``, no step (``Trainer.dry_run``)."""
    output_dir = Path(cfg.output_dir)
    log_unk_rate(tokenizer, caption_texts(datasets['train']), 'the train captions')
    optimizer = build_adamw(model.parameters(), cfg.init_lr, cfg.weight_decay)
    schedule = CosineSchedule(cfg.init_lr, cfg.min_lr, cfg.max_epoch, cfg.warmup_steps, cfg.warmup_lr)
    trainer = Trainer(model, optimizer, schedule, info, cfg, progress=progress)
    loader = trainer.loader(datasets['train'], cfg.batch_size_train,
                            CaptionCollator(tokenizer, cfg.prompt, cfg.max_tokens), num_workers=cfg.num_workers,
                            shuffle=not dry_run)
    if dry_run:
        return trainer.dry_run(loader, caption_loss, extra={'prompt': cfg.prompt})
    logger.info('training: %d captions of %d images, %d batches per epoch per rank', len(datasets['train']),
                datasets['train'].num_images, len(loader))

    def evaluate(epoch: int):
        record = evaluate_split(model, datasets['val'], cfg, 'val', output_dir)
        return record, record['val_CIDEr']

    def after_epoch(epoch: int, is_best: bool, is_last: bool) -> dict:
        if cfg.has_test and (is_best or not cfg.has_val and is_last):
            return evaluate_split(model, datasets['test'], cfg, 'test', output_dir)
        return {}

    return trainer.fit(loader, caption_loss, cfg.max_epoch, evaluate=evaluate if cfg.has_val else None,
                       eval_every=cfg.eval_every, after_epoch=after_epoch, resume=resume)
