"""BLIP's key names <-> transformers' ``Blip*`` names, layout by layout, and an HF state dict as
BLIP's official one (the key mapping behind ``models/hf.py``; VQA's particulars: ``models/hf_vqa.py``).

Three layouts (``RETRIEVAL``, ``CAPTION``, ``VQA``), one HF class each (``HF_CLASS``); :func:`layout_of`
tells which one a folder holds.

Key mapping (ours -> HF): the ViT is renamed (``visual_encoder.cls_token`` ->
``vision_model.embeddings.class_embedding``, ``pos_embed`` -> ``embeddings.position_embedding``,
``patch_embed.proj`` -> ``embeddings.patch_embedding``, ``blocks.N.{norm1, norm2, attn.qkv,
attn.proj, mlp.fc1, mlp.fc2}`` -> ``encoder.layers.N.{layer_norm1, layer_norm2, self_attn.qkv,
self_attn.projection, mlp.fc1, mlp.fc2}``, ``norm`` -> ``post_layernorm``); the text side,
``vision_proj``, ``text_proj`` and ``itm_head`` keep their names. HF has no place for the
``position_ids`` buffers (non-persistent there), the LM head's ``decoder.weight``/``decoder.bias``
(tied to the word embeddings and ``predictions.bias``), ``temp``, the momentum encoders and the queues.

Without ``blip_extras.safetensors`` (a folder from the hub), :func:`official_from_hf` synthesises
what BLIP's ``__init__`` would: momentum copies of the online weights, queues of normalised random
features (seed 0; ``idx_queue`` -100, never a positive; ``ptr_queue`` 0), ``temp`` 0.07 and
``position_ids``; the tied LM head is retied.
"""
from __future__ import annotations

import logging
import re
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from utils.errors import CheckpointError

logger = logging.getLogger(__name__)

RETRIEVAL, CAPTION, VQA = "retrieval", "caption", "vqa"
HF_CLASS = {RETRIEVAL: "BlipForImageTextRetrieval", CAPTION: "BlipForConditionalGeneration",
            VQA: "BlipForQuestionAnswering"}
DEFAULT_QUEUE_SIZE = 57600           # BLIP's retrieval configs (COCO and Flickr30k)
QUEUE_SEED = 0
DEFAULT_TEMP = 0.07
MOMENTUM_PAIRS = (("visual_encoder.", "visual_encoder_m."), ("vision_proj.", "vision_proj_m."),
                  ("text_encoder.", "text_encoder_m."), ("text_proj.", "text_proj_m."))

# ---------------------------------------------------------------------- key mapping

_VIT_TOP = (("cls_token", "embeddings.class_embedding"), ("pos_embed", "embeddings.position_embedding"),
            ("patch_embed.proj.", "embeddings.patch_embedding."), ("norm.", "post_layernorm."))
_VIT_BLOCK = (("norm1.", "layer_norm1."), ("norm2.", "layer_norm2."), ("attn.qkv.", "self_attn.qkv."),
              ("attn.proj.", "self_attn.projection."), ("mlp.fc1.", "mlp.fc1."), ("mlp.fc2.", "mlp.fc2."))
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
# The LM head's tied weights (HF ties and does not save them): key -> the key it is tied to.
TIED = {"text_decoder.cls.predictions.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight",
        "text_decoder.cls.predictions.decoder.bias": "text_decoder.cls.predictions.bias"}


def _swap(name: str, pairs, to_hf: bool) -> Optional[str]:
    for ours, hf in pairs:
        src, dst = (ours, hf) if to_hf else (hf, ours)
        if name == src or (src.endswith(".") and name.startswith(src)):
            return dst + name[len(src):]
    return None


def _vit_key(suffix: str, to_hf: bool) -> Optional[str]:
    m = (_BLOCK if to_hf else _LAYER).match(suffix)
    if m:
        rest = _swap(m.group(2), _VIT_BLOCK, to_hf)
        return None if rest is None else f"{'encoder.layers' if to_hf else 'blocks'}.{m.group(1)}.{rest}"
    return _swap(suffix, _VIT_TOP, to_hf)


