"""ImageCoDe heads on ContextBLIP: pick the image a description means among K candidates.

- :class:`CandidateScorer` (stage 1): adapter-BLIP's multimodal [ENC] state of (description,
  candidate), L2-normalised, through a prediction layer ``Linear(Dt, 1)`` -> K logits.
- :class:`InterContextEncoder` (stage 2): transformer layers over the sequence of the K candidate
  features, a candidate position embedding for video sets (all sets with ``all_pos``), residual.
- :class:`ContextualScorer` (stage 2): a frozen stage 1 + the encoder; the frozen prediction layer
  reads the contextualised features.

Both scorers map ``pixel_values`` ``[B, K, 3, H, W]`` (or precomputed ``image_embeds``
``[B, K, L, Dv]``), ``input_ids`` / ``attention_mask`` ``[B, T]`` and ``video`` ``[B]`` (bool) to
logits ``[B, K]``. For other tasks (MMVP's 2-image sets), ``models.factory.model_from_checkpoint`` rebuilds a
model from a fine-tuning checkpoint and :func:`score_candidates` scores one set.
"""
from __future__ import annotations

import logging
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.contextblip import ContextBLIP, ContextBLIPArch, build_contextblip
from utils.config import ConfigError, Config, PosFloat, PosInt, Probability

logger = logging.getLogger(__name__)


class ContextArch(Config):
    """Which ImageCoDe model, and the stage-2 inter-context encoder."""

    stage: Literal[1, 2] = 1                    # 1: adapter-BLIP + prediction layer; 2: + inter-context encoder
    all_pos: bool = False                       # stage 2: candidate position embedding for static sets too
    context_layers: PosInt = 2                  # stage 2 encoder over the 10 candidate features
    context_heads: PosInt = 8
    context_mlp_ratio: PosFloat = 4.0           # FFN = ratio x text width (3072 for BERT-base)
    context_dropout: Probability = 0.1
    context_zero_init: bool = True              # ours: stage 2 starts at stage 1's output; released: false
    head_init: Literal['itm', 'random'] = 'random'  # stage 1's prediction layer; released: random; itm: start at
                                                # zero-shot ITM's ranking (not better on the demo)


class ImageCodeArch(ContextBLIPArch, ContextArch):
    """A stage-1 or stage-2 ImageCoDe model."""


