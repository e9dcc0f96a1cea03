"""Typed, validated YAML configs shared by every entry script.

A config is a dataclass schema (``ModelConfig``, ``RetrievalConfig``, ...) plus a YAML file that
sets some of its fields. ``load_config`` reads the file with ruamel.yaml in round-trip mode (so
its comments survive into the copy written next to a run's outputs), applies ``--opts key=value``
overrides and converts the result into the schema, checking every key and type::

    cfg, doc = load_config('configs/retrieval_coco.yaml', RetrievalConfig, ['k_test=32'])
    save_config(doc, Path(cfg.output_dir) / 'config.yaml')

A typo is an error, not a silently ignored key:
``unknown config key 'init_l' in configs/x.yaml; did you mean 'init_lr'?``.

A schema may define ``validate(self)`` yielding ``(field, message)`` pairs for semantic checks;
``load_config`` calls it on every (nested) dataclass it builds and reports the full dotted key.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import logging
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Literal, Mapping, Optional, Union

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError
from ruamel.yaml.scalarbool import ScalarBoolean

logger = logging.getLogger(__name__)

__all__ = [
    'ConfigError', 'ViTSpec', 'ModelConfig', 'RetrievalConfig', 'MMVPConfig', 'ContextBLIPConfig',
    'PretrainConfig', 'ImageCodeConfig', 'VIT_PRESETS', 'load_config',
    'save_config', 'config_to_dict', 'add_config_args', 'parse_config',
]

_UNION_ORIGINS = (Union, types.UnionType)


class ConfigError(ValueError):
    """A config file or override that does not fit its schema; the message names the key."""


# ----------------------------------------------------------------------------- schemas

@dataclass
class ViTSpec:
    """A custom ViT size (for tiny test models or non-standard backbones)."""
    width: int              # embedding dim
    depth: int              # number of transformer blocks
    heads: int              # attention heads; must divide width
    patch_size: int = 16
    mlp_ratio: float = 4.0  # MLP hidden dim = mlp_ratio * width

    def validate(self) -> Iterator[tuple[str, str]]:
        yield from _at_least(self, ('width', 'depth', 'heads', 'patch_size'), 1)
        if self.heads >= 1 and self.width % self.heads:
            yield 'heads', f'must divide width {self.width}, got {self.heads}'
        if self.mlp_ratio <= 0:
            yield 'mlp_ratio', f'must be > 0, got {self.mlp_ratio}'


# The two released BLIP backbones (see docs/BLIP.md); `vit: base` in a config means this size.
VIT_PRESETS: Dict[str, ViTSpec] = {
    'base': ViTSpec(width=768, depth=12, heads=12),
    'large': ViTSpec(width=1024, depth=24, heads=16),
}


@dataclass
class ModelConfig:
    """Model keys shared by every entry script; task schemas inherit from it."""
    vit: Union[str, ViTSpec] = 'base'           # 'base' | 'large' | a ViTSpec mapping
    image_size: int = 384                       # square input resolution
    vit_grad_ckpt: bool = False                 # gradient checkpointing in the ViT
    vit_ckpt_layer: int = 0                     # checkpoint the last N blocks (0 = all, if enabled)
    vit_drop_path_rate: Optional[float] = None  # None -> 0.1 for large, 0.0 otherwise
    med_config: str = 'configs/med_config.json'  # BERT json + encoder_width/add_cross_attention
    tokenizer: str = 'bert-base-uncased'        # local folder or hub id
    embed_dim: int = 256                        # ITC projection dim
    pretrained: str = ''                        # checkpoint path, URL, or '' for random init
    strict_load: bool = False                   # fail on missing/unexpected/mismatched weights
    max_tokens: int = 35                        # text pad/truncate length (tokens)
    max_words: int = 30                         # pre_caption word limit
    precision: Literal['fp32', 'bf16', 'fp16'] = 'fp32'  # autocast dtype
    device: str = 'auto'                        # 'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps'
    seed: int = 42
    output_dir: str = 'outputs/run'             # checkpoints, logs and the resolved config

    def __post_init__(self) -> None:
        # Resolve here so checkpoints and the saved config record the rate actually used.
        if self.vit_drop_path_rate is None:
            self.vit_drop_path_rate = 0.1 if self.vit == 'large' else 0.0

    def vit_spec(self) -> ViTSpec:
        """The ViT size as a ViTSpec, whether `vit` names a preset or spells one out."""
        return VIT_PRESETS[self.vit] if isinstance(self.vit, str) else self.vit

    def validate(self) -> Iterator[tuple[str, str]]:
        if isinstance(self.vit, str) and self.vit not in VIT_PRESETS:
            yield 'vit', f"must be one of {sorted(VIT_PRESETS)} or a mapping, got {self.vit!r}"
            return  # the checks below need the ViT size
        spec = self.vit_spec()
        yield from _at_least(self, ('image_size', 'embed_dim', 'max_tokens', 'max_words'), 1)
        if self.image_size % spec.patch_size:
            yield 'image_size', f'must be a multiple of patch_size {spec.patch_size}, got {self.image_size}'
        if not 0 <= self.vit_ckpt_layer <= spec.depth:
            yield 'vit_ckpt_layer', f'must be in [0, {spec.depth}], got {self.vit_ckpt_layer}'
        if not 0.0 <= self.vit_drop_path_rate < 1.0:
            yield 'vit_drop_path_rate', f'must be in [0, 1), got {self.vit_drop_path_rate}'
        if not re.fullmatch(r'auto|cpu|mps|cuda(:\d+)?', self.device):
            yield 'device', f"must be 'auto', 'cpu', 'mps', 'cuda' or 'cuda:N', got {self.device!r}"


@dataclass
class RetrievalConfig(ModelConfig):
    """Image-text retrieval fine-tuning and evaluation (train_retrieval.py)."""
    image_root: str = ''                        # prefix joined to the annotations' image paths
    ann_root: str = ''                          # folder with the train/val/test json files
    dataset: Literal['coco', 'flickr', 'custom'] = 'coco'
    train_file: Optional[Union[str, List[str]]] = None  # None -> the dataset's standard split
    val_file: Optional[str] = None
    test_file: Optional[str] = None
    skip_bad_images: bool = False               # log and skip unreadable images instead of failing
    queue_size: int = 57600                     # ITC queue; a multiple of the global batch size
    momentum: float = 0.995                     # EMA of the momentum encoders
    alpha: float = 0.4                          # weight of momentum-distillation soft targets
    k_test: int = 256                           # candidates re-ranked with ITM at eval
    negative_all_rank: bool = False             # mine ITM hard negatives across all ranks
    batch_size_train: int = 32                  # per GPU
    batch_size_test: int = 64                   # per GPU, for feature extraction
    rerank_batch_size: int = 128                # (query, candidate) pairs per ITM forward
    init_lr: float = 1e-5
    min_lr: float = 0.0                         # cosine schedule end value
    weight_decay: float = 0.05
    max_epoch: int = 6
    warmup_steps: int = 0
    grad_accum_steps: int = 1
    clip_grad_norm: Optional[float] = None      # None = no clipping
    num_workers: int = 4                        # dataloader workers per process
    log_every: int = 50                         # steps between training log lines
    eval_every: int = 1                         # epochs between validation runs
    ckpt_every_steps: int = 0                   # also save checkpoint_last.pth every N steps (0: per epoch)
    itc_all_rank_keys: bool = True              # ITC keys include every rank's batch (false: BLIP's local-only)
    train_crop_min_scale: float = 0.5           # RandomResizedCrop scale=(min, 1)
    train_hflip: bool = True                    # horizontal flip (off for data whose captions say left/right)
    train_randaug: bool = True                  # BLIP's RandAugment(2, 5)
    train_resize_only: bool = False             # train transform = the test transform (no augmentation)

    def validate(self) -> Iterator[tuple[str, str]]:
        yield from super().validate()
        if not 0.0 < self.train_crop_min_scale <= 1.0:
            yield 'train_crop_min_scale', f'must be in (0, 1], got {self.train_crop_min_scale}'
        yield from _at_least(self, ('queue_size', 'k_test', 'batch_size_train', 'batch_size_test',
                                    'rerank_batch_size', 'grad_accum_steps', 'log_every',
                                    'eval_every'), 1)
        yield from _at_least(self, ('max_epoch', 'warmup_steps', 'num_workers', 'min_lr',
                                    'weight_decay', 'ckpt_every_steps'), 0)
        for name in ('momentum', 'alpha'):
            if not 0.0 <= getattr(self, name) <= 1.0:
                yield name, f'must be in [0, 1], got {getattr(self, name)}'
        if self.init_lr <= 0:
            yield 'init_lr', f'must be > 0, got {self.init_lr}'
        elif self.min_lr > self.init_lr:
            yield 'min_lr', f'must be <= init_lr {self.init_lr}, got {self.min_lr}'
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            yield 'clip_grad_norm', f'must be > 0 or null, got {self.clip_grad_norm}'


@dataclass
class ContextBLIPConfig(ModelConfig):
    """ContextBLIP's architecture on top of BLIP (models/contextblip.py; CONTEXTBLIP.md).
    Schemas of every stage that builds a ContextBLIP inherit it."""
    use_adapter: bool = True                    # false: image_embeds are plain BLIP's (zero-shot BLIP)
    adapter_taps: Optional[List[int]] = None    # 1-based ViT blocks; None -> 4 evenly spaced up to the last (3,6,9,12 for ViT-B)
    adapter_reduction: int = 2                  # r: each tap goes width -> width / r
    text_adapter_reduction: int = 2             # TMIM text adapter: text width -> width / r -> width
    decoder_depth: int = 4                      # TMIM decoder layers (width = the ViT's)
    decoder_heads: int = 8
    decoder_mlp_ratio: float = 4.0              # FFN = ratio x width (3072 for ViT-B)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adapter_taps is None and self.vit_spec_ok():
            depth = self.vit_spec().depth
            # Record the resolved taps so checkpoints and saved configs say what was used.
            self.adapter_taps = sorted({-(-depth * k // 4) for k in range(1, 5)})

    def vit_spec_ok(self) -> bool:
        return not isinstance(self.vit, str) or self.vit in VIT_PRESETS

    def validate(self) -> Iterator[tuple[str, str]]:
        yield from super().validate()
        if not self.vit_spec_ok():
            return
        depth, width = self.vit_spec().depth, self.vit_spec().width
        taps = self.adapter_taps or []
        if not taps or any(not 1 <= t <= depth for t in taps) or len(set(taps)) != len(taps):
            yield 'adapter_taps', f'must be distinct block numbers in [1, {depth}], got {self.adapter_taps}'
        yield from _at_least(self, ('adapter_reduction', 'text_adapter_reduction', 'decoder_depth',
                                    'decoder_heads'), 1)
        if self.adapter_reduction >= 1 and width % self.adapter_reduction:
            yield 'adapter_reduction', f'must divide the ViT width {width}, got {self.adapter_reduction}'
        if self.decoder_heads >= 1 and width % self.decoder_heads:
            yield 'decoder_heads', f'must divide the ViT width {width}, got {self.decoder_heads}'
        if self.decoder_mlp_ratio <= 0:
            yield 'decoder_mlp_ratio', f'must be > 0, got {self.decoder_mlp_ratio}'


@dataclass
class PretrainConfig(ContextBLIPConfig):
    """ContextBLIP adapter pretraining: ITM + text-guided masked image modelling (pretrain.py).
    Defaults are the released recipe (configs/pretrain.yaml); BLIP stays frozen."""
    image_size: int = 224
    max_tokens: int = 30                        # released: padded/truncated to 30 tokens
    train_file: Union[str, List[str]] = ''      # json list(s) of {"image", "caption": str | [str]} (FORMATS.md 2)
    image_root: str = ''                        # prefix for relative image paths ('' = as written)
    skip_bad_images: bool = False               # log and skip unreadable images instead of failing
    mask_strategy: Literal['text', 'random'] = 'text'  # text-guided (the method) or random (ablation)
    mask_rate: float = 0.25                     # masked share of patches: int(mask_rate * N)
    guide_token: Literal['words', 'any'] = 'words'  # 'any': released (any of the padded positions)
    mask_noise: float = 0.02                    # uniform noise added to the normalised attention row
    tmim_condition: Literal['unmasked', 'masked'] = 'masked'  # image the text condition h sees; 'unmasked': released (leaks)
    tmim_norm_pix: bool = False                 # targets normalised per patch (MAE) instead of the input
    itm_neg_temp: float = 1.0                   # hard negatives ~ softmax(sim / T); released: 1 (none)
    itm_weight: float = 1.0
    tmim_weight: float = 1.0
    batch_size_train: int = 256                 # per GPU (released: 4 GPUs x 256)
    init_lr: float = 3e-4
    min_lr: float = 1e-6
    warmup_lr: float = 1e-6
    warmup_steps: int = 3000                    # linear per-step warm-up in epoch 0
    lr_decay_rate: float = 0.9                  # then lr = max(min_lr, init_lr * rate ** epoch)
    weight_decay: float = 0.05
    max_epoch: int = 20
    grad_accum_steps: int = 1
    clip_grad_norm: Optional[float] = None
    num_workers: int = 4
    log_every: int = 50
    ckpt_every_steps: int = 0                   # also save checkpoint_last.pth every N steps
    train_crop_min_scale: float = 0.2           # RandomResizedCrop scale=(min, 1)
    train_hflip: bool = True
    train_randaug: bool = True
    train_resize_only: bool = False             # train transform = the test transform
    visualize_samples: int = 4                  # images in the per-epoch mask grid (0: none)

    def validate(self) -> Iterator[tuple[str, str]]:
        yield from super().validate()
        if not self.train_file:
            yield 'train_file', 'must name at least one pretraining json file'
        if not 0.0 < self.mask_rate < 1.0:
            yield 'mask_rate', f'must be in (0, 1), got {self.mask_rate}'
        elif self.vit_spec_ok() and self.image_size % self.vit_spec().patch_size == 0:
            n = (self.image_size // self.vit_spec().patch_size) ** 2
            if not 1 <= int(self.mask_rate * n) < n:
                yield 'mask_rate', f'masks int({self.mask_rate} * {n}) patches; need 1 to {n - 1}'
        if not 0.0 < self.train_crop_min_scale <= 1.0:
            yield 'train_crop_min_scale', f'must be in (0, 1], got {self.train_crop_min_scale}'
        yield from _at_least(self, ('batch_size_train', 'grad_accum_steps', 'log_every'), 1)
        yield from _at_least(self, ('max_epoch', 'warmup_steps', 'num_workers', 'min_lr', 'warmup_lr',
                                    'weight_decay', 'ckpt_every_steps', 'mask_noise', 'itm_weight',
                                    'tmim_weight', 'visualize_samples'), 0)
        if self.itm_neg_temp <= 0:
            yield 'itm_neg_temp', f'must be > 0, got {self.itm_neg_temp}'
        if self.init_lr <= 0:
            yield 'init_lr', f'must be > 0, got {self.init_lr}'
        if not 0.0 < self.lr_decay_rate <= 1.0:
            yield 'lr_decay_rate', f'must be in (0, 1], got {self.lr_decay_rate}'
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            yield 'clip_grad_norm', f'must be > 0 or null, got {self.clip_grad_norm}'


@dataclass
class MMVPConfig(ContextBLIPConfig):
    """MMVP-VLM evaluation (eval_mmvp.py): nine visual patterns, pairs of images and statements."""
    data_root: str = 'data/mmvp'                # holds Questions.csv and 'MLLM_VLM Images/'
    model_type: Literal['zero_shot', 'finetuned'] = 'zero_shot'  # zero_shot: a BLIP or ContextBLIP
                                                # pretraining checkpoint, scored with `score`; finetuned: a
                                                # finetune_imagecode.py stage-1/2 checkpoint (its own config)
    score: Literal['itm', 'itc', 'itm+itc'] = 'itm'  # itm: softmax(itm_head)[:, 1]; itc: cosine;
                                                # itm+itc: ITM logit[:, 1] + cosine (BLIP's rerank score)
    prompt_prefix: str = 'a photo of '          # the official prompt: prefix + statement
    clean_text: bool = True                     # BLIP's pre_caption on the prompt (lowercase, no . ! ...)
    pairs_per_pattern: int = 15                 # pattern of pair p = PATTERNS[p // pairs_per_pattern]
    batch_size: int = 16                        # pairs per forward pass (4 image-text matches each)

    def validate(self) -> Iterator[tuple[str, str]]:
        yield from super().validate()
        yield from _at_least(self, ('pairs_per_pattern', 'batch_size'), 1)


@dataclass
class ImageCodeConfig(ContextBLIPConfig):
    """ImageCoDe: zero-shot scoring (zero_shot.py) and the two fine-tuning stages
    (finetune_imagecode.py). Defaults are the released stage-1 recipe (CONTEXTBLIP.md)."""
    image_size: int = 224
    max_tokens: int = 30                        # released: padded/truncated to 30 tokens
    image_root: str = ''                        # the image-sets folder: <image_root>/<set>/img<N>.jpg
    ann_root: str = ''                          # train_data.json, valid_data.json, test_data_unlabeled.json
    split: Literal['valid', 'test'] = 'valid'   # what is scored; test: the leaderboard submission too
    tag_file: str = ''                          # phenomenon tags (manual_annotation_valid.yaml), for analysis
    score: Literal['itm', 'itc', 'itm+itc'] = 'itm'  # zero-shot: match prob | cosine | ITM logit + cosine
    stage: Literal[1, 2] = 1                    # 1: adapter-BLIP + prediction layer; 2: + inter-context encoder
    all_pos: bool = False                       # stage 2: candidate position embedding for static sets too
    context_layers: int = 2                     # stage 2 encoder over the 10 candidate features
    context_heads: int = 8
    context_mlp_ratio: float = 4.0              # FFN = ratio x text width (3072 for BERT-base)
    context_dropout: float = 0.1
    context_zero_init: bool = True              # ours: stage 2 starts at stage 1's output; released: false
    cache_features: bool = False                # stage 2: compute the frozen stage-1 features once
    batch_size_train: int = 36                  # descriptions (each with its 10 images) per process and step
    batch_size_test: int = 8                    # image sets per forward pass at evaluation
    init_lr: float = 2e-6                       # stage 1: BLIP + adapter; stage 2: the inter-context encoder
    head_lr: float = 1e-4                       # stage 1: the prediction layer
    head_init: Literal['itm', 'random'] = 'random'  # released; itm: start at zero-shot ITM's ranking (not better on the demo)
    lr_decay_rate: float = 0.95                 # lr = init_lr * rate ** epoch
    min_lr: float = 0.0
    optimizer: Literal['adam', 'adamw'] = 'adam'  # released: Adam, weight decay as L2
    betas: List[float] = dataclasses.field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.2
    max_epoch: int = 40
    grad_accum_steps: int = 1
    clip_grad_norm: Optional[float] = None
    num_workers: int = 4
    log_every: int = 50
    eval_every: int = 1                         # epochs between validation runs (best-on-valid)
    ckpt_every_steps: int = 0                   # also save checkpoint_last.pth every N steps
    train_crop_min_scale: float = 0.5           # RandomResizedCrop scale=(min, 1)
    train_hflip: bool = False                   # released: true; descriptions say left and right
    train_randaug: bool = True
    train_shared_crop: bool = True              # one augmentation draw for all 10 frames; released: per frame
    train_resize_only: bool = False             # train transform = the test transform

    def validate(self) -> Iterator[tuple[str, str]]:
        yield from super().validate()
        yield from _at_least(self, ('context_layers', 'context_heads', 'batch_size_train', 'batch_size_test',
                                    'grad_accum_steps', 'log_every', 'eval_every'), 1)
        yield from _at_least(self, ('max_epoch', 'num_workers', 'min_lr', 'weight_decay', 'ckpt_every_steps',
                                    'head_lr', 'eps'), 0)
        if self.init_lr <= 0:
            yield 'init_lr', f'must be > 0, got {self.init_lr}'
        if not 0.0 < self.lr_decay_rate <= 1.0:
            yield 'lr_decay_rate', f'must be in (0, 1], got {self.lr_decay_rate}'
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            yield 'betas', f'must be two numbers in [0, 1), got {self.betas}'
        if not 0.0 <= self.context_dropout < 1.0:
            yield 'context_dropout', f'must be in [0, 1), got {self.context_dropout}'
        if self.context_mlp_ratio <= 0:
            yield 'context_mlp_ratio', f'must be > 0, got {self.context_mlp_ratio}'
        if not 0.0 < self.train_crop_min_scale <= 1.0:
            yield 'train_crop_min_scale', f'must be in (0, 1], got {self.train_crop_min_scale}'
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            yield 'clip_grad_norm', f'must be > 0 or null, got {self.clip_grad_norm}'
        if self.cache_features and not (self.stage == 2 and self.train_resize_only):
            yield 'cache_features', ('needs stage: 2 and train_resize_only: true (augmented images give '
                                     'new features every epoch)')

def _at_least(obj: Any, names: tuple[str, ...], low: float) -> Iterator[tuple[str, str]]:
    for name in names:
        if getattr(obj, name) < low:
            yield name, f'must be >= {low}, got {getattr(obj, name)}'


# ----------------------------------------------------------------------------- conversion

class _Origins:
    """Which source set each dotted key, so an error points at the file or at --opts."""

    def __init__(self, default: str):
        self.default = default
        self.by_key: Dict[str, str] = {}

    def mark(self, key: str, label: str) -> None:
        self.by_key[key] = label

    def of(self, key: str) -> str:
        # The longest marked prefix wins: `vit={...}` from --opts owns `vit.width` too.
        best = max((k for k in self.by_key if key == k or key.startswith(k + '.')
                    or key.startswith(k + '[')), key=len, default=None)
        return self.by_key[best] if best is not None else self.default


def _scalar(value: Any) -> Any:
    """ruamel's formatting-preserving scalars -> builtins (ScalarBoolean is an int subclass)."""
    if isinstance(value, ScalarBoolean):
        return bool(value)
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    return value


