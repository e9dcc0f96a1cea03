"""BLIP's visual question answering: its config, data, loss, inference, accuracy and hooks into the
shared loop (``train_vqa.py``).

Data (``data/vqa.py``): BLIP's ``train_files`` (``vqa_train``, ``vqa_val``, ``vg_qa``: names of
``<ann_root>/<name>.json``, or paths) with ``vqa_root`` / ``vg_root``, the test split
``test_file`` (BLIP's ``vqa_test``) and, ours, an optional ``val_file`` with answers (the best
epoch is the one of the highest val accuracy). Candidates for ``inference: rank`` come from
``answer_list`` (default ``<ann_root>/answer_list.json``).

Inference is batched and sharded over the ranks (contiguous blocks), answers gathered back in
question order: ``vqa_result.json`` for the test split (``[{"question_id", "answer"}]``, the
format of the VQA v2 evaluation server), ``vqa_result_<split>.json`` for the others. Where a
split's entries carry their annotators' answers, the standard VQA accuracy (``tasks/vqa_metrics.py``)
is computed, overall and per answer type / question type: ``log.txt`` keys ``val_acc``,
``val_acc_yes/no``, ``val_acc_number``, ``val_acc_other``, ``test_acc`` ...
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader

from data.preflight import check_splits, log_unk_rate
from data.transforms import build_test_transform
from data.vqa import VG_WEIGHT, VQACollator, VQAColumns, VQADataset, read_answer_list
from models.vqa import MAX_QUESTION_TOKENS, VQAArch, VQASettings, tokenize_candidates
from tasks.caption_files import write_results
from tasks.retrieval import train_transform
from tasks.vqa_metrics import vqa_accuracy
from utils import dist as du
from utils.config import ConfigError, PosFloat
from utils.engine import Trainer
from utils.logging import Heartbeat
from utils.precision import autocast
from utils.schedule import CosineSchedule, build_adamw
from utils.settings import (AugmentSettings, EvalSettings, LoopSettings, OptimSettings, RunSettings, TextSettings,
                            WarmupSettings, WeightsSettings)

logger = logging.getLogger(__name__)


class VQAData(AugmentSettings):
    vqa_root: str = ''                          # image folder of `dataset: vqa` entries (COCO: followed by train2014/)
    vg_root: str = ''                           # image folder of `dataset: vg` entries (Visual Genome)
    ann_root: str = ''                          # folder of the named annotation files
    train_files: Union[str, List[str]] = ['vqa_train']  # names (<ann_root>/<name>.json) or paths
    val_file: Optional[str] = None              # a split with answers: evaluated each epoch, best = val accuracy
    test_file: Optional[str] = 'vqa_test'       # BLIP's test split (answers optional: accuracy when present)
    vg_weight: PosFloat = VG_WEIGHT             # the weight of a Visual Genome answer (BLIP: 0.2)
    skip_bad_images: bool = False               # drop entries of missing/unreadable images (logged, counted)
    image_col: str = 'image'                    # CSV columns of a custom file
    question_col: str = 'question'
    answer_col: str = 'answer'                  # the annotators' answers joined by answer_sep
    question_id_col: str = 'question_id'
    answer_sep: str = '|'


class VQAConfig(VQAArch, VQASettings, WeightsSettings, VQAData, OptimSettings, WarmupSettings, LoopSettings,
                EvalSettings, RunSettings):
    """VQA fine-tuning and evaluation (train_vqa.py); BLIP's key names (configs/vqa.yaml)."""

    tokenizer: str = TextSettings.model_fields['tokenizer'].default


def resolve(cfg: VQAConfig, name: str) -> str:
    """A split file: a bare name (BLIP's ``vqa_train``) is ``<ann_root>/<name>.json``; a path is
    joined to ``ann_root`` (an absolute one kept)."""
    if not os.path.splitext(name)[1]:
        name = f"{name}.json"
    return os.path.join(cfg.ann_root, name) if cfg.ann_root else name


def eval_splits(cfg: VQAConfig) -> tuple:
    return (('val',) if cfg.val_file else ()) + (('test',) if cfg.test_file else ())


def answer_list_file(cfg: VQAConfig) -> str:
    return cfg.answer_list or os.path.join(cfg.ann_root, 'answer_list.json')


def build_datasets(cfg: VQAConfig, splits: Sequence[str], dry_run: bool = False) -> Dict[str, VQADataset]:
    """The datasets of ``splits``, every file parsed and every image checked before any model is
    built (``data/preflight.py``), and the candidate list for ``inference: rank``. A collective."""
    roots = {'vqa': cfg.vqa_root or None, 'vg': cfg.vg_root or None}
    columns = VQAColumns.of(cfg)
    files = {'train': [cfg.train_files] if isinstance(cfg.train_files, str) else list(cfg.train_files),
             'val': [cfg.val_file] if cfg.val_file else [], 'test': [cfg.test_file] if cfg.test_file else []}
    datasets = {}
    for split in splits:
        if not files[split]:
            raise ConfigError(f"no {split} file: set {'train_files' if split == 'train' else split + '_file'}")
        transform = (train_transform(cfg, cfg.image_size, dry_run) if split == 'train'
                     else build_test_transform(cfg.image_size))
        datasets[split] = VQADataset([resolve(cfg, f) for f in files[split]], roots, transform, train=split == 'train',
                                     columns=columns, vg_weight=cfg.vg_weight)
    if 'val' in datasets and not datasets['val'].has_answers:
        raise ConfigError(f"val_file {cfg.val_file}: the best epoch is chosen by val accuracy, so every val question "
                          "needs its annotators' answers ('answer')")
    check_splits(datasets, cfg.skip_bad_images)
    if cfg.inference == 'rank' and any(s != 'train' for s in datasets):
        candidates = read_answer_list(answer_list_file(cfg))
        for split, dataset in datasets.items():
            if split != 'train':
                dataset.answer_list = candidates  # as BLIP's test dataset carries it
    return datasets