class CandidateScorer(nn.Module):
    """Stage 1: ``backbone`` (a ContextBLIP) + ``prediction`` (``Linear(Dt, 1)``)."""
    checkpoint_format = "imagecode"

    def __init__(self, backbone: ContextBLIP):
        super().__init__()
        self.backbone = backbone
        self.prediction = nn.Linear(backbone.blip.text_encoder.config.hidden_size, 1)

    @property
    def width(self) -> int:
        return self.prediction.in_features

    @torch.no_grad()
    def init_prediction_from_itm(self) -> None:
        """Start the prediction layer at the ITM head's match-minus-no-match direction, so stage 1
        starts by ranking candidates as zero-shot ITM does (the logit difference, read off the
        L2-normalised state). The [ENC] state leaves a LayerNorm: its norm is about the norm of
        that LayerNorm's gain, which rescales the direction to the unnormalised state's logits."""
        head = self.backbone.blip.itm_head
        gain = self.backbone.blip.text_encoder.layers[-1].output.LayerNorm.weight
        self.prediction.weight.copy_((head.weight[1] - head.weight[0]).unsqueeze(0) * gain.norm())
        self.prediction.bias.zero_()

    def embed_candidates(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, K, 3, H, W] -> [B, K, L, Dv]``: the adapted image tokens of every candidate."""
        B, K = pixel_values.shape[:2]
        emb = self.backbone.image_embeds(pixel_values.flatten(0, 1))
        return emb.view(B, K, *emb.shape[1:])

    def candidate_features(self, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, K, L, Dv]`` + texts ``[B, T]`` -> L2-normalised [ENC] states ``[B, K, Dt]``."""
        B, K = image_embeds.shape[:2]
        cls = self.backbone.multimodal_cls(input_ids.repeat_interleave(K, dim=0),
                                           attention_mask.repeat_interleave(K, dim=0), image_embeds.flatten(0, 1))
        return F.normalize(cls, dim=-1).view(B, K, -1)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 pixel_values: Optional[torch.Tensor] = None, image_embeds: Optional[torch.Tensor] = None):
        """``[B, K, Dt]`` from images ``[B, K, 3, H, W]`` or their tokens ``[B, K, L, Dv]``."""
        if image_embeds is None:
            image_embeds = self.embed_candidates(pixel_values)
        return self.candidate_features(image_embeds, input_ids, attention_mask)

    def logits_from_features(self, feats: torch.Tensor, video: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.prediction(feats).squeeze(-1)

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None, *,
                pixel_values: Optional[torch.Tensor] = None, image_embeds: Optional[torch.Tensor] = None,
                features: Optional[torch.Tensor] = None, video: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``[B, K]`` of texts and candidates (images, their tokens, or ready ``features``)."""
        if features is None:
            features = self.features(input_ids, attention_mask, pixel_values, image_embeds)
        return self.logits_from_features(features, video)


class InterContextEncoder(nn.Module):
    """``x + Encoder(x + position * use_pos)`` over the K candidate features ``x`` ``[B, K, D]``."""

    def __init__(self, width: int, layers: int = 2, heads: int = 8, mlp_ratio: float = 4.0,
                 dropout: float = 0.1, max_candidates: int = 10, zero_init: bool = False):
        super().__init__()
        if width % heads:
            raise ConfigError(f"context_heads {heads} must divide the text width {width}")
        self.position = nn.Embedding(max_candidates, width)
        layer = nn.TransformerEncoderLayer(width, heads, int(width * mlp_ratio), dropout, activation="gelu",
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        if zero_init:
            # The last post-norm LayerNorm outputs 0 at init, so x + Encoder(...) = x: stage 2 starts
            # exactly at stage 1's predictions. (As released, the encoder's unit-scale output swamps the
            # L2-normalised features at init and the frozen prediction layer sees noise.)
            last = self.encoder.layers[-1].norm2
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, feats: torch.Tensor, use_pos: torch.Tensor) -> torch.Tensor:
        """``feats`` ``[B, K, D]``, ``use_pos`` ``[B]`` (bool: add the position embedding) -> ``[B, K, D]``."""
        K = feats.shape[1]
        if K > self.position.num_embeddings:
            raise ValueError(f"{K} candidates, but the position embedding has {self.position.num_embeddings}")
        pos = self.position.weight[:K].unsqueeze(0) * use_pos.to(feats.dtype).view(-1, 1, 1)
        return feats + self.encoder(feats + pos)


class ContextualScorer(nn.Module):
    """Stage 2: ``stage1`` (frozen, prediction layer included) + ``context``."""
    checkpoint_format = "imagecode"

    def __init__(self, stage1: CandidateScorer, context: InterContextEncoder, all_pos: bool = False):
        super().__init__()
        self.stage1 = stage1
        self.context = context
        self.all_pos = all_pos
        self.stage1.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "ContextualScorer":
        super().train(mode)
        self.stage1.eval()  # frozen: no dropout, what stage 1 computed is what stage 2 reads
        return self

    @property
    def width(self) -> int:
        return self.stage1.width

    @torch.no_grad()
    def embed_candidates(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.stage1.embed_candidates(pixel_values)

    @torch.no_grad()
    def features(self, input_ids, attention_mask, pixel_values=None, image_embeds=None) -> torch.Tensor:
        """The frozen stage-1 features ``[B, K, Dt]`` (no gradient)."""
        return self.stage1.features(input_ids, attention_mask, pixel_values, image_embeds)

    def logits_from_features(self, feats: torch.Tensor, video: Optional[torch.Tensor] = None) -> torch.Tensor:
        if video is None:
            video = torch.zeros(feats.shape[0], dtype=torch.bool, device=feats.device)
        use_pos = torch.ones_like(video) if self.all_pos else video
        return self.stage1.prediction(self.context(feats, use_pos)).squeeze(-1)

    def forward(self, input_ids=None, attention_mask=None, *, pixel_values=None, image_embeds=None, features=None,
                video=None) -> torch.Tensor:
        """Logits ``[B, K]``; ``video`` ``[B]`` bool (None: all static, no position embedding)."""
        if features is None:
            features = self.features(input_ids, attention_mask, pixel_values, image_embeds)
        return self.logits_from_features(features, video)


# ---------------------------------------------------------------------- building and loading

def build_imagecode_model(arch: ImageCodeArch, tokenizer) -> nn.Module:
    """Stage 1 or 2 (``arch.stage``) with random weights; stage 1's BLIP is trainable."""
    backbone = build_contextblip(arch, tokenizer)
    backbone.set_blip_frozen(False)  # fine-tuning trains adapter-BLIP as a whole
    # Parts the ImageCoDe objective never reaches get no gradient: DDP requires every trainable
    # parameter to take part in the loss.
    blip = backbone.blip
    for unused in (blip.vision_proj, blip.text_proj, blip.itm_head):
        unused.requires_grad_(False)
    blip.temp.requires_grad_(False)
    if not backbone.use_adapter:
        backbone.adapter.requires_grad_(False)
    stage1 = CandidateScorer(backbone)
    if arch.stage == 1:
        return stage1
    context = InterContextEncoder(stage1.width, arch.context_layers, arch.context_heads, arch.context_mlp_ratio,
                                  arch.context_dropout, zero_init=arch.context_zero_init)
    return ContextualScorer(stage1, context, all_pos=arch.all_pos)


@torch.no_grad()
def score_candidates(model: nn.Module, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor, video: bool = False) -> torch.Tensor:
    """Scores ``[K]`` of one description (``input_ids`` ``[T]`` or ``[1, T]``) over its K candidate
    images ``[K, 3, H, W]``. ``video`` False: no candidate position embedding (MMVP's pairs)."""
    ids, mask = input_ids.view(1, -1), attention_mask.view(1, -1)
    flag = torch.tensor([video], device=pixel_values.device)
    return model(ids, mask, pixel_values=pixel_values.unsqueeze(0), video=flag)[0].float()


# ---------------------------------------------------------------------- zero-shot scores

ZERO_SHOT_SCORES = ("itm", "itc", "itm+itc")


def zero_shot_scores(backbone: ContextBLIP, plain: torch.Tensor, adapted: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor, score: str = "itm") -> torch.Tensor:
    """Scores ``[B, K]`` of texts ``[B, T]`` against candidates given as ViT tokens ``[B, K, L, Dv]``
    (``plain``: BLIP's; ``adapted``: after the adapter, the same tensor without one).

    - ``itm``: ``softmax(itm_head)[:, 1]`` over the adapted tokens (ContextBLIP's zero-shot score);
    - ``itc``: cosine of BLIP's projections of the plain [CLS] token and the text [CLS] (ITC was
      trained without the adapter);
    - ``itm+itc``: ITM logit[:, 1] + cosine (BLIP's retrieval re-rank score).
    """
    if score not in ZERO_SHOT_SCORES:
        raise ValueError(f"score must be one of {ZERO_SHOT_SCORES}, got {score!r}")
    B, K = adapted.shape[:2]
    out = torch.zeros(B, K, device=adapted.device)
    if score != "itc":
        logits = backbone.itm_logits(input_ids.repeat_interleave(K, dim=0), attention_mask.repeat_interleave(K, dim=0),
                                     adapted.flatten(0, 1)).float().view(B, K, 2)
        out += logits.softmax(dim=-1)[..., 1] if score == "itm" else logits[..., 1]
    if score != "itm":
        blip = backbone.blip
        image_feat = F.normalize(blip.vision_proj(plain[:, :, 0]).float(), dim=-1)  # [B, K, E]
        text_feat = blip.encode_text(input_ids, attention_mask)[1].float()        # [B, E]
        out += torch.einsum("bke,be->bk", image_feat, text_feat)
    return out


def candidate_tokens(backbone: ContextBLIP, pixel_values: torch.Tensor) -> Sequence[torch.Tensor]:
    """(plain, adapted) ViT tokens of ``[B, K, 3, H, W]``, each ``[B, K, L, Dv]``."""
    B, K = pixel_values.shape[:2]
    plain, adapted = backbone.vision_tokens(pixel_values.flatten(0, 1))
    return plain.view(B, K, *plain.shape[1:]), adapted.view(B, K, *adapted.shape[1:])
