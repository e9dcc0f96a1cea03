"""One door to every model: build it from its config, load any checkpoint kind into it.

    model, tokenizer = create_model(cfg, "blip", device)           # BLIP retrieval, momentum encoders + queues
    model, tokenizer = create_model(cfg, "blip_pretrain", device)  # BLIP pretraining (tied decoder; model_base.pth layout)
    model, tokenizer = create_model(cfg, "blip_inference", device) # the same without them (half the memory)
    model, tokenizer = create_model(cfg, "contextblip_pretrain")    # ContextBLIP + TMIM decoder
    model, tokenizer = create_model(cfg, "zero_shot")              # ContextBLIP; a plain BLIP file -> BLIP itself
    model, tokenizer = create_model(cfg, "imagecode")              # ImageCoDe stage 1 or 2 (cfg.stage)
    model, tokenizer = create_model(cfg, "caption")                # BLIP captioner (ViT + text decoder)
    model, tokenizer = create_model(cfg, "vqa")                    # BLIP VQA (ViT + question encoder + answer decoder)
    model, tokenizer = create_model(cfg, "nlvr")                   # BLIP NLVR2 (ViT + twin cross-attention encoder)
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
| ``blip-vqa`` (official or ours) | ``visual_encoder.*``, ``text_encoder.*``, ``text_decoder.*`` (no projections) | the VQA model |
| ``blip-nlvr`` (official or ours) | ``visual_encoder.*``, ``text_encoder.*`` with twin ``crossattention.self0/self1``, ``cls_head.*`` | the NLVR2 model |

A pretraining checkpoint (``model_base.pth``: encoder, decoder, momentum copies, queues) is a
``blip`` file: a retrieval model takes all but ``text_decoder.*``, a captioner takes
``visual_encoder.*`` and ``text_decoder.*``, a VQA model all three towers (as BLIP's ``blip_vqa``
initialises from ``model_base.pth``; decoder cross-attention weights of another width, a ViT wider
than the text, start afresh as BLIP's loader drops them); what each leaves is reported as an
expected extra. An NLVR2 model takes its ViT and text encoder, each cross-attention copied into
both twins (BLIP's ``blip_nlvr.load_checkpoint``); its merge layers and head are new.

Resume checkpoints are these same files plus optimiser and loop state (``utils.resume``).

Wherever a checkpoint is named (``pretrained``, ``teacher``, ``load_weights(model, source)``), a
HuggingFace BLIP folder (``config.json`` with model_type ``blip`` + ``model.safetensors`` or
``pytorch_model.bin``) or a hub id (``Salesforce/blip-itm-base-coco``, from the local HF cache) may
stand instead: ``models/hf.py`` converts it in memory to the official layout (``read_source``).
"""
from __future__ import annotations

import logging
import re
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
from models.nlvr import BLIPNLVR, build_nlvr, has_twins, new_parts, twin_state
from models.vit import VIT_PRESETS
from models.vqa import BLIPVQA, build_vqa
from utils.checkpoint import load_checkpoint
from utils.errors import CheckpointError, CheckpointMismatchError
from utils.state_dict import (LoadReport, apply_load, collapse_keys, extract_state_dict, interpolate_pos_embed,
                              load_state_dict_with_report)
from utils import zoo
from utils.config import ConfigError

logger = logging.getLogger(__name__)


class Format:
    BLIP = "blip"
    CONTEXTBLIP_TRAINABLE = "contextblip-trainable"
    CONTEXTBLIP_MERGED = "contextblip-merged"
    IMAGECODE = "imagecode"
    CAPTION = "blip-caption"
    VQA = "blip-vqa"
    NLVR = "blip-nlvr"
    ALL = (BLIP, CONTEXTBLIP_TRAINABLE, CONTEXTBLIP_MERGED, IMAGECODE, CAPTION, VQA, NLVR)


KINDS = ("blip", "blip_inference", "blip_pretrain", "contextblip", "contextblip_pretrain", "zero_shot", "imagecode", "caption", "vqa", "nlvr")