def _plain(value: Any) -> Any:
    """Dataclasses, ruamel nodes and scalars -> plain nested dicts/lists/builtins."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return _scalar(value)


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in _UNION_ORIGINS:
        return ' | '.join(_type_name(a) for a in args)
    if origin is Literal:
        return 'one of ' + ', '.join(repr(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if tp is type(None):
        return 'null'
    if dataclasses.is_dataclass(tp):
        return f'{tp.__name__} mapping'
    return getattr(tp, '__name__', str(tp))


def _accepts(tp: Any, value: Any) -> bool:
    """Whether `value` has the shape `tp` expects; picks the Union member to convert with."""
    origin = typing.get_origin(tp) or tp
    if tp is Any:
        return True
    if value is None:
        return tp is type(None)
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp) or origin is dict:
        return isinstance(value, Mapping)
    if origin is list:
        return isinstance(value, list)
    if isinstance(value, bool):  # bool is an int subclass, but `true` is no valid int or float
        return tp is bool
    if tp is float:
        return isinstance(value, (int, float))
    return isinstance(tp, type) and isinstance(value, tp)


def _convert(value: Any, tp: Any, key: str, origins: _Origins) -> Any:
    value = _scalar(value)
    if typing.get_origin(tp) in _UNION_ORIGINS:
        members = [a for a in typing.get_args(tp) if _accepts(a, value)]
        tp = members[0] if members else tp
    if not _accepts(tp, value):
        shown = _plain(value)
        raise ConfigError(f'config key {key!r} in {origins.of(key)}: expected {_type_name(tp)}, '
                          f'got {type(shown).__name__} {shown!r}')
    origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, origins)
    if origin is list:
        item = args[0] if args else Any
        return [_convert(v, item, f'{key}[{i}]', origins) for i, v in enumerate(value)]
    if origin is dict:
        item = args[1] if args else Any
        return {str(k): _convert(v, item, f'{key}.{k}', origins) for k, v in value.items()}
    if tp is float:
        return float(value)  # `min_lr: 0` is a valid float
    return _plain(value)


@functools.lru_cache(maxsize=None)
def _hints(schema: type) -> Dict[str, Any]:
    return typing.get_type_hints(schema)  # resolves the string annotations of this module


def _join(prefix: str, name: Any) -> str:
    return f'{prefix}.{name}' if prefix else str(name)


def _build(schema: type, mapping: Mapping, prefix: str, origins: _Origins) -> Any:
    """Mapping -> validated `schema` instance; every error names the full dotted key."""
    hints = _hints(schema)
    fields = [f for f in dataclasses.fields(schema) if f.init]
    names = [f.name for f in fields]
    for name in mapping:
        if name not in names:
            key = _join(prefix, name)
            close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.6)
            hint = (f'did you mean {_join(prefix, close[0])!r}?' if close
                    else f"valid keys{f' under {prefix!r}' if prefix else ''}: {', '.join(names)}")
            raise ConfigError(f'unknown config key {key!r} in {origins.of(key)}; {hint}')
    kwargs = {}
    for f in fields:
        key = _join(prefix, f.name)
        if f.name in mapping:
            kwargs[f.name] = _convert(mapping[f.name], hints[f.name], key, origins)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f'missing required config key {key!r} ({_type_name(hints[f.name])}) '
                              f'in {origins.of(key)}')
    obj = schema(**kwargs)
    problems = list(obj.validate()) if hasattr(obj, 'validate') else []
    if problems:
        raise ConfigError('; '.join(f'invalid config key {_join(prefix, k)!r} in '
                                    f'{origins.of(_join(prefix, k))}: {msg}' for k, msg in problems))
    return obj


# ----------------------------------------------------------------------------- documents

def _yaml() -> YAML:
    yaml = YAML(typ='rt')  # round-trip: keeps comments, key order and number formatting
    yaml.indent(mapping=2, sequence=4, offset=2)
    # `val_file: null` rather than ruamel's bare `val_file:`, which reads like a forgotten value.
    yaml.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar('tag:yaml.org,2002:null', 'null'))
    return yaml


def _to_yaml(value: Any) -> Any:
    """Plain data -> ruamel nodes, so comments can later be attached anywhere in the document."""
    value = _plain(value)
    if isinstance(value, dict):
        return CommentedMap((k, _to_yaml(v)) for k, v in value.items())
    if isinstance(value, list):
        return CommentedSeq(_to_yaml(v) for v in value)
    return value


def _read(path: Path, label: str) -> CommentedMap:
    try:
        doc = _yaml().load(path.read_text())
    except YAMLError as err:
        raise ConfigError(f'cannot parse {label}: {err}') from err
    if doc is None:
        return CommentedMap()  # an empty file sets nothing
    if not isinstance(doc, Mapping):
        raise ConfigError(f'{label} must hold a mapping of config keys, got {type(doc).__name__}')
    return doc


def _fill_under(node: CommentedMap, base: Mapping, prefix: str, origins: _Origins, label: str) -> None:
    """Copy keys of `base` that `node` lacks (deep): a lower-priority layer of values."""
    for name, value in base.items():
        key = _join(prefix, name)
        if name not in node:
            node[name] = _to_yaml(value)
            origins.mark(key, label)
        elif isinstance(node[name], Mapping) and isinstance(value, Mapping):
            _fill_under(node[name], value, key, origins, label)


def _parse_opt(opt: str) -> tuple[List[str], Any]:
    key, sep, text = opt.partition('=')
    parts = key.strip().split('.')
    if not sep or not all(parts):
        raise ConfigError(f'--opts entry {opt!r} is not key=value (dotted keys for nesting)')
    if not text.strip():
        return parts, ''  # `pretrained=` means the empty string, not null
    try:
        return parts, _yaml().load(text)  # YAML typing: 32 -> int, false -> bool, [a, b] -> list
    except YAMLError as err:
        raise ConfigError(f'cannot parse --opts value for {key!r}: {text!r} ({err})') from err


def _apply_opts(doc: CommentedMap, opts: List[str], origins: _Origins) -> None:
    for opt in opts:
        parts, value = _parse_opt(opt)
        node = doc
        for i, part in enumerate(parts[:-1]):
            sub = '.'.join(parts[:i + 1])
            if node.get(part) is None:
                node[part] = CommentedMap()
                origins.mark(sub, '--opts')  # created here: nothing under it came from the file
            elif not isinstance(node[part], Mapping):
                raise ConfigError(f"cannot set {'.'.join(parts)!r} from --opts: {sub!r} is "
                                  f'{_plain(node[part])!r}, not a mapping')
            node = node[part]
        node[parts[-1]] = value
        origins.mark('.'.join(parts), '--opts')


def _sync(node: CommentedMap, obj: Any) -> List[str]:
    """Write `obj`'s values into `node` where absent or changed (defaults, resolved values).

    Unchanged values are left alone so their formatting (`1e-5`, `min_lr: 0`) and comments stay.
    Returns the names that were added.
    """
    added = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name not in node:
            node[f.name] = _to_yaml(value)
            added.append(f.name)
        elif dataclasses.is_dataclass(value) and isinstance(node[f.name], CommentedMap):
            _sync(node[f.name], value)
        elif _plain(node[f.name]) != _plain(value):
            node[f.name] = _to_yaml(value)
    return added


# ----------------------------------------------------------------------------- public API

def load_config(path: Union[str, Path, None], schema: type, opts: Optional[List[str]] = None,
                defaults_from: Union[str, Path, Mapping, Any, None] = None) -> tuple[Any, CommentedMap]:
    """Load, override and validate a config.

    Args:
        path: YAML file, or None for the schema defaults only.
        schema: dataclass type to build (e.g. RetrievalConfig).
        opts: ``key=value`` overrides (dotted keys for nesting, YAML-typed values).
        defaults_from: optional lower-priority layer under the file: another YAML file, a mapping
            or a schema instance (e.g. the config stored in a checkpoint).
    Returns:
        (instance of `schema`, ruamel document of the resolved config incl. filled-in defaults).
    Raises:
        ConfigError: unknown key, wrong type, missing required key, failed semantic check.
    """
    label = str(path) if path is not None else '(no config file)'
    doc = _read(Path(path), label) if path is not None else CommentedMap()
    origins = _Origins(label)
    if defaults_from is not None:
        if isinstance(defaults_from, (str, Path)):
            base, base_label = _read(Path(defaults_from), str(defaults_from)), str(defaults_from)
        else:
            base, base_label = _plain(defaults_from), 'defaults_from'
        _fill_under(doc, base, '', origins, base_label)
    _apply_opts(doc, list(opts or []), origins)
    cfg = _build(schema, doc, '', origins)
    added = _sync(doc, cfg)
    if path is not None and added and len(added) < len(doc):
        doc.yaml_set_comment_before_after_key(added[0], before='schema defaults (not set in the file)')
    logger.info('loaded %s config from %s%s', schema.__name__, label,
                f" with overrides {' '.join(opts)}" if opts else '')
    return cfg, doc


def config_to_dict(instance: Any) -> Dict[str, Any]:
    """A config instance as plain nested dicts/lists (for checkpoints and loggers)."""
    return _plain(instance)


def save_config(doc_or_instance: Any, path: Union[str, Path]) -> Path:
    """Write the resolved config as YAML; a ruamel document keeps the original file's comments."""
    if isinstance(doc_or_instance, Mapping):
        data = doc_or_instance
    elif dataclasses.is_dataclass(doc_or_instance) and not isinstance(doc_or_instance, type):
        data = _to_yaml(doc_or_instance)
    else:
        raise TypeError(f'expected a config document or dataclass, got {type(doc_or_instance).__name__}')
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open('w') as fh:
        _yaml().dump(data, fh)
    logger.info('wrote config to %s', path)
    return path


