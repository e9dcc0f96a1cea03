"""One door to every model: build it from its config, load any checkpoint kind into it.

    model, tokenizer = create_model(cfg, "blip", device)           # BLIP retrieval, momentum encoders + queues
    model, tokenizer = create_model(cfg, "blip_pretrain", device)  # BLIP pretraining (tied decoder; model_base.pth layout)
    model, tokenizer = create_model(cfg, "blip_inference", device) # the same without them (half the memory)
    model, tokenizer = create_model(cfg, "contextblip_pretrain")    # ContextBLIP + TMIM decoder
    model, tokenizer = create_model(cfg, "zero_shot")              # ContextBLIP; a plain BLIP file -> BLIP itself
    model, tokenizer = create_model(cfg, "imagecode")              # ImageCoDe stage 1 or 2 (cfg.stage)
    model, tokenizer = create_model(cfg, "caption")                # BLIP captioner (ViT + text decoder)
    load_weights(model, "any checkpoint")                          # dispatches on the file's format

Every checkpoint we write carries a ``format`` tag (:class:`Format`); official BLIP files carry
none and are recognised by their layout (and so are files written before the tag existed).

| format | holds | loads into |
|---|---|---|
| ``blip`` (official or ours) | BLIP's state dict (``visual_encoder.*``, ``text_encoder.*``, ...) | BLIP; ContextBLIP's ``blip``; stage 1's backbone |
| ``contextblip-trainable`` | ``adapter.*`` (+ ``decoder.*``); the config names the base BLIP | ContextBLIP (base BLIP loaded too) |
| ``contextblip-merged`` | ``blip.*``, ``adapter.*``, ``decoder.*`` | ContextBLIP; stage 1's backbone |
| ``imagecode`` | a whole stage-1 or stage-2 model (``stage`` in its config) | the same stage; stage 1 into stage 2's frozen part |
| ``blip-caption`` (official or ours) | ``visual_encoder.*``, ``text_decoder.*`` | the captioner |

A pretraining checkpoint (``model_base.pth``: encoder, decoder, momentum copies, queues) is a
``blip`` file: a retrieval model takes all but ``text_decoder.*``, a captioner takes
``visual_encoder.*`` and ``text_decoder.*``; what each leaves is reported as an expected extra.

Resume checkpoints are these same files plus optimiser and loop state (``utils.engine``).

Wherever a checkpoint is named (``pretrained``, ``teacher``, ``load_weights(model, source)``), a
HuggingFace BLIP folder (``config.json`` with model_type ``blip`` + ``model.safetensors`` or
``pytorch_model.bin``) or a hub id (``Salesforce/blip-itm-base-coco``, from the local HF cache) may
stand instead: ``models/hf.py`` converts it in memory to the official layout (``read_source``).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple

import torch
from torch import nn

from models import hf
from models.blip import BlipArch, BLIPRetrieval, build_blip_retrieval
from models.blip_pretrain import build_blip_pretrain
from models.caption import BLIPCaptioner, build_captioner
from models.contextblip import ContextBLIP, PretrainSettings, build_contextblip
from models.imagecode import CandidateScorer, ContextualScorer, ImageCodeArch, build_imagecode_model
from models.tokenizer import build_tokenizer
from utils.checkpoint import (CheckpointError, LoadReport, extract_state_dict, interpolate_pos_embed,
                              load_checkpoint, load_state_dict_with_report)
from utils.config import ConfigError

logger = logging.getLogger(__name__)


class Format:
    BLIP = "blip"
    CONTEXTBLIP_TRAINABLE = "contextblip-trainable"
    CONTEXTBLIP_MERGED = "contextblip-merged"
    IMAGECODE = "imagecode"
    CAPTION = "blip-caption"
    ALL = (BLIP, CONTEXTBLIP_TRAINABLE, CONTEXTBLIP_MERGED, IMAGECODE, CAPTION)


KINDS = ("blip", "blip_inference", "blip_pretrain", "contextblip", "contextblip_pretrain", "zero_shot", "imagecode", "caption")

# Pretraining checkpoints (model_base.pth) carry a captioning decoder and name their queue pointer
# `queue_ptr`; a retrieval model does not use either, and starts its idx queue afresh.
# DLIP's released student also carries `vl_proj` (a projection its losses never use).
PRETRAIN_EXTRAS = ("text_decoder.", "vl_proj.")
PRETRAIN_EXTRA_KEYS = ("queue_ptr",)
# What a model built without momentum encoders leaves unused in any BLIP checkpoint.
MOMENTUM_PREFIXES = ("visual_encoder_m.", "vision_proj_m.", "text_encoder_m.", "text_proj_m.")
QUEUE_KEYS = ("image_queue", "text_queue", "idx_queue", "ptr_queue", "queue_ptr")
CONTEXTBLIP_PARTS = ("adapter.", "decoder.")
# What a captioner leaves unused in a pretraining (or retrieval) checkpoint.
ENCODER_PREFIXES = ("text_encoder.", "vision_proj.", "text_proj.", "itm_head.") + MOMENTUM_PREFIXES
ENCODER_KEYS = ("temp",) + QUEUE_KEYS


class LoadResult(NamedTuple):
    format: str                       # one of Format.ALL
    blip: Optional[LoadReport]        # report of the BLIP weights (None: not loaded here)
    parts: Optional[LoadReport]       # report of the rest (adapter/decoder, or a whole ImageCoDe model)


# ---------------------------------------------------------------------- building

def build_model(cfg, kind: str, tokenizer) -> nn.Module:
    """A model of ``kind`` with random weights, from the config's architecture fields."""
    if kind == "blip":
        return build_blip_retrieval(cfg, tokenizer, itc=cfg)
    if kind == "blip_inference":
        return build_blip_retrieval(cfg, tokenizer)
    if kind == "blip_pretrain":
        return build_blip_pretrain(cfg, tokenizer, itc=cfg)
    if kind in ("contextblip", "zero_shot"):
        # A pretraining config's mask settings come along (compute_mask reads them); others: defaults.
        return build_contextblip(cfg, tokenizer, settings=cfg if isinstance(cfg, PretrainSettings) else None)
    if kind == "contextblip_pretrain":
        return build_contextblip(cfg, tokenizer, tmim=cfg, settings=cfg)
    if kind == "imagecode":
        return build_imagecode_model(cfg, tokenizer)
    if kind == "caption":
        return build_captioner(cfg, tokenizer)
    raise ValueError(f"unknown model kind {kind!r}; one of {KINDS}")


