"""Checkpoint formats: the ``format`` tag every checkpoint we write carries (:class:`Format`), and
:func:`checkpoint_format`, which reads it or, for an untagged file, tells the format from its layout:
official BLIP files carry none and are recognised by their layout (and so are files written before
the tag existed).

| format | holds | loads into |
|---|---|---|
| ``blip`` (official or ours) | BLIP's state dict (``visual_encoder.*``, ``text_encoder.*``, ...) | BLIP; ContextBLIP's ``blip``; stage 1's backbone |
| ``contextblip-trainable`` | ``adapter.*`` (+ ``decoder.*``); the config names the base BLIP | ContextBLIP (base BLIP loaded too) |
| ``contextblip-merged`` | ``blip.*``, ``adapter.*``, ``decoder.*`` | ContextBLIP; stage 1's backbone |
| ``imagecode`` | a whole stage-1 or stage-2 model (``stage`` in its config) | the same stage; stage 1 into stage 2's frozen part |
| ``blip-caption`` (official or ours) | ``visual_encoder.*``, ``text_decoder.*`` | the captioner |
| ``blip-vqa`` (official or ours) | ``visual_encoder.*``, ``text_encoder.*``, ``text_decoder.*`` (no projections) | the VQA model |
| ``blip-nlvr`` (official or ours) | ``visual_encoder.*``, ``text_encoder.*`` with twin ``crossattention.self0/self1``, ``cls_head.*`` | the NLVR2 model |

``models/factory.py`` dispatches on (format, model type) when it loads a file into a model.
"""
from __future__ import annotations

from typing import Mapping

from models.nlvr import has_twins
from utils.errors import CheckpointError
from utils.state_dict import extract_state_dict


class Format:
    BLIP = "blip"
    CONTEXTBLIP_TRAINABLE = "contextblip-trainable"
    CONTEXTBLIP_MERGED = "contextblip-merged"
    IMAGECODE = "imagecode"
    CAPTION = "blip-caption"
    VQA = "blip-vqa"
    NLVR = "blip-nlvr"
    ALL = (BLIP, CONTEXTBLIP_TRAINABLE, CONTEXTBLIP_MERGED, IMAGECODE, CAPTION, VQA, NLVR)


# ContextBLIP's own parts: all a contextblip-trainable file holds.
CONTEXTBLIP_PARTS = ("adapter.", "decoder.")
# What a VQA model leaves unused in a pretraining (or retrieval) checkpoint: BLIP's blip_vqa takes
# visual_encoder, text_encoder and text_decoder only; a file with a decoder and none of these is a VQA file.
HEAD_PREFIXES = ("vision_proj.", "text_proj.", "itm_head.", "vl_proj.")


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
