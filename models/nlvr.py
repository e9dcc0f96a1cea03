"""BLIP's NLVR2 model (``BLIP_NLVR`` with the text encoder of the release's ``nlvr_encoder.py``):
one sentence, two images, true or false.

Parts, with BLIP's keys:

- ``visual_encoder``: the ViT (drop path 0.1, as ``BLIP_NLVR``); both images of a pair go through it
  as one batch ``cat([image0, image1])`` and are split again;
- ``text_encoder``: BERT (``[ENC]`` first) whose every layer's cross-attention has **twins**:
  ``crossattention.self0`` attends to image 0's tokens, ``crossattention.self1`` to image 1's, with
  their own output projections ``crossattention.output.dense0`` / ``dense1``. In layers ``< 6`` the
  two are averaged, ``(dense0(a0) + dense1(a1)) / 2``; from layer 6 on
  ``crossattention.output.merge_layer`` (Linear 2D -> D, no activation: the release's is commented
  out) combines ``cat([dense0(a0), dense1(a1)])``; then dropout and ``LayerNorm(. + input)`` as in
  every BERT output. A model needs at least 7 layers to have a merge layer (BLIP's 12 have 6);
- ``cls_head``: Linear(D, D) - ReLU - Linear(D, 2) on the ``[ENC]`` state; class 1 = "True".

From a pretraining or retrieval file (``model_base.pth``: one cross-attention per layer),
:func:`twin_state` copies each ``crossattention.self.*`` into ``self0`` and ``self1`` and each
``crossattention.output.dense.*`` into ``dense0`` and ``dense1`` (the release's ``load_checkpoint``);
the merge layers and the head start afresh (``models/factory.py`` lists them as new).
Pinned by ``tests/fixtures/blip_nlvr_tiny`` (docs/BLIP.md, "NLVR2").
"""
from __future__ import annotations

import dataclasses
import re
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from models.med import (KV, AttentionBlock, Embeddings, HeadProjections, Intermediate, MedArch, MedConfig, MedEncoder,
                        ResidualOutput, additive_mask, med_config_for)
from models.vit import BlipViT, ViTSettings, build_vit
from utils.config import Probability

MERGE_FROM_LAYER = 6  # the release's nlvr_encoder: layers with layer_num >= 6 merge, the others average


class NLVRArch(ViTSettings, MedArch):
    """BLIP's NLVR2 model: the ViT keys (drop path 0.1, as ``BLIP_NLVR``) and the text encoder's med config."""

    vit_drop_path_rate: Optional[Probability] = 0.1


def tokenize_sentences(tokenizer, sentences: Sequence[str], max_tokens: Optional[int] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """BLIP's NLVR text input: padded to the longest sentence (no truncation unless ``max_tokens``),
    the first id (``[CLS]``) replaced by ``[ENC]``. Returns ``(input_ids, attention_mask)``."""
    enc = tokenizer(list(sentences), padding="longest", truncation=max_tokens is not None, max_length=max_tokens,
                    return_tensors="pt")
    input_ids = enc["input_ids"]
    input_ids[:, 0] = tokenizer.enc_token_id
    return input_ids, enc["attention_mask"]


class TwinOutput(nn.Module):
    """``crossattention.output`` of an NLVR layer: ``dense0`` / ``dense1`` (+ ``merge_layer``)."""

    def __init__(self, cfg: MedConfig, merge: bool):
        super().__init__()
        self.dense0 = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dense1 = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.merge_layer = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size) if merge else None
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, a0: torch.Tensor, a1: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        h0, h1 = self.dense0(a0), self.dense1(a1)
        h = self.merge_layer(torch.cat([h0, h1], dim=-1)) if self.merge_layer is not None else (h0 + h1) / 2
        return self.LayerNorm(self.dropout(h) + residual)


class TwinCrossAttention(nn.Module):
    def __init__(self, cfg: MedConfig, merge: bool):
        super().__init__()
        self.self0 = HeadProjections(cfg, cfg.encoder_width)
        self.self1 = HeadProjections(cfg, cfg.encoder_width)
        self.output = TwinOutput(cfg, merge)

    def forward(self, hidden: torch.Tensor, kv0: KV, kv1: KV) -> torch.Tensor:
        a0, _ = self.self0(hidden, kv0, None)  # every image token is visible (the release's all-ones masks)
        a1, _ = self.self1(hidden, kv1, None)
        return self.output(a0, a1, hidden)