def create_model(cfg, kind: str, device: Any = "cpu", pretrained: Optional[str] = None,
                 load: bool = True) -> Tuple[nn.Module, Any]:
    """Tokenizer + model of ``kind`` with ``pretrained`` (default ``cfg.pretrained``) loaded.

    ``zero_shot``: a plain BLIP checkpoint is scored as BLIP itself (no adapter: ``model.use_adapter``
    tells what was built). ``imagecode`` stage 2 needs its stage-1 checkpoint, loaded strictly.
    """
    source = cfg.pretrained if pretrained is None else pretrained
    tokenizer = build_tokenizer(cfg.tokenizer)
    ckpt = read_source(source, cfg, tokenizer) if load and source else None
    if kind == "zero_shot" and ckpt is not None and cfg.use_adapter and checkpoint_format(ckpt) == Format.BLIP:
        logger.info("%s is a plain BLIP checkpoint: scoring with BLIP itself (use_adapter off)", source)
        cfg = cfg.model_copy(update={"use_adapter": False})
    model = build_model(cfg, kind, tokenizer)
    if ckpt is not None:
        load_weights(model, ckpt, strict=cfg.strict_load, source_name=str(source))
        if kind == "imagecode" and cfg.stage == 1 and cfg.head_init == "itm":
            model.init_prediction_from_itm()
    elif load and kind == "imagecode" and cfg.stage == 2:
        raise ConfigError("stage 2 needs `pretrained`: the stage-1 checkpoint (finetune_imagecode.py, stage: 1)")
    elif load:
        logger.warning("`pretrained` is empty: the %s model starts from random weights", kind)
    if kind == "zero_shot":
        model.eval()
    return model.to(device), tokenizer