# Pretraining checkpoints (model_base.pth) carry a captioning decoder and name their queue pointer
# `queue_ptr`; a retrieval model does not use either, and starts its idx queue afresh.
# DLIP's released student also carries `vl_proj` (a projection its losses never use).
PRETRAIN_EXTRAS = ("text_decoder.", "vl_proj.")
PRETRAIN_EXTRA_KEYS = ("queue_ptr",)
# What a model built without momentum encoders leaves unused in any BLIP checkpoint.
MOMENTUM_PREFIXES = ("visual_encoder_m.", "vision_proj_m.", "text_encoder_m.", "text_proj_m.")
QUEUE_KEYS = ("image_queue", "text_queue", "idx_queue", "ptr_queue", "queue_ptr")
BOOKKEEPING = ("idx_queue", "ptr_queue", "queue_ptr")  # queue labels and pointers: no learned weights
CONTEXTBLIP_PARTS = ("adapter.", "decoder.")
# What a captioner leaves unused in a pretraining (or retrieval) checkpoint.
ENCODER_PREFIXES = ("text_encoder.", "vision_proj.", "text_proj.", "itm_head.") + MOMENTUM_PREFIXES
ENCODER_KEYS = ("temp",) + QUEUE_KEYS
# What a VQA model leaves unused in a pretraining (or retrieval) checkpoint: BLIP's blip_vqa takes
# visual_encoder, text_encoder and text_decoder only.
HEAD_PREFIXES = ("vision_proj.", "text_proj.", "itm_head.", "vl_proj.")


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
    if kind == "vqa":
        return build_vqa(cfg, tokenizer)
    if kind == "nlvr":
        return build_nlvr(cfg, tokenizer)
    raise ValueError(f"unknown model kind {kind!r}; one of {KINDS}")


def create_model(cfg, kind: str, device: Any = "cpu", pretrained: Optional[str] = None,
                 load: bool = True, purpose: str = "train", role: str = "pretrained") -> Tuple[nn.Module, Any]:
    """Tokenizer + model of ``kind`` with ``pretrained`` (default ``cfg.pretrained``) loaded under
    the loading policy (``load_weights``: ``purpose`` 'train' when training starts from it, 'eval'
    when the model is evaluated or used by a tool; ``role`` names the file in messages).

    ``zero_shot``: a plain BLIP checkpoint is scored as BLIP itself (no adapter: ``model.use_adapter``
    tells what was built). ``imagecode`` stage 2 needs its stage-1 checkpoint, loaded strictly.
    Evaluating a model with no ``pretrained`` at all is refused: its numbers would be a random model's.
    """
    source = cfg.pretrained if pretrained is None else pretrained
    tokenizer = build_tokenizer(cfg.tokenizer)
    ckpt = read_source(source, cfg, tokenizer, role=role) if load and source else None
    if kind == "zero_shot" and ckpt is not None and cfg.use_adapter and checkpoint_format(ckpt) == Format.BLIP:
        logger.info("%s is a plain BLIP checkpoint: scoring with BLIP itself (use_adapter off)", source)
        cfg = cfg.model_copy(update={"use_adapter": False})
    if load and not source and purpose == "eval":
        raise ConfigError(f"`pretrained` is empty: there is no checkpoint to evaluate (the {kind} model would have "
                          "random weights); set --opts pretrained=CHECKPOINT")
    model = build_model(cfg, kind, tokenizer)
    if ckpt is not None:
        load_weights(model, ckpt, strict=cfg.strict_load, source_name=str(source), role=role, purpose=purpose)
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
    ckpt = read_source(cfg.teacher, arch, tokenizer, role="teacher")
    state = extract_state_dict(ckpt)
    if not any(k.startswith("text_decoder.") for k in state) or not any(k.startswith("text_encoder.") for k in state):
        raise CheckpointError(f"teacher {cfg.teacher}: a DLIP teacher needs a text encoder and a decoder "
                              "(BLIP's pretraining layout, model_base.pth); this file has "
                              f"{'no decoder' if not any(k.startswith('text_decoder.') for k in state) else 'no text encoder'}")
    teacher = build_blip_pretrain(arch, tokenizer, itc=None)
    report = load_weights(teacher, ckpt, strict=True, source_name=str(cfg.teacher), role="teacher", purpose="eval").blip
    teacher.requires_grad_(False)
    teacher.eval()
    logger.info("teacher %s: %d tensors loaded, %.1fM parameters, frozen (eval, no_grad)", cfg.teacher,
                report.num_loaded, sum(p.numel() for p in teacher.parameters()) / 1e6)
    return teacher.to(device)


def model_from_checkpoint(source, device: Any = "cpu", strict: Optional[bool] = True) -> Tuple[nn.Module, Any, Dict]:
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
    load_weights(model, ckpt, strict=strict, source_name=str(source), purpose="eval")
    return model.to(device).eval(), tokenizer, dict(stored)