class NLVRLayer(nn.Module):
    def __init__(self, cfg: MedConfig, index: int):
        super().__init__()
        self.attention = AttentionBlock(cfg, cfg.hidden_size)
        self.crossattention = TwinCrossAttention(cfg, merge=index >= MERGE_FROM_LAYER)
        self.intermediate = Intermediate(cfg)
        self.output = ResidualOutput(cfg.intermediate_size, cfg)

    def forward(self, x: torch.Tensor, self_mask: Optional[torch.Tensor], images0: torch.Tensor,
                images1: torch.Tensor, first_token_only: bool = False) -> torch.Tensor:
        self_kv = self.attention.self.project_kv(x)
        if first_token_only:  # the last layer: only [ENC]'s state is read by the head
            x = x[:, :1]
        h, _ = self.attention(x, self_kv, self_mask)
        c = self.crossattention
        h = c(h, c.self0.project_kv(images0), c.self1.project_kv(images1))
        return self.output(self.intermediate(h), h)


class _Layers(nn.Module):
    def __init__(self, cfg: MedConfig):
        super().__init__()
        self.layer = nn.ModuleList(NLVRLayer(cfg, i) for i in range(cfg.num_hidden_layers))


class NLVREncoder(MedEncoder):
    """The release's ``nlvr_encoder.BertModel`` (no pooler): :class:`MedEncoder`'s embeddings and
    weight init, layers with twin cross-attention."""

    def __init__(self, cfg: MedConfig):
        nn.Module.__init__(self)
        if cfg.vocab_size is None:
            raise ValueError("MedConfig.vocab_size must be set (from the tokenizer) before building")
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = _Layers(cfg)
        self.apply(self._init_weights)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], images0: torch.Tensor,
                images1: torch.Tensor, first_token_only: bool = False) -> torch.Tensor:
        """States ``[B, T, D]`` (``[B, 1, D]`` with ``first_token_only``) of ``input_ids`` attending to
        ``images0`` / ``images1`` ``[B, N, W]``."""
        x = self.embeddings(input_ids)
        mask = None if attention_mask is None else additive_mask(attention_mask)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, images0, images1, first_token_only=first_token_only and i == last)
        return x


class BLIPNLVR(nn.Module):
    checkpoint_format = "blip-nlvr"  # the tag checkpoints of this model carry (models/factory.py)

    def __init__(self, visual_encoder: BlipViT, text_config: MedConfig, tokenizer):
        super().__init__()
        if text_config.encoder_width != visual_encoder.width:
            text_config = dataclasses.replace(text_config, encoder_width=visual_encoder.width)
        self.visual_encoder = visual_encoder
        self.text_encoder = NLVREncoder(text_config)
        D = text_config.hidden_size
        self.cls_head = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, 2))
        self.tokenizer = tokenizer

    def cls_states(self, image0: torch.Tensor, image1: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        """The ``[ENC]`` state ``[B, D]`` (both images through the ViT as one batch, as the release)."""
        B = image0.shape[0]
        tokens = self.visual_encoder(torch.cat([image0, image1]))
        return self.text_encoder(input_ids, attention_mask, tokens[:B], tokens[B:], first_token_only=True)[:, 0]

    def forward(self, image0: torch.Tensor, image1: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, 2]`` (class 1: the sentence is true of the pair); ``input_ids[:, 0]`` is ``[ENC]``
        (:func:`tokenize_sentences`)."""
        return self.cls_head(self.cls_states(image0, image1, input_ids, attention_mask))


def build_nlvr(arch: NLVRArch, tokenizer) -> BLIPNLVR:
    """A BLIP NLVR2 model with random weights."""
    vit = build_vit(arch)
    return BLIPNLVR(vit, med_config_for(arch.med_config, tokenizer, vit.width), tokenizer)


_SINGLE_CROSS = re.compile(r"^text_encoder\.encoder\.layer\.(\d+)\.crossattention\.(self|output\.dense)\.(.+)$")


def has_twins(state: Mapping[str, torch.Tensor]) -> bool:
    """A file in the NLVR layout (twin cross-attention) rather than one cross-attention per layer."""
    return any(".crossattention.self0." in k for k in state)


def twin_state(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A pretraining/retrieval ``text_encoder`` (one cross-attention per layer) in the NLVR layout:
    every ``text_encoder.encoder.layer.N.crossattention.self.*`` as ``self0.*`` and ``self1.*``,
    every ``crossattention.output.dense.*`` as ``dense0.*`` and ``dense1.*`` (the same tensor in
    both, as the release's ``load_checkpoint``); the single keys are dropped, everything else kept."""
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _SINGLE_CROSS.match(key)
        if m is None:
            out[key] = value
            continue
        layer, part, rest = m.groups()
        base = f"text_encoder.encoder.layer.{layer}.crossattention."
        names = ("self0", "self1") if part == "self" else ("output.dense0", "output.dense1")
        for name in names:
            out[f"{base}{name}.{rest}"] = value
    return out


def new_parts(model: BLIPNLVR) -> Tuple[str, ...]:
    """What a single-cross-attention file cannot give: the merge layers and the head."""
    return tuple(sorted({k.rsplit(".", 1)[0] + "." for k in model.state_dict()
                         if ".merge_layer." in k or k.startswith("cls_head.")}))