def create_teacher(cfg, tokenizer, device: Any = "cpu") -> nn.Module:
    """DLIP's frozen teacher: a BLIP pretraining model (no momentum encoders or queues) of the
    config's ``teacher_vit`` / ``teacher_med_config`` (same ``embed_dim``, ``image_size`` and
    tokenizer as the student), ``cfg.teacher`` loaded strictly (it must carry a decoder), every
    parameter frozen, in eval mode (no dropout) for good: distillation runs it under no_grad."""
    if not cfg.teacher:
        raise ConfigError("`teacher` is empty: name the BLIP checkpoint (with a decoder) to distil from")
    arch = BlipArch.model_validate({"vit": cfg.teacher_vit, "image_size": cfg.image_size,
                                    "med_config": cfg.teacher_med_config, "embed_dim": cfg.embed_dim})
    ckpt = read_source(cfg.teacher, arch, tokenizer)
    state = extract_state_dict(ckpt)
    if not any(k.startswith("text_decoder.") for k in state) or not any(k.startswith("text_encoder.") for k in state):
        raise CheckpointError(f"teacher {cfg.teacher}: a DLIP teacher needs a text encoder and a decoder "
                              "(BLIP's pretraining layout, model_base.pth); this file has "
                              f"{'no decoder' if not any(k.startswith('text_decoder.') for k in state) else 'no text encoder'}")
    teacher = build_blip_pretrain(arch, tokenizer, itc=None)
    report = load_weights(teacher, ckpt, strict=True, source_name=f"teacher {cfg.teacher}").blip
    teacher.requires_grad_(False)
    teacher.eval()
    logger.info("teacher %s: %d tensors loaded, %.1fM parameters, frozen (eval, no_grad)", cfg.teacher,
                report.num_loaded, sum(p.numel() for p in teacher.parameters()) / 1e6)
    return teacher.to(device)


def model_from_checkpoint(source, device: Any = "cpu", strict: bool = True) -> Tuple[nn.Module, Any, Dict]:
    """Rebuild a fine-tuned ImageCoDe model from its own checkpoint (it stores its config).
    Returns ``(model in eval mode, tokenizer, the stored config as a dict)``."""
    ckpt = read_source(source)
    stored = ckpt.get("config") if isinstance(ckpt, Mapping) else None
    if checkpoint_format(ckpt) != Format.IMAGECODE or not isinstance(stored, Mapping):
        raise CheckpointError(f"{source} is not a finetune_imagecode.py checkpoint (format "
                              f"{checkpoint_format(ckpt)!r}, config inside: {isinstance(stored, Mapping)})")
    arch = ImageCodeArch.model_validate({k: v for k, v in stored.items() if k in ImageCodeArch.model_fields})
    tokenizer = build_tokenizer(stored["tokenizer"])
    model = build_imagecode_model(arch, tokenizer)
    load_weights(model, ckpt, strict=strict, source_name=str(source))
    return model.to(device).eval(), tokenizer, dict(stored)


# ---------------------------------------------------------------------- loading

def read_source(source, arch=None, tokenizer=None, queue_size: Optional[int] = None) -> Dict[str, Any]:
    """A checkpoint as loaded: a file or URL (``utils.checkpoint.load_checkpoint``), or a
    HuggingFace BLIP folder / hub id (``owner/name``, from the local HF cache) converted in memory to
    the official layout (``models/hf.py``). With ``arch`` (a config with the ViT / med_config keys)
    the folder's config.json dimensions are checked against it first, naming any field that differs.
    Queues a folder lacks are made of ``queue_size`` (default: the config's, else BLIP's 57600)."""
    if hf.is_hf_source(source):
        expect = None
        if arch is not None and hasattr(arch, "vit_arch") and hasattr(arch, "med_config"):
            expect = hf.expected_dims(arch, tokenizer, getattr(arch, "embed_dim", None))
        return hf.load_official(source, queue_size=queue_size or getattr(arch, "queue_size", None), expect=expect)
    return load_checkpoint(source)


def _queue_size(model: nn.Module) -> Optional[int]:
    """The queue size of the model's BLIP (for queues an HF folder lacks); None: no queues."""
    blip = model.blip if isinstance(model, ContextBLIP) else model
    return blip.queue_size if isinstance(blip, BLIPRetrieval) else None