# ---------------------------------------------------------------------- loading

def read_source(source, arch=None, tokenizer=None, queue_size: Optional[int] = None,
                role: str = "pretrained") -> Dict[str, Any]:
    """A checkpoint as loaded: a file or URL (``utils.checkpoint.load_checkpoint``), an official
    checkpoint's name (``blip/model_base``, ``utils/zoo.py``), or a
    HuggingFace BLIP folder / hub id (``owner/name``, from the local HF cache) converted in memory to
    the official layout (``models/hf.py``). With ``arch`` (a config with the ViT / med_config keys)
    the folder's config.json dimensions are checked against it first, naming any field that differs,
    and a name's ViT size (``role`` ``teacher``: the ``teacher_vit`` key), before anything is downloaded.
    Queues a folder lacks are made of ``queue_size`` (default: the config's, else BLIP's 57600)."""
    if zoo.is_zoo_name(source):  # before hf: `blip/model_base` has a hub id's shape
        if arch is not None and hasattr(arch, "vit"):
            vit = arch.vit if isinstance(arch.vit, str) else next(
                (n for n, preset in VIT_PRESETS.items() if preset == arch.vit), None)  # a custom mapping: None
            zoo.check_vit(source, vit, "teacher_vit" if role.startswith("teacher") else "vit", role)
        return load_checkpoint(source)
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
    if has_twins(state):
        return Format.NLVR  # BLIP_NLVR's layout: twin cross-attention (self0 / self1)
    if any(k.startswith("text_decoder.") for k in state) and not any(k.startswith("text_encoder.") for k in state):
        return Format.CAPTION
    if any(k.startswith("text_decoder.") for k in state) and not any(k.startswith(HEAD_PREFIXES) for k in state):
        return Format.VQA  # BLIP_VQA's layout: the three towers, no projections or ITM head
    return Format.BLIP


def _imagecode_stage(ckpt: Mapping, state: Mapping) -> int:
    stored = ckpt.get("config") if isinstance(ckpt, Mapping) else None
    if isinstance(stored, Mapping) and stored.get("stage") in (1, 2):
        return stored["stage"]
    return 2 if any(k.startswith("stage1.") for k in state) else 1


# ---------------------------------------------------------------------- the loading policy
#
# One policy for every place a checkpoint meets a model: `pretrained`, `teacher`, a tool's member,
# resume (utils.resume checks its own files strictly with the same messages). `strict` is the
# config's `strict_load`:
#   None (the default): a shape mismatch, a file tensor the model has no place for, or a model
#       weight the file lacks is an error; parts the layout declares new (a fresh caption decoder,
#       ContextBLIP's adapter and TMIM decoder over a plain BLIP) are allowed when training starts
#       from the file (purpose 'train') and listed, and are errors when it is evaluated ('eval');
#   True: even those must come from the file;
#   False: the escape hatch: what fits is loaded and a warning says what was let through.

PURPOSES = ("train", "eval")