def add_config_args(parser: argparse.ArgumentParser,
                    default_config: Optional[str] = None) -> argparse.ArgumentParser:
    """Add ``--config FILE``, ``--output_dir DIR`` and ``--opts key=value ...`` to `parser`."""
    group = parser.add_argument_group('config')
    group.add_argument('--config', metavar='FILE', default=default_config,
                       required=default_config is None, help='YAML config file')
    group.add_argument('--output_dir', metavar='DIR', default=None,
                       help="overrides the config's output_dir")
    group.add_argument('--opts', nargs='*', action='extend', default=[], metavar='KEY=VALUE',
                       help='config overrides, e.g. --opts k_test=32 vit.width=96 pretrained= '
                            '(may be given several times; later entries win)')
    return parser


def parse_config(schema: type, argv: Optional[List[str]] = None, description: Optional[str] = None,
                 extra_args: Optional[Callable[[argparse.ArgumentParser], Any]] = None,
                 default_config: Optional[str] = None,
                 prog: Optional[str] = None) -> tuple[argparse.Namespace, Any, CommentedMap]:
    """Parse the command line of an entry script: ``(args, cfg, doc)``.

    ``prog`` names the command in usage lines (e.g. ``python -m tools score``).

    A bad config exits through ``parser.error`` (usage + message, status 2) rather than a traceback.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_config_args(parser, default_config)
    if extra_args is not None:
        extra_args(parser)
    args = parser.parse_args(argv)
    try:
        cfg, doc = load_config(args.config, schema, args.opts)
    except (ConfigError, FileNotFoundError) as err:
        parser.error(str(err))
    if args.output_dir is not None and 'output_dir' in _hints(schema):
        cfg.output_dir = args.output_dir
        doc['output_dir'] = args.output_dir
    return args, cfg, doc
