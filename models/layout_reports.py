"""What each model takes from each checkpoint layout: one :class:`~utils.state_dict.LoadReport` per
part (nothing loaded yet: ``apply=False``), with the keys a layout holds and the model leaves unused
reported as expected extras, and the parts the layout does not hold and the model adds by design
as ``new``. ``models/factory.py`` ``_plan`` picks the report by (format, model type) and
``models/load_policy.py`` judges it.

A pretraining checkpoint (``model_base.pth``: encoder, decoder, momentum copies, queues) is a
``blip`` file: a retrieval model takes all but ``text_decoder.*``, a captioner takes
``visual_encoder.*`` and ``text_decoder.*``, a VQA model all three towers (as BLIP's ``blip_vqa``
initialises from ``model_base.pth``; decoder cross-attention weights of another width, a ViT wider
than the text, start afresh as BLIP's loader drops them); what each leaves is reported as an
expected extra. An NLVR2 model takes its ViT and text encoder, each cross-attention copied into
both twins (BLIP's ``blip_nlvr.load_checkpoint``); its merge layers and head are new.
"""
from __future__ import annotations

import logging
import re
from typing import Dict, Mapping, Tuple

import torch

from models.blip import BLIPRetrieval
from models.caption import BLIPCaptioner
from models.contextblip import ContextBLIP
from models.formats import CONTEXTBLIP_PARTS, HEAD_PREFIXES, Format
from models.nlvr import BLIPNLVR, new_parts, twin_state
from models.vqa import BLIPVQA
from utils.state_dict import LoadReport, interpolate_pos_embed, load_state_dict_with_report

logger = logging.getLogger(__name__)

# Pretraining checkpoints (model_base.pth) carry a captioning decoder and name their queue pointer
# `queue_ptr`; a retrieval model does not use either, and starts its idx queue afresh.
# DLIP's released student also carries `vl_proj` (a projection its losses never use).
PRETRAIN_EXTRAS = ("text_decoder.", "vl_proj.")
PRETRAIN_EXTRA_KEYS = ("queue_ptr",)
# What a model built without momentum encoders leaves unused in any BLIP checkpoint.
MOMENTUM_PREFIXES = ("visual_encoder_m.", "vision_proj_m.", "text_encoder_m.", "text_proj_m.")
QUEUE_KEYS = ("image_queue", "text_queue", "idx_queue", "ptr_queue", "queue_ptr")
BOOKKEEPING = ("idx_queue", "ptr_queue", "queue_ptr")  # queue labels and pointers: no learned weights
# What a captioner leaves unused in a pretraining (or retrieval) checkpoint.
ENCODER_PREFIXES = ("text_encoder.", "vision_proj.", "text_proj.", "itm_head.") + MOMENTUM_PREFIXES
ENCODER_KEYS = ("temp",) + QUEUE_KEYS


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _fit_pos_embeds(state: Dict[str, torch.Tensor], own: Mapping[str, torch.Tensor], num_patches: int,
                    keys: Tuple[str, ...] = ("visual_encoder.pos_embed",)) -> None:
    """Resize each of ``keys`` in ``state`` (in place) to the model's patch grid when the file's
    grid differs and its width is the model's (a 384 px checkpoint into a 224 px model and back)."""
    for key in keys:
        if key in state and key in own and state[key].shape != own[key].shape and state[key].dim() == 3 \
                and state[key].shape[-1] == own[key].shape[-1]:
            state[key] = interpolate_pos_embed(state[key], num_patches)


def _blip_report(model: BLIPRetrieval, state: Dict[str, torch.Tensor]) -> LoadReport:
    """BLIP's layout, official or ours. ``visual_encoder(_m).pos_embed`` is resized to the model's
    patch grid first, so a 384 px checkpoint loads into a 224 px model and vice versa. A pretraining
    file's queue labels and pointer are started afresh (a retrieval model's own bookkeeping)."""
    state = dict(state)
    own = model.state_dict()
    _fit_pos_embeds(state, own, model.visual_encoder.num_patches,
                    ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed"))
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
    _fit_pos_embeds(state, {"visual_encoder.pos_embed": model.visual_encoder.pos_embed},
                    model.visual_encoder.num_patches)
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
    own = model.state_dict()
    _fit_pos_embeds(state, own, model.visual_encoder.num_patches)
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
    own = model.state_dict()
    _fit_pos_embeds(state, own, model.visual_encoder.num_patches)
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