# Which config keys set the dimensions of a key's tensor: (pattern, {dim index or None: [key or
# "key:field"]}): the dims that differ pick their keys (None: any other dim).
_DIM_KEYS = (
    (r"visual_encoder(_m)?\.pos_embed$", {1: ["image_size", "vit:patch_size"], None: ["vit:width"]}),
    (r"visual_encoder(_m)?\.patch_embed\.", {0: ["vit:width"], None: ["vit:patch_size"]}),
    (r"visual_encoder(_m)?\.", {None: ["vit:width", "vit:mlp_ratio"]}),
    (r"\.word_embeddings\.weight$", {0: ["tokenizer", "med_config:vocab_size"], None: ["med_config:hidden_size"]}),
    (r"\.predictions\.(bias|decoder\.weight|decoder\.bias)$", {0: ["tokenizer", "med_config:vocab_size"],
                                                                None: ["med_config:hidden_size"]}),
    (r"\.position_embeddings\.weight$", {0: ["med_config:max_position_embeddings"],
                                         None: ["med_config:hidden_size"]}),
    (r"\.position_ids$", {None: ["med_config:max_position_embeddings"]}),
    (r"crossattention\.self\.(key|value)\.weight$", {1: ["vit:width"], None: ["med_config:hidden_size"]}),
    (r"(^|\.)vision_proj(_m)?\.weight$", {0: ["embed_dim"], None: ["vit:width"]}),
    (r"(^|\.)text_proj(_m)?\.weight$", {0: ["embed_dim"], None: ["med_config:hidden_size"]}),
    (r"(^|\.)(vision|text)_proj(_m)?\.bias$", {None: ["embed_dim"]}),
    (r"(^|\.)(image|text)_queue$", {0: ["embed_dim"], None: ["queue_size"]}),
    (r"(^|\.)idx_queue$", {None: ["queue_size"]}),
    (r"(^|\.)itm_head\.", {None: ["med_config:hidden_size"]}),
    (r"(^|\.)(text_encoder|text_decoder)(_m)?\.", {None: ["med_config:hidden_size", "med_config:intermediate_size"]}),
    (r"(^|\.)adapter\.", {None: ["vit:width", "adapter_taps", "adapter_reduction"]}),
    (r"(^|\.)decoder\.", {None: ["vit:width", "decoder_depth", "decoder_heads", "decoder_mlp_ratio",
                                   "text_adapter_reduction"]}),
    (r"(^|\.)prediction\.", {None: ["med_config:hidden_size"]}),
    (r"(^|\.)context\.|(^|\.)stage1\.", {None: ["context_layers", "context_heads", "context_mlp_ratio"]}),
)
# Layers a file has and the model has not (or the reverse): the depth keys.
_DEPTH_KEYS = ((r"visual_encoder(_m)?\.blocks\.\d+\.", "vit:depth"),
               (r"(text_encoder|text_decoder)(_m)?\.(bert\.)?encoder\.layer\.\d+\.", "med_config:num_hidden_layers"),
               (r"(^|\.)decoder\.blocks?\.\d+\.", "decoder_depth"))


def _dims_keys(key: str, file_shape: tuple, model_shape: tuple) -> list:
    for pattern, by_dim in _DIM_KEYS:
        if re.search(pattern, key):
            differs = [i for i in range(min(len(file_shape), len(model_shape))) if file_shape[i] != model_shape[i]]
            named = [t for i in differs if i in by_dim for t in by_dim[i]]
            return named or by_dim[None]
    return []


def config_keys_of(report: LoadReport, role: str = "pretrained") -> str:
    """The config keys that set the dims a report found different (for its error message), e.g.
    ``vit (width, mlp_ratio), embed_dim``; a teacher's are ``teacher_vit`` / ``teacher_med_config``."""
    tokens = [t for k, a, b in report.mismatched for t in _dims_keys(k, a, b)]
    tokens += [name for k in report.unexpected + report.missing for pattern, name in _DEPTH_KEYS if re.search(pattern, k)]
    fields: Dict[str, list] = {}
    for token in tokens:
        key, _, part = token.partition(":")
        if role.startswith("teacher") and key in ("vit", "med_config"):
            key = f"teacher_{key}"
        parts = fields.setdefault(key, [])
        if part and part not in parts:
            parts.append(part)
    return ", ".join(f"{k} ({', '.join(v)})" if v else k for k, v in fields.items()) or \
        "the model's architecture keys (vit, image_size, med_config, embed_dim)"


def _shapes(items) -> str:
    return "; ".join(f"{k} {tuple(a)} in the file, {tuple(b)} in the model" for k, a, b in items)