def checkpoint_format(ckpt: Mapping) -> str:
    """The ``format`` tag of a loaded checkpoint, or the format its layout shows (official files)."""
    tag = ckpt.get("format") if isinstance(ckpt, Mapping) else None
    if tag is not None:
        if tag not in Format.ALL:
            raise CheckpointError(f"unknown checkpoint format {tag!r}; this version reads {Format.ALL}")
        return tag
    state = extract_state_dict(ckpt)
    if any(k.startswith(("backbone.", "stage1.")) for k in state):
        return Format.IMAGECODE
    if any(k.startswith("blip.") for k in state):
        return Format.CONTEXTBLIP_MERGED
    if state and all(k.startswith(CONTEXTBLIP_PARTS) for k in state):
        return Format.CONTEXTBLIP_TRAINABLE
    if any(k.startswith("text_decoder.") for k in state) and not any(k.startswith("text_encoder.") for k in state):
        return Format.CAPTION
    return Format.BLIP


def _imagecode_stage(ckpt: Mapping, state: Mapping) -> int:
    stored = ckpt.get("config") if isinstance(ckpt, Mapping) else None
    if isinstance(stored, Mapping) and stored.get("stage") in (1, 2):
        return stored["stage"]
    return 2 if any(k.startswith("stage1.") for k in state) else 1


def load_weights(model: nn.Module, source, strict: bool = False, base: Optional[str] = "auto",
                 source_name: Optional[str] = None) -> LoadResult:
    """Load ``source`` (a path/URL, or a checkpoint already loaded) into ``model``, with a report.

    ``base`` matters for a ``contextblip-trainable`` checkpoint only: ``'auto'`` loads the BLIP its
    config's ``pretrained`` names, a path loads that one, None keeps ``model.blip`` as it is.
    """
    name = source_name or (str(source) if not isinstance(source, Mapping) else "a checkpoint")
    ckpt = source if isinstance(source, Mapping) else read_source(source, queue_size=_queue_size(model))
    state = extract_state_dict(ckpt)
    fmt = checkpoint_format(ckpt)
    if isinstance(model, BLIPCaptioner):
        if fmt not in (Format.CAPTION, Format.BLIP):
            raise CheckpointError(f"{name} is a {fmt!r} checkpoint; a captioner loads BLIP caption or "
                                  "pretraining files")
        return LoadResult(fmt, _load_captioner(model, state, strict, name), None)
    if fmt == Format.CAPTION:
        raise CheckpointError(f"{name} is a BLIP captioning checkpoint (visual_encoder + text_decoder): it has "
                              f"no text encoder for {type(model).__name__}; use it with train_caption.py")
    if isinstance(model, BLIPRetrieval):
        if fmt == Format.CONTEXTBLIP_MERGED:
            state = _strip(state, "blip.")
        elif fmt != Format.BLIP:
            raise CheckpointError(f"{name} is a {fmt!r} checkpoint; a BLIP model loads 'blip' or "
                                  f"'contextblip-merged' files")
        return LoadResult(fmt, _load_blip(model, state, strict, name), None)
    if isinstance(model, ContextBLIP):
        return _load_contextblip(model, ckpt, state, fmt, strict, base, name)
    if isinstance(model, (CandidateScorer, ContextualScorer)):
        if fmt == Format.IMAGECODE:
            stage = _imagecode_stage(ckpt, state)
            target = model.stage1 if isinstance(model, ContextualScorer) and stage == 1 else model
            if (stage == 2) != isinstance(target, ContextualScorer):
                raise CheckpointError(f"{name} is a stage-{stage} ImageCoDe checkpoint; this model is stage "
                                      f"{2 if isinstance(model, ContextualScorer) else 1}")
            # Stage 2 trains on top of exactly its stage 1: everything must load.
            strict = strict or target is not model
            return LoadResult(fmt, None, load_state_dict_with_report(target, state, strict=strict))
        if isinstance(model, ContextualScorer):
            raise CheckpointError(f"stage 2 starts from a stage-1 checkpoint (finetune_imagecode.py, stage: 1); "
                                  f"{name} is a {fmt!r} checkpoint")
        return _load_contextblip(model.backbone, ckpt, state, fmt, strict, base, name)
    raise TypeError(f"load_weights: no loader for {type(model).__name__}")


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _load_blip(model: BLIPRetrieval, state: Dict[str, torch.Tensor], strict: bool, name: str) -> LoadReport:
    """BLIP's layout, official or ours. ``visual_encoder(_m).pos_embed`` is resized to the model's
    patch grid first, so a 384 px checkpoint loads into a 224 px model and vice versa."""
    state = dict(state)
    own = model.state_dict()
    for key in ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed"):
        if key in state and key in own and state[key].shape != own[key].shape:
            state[key] = interpolate_pos_embed(state[key], model.visual_encoder.num_patches)
    pretrain_layout = any(k.startswith(PRETRAIN_EXTRAS) for k in state) or "queue_ptr" in state
    ignore_missing = ("idx_queue", "ptr_queue") if pretrain_layout else ()
    extra_prefixes, extra_keys = PRETRAIN_EXTRAS, PRETRAIN_EXTRA_KEYS
    if not model.with_momentum:
        extra_prefixes, extra_keys = extra_prefixes + MOMENTUM_PREFIXES, extra_keys + QUEUE_KEYS
    report = load_state_dict_with_report(model, state, strict=strict, expected_extra_prefixes=extra_prefixes,
                                         expected_extra_keys=extra_keys, ignore_missing_prefixes=ignore_missing)
    logger.info("loaded BLIP weights from %s", name)
    return report


