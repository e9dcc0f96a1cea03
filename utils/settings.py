"""The config groups every task shares (optimiser, schedule, loop, evaluation, augmentation, run,
weights, text). A task's schema inherits the ones it uses; each key is declared here once."""
from __future__ import annotations

from typing import List, Literal, Optional, Union

from pydantic import ValidationInfo, model_validator

from utils.config import Config, Device, Fraction, NonNegFloat, NonNegInt, PosFloat, PosInt, unused


class RunSettings(Config):
    precision: Literal['fp32', 'bf16', 'fp16'] = 'fp32'  # autocast dtype
    device: Device = 'auto'                     # 'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps'
    seed: int = 42
    deterministic: bool = False                 # bitwise repeatable runs on the same machine and software
                                                # (deterministic kernels; its cost: docs/RETRIEVAL.md)
    output_dir: str = 'outputs/run'             # checkpoints, logs and the resolved config


class WeightsSettings(Config):
    pretrained: str = ''                        # checkpoint path, URL, or '' for random init
    strict_load: Optional[bool] = None          # null: the loading policy (models/factory.py): other shapes,
                                                # stray or missing weights are errors, parts the layout
                                                # declares new allowed only to start training; true: every
                                                # weight from the file; false: load what fits (warned)


class TextSettings(Config):
    tokenizer: str = 'bert-base-uncased'        # local folder or hub id (BLIP adds [DEC] and [ENC])
    max_tokens: PosInt = 35                     # text pad/truncate length (tokens)
    max_words: PosInt = 30                      # pre_caption word limit


class OptimSettings(Config):
    init_lr: PosFloat = 1e-5
    min_lr: NonNegFloat = 0.0                   # end value of the schedule
    weight_decay: NonNegFloat = 0.05

    @model_validator(mode='after')
    def _min_below_init(self):
        if self.min_lr > self.init_lr:
            raise ValueError(f'min_lr: must be <= init_lr {self.init_lr}, got {self.min_lr}')
        return self


class LoopSettings(Config):
    max_epoch: NonNegInt = 6
    batch_size_train: PosInt = 32               # per process
    grad_accum_steps: PosInt = 1
    clip_grad_norm: Optional[PosFloat] = None   # None = no clipping
    num_workers: NonNegInt = 4                  # dataloader workers per process
    log_every: PosInt = 50                      # steps between training log lines
    ckpt_every_steps: NonNegInt = 0             # also save checkpoint_last.pth every N steps (0: per epoch)
    save_every: NonNegInt = 0                   # also keep checkpoint_epochNNN every N epochs (0: only best/last)
    keep_checkpoints: Optional[PosInt] = None   # the newest N epoch checkpoints are kept (None: all); best/last always
    save_format: Literal['torch', 'safetensors'] = 'torch'  # weights as .pth, or .safetensors + a torch state file
    # tensorboard: events in output_dir/tensorboard; wandb: a Weights & Biases run (rank 0 only; a list: both)
    report_to: Union[Literal['none', 'tensorboard', 'wandb'], List[Literal['tensorboard', 'wandb']]] = 'none'
    wandb_project: str = 'blip'                 # report_to: wandb
    wandb_mode: Literal['offline', 'online'] = 'offline'  # offline: the run stays in output_dir/wandb, no
                                                # network (`wandb sync output_dir/wandb/offline-run-*` uploads it)
    compile: bool = False                       # torch.compile the ViT blocks and text layers (utils/compile.py;
                                                # measured in docs/PERFORMANCE.md)
    compile_backend: Literal['inductor', 'aot_eager'] = 'inductor'  # aot_eager: traced, no code generated (debug)

    @model_validator(mode='after')
    def _retention(self, info: ValidationInfo):
        if self.max_epoch < 1 and 'max_epoch' not in unused(info):
            raise ValueError(f'max_epoch: {self.max_epoch} trains nothing; a training run needs max_epoch >= 1 '
                             '(to evaluate, use --evaluate)')
        if self.keep_checkpoints is not None and not self.save_every:
            raise ValueError(f'keep_checkpoints: {self.keep_checkpoints} keeps epoch checkpoints, which only '
                             'save_every > 0 writes; set save_every too')
        return self


class StreamSettings(Config):
    """Streamed training data (tar / parquet shards in ``train_file``; data/stream.py, docs/FORMATS.md 2c)."""
    train_num_samples: Optional[PosInt] = None  # samples per epoch over all ranks (None: every record once)
    shuffle_buffer: PosInt = 1000               # records shuffled together per worker (a block)
    max_bad_fraction: Fraction = 0.01           # bad records tolerated per source (judged after 1000 read, or at its end)
    log_sample_keys: bool = False               # write output_dir/samples_rank<R>.txt: "epoch step key" per sample


class EvalSettings(Config):
    batch_size_test: PosInt = 64                # per process
    eval_every: PosInt = 1                      # epochs between validation runs


class AugmentSettings(Config):
    train_crop_min_scale: Fraction = 0.5        # RandomResizedCrop scale=(min, 1)
    train_hflip: bool = True                    # horizontal flip (off for data whose captions say left/right)
    train_randaug: bool = True                  # BLIP's RandAugment(2, 5)
    train_resize_only: bool = False             # train transform = the test transform (no augmentation)


class WarmupSettings(Config):
    warmup_steps: NonNegInt = 0                 # linear per-step warm-up at the start of training
    warmup_lr: NonNegFloat = 0.0                # the warm-up starts from this lr


class DecaySettings(Config):
    lr_decay_rate: Fraction = 0.9               # lr = max(min_lr, init_lr * rate ** epoch)


class ColumnSettings(Config):
    """CSV/TSV annotation columns (retrieval, captioning and pretraining files; docs/FORMATS.md, "CSV column
    mapping"). json files keep BLIP's field names."""
    image_col: str = 'image'                    # the image path column (with image_dir_col: the file name)
    caption_col: str = 'caption'                # the caption column
    image_dir_col: Optional[str] = None         # a folder column: image path = folder/file (file: image_col)
    image_id_col: str = 'image_id'              # optional train column: captions with one id are positives

    @model_validator(mode='after')
    def _named_columns(self):
        for key in ('image_col', 'caption_col', 'image_dir_col', 'image_id_col'):
            if getattr(self, key) is not None and not getattr(self, key).strip():
                raise ValueError(f'{key}: must name a column, got {getattr(self, key)!r}')
        return self


def batch_size_alias(data, keys=('batch_size_train', 'batch_size_test')):
    """BLIP's single ``batch_size`` key (its caption, nocaps, pretraining and MSRVTT configs) for
    the explicit ``keys`` it stands for; an explicit ``batch_size_train`` / ``_test`` wins. For a
    config's ``model_validator(mode='before')``."""
    if isinstance(data, dict) and data.get('batch_size') is not None:
        data = dict(data)
        for key in keys:
            data.setdefault(key, data['batch_size'])
    return data