def vqa_loss(model, batch, ctx) -> Dict[str, torch.Tensor]:
    """BLIP's VQA loss (``sum(weights * answer losses) / questions``), logged as ``train_loss``."""
    return {'loss': model(batch['pixel_values'], batch['input_ids'], batch['attention_mask'],
                          batch['answer_input_ids'], batch['answer_attention_mask'], batch['n'],
                          batch['weights'])['loss_vqa']}


@torch.no_grad()
def predict(model, dataset: VQADataset, cfg: VQAConfig, answer_list: Optional[List[str]] = None,
            use_cache: bool = True) -> List[str]:
    """One answer per question of ``dataset``, in dataset order (sharded over the ranks, gathered
    to every rank)."""
    model = getattr(model, 'module', model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    mine = list(du.shard_range(len(dataset)))
    loader = DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=cfg.batch_size_test,
                        num_workers=cfg.num_workers, shuffle=False,
                        collate_fn=VQACollator(model.tokenizer, MAX_QUESTION_TOKENS))
    if cfg.inference == 'rank':
        if not answer_list:
            raise ConfigError("inference: rank needs the candidate answers (answer_list)")
        cand_ids, cand_mask = (t.to(device) for t in tokenize_candidates(model.tokenizer, answer_list))
    settings = cfg.answer_generation()
    answers: List[str] = []
    beat = Heartbeat(f"answering ({cfg.inference})", len(mine), "questions", logger)
    for batch in loader:
        pixels = batch['pixel_values'].to(device, non_blocking=True)
        ids, mask = batch['input_ids'].to(device), batch['attention_mask'].to(device)
        with autocast(device, cfg.precision):
            states = model.encode_questions(pixels, ids, mask)
            if cfg.inference == 'rank':
                out = model.rank(states, mask, cand_ids, cand_mask, cfg.k_test)
                answers += [answer_list[i] for i in out.answer_ids.tolist()]
            else:
                answers += model.decode(model.generate_ids(states, mask, settings, cfg.mask_question_padding,
                                                           use_cache=use_cache))
        beat.update(len(pixels))
    model.train(was_training)
    return [a for part in du.all_gather_object(answers) for a in part]


def result_name(split: str) -> str:
    return 'vqa_result.json' if split == 'test' else f'vqa_result_{split}.json'


def evaluate_split(model, dataset: VQADataset, cfg: VQAConfig, split: str, output_dir: Path) -> Dict[str, float]:
    """Answer ``split``, write its result file, and its VQA accuracy when it has answers:
    ``{<split>_acc: 0-100, <split>_acc_<answer type>: ...}`` (the same on every rank)."""
    answers = predict(model, dataset, cfg, getattr(dataset, 'answer_list', None))
    results = [{'question_id': e.question_id, 'answer': a} for e, a in zip(dataset.entries, answers)]
    record: Dict[str, float] = {}
    if du.is_main_process():
        write_results(output_dir / result_name(split), results)
        if dataset.has_answers:
            acc = vqa_accuracy({r['question_id']: r['answer'] for r in results},
                               [{'question_id': e.question_id, 'answer': e.answers, 'answer_type': e.answer_type,
                                 'question_type': e.question_type}
                                for e in dataset.entries])
            record[f'{split}_acc'] = acc['overall']
            record.update({f'{split}_acc_{t}': v for t, v in acc['per_answer_type'].items()})
            record.update({f'{split}_acc_q_{t}': v for t, v in acc['per_question_type'].items()})
    return du.broadcast_object(record)


def train(cfg: VQAConfig, model, tokenizer, info: du.DistInfo, datasets: Dict[str, VQADataset],
          resume: Optional[str] = None, progress: bool = True, dry_run: bool = False) -> dict:
    """Fine-tune on ``datasets['train']``; val (when given) every ``eval_every`` epochs, best = val
    accuracy; the test split answered on a new best, or after the last epoch without val."""
    output_dir = Path(cfg.output_dir)
    log_unk_rate(tokenizer, datasets['train'].texts(), 'the train questions and answers')
    optimizer = build_adamw(model.parameters(), cfg.init_lr, cfg.weight_decay)
    schedule = CosineSchedule(cfg.init_lr, cfg.min_lr, cfg.max_epoch, cfg.warmup_steps, cfg.warmup_lr)
    trainer = Trainer(model, optimizer, schedule, info, cfg, progress=progress)
    loader = trainer.loader(datasets['train'], cfg.batch_size_train, VQACollator(tokenizer, MAX_QUESTION_TOKENS),
                            num_workers=cfg.num_workers, shuffle=not dry_run)
    if dry_run:
        return trainer.dry_run(loader, vqa_loss, extra={'inference': cfg.inference})
    logger.info('training: %d questions, %d batches per epoch per rank', len(datasets['train']), len(loader))
    has_val = 'val' in datasets

    def evaluate(epoch: int):
        record = evaluate_split(model, datasets['val'], cfg, 'val', output_dir)
        return record, record['val_acc']

    def after_epoch(epoch: int, is_best: bool, is_last: bool) -> dict:
        if 'test' in datasets and (is_best or not has_val and is_last):
            return evaluate_split(model, datasets['test'], cfg, 'test', output_dir)
        return {}

    return trainer.fit(loader, vqa_loss, cfg.max_epoch, evaluate=evaluate if has_val else None,
                       eval_every=cfg.eval_every, after_epoch=after_epoch, resume=resume)