def check_report(report: LoadReport, name: str, role: str = "pretrained", purpose: str = "eval",
                 strict: Optional[bool] = None, model_name: str = "model") -> None:
    """The loading policy (above) on one report: a one-line CheckpointMismatchError naming the role,
    the file, the first keys (with both shapes) and the config keys behind them; else the new
    parts listed and, with ``strict=False``, what was let through warned about."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose {purpose!r}: one of {PURPOSES}")
    who = f"{role} {name}" if not str(name).startswith(role) else str(name)
    if strict is False:
        let = [f"{len(v)} {what}" for what, v in (("shape-mismatched", report.mismatched),
                                                   ("missing", report.missing), ("unexpected", report.unexpected),
                                                   ("new", report.new)) if v]
        if let:
            logger.warning("strict_load: false: %s loaded with %s tensor(s) let through (%s); those weights are "
                           "not the file's", who, ", ".join(let),
                           collapse_keys([k for k, _, _ in report.mismatched] + report.missing + report.new
                                         + report.unexpected))
        return
    new_is_missing = purpose == "eval" or strict is True
    missing = report.missing + (report.new if new_is_missing else [])
    problems = []
    if report.mismatched:
        more = len(report.mismatched) - 2
        problems.append(f"{len(report.mismatched)} tensor(s) have other shapes: {_shapes(report.mismatched[:2])}"
                        + (f" (and {more} more)" if more > 0 else ""))
    if report.unexpected:
        problems.append(f"{len(report.unexpected)} tensor(s) of the file have no place in the model: "
                        f"{collapse_keys(report.unexpected)}")
    if missing:
        why = (" (evaluation needs every weight from the file)" if report.new and purpose == "eval" else
               " (strict_load: true)" if report.new and strict else "")
        problems.append(f"the file lacks {len(missing)} weight(s) the model needs{why}: {collapse_keys(missing)}")
    if problems:
        if report.mismatched or report.unexpected or report.missing:
            todo = (f"Those shapes come from the config keys {config_keys_of(report, role)}: set them as the "
                    "checkpoint was trained (its config.yaml), or strict_load: false to load only what fits")
        elif strict is True:
            todo = "Drop strict_load: true to start them afresh, or give a checkpoint that holds them"
        else:
            todo = ("Evaluate a checkpoint trained for this model (it holds them), or strict_load: false to run "
                    "with them at their random initialisation")
        raise CheckpointMismatchError(f"{who} does not fit the {model_name}: {'; '.join(problems)}. {todo}")
    if report.new:
        logger.info("%s: %d weight(s) new, initialised here (not in the file): %s", who, len(report.new),
                    collapse_keys(report.new))


def _model_name(model: nn.Module) -> str:
    return {"BLIPRetrieval": "BLIP retrieval model", "BLIPCaptioner": "captioner", "ContextBLIP": "ContextBLIP model",
            "CandidateScorer": "ImageCoDe stage-1 model", "ContextualScorer": "ImageCoDe stage-2 model",
            "BLIPPretrain": "BLIP pretraining model", "BLIPVQA": "VQA model"}.get(type(model).__name__, type(model).__name__)


def load_weights(model: nn.Module, source, strict: Optional[bool] = None, base: Optional[str] = "auto",
                 source_name: Optional[str] = None, role: str = "pretrained", purpose: str = "eval",
                 apply: bool = True) -> LoadResult:
    """Load ``source`` (a path/URL, or a checkpoint already loaded) into ``model``, with a report,
    under the loading policy (``strict``: ``strict_load``; ``role``: what the file is to the run,
    for messages; ``purpose``: ``'train'`` (training starts from it) or ``'eval'``). Every report is
    judged before anything is loaded; ``apply=False`` only judges (``inspect_weights``).

    ``base`` matters for a ``contextblip-trainable`` checkpoint only: ``'auto'`` loads the BLIP its
    config's ``pretrained`` names, a path loads that one, None keeps ``model.blip`` as it is.
    """
    name = source_name or (str(source) if not isinstance(source, Mapping) else "a checkpoint")
    ckpt = source if isinstance(source, Mapping) else read_source(source, queue_size=_queue_size(model))
    state = extract_state_dict(ckpt)
    fmt = checkpoint_format(ckpt)
    plans: list = []  # (module, report, file name, role)
    result = _plan(model, ckpt, state, fmt, base, name, role, plans)
    for module, report, file, who in plans:
        check_report(report, file, who, purpose, strict, _model_name(module))
    if apply:
        for module, report, _, _ in plans:
            apply_load(module, report)
    return result


def _plan(model, ckpt, state, fmt, base, name, role, plans) -> LoadResult:
    """The reports of every part ``model`` takes from ``ckpt`` (appended to ``plans``)."""
    def add(module, report, file=name, who=role):
        plans.append((module, report, file, who))
        return report

    if isinstance(model, BLIPCaptioner):
        if fmt not in (Format.CAPTION, Format.BLIP):
            raise CheckpointError(f"{role} {name} is a {fmt!r} checkpoint; a captioner loads BLIP caption or "
                                  "pretraining files")
        return LoadResult(fmt, add(model, _captioner_report(model, state, name)), None)
    if isinstance(model, BLIPVQA):
        if fmt not in (Format.VQA, Format.BLIP, Format.CAPTION):
            raise CheckpointError(f"{role} {name} is a {fmt!r} checkpoint; a VQA model loads BLIP VQA, pretraining, "
                                  "retrieval or caption files")
        return LoadResult(fmt, add(model, _vqa_report(model, state, fmt)), None)
    if isinstance(model, BLIPNLVR):
        if fmt not in (Format.NLVR, Format.BLIP):
            raise CheckpointError(f"{role} {name} is a {fmt!r} checkpoint; an NLVR2 model loads BLIP NLVR2, pretraining "
                                  "or retrieval files")
        return LoadResult(fmt, add(model, _nlvr_report(model, state, fmt)), None)
    if fmt == Format.NLVR:
        raise CheckpointError(f"{role} {name} is a BLIP NLVR2 checkpoint (twin cross-attention over two images): use "
                              f"it with train_nlvr.py, not with {type(model).__name__}")
    if fmt == Format.VQA:
        raise CheckpointError(f"{role} {name} is a BLIP VQA checkpoint (visual_encoder, question encoder, answer "
                              f"decoder): use it with train_vqa.py, not with {type(model).__name__}")
    if fmt == Format.CAPTION:
        raise CheckpointError(f"{role} {name} is a BLIP captioning checkpoint (visual_encoder + text_decoder): it has "
                              f"no text encoder for {type(model).__name__}; use it with train_caption.py")
    if isinstance(model, BLIPRetrieval):
        if fmt == Format.CONTEXTBLIP_MERGED:
            state = _strip(state, "blip.")
        elif fmt != Format.BLIP:
            raise CheckpointError(f"{role} {name} is a {fmt!r} checkpoint; a BLIP model loads 'blip' or "
                                  f"'contextblip-merged' files")
        return LoadResult(fmt, add(model, _blip_report(model, state)), None)
    if isinstance(model, ContextBLIP):
        return _plan_contextblip(model, ckpt, state, fmt, base, name, role, add)
    if isinstance(model, (CandidateScorer, ContextualScorer)):
        if fmt == Format.IMAGECODE:
            stage = _imagecode_stage(ckpt, state)
            target = model.stage1 if isinstance(model, ContextualScorer) and stage == 1 else model
            if (stage == 2) != isinstance(target, ContextualScorer):
                raise CheckpointError(f"{role} {name} is a stage-{stage} ImageCoDe checkpoint; this model is stage "
                                      f"{2 if isinstance(model, ContextualScorer) else 1}")
            # Stage 2 trains on top of exactly its stage 1 (and any ImageCoDe file is a whole model).
            return LoadResult(fmt, None, add(target, load_state_dict_with_report(target, state, apply=False)))
        if isinstance(model, ContextualScorer):
            raise CheckpointError(f"stage 2 starts from a stage-1 checkpoint (finetune_imagecode.py, stage: 1); "
                                  f"{role} {name} is a {fmt!r} checkpoint")
        # Stage 1 from a ContextBLIP or BLIP file: the prediction layer is new by design.
        result = _plan_contextblip(model.backbone, ckpt, state, fmt, base, name, role, add)
        first = plans[-1][1] if plans else None
        if first is not None:
            first.new += [f"prediction.{k}" for k in model.prediction.state_dict()]
        return result
    raise TypeError(f"load_weights: no loader for {type(model).__name__}")


def inspect_weights(cfg, kind: str, source, role: str = "pretrained", purpose: str = "eval",
                    tokenizer=None) -> LoadResult:
    """Judge ``source`` against the model ``cfg`` and ``kind`` build, without building its weights
    (the model is made on the ``meta`` device) or loading anything: the loading policy's error, if
    any, now. For commands that load several checkpoints in turn (``tools sweep``, ``tools
    ensemble``): every one is inspected before the first is evaluated."""
    tokenizer = tokenizer or build_tokenizer(cfg.tokenizer)
    ckpt = read_source(source, cfg, tokenizer, role=role)
    with torch.device("meta"):
        model = build_model(cfg, kind, tokenizer)
    return load_weights(model, ckpt, strict=cfg.strict_load, source_name=str(source), role=role, purpose=purpose,
                        apply=False)


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _blip_report(model: BLIPRetrieval, state: Dict[str, torch.Tensor]) -> LoadReport:
    """BLIP's layout, official or ours. ``visual_encoder(_m).pos_embed`` is resized to the model's
    patch grid first, so a 384 px checkpoint loads into a 224 px model and vice versa. A pretraining
    file's queue labels and pointer are started afresh (a retrieval model's own bookkeeping)."""
    state = dict(state)
    own = model.state_dict()
    for key in ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed"):
        if key in state and key in own and state[key].shape != own[key].shape and state[key].dim() == 3 \
                and state[key].shape[-1] == own[key].shape[-1]:
            state[key] = interpolate_pos_embed(state[key], model.visual_encoder.num_patches)
    # Queue bookkeeping differs between the layouts (a pretraining file names its pointer
    # `queue_ptr` and has no labels; a retrieval one `ptr_queue` + `idx_queue`): what the model has
    # and the file lacks starts afresh, what the file has and the model lacks is unused.
    fresh = [k for k in BOOKKEEPING if k in own and k not in state]
    # Another queue_size: the file's queues (of the same width) do not fit, and start afresh, as
    # BLIP's loader has it (the pointer with them). Another embed_dim stays a mismatch.
    restart = [k for k in QUEUE_KEYS if k in state and k in own and state[k].dim() == own[k].dim() == 2
               and state[k].shape[0] == own[k].shape[0] and state[k].shape[1] != own[k].shape[1]]
    if restart:
        logger.info("queue_size %d: the checkpoint's queues hold %d: %s start afresh", own[restart[0]].shape[1],
                    state[restart[0]].shape[1], ", ".join(restart + ["ptr_queue"]))
        for k in restart + ["ptr_queue", "queue_ptr"]:
            state.pop(k, None)
        fresh += restart + ["ptr_queue"]
    extra_prefixes, extra_keys = PRETRAIN_EXTRAS, PRETRAIN_EXTRA_KEYS + BOOKKEEPING
    if not model.with_momentum:
        extra_prefixes, extra_keys = extra_prefixes + MOMENTUM_PREFIXES, extra_keys + QUEUE_KEYS
    # A pretraining model (its decoder tied to the text encoder) over a retrieval file: a fresh decoder.
    new = ("text_decoder.",) if any(k.startswith("text_decoder.") for k in own) and not any(
        k.startswith("text_decoder.") for k in state) else ()
    return load_state_dict_with_report(model, state, expected_extra_prefixes=extra_prefixes,
                                       expected_extra_keys=extra_keys, ignore_missing_prefixes=tuple(fresh),
                                       new_prefixes=new, apply=False)


def _captioner_report(model: BLIPCaptioner, state: Dict[str, torch.Tensor], name: str) -> LoadReport:
    """A caption checkpoint key for key; a pretraining checkpoint's ``visual_encoder.*`` and
    ``text_decoder.*`` (its encoder, momentum copies and queues are reported as expected extras).
    ``visual_encoder.pos_embed`` is resized to the model's grid. A file without ``text_decoder.*``
    (a retrieval checkpoint) gives a fresh decoder: allowed to start training, never to evaluate."""
    state = dict(state)
    key = "visual_encoder.pos_embed"
    own = model.visual_encoder.pos_embed
    if key in state and state[key].shape != own.shape and state[key].dim() == 3 and state[key].shape[-1] == own.shape[-1]:
        state[key] = interpolate_pos_embed(state[key], model.visual_encoder.num_patches)
    fresh_decoder = not any(k.startswith("text_decoder.") for k in state)
    return load_state_dict_with_report(model, state, expected_extra_prefixes=ENCODER_PREFIXES,
                                       expected_extra_keys=ENCODER_KEYS,
                                       new_prefixes=("text_decoder.",) if fresh_decoder else (), apply=False)


def _vqa_report(model: BLIPVQA, state: Dict[str, torch.Tensor], fmt: str) -> LoadReport:
    """A VQA checkpoint key for key. A pretraining file gives all three towers (its projections, ITM
    head, momentum copies and queues are expected extras); its decoder attended to images, so when
    the ViT is wider than the text its cross-attention keys/values do not fit the answer decoder
    (which attends to question states) and start afresh, as BLIP's ``load_checkpoint`` drops them.
    A file without a decoder (retrieval) or without a text encoder (caption) gives that part
    fresh: allowed to start training, never to evaluate. ``pos_embed`` is resized to the model's grid."""
    state = dict(state)
    key = "visual_encoder.pos_embed"
    own = model.state_dict()
    if key in state and state[key].shape != own[key].shape and state[key].dim() == 3 \
            and state[key].shape[-1] == own[key].shape[-1]:
        state[key] = interpolate_pos_embed(state[key], model.visual_encoder.num_patches)
    new = [p for p in ("text_decoder.", "text_encoder.") if not any(k.startswith(p) for k in state)]
    if fmt != Format.VQA:
        cross = [k for k in state if re.match(r"text_decoder\.bert\.encoder\.layer\.\d+\.crossattention\.self\."
                                              r"(key|value)\.weight$", k)
                 and k in own and state[k].shape != own[k].shape and state[k].shape[0] == own[k].shape[0]]
        if cross:
            logger.info("the file's decoder attended to %d-wide image tokens: its cross-attention keys/values "
                        "start afresh for the %d-wide question states, as BLIP's loader does",
                        state[cross[0]].shape[1], own[cross[0]].shape[1])
        for k in cross:  # their biases fit, and load (BLIP's loader drops only what mismatches)
            del state[k]
        new += cross
    return load_state_dict_with_report(model, state, expected_extra_prefixes=HEAD_PREFIXES + MOMENTUM_PREFIXES,
                                       expected_extra_keys=ENCODER_KEYS, new_prefixes=tuple(new), apply=False)