def vit_to_hf(suffix: str) -> Optional[str]:
    """A ``visual_encoder.`` key suffix -> its ``vision_model.`` suffix (None: not a BLIP ViT key)."""
    return _vit_key(suffix, True)


def vit_from_hf(suffix: str) -> Optional[str]:
    """A ``vision_model.`` key suffix -> its ``visual_encoder.`` suffix (None: not an HF ViT key)."""
    return _vit_key(suffix, False)


def _hf_parts(layout: str) -> Tuple[str, ...]:
    return {RETRIEVAL: ("text_encoder.", "vision_proj.", "text_proj.", "itm_head."), CAPTION: ("text_decoder.",),
            VQA: ("text_encoder.", "text_decoder.")}[layout]


# The text towers of each layout (their ``embeddings.position_ids`` are rebuilt on the way back).
_TEXT_TOWERS = {RETRIEVAL: ("text_encoder.",), CAPTION: ("text_decoder.bert.",),
                VQA: ("text_encoder.", "text_decoder.bert.")}


def key_to_hf(key: str, layout: str) -> Optional[str]:
    """Our/official key -> the HF key of ``layout``'s class; None where HF has no place for it."""
    if key.startswith("visual_encoder."):
        suffix = vit_to_hf(key[len("visual_encoder."):])
        return None if suffix is None else "vision_model." + suffix
    if key.endswith("embeddings.position_ids") or key in TIED:
        return None
    return key if key.startswith(_hf_parts(layout)) else None


def to_hf_state(state: Mapping[str, Tensor], layout: str) -> "OrderedDict[str, Tensor]":
    """The HF-named tensors of ``state`` (ours/official names) for ``layout``'s class."""
    out = OrderedDict()
    for k, v in state.items():
        hf = key_to_hf(k, layout)
        if hf is not None:
            out[hf] = v
    return out


# The official files' order: a module's own parameters, then its buffers, then its children in the
# order they were registered. Ranks only need to order siblings.
_RANK = {name: i for i, name in enumerate((
    "temp", "image_queue", "text_queue", "idx_queue", "ptr_queue", "visual_encoder", "text_encoder",
    "text_decoder", "vision_proj", "text_proj", "itm_head", "visual_encoder_m", "vision_proj_m",
    "text_encoder_m", "text_proj_m"))}
_RANK.update({"cls_token": 0, "pos_embed": 1, "patch_embed": 2, "blocks": 3, "norm": 4,          # ViT
              "norm1": 0, "attn": 1, "norm2": 2, "mlp": 3, "qkv": 0, "proj": 1, "fc1": 0, "fc2": 1,
              "embeddings": 0, "encoder": 1, "layer": 0, "position_ids": 0, "word_embeddings": 1,  # BERT
              "position_embeddings": 2, "attention": 0, "crossattention": 1, "intermediate": 2,
              "output": 3, "self": 0, "query": 0, "key": 1, "value": 2, "dense": 5, "LayerNorm": 9,
              "bert": 0, "cls": 1, "predictions": 0, "transform": 2, "decoder": 3,                  # LM head
              "weight": 0, "bias": 1})


def _order(key: str) -> tuple:
    return tuple((0, int(p)) if p.isdigit() else (1, _RANK.get(p, 1000)) for p in key.split("."))


# ---------------------------------------------------------------------- HF -> official

def layout_of(hf_state: Mapping[str, Tensor], config: Mapping, name: str) -> str:
    arch = list(config.get("architectures") or [])
    for layout, cls in HF_CLASS.items():
        if cls in arch:
            return layout
    enc = any(k.startswith("text_encoder.") for k in hf_state)
    dec = any(k.startswith("text_decoder.") for k in hf_state)
    if enc and not dec and "itm_head.weight" in hf_state:
        return RETRIEVAL
    if dec and not enc:
        return CAPTION
    if enc and dec and not any(k.startswith(("itm_head.", "vision_proj.", "text_proj.")) for k in hf_state):
        return VQA
    raise CheckpointError(f"{name}: architectures {arch or '(none)'} with "
                          f"{'a text encoder' if enc else 'no text encoder'} and {'a' if dec else 'no'} "
                          f"text decoder: only {', '.join(HF_CLASS.values())} folders convert")