def _load_captioner(model: BLIPCaptioner, state: Dict[str, torch.Tensor], strict: bool, name: str) -> LoadReport:
    """A caption checkpoint key for key; a pretraining checkpoint's ``visual_encoder.*`` and
    ``text_decoder.*`` (its encoder, momentum copies and queues are reported as expected extras).
    ``visual_encoder.pos_embed`` is resized to the model's grid."""
    state = dict(state)
    key = "visual_encoder.pos_embed"
    if key in state and state[key].shape != model.visual_encoder.pos_embed.shape:
        state[key] = interpolate_pos_embed(state[key], model.visual_encoder.num_patches)
    if not any(k.startswith("text_decoder.") for k in state):
        logger.warning("%s has no text_decoder.* weights (a retrieval checkpoint?): the decoder starts "
                       "from random weights", name)
    report = load_state_dict_with_report(model, state, strict=strict, expected_extra_prefixes=ENCODER_PREFIXES,
                                         expected_extra_keys=ENCODER_KEYS)
    logger.info("loaded BLIP captioner weights from %s", name)
    return report


def _load_parts(model: ContextBLIP, state: Mapping[str, torch.Tensor], strict: bool) -> LoadReport:
    parts = {k: v for k, v in state.items() if k.startswith(CONTEXTBLIP_PARTS)}
    # A model built without a decoder (fine-tuning, zero-shot) has no use for the TMIM decoder.
    extra = ("decoder.",) if model.decoder is None else ()
    return load_state_dict_with_report(model, parts, strict=strict, expected_extra_prefixes=extra,
                                       ignore_missing_prefixes=("blip.",))


def _load_contextblip(model: ContextBLIP, ckpt: Mapping, state: Dict[str, torch.Tensor], fmt: str, strict: bool,
                      base: Optional[str], name: str) -> LoadResult:
    if fmt == Format.BLIP:
        report = _load_blip(model.blip, state, strict, name)
        if model.use_adapter and model.decoder is None:  # pretraining starts from plain BLIP by design
            logger.warning("%s is a plain BLIP checkpoint: the adapter stays at its random init, so this "
                           "is not BLIP's zero-shot model (set use_adapter: false for that)", name)
        return LoadResult(fmt, report, None)
    if fmt == Format.CONTEXTBLIP_MERGED:
        return LoadResult(fmt, _load_blip(model.blip, _strip(state, "blip."), strict, name),
                          _load_parts(model, state, strict))
    if fmt != Format.CONTEXTBLIP_TRAINABLE:
        raise CheckpointError(f"{name} is a {fmt!r} checkpoint; a ContextBLIP loads BLIP, ContextBLIP "
                              "pretraining or merged files")
    blip_report = None
    if base == "auto":
        base = (ckpt.get("config") or {}).get("pretrained")
        if not base:
            raise CheckpointError(f"{name} holds only the adapter/decoder and its config names no "
                                  "'pretrained' BLIP; pass base=<BLIP checkpoint> or load BLIP first (base=None)")
    if base:
        base_state = extract_state_dict(read_source(base, queue_size=model.blip.queue_size))
        blip_report = _load_blip(model.blip, base_state, strict, str(base))
    return LoadResult(fmt, blip_report, _load_parts(model, state, strict))