def _nlvr_report(model: BLIPNLVR, state: Dict[str, torch.Tensor], fmt: str) -> LoadReport:
    """An NLVR2 checkpoint key for key. A pretraining or retrieval file (one cross-attention per
    layer) gives the ViT and the text encoder with each cross-attention copied into both twins; the
    merge layers and ``cls_head`` are new (allowed to start training, never to evaluate); its
    projections, ITM head, decoder, momentum copies and queues are expected extras. ``pos_embed`` is
    resized to the model's grid (both, as the release's loader)."""
    state = dict(state)
    key = "visual_encoder.pos_embed"
    own = model.state_dict()
    if key in state and state[key].shape != own[key].shape and state[key].dim() == 3 \
            and state[key].shape[-1] == own[key].shape[-1]:
        state[key] = interpolate_pos_embed(state[key], model.visual_encoder.num_patches)
    new: Tuple[str, ...] = ()
    if fmt != Format.NLVR:
        state, new = twin_state(state), new_parts(model)
    return load_state_dict_with_report(model, state, expected_extra_prefixes=HEAD_PREFIXES + MOMENTUM_PREFIXES
                                       + PRETRAIN_EXTRAS, expected_extra_keys=ENCODER_KEYS, new_prefixes=new,
                                       apply=False)


def _parts_report(model: ContextBLIP, state: Mapping[str, torch.Tensor]) -> LoadReport:
    parts = {k: v for k, v in state.items() if k.startswith(CONTEXTBLIP_PARTS)}
    # A model built without a decoder (fine-tuning, zero-shot) has no use for the TMIM decoder.
    extra = ("decoder.",) if model.decoder is None else ()
    return load_state_dict_with_report(model, parts, expected_extra_prefixes=extra,
                                       ignore_missing_prefixes=("blip.",), apply=False)