def official_from_hf(hf_state: Mapping[str, Tensor], layout: str, queue_size: Optional[int] = None,
                     copy: bool = True, name: str = "the HF weights") -> Tuple["OrderedDict[str, Tensor]", List[str]]:
    """The official BLIP state dict of an HF ``layout`` state, in the official key order, and the
    list of what was synthesised (not in the HF weights). ``copy``: momentum copies and tied
    weights are clones (for a file); else they share the online tensors (for loading)."""
    if layout == VQA:
        from models import hf_vqa
        hf_vqa.check_widths(hf_state, name, hf_names=True)
    state: Dict[str, Tensor] = {}
    synth: List[str] = []
    unknown, dropped = [], []
    for k, v in hf_state.items():
        if k.startswith("vision_model."):
            suffix = vit_from_hf(k[len("vision_model."):])
            if suffix is None:
                unknown.append(k)
            else:
                state["visual_encoder." + suffix] = v
        elif ".pooler." in k:
            dropped.append(k)   # BLIP's text encoders have no pooler; HF folders may carry one
        elif k.startswith(_hf_parts(layout)):
            state[k] = v
        else:
            unknown.append(k)
    if unknown:
        raise CheckpointError(f"{name}: {len(unknown)} keys have no place in BLIP's {layout} layout: "
                              f"{sorted(unknown)[:5]}")
    if dropped:
        logger.info("%s: dropped %d pooler weights (BLIP's text encoder has no pooler)", name, len(dropped))
    clone = (lambda t: t.clone()) if copy else (lambda t: t)
    towers = _TEXT_TOWERS[layout]
    needed = [t + "embeddings.position_embeddings.weight" for t in towers] + ["visual_encoder.cls_token"] + (
        ["vision_proj.weight"] if layout == RETRIEVAL else [])
    absent = [k for k in needed if k not in state]
    if absent:
        raise CheckpointError(f"{name}: no {', '.join(absent)} (not a complete BLIP {layout} model)")
    for text in towers:
        pid = text + "embeddings.position_ids"
        if pid not in state:
            state[pid] = torch.arange(state[text + "embeddings.position_embeddings.weight"].shape[0],
                                      dtype=torch.long).unsqueeze(0)
            synth.append(pid)
    if layout in (CAPTION, VQA):
        for key, src in TIED.items():
            if key not in state and src in state:
                state[key] = clone(state[src])
    else:
        state["temp"] = torch.tensor(DEFAULT_TEMP)
        synth.append("temp")
        for online, momentum in MOMENTUM_PAIRS:
            for k in [k for k in state if k.startswith(online)]:
                state[momentum + k[len(online):]] = clone(state[k])
        synth.append("momentum copies " + ", ".join(m.rstrip(".") for _, m in MOMENTUM_PAIRS))
        size = queue_size or DEFAULT_QUEUE_SIZE
        dim = state["vision_proj.weight"].shape[0]
        gen = torch.Generator().manual_seed(QUEUE_SEED)
        state["image_queue"] = F.normalize(torch.randn(dim, size, generator=gen), dim=0)
        state["text_queue"] = F.normalize(torch.randn(dim, size, generator=gen), dim=0)
        state["idx_queue"] = torch.full((1, size), -100, dtype=torch.long)
        state["ptr_queue"] = torch.zeros(1, dtype=torch.long)
        synth.append(f"queues of {size} (normalised random, seed {QUEUE_SEED}; idx_queue -100; ptr_queue 0)")
    ordered = OrderedDict((k, state[k]) for k in sorted(state, key=_order))
    return ordered, synth
