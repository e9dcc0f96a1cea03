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

Every checkpoint we write carries a ``format`` tag; official BLIP files carry none and are
recognised by their layout (``models/formats.py``: :class:`Format`, ``checkpoint_format``, the table
of what each format holds and loads into). Loading one is three steps: ``_plan`` picks, by (format,
model type), the reports of the parts the model takes from the file (``models/layout_reports.py``:
what each model takes from each layout, a pretraining file included); every report is judged by
the loading policy (``models/load_policy.py``: ``check_report``, ``config_keys_of``); only then is
anything loaded (``apply_load``).

Resume checkpoints are these same files plus optimiser and loop state (``utils.resume``).

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

from models import hf, hf_config, hf_source
from models.blip import BlipArch, BLIPRetrieval, build_blip_retrieval
from models.blip_pretrain import build_blip_pretrain
from models.caption import BLIPCaptioner, build_captioner
from models.contextblip import ContextBLIP, PretrainSettings, build_contextblip
from models.formats import CONTEXTBLIP_PARTS, Format, checkpoint_format
from models.imagecode import CandidateScorer, ContextualScorer, ImageCodeArch, build_imagecode_model
from models.layout_reports import (_blip_report, _captioner_report, _nlvr_report, _parts_report, _strip,
                                   _vqa_report)
from models.load_policy import check_report
from models.tokenizer import build_tokenizer
from models.nlvr import BLIPNLVR, build_nlvr
from models.vit import VIT_PRESETS
from models.vqa import BLIPVQA, build_vqa
from utils.checkpoint import load_checkpoint
from utils.errors import CheckpointError
from utils.state_dict import LoadReport, apply_load, extract_state_dict, load_state_dict_with_report
from utils import zoo
from utils.config import ConfigError

logger = logging.getLogger(__name__)

KINDS = ("blip", "blip_inference", "blip_pretrain", "contextblip", "contextblip_pretrain", "zero_shot", "imagecode", "caption", "vqa", "nlvr")


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
    if hf_source.is_hf_source(source):
        expect = None
        if arch is not None and hasattr(arch, "vit_arch") and hasattr(arch, "med_config"):
            expect = hf_config.expected_dims(arch, tokenizer, getattr(arch, "embed_dim", None))
        return hf.load_official(source, queue_size=queue_size or getattr(arch, "queue_size", None), expect=expect)
    return load_checkpoint(source)


def _queue_size(model: nn.Module) -> Optional[int]:
    """The queue size of the model's BLIP (for queues an HF folder lacks); None: no queues."""
    blip = model.blip if isinstance(model, ContextBLIP) else model
    return blip.queue_size if isinstance(blip, BLIPRetrieval) else None


def _imagecode_stage(ckpt: Mapping, state: Mapping) -> int:
    stored = ckpt.get("config") if isinstance(ckpt, Mapping) else None
    if isinstance(stored, Mapping) and stored.get("stage") in (1, 2):
        return stored["stage"]
    return 2 if any(k.startswith("stage1.") for k in state) else 1


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