def _plan_contextblip(model: ContextBLIP, ckpt: Mapping, state: Dict[str, torch.Tensor], fmt: str,
                      base: Optional[str], name: str, role: str, add) -> LoadResult:
    if fmt == Format.BLIP:
        report = add(model.blip, _blip_report(model.blip, state))
        if model.use_adapter:  # pretraining (and stage 1) start from plain BLIP by design
            report.new += [k for k in model.state_dict() if k.startswith(CONTEXTBLIP_PARTS)]
        return LoadResult(fmt, report, None)
    if fmt == Format.CONTEXTBLIP_MERGED:
        return LoadResult(fmt, add(model.blip, _blip_report(model.blip, _strip(state, "blip."))),
                          add(model, _parts_report(model, state)))
    if fmt != Format.CONTEXTBLIP_TRAINABLE:
        raise CheckpointError(f"{role} {name} is a {fmt!r} checkpoint; a ContextBLIP loads BLIP, ContextBLIP "
                              "pretraining or merged files")
    blip_report = None
    if base == "auto":
        base = (ckpt.get("config") or {}).get("pretrained")
        if not base:
            raise CheckpointError(f"{role} {name} holds only the adapter/decoder and its config names no "
                                  "'pretrained' BLIP; pass base=<BLIP checkpoint> or load BLIP first (base=None)")
    if base:
        base_state = extract_state_dict(read_source(base, queue_size=model.blip.queue_size))
        blip_report = add(model.blip, _blip_report(model.blip, base_state), str(base), f"the base BLIP of {role}")
    return LoadResult(fmt, blip_report, add(model, _parts_report(model, state)))
