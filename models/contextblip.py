"""ContextBLIP: a frozen BLIP with a multi-scale adapter, pretrained with ITM + text-guided masked
image modelling (docs/CONTEXTBLIP.md). The API later stages build on:

    model = build_contextblip(cfg, tokenizer)            # cfg: a ContextBLIPArch (or a run config)
    load_weights(model, "outputs/pretrain/checkpoint_last.pth")       # models/factory.py; or a merged export / BLIP file
    emb = model.image_embeds(pixel_values)               # [B, 1 + N, D]: frozen ViT + adapter
    logits = model.itm_logits(input_ids, attention_mask, emb)         # [B, 2]
    cls = model.multimodal_cls(input_ids, attention_mask, emb)        # [B, Dt]: the [ENC] state

``input_ids`` start with [CLS] (as the collator produces them); the matching passes replace it by
[ENC], as BLIP does. ``model.blip`` is a :class:`BLIPRetrieval` without momentum encoders and queues.

Checkpoints (see ``models/factory.py``):
- pretraining checkpoints hold only the trainable parts (``adapter.*``, ``decoder.*``) and the full
  config, whose ``pretrained`` names the base BLIP to rebuild from;
- the merged export (``python pretrain.py --export CKPT``) holds everything (``blip.*`` too);
- a plain BLIP checkpoint fills ``blip`` and leaves the adapter at its random init, which is NOT
  plain BLIP: the adapter adds a ReLU residual to every image token. For BLIP's zero-shot numbers
  build with ``use_adapter: false`` (then ``image_embeds`` is exactly BLIP's ViT output).
"""
from __future__ import annotations

import logging
from typing import Annotated, Dict, List, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from models.adapter import MultiScaleAdapter
from models.blip import BlipArch, BLIPRetrieval, build_blip_retrieval
from models.losses import itm_loss, sample_hard_negatives
from models.med import TextOutput
from models.tmim import PatchMask, TMIMDecoder, random_mask, text_guided_mask, tmim_loss, tmim_targets
from utils.config import Config, ConfigError, NonNegFloat, PosFloat, PosInt

logger = logging.getLogger(__name__)

PARTS = ("adapter.", "decoder.")


def default_taps(depth: int) -> List[int]:
    """Four evenly spaced 1-based blocks ending at the last: 3, 6, 9, 12 for a 12-block ViT."""
    return sorted({-(-depth * k // 4) for k in range(1, 5)})


class AdapterArch(Config):
    """The multi-scale adapter (ContextBLIP's intra-context part)."""

    use_adapter: bool = True                    # false: image_embeds are plain BLIP's (zero-shot BLIP)
    adapter_taps: Optional[List[PosInt]] = None  # 1-based ViT blocks; None -> 4 evenly spaced up to the last (3,6,9,12 for ViT-B)
    adapter_reduction: PosInt = 2               # r: each tap goes width -> width / r


class ContextBLIPArch(BlipArch, AdapterArch):
    """A ContextBLIP: BLIP's encoders plus the adapter."""

    @model_validator(mode="after")
    def _resolve_taps(self):
        if self.adapter_taps is None:
            # Recorded so that checkpoints and saved configs say which blocks were tapped.
            self.adapter_taps = default_taps(self.vit_arch.depth)
        return self


class TMIMArch(Config):
    """The TMIM decoder (pretraining only); its width is the ViT's."""

    text_adapter_reduction: PosInt = 2          # text adapter: text width -> width / r -> width
    decoder_depth: PosInt = 4
    decoder_heads: PosInt = 8
    decoder_mlp_ratio: PosFloat = 4.0           # FFN = ratio x width (3072 for ViT-B)


class PretrainSettings(Config):
    """The pretraining objective's knobs."""

    mask_strategy: Literal["text", "random"] = "text"  # text-guided (the method) or random (ablation)
    mask_rate: Annotated[float, Field(gt=0, lt=1)] = 0.25  # masked share of patches: int(mask_rate * N)
    guide_token: Literal["words", "any"] = "words"  # 'any': released (any of the padded positions)
    mask_noise: NonNegFloat = 0.02              # uniform noise added to the normalised attention row
    tmim_condition: Literal["unmasked", "masked"] = "masked"  # image the text condition h sees; 'unmasked': released (leaks)
    tmim_norm_pix: bool = False                 # targets normalised per patch (MAE) instead of the input
    itm_neg_temp: PosFloat = 1.0                # hard negatives ~ softmax(sim / T); released: 1 (none)
    itm_weight: NonNegFloat = 1.0
    tmim_weight: NonNegFloat = 1.0


class ContextBLIP(nn.Module):
    """``blip`` (frozen by default) + ``adapter`` (+ ``decoder`` for TMIM pretraining)."""

    def __init__(self, blip: BLIPRetrieval, taps: Sequence[int], adapter_reduction: int = 2,
                 use_adapter: bool = True, decoder: Optional[TMIMDecoder] = None,
                 settings: Optional[PretrainSettings] = None, freeze_blip: bool = True):
        super().__init__()
        depth = len(blip.visual_encoder.blocks)
        if not taps or any(not 1 <= t <= depth for t in taps):
            raise ConfigError(f"adapter taps {list(taps)} must be 1-based block numbers in [1, {depth}]")
        self.blip = blip
        self.taps = tuple(taps)
        self.use_adapter = use_adapter
        self.adapter = MultiScaleAdapter(blip.visual_encoder.width, len(self.taps), adapter_reduction)
        # An unused adapter must not count as trainable (DDP would wait for its gradients).
        self.adapter.requires_grad_(use_adapter)
        self.decoder = decoder
        self.settings = settings or PretrainSettings()
        self.blip_frozen = False
        self.set_blip_frozen(freeze_blip)

    # ------------------------------------------------------------------ freezing and checkpoints
    @property
    def vit(self):
        return self.blip.visual_encoder

    def set_blip_frozen(self, frozen: bool) -> None:
        """Frozen: BLIP gets no gradient, stays in eval mode (no dropout), and the ViT runs without
        storing activations (nothing before the adapter needs a gradient)."""
        self.blip_frozen = frozen
        self.blip.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> "ContextBLIP":
        super().train(mode)
        if self.blip_frozen:
            self.blip.eval()
        return self

    @property
    def checkpoint_format(self) -> str:
        """Tag of what :meth:`checkpoint_state_dict` holds (models/factory.py)."""
        return "contextblip-trainable" if self.blip_frozen else "contextblip-merged"

    def checkpoint_state_dict(self) -> Dict[str, torch.Tensor]:
        """What a training checkpoint stores: the trainable parts only while BLIP is frozen."""
        state = self.state_dict()
        if not self.blip_frozen:
            return state
        return {k: v for k, v in state.items() if not k.startswith("blip.")}

    def load_checkpoint_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Strict inverse of :meth:`checkpoint_state_dict` (exact resume)."""
        if any(k.startswith("blip.") for k in state):
            self.load_state_dict(state)
            return
        own = {k for k in self.state_dict() if not k.startswith("blip.")}
        missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
        if missing or unexpected:
            raise RuntimeError(f"checkpoint does not fit this ContextBLIP: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        self.load_state_dict(state, strict=False)

    # ------------------------------------------------------------------ image side
    def vision_tokens(self, pixel_values: torch.Tensor, keep_idx: Optional[torch.Tensor] = None):
        """(plain ViT tokens, adapted tokens), each ``[B, 1 + N, D]`` (``[B, 1 + K, D]`` for the
        visible patches ``keep_idx`` ``[B, K]``: one batched pass over the kept tokens)."""
        vit = self.vit
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.blip_frozen):
            x = vit.embed(pixel_values) if keep_idx is None else vit.embed_visible(pixel_values, keep_idx)
            tokens, raw_taps = vit.run_blocks(x, self.taps if self.use_adapter else ())
            taps = [vit.norm(t) for t in raw_taps]
        if not self.use_adapter:
            return tokens, tokens
        return tokens, self.adapter(tokens, taps)

    def image_embeds(self, pixel_values: torch.Tensor, keep_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[B, 3, H, W] -> [B, 1 + N, D]``: the tokens the text encoder cross-attends to."""
        return self.vision_tokens(pixel_values, keep_idx)[1]

    # ------------------------------------------------------------------ matching
    def multimodal(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor,
                   first_token_only: bool = False, output_cross_attentions: bool = False) -> TextOutput:
        """The image-grounded text encoder ([ENC] first) over ``image_embeds`` ``[B, L, D]``."""
        return self.blip.text_encoder(self.blip.itm_input_ids(input_ids), attention_mask, mode="multimodal",
                                      encoder_hidden_states=image_embeds, first_token_only=first_token_only,
                                      output_cross_attentions=output_cross_attentions)

    def multimodal_cls(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       image_embeds: torch.Tensor) -> torch.Tensor:
        """The multimodal [ENC] state ``[B, Dt]`` (ImageCoDe's prediction layer reads it)."""
        return self.multimodal(input_ids, attention_mask, image_embeds, first_token_only=True).last_hidden_state[:, 0]

    def itm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   image_embeds: torch.Tensor) -> torch.Tensor:
        """Match logits ``[B, 2]`` (index 1 = match) of texts ``[B, T]`` and images ``[B, L, D]``."""
        return self.blip.itm_head(self.multimodal_cls(input_ids, attention_mask, image_embeds))

    def match_prob(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   image_embeds: torch.Tensor) -> torch.Tensor:
        """``softmax(itm_logits)[:, 1]`` ``[B]``: ContextBLIP's zero-shot score."""
        return self.itm_logits(input_ids, attention_mask, image_embeds).float().softmax(dim=-1)[:, 1]

    # ------------------------------------------------------------------ pretraining
    def choose_mask(self, positive: TextOutput, attention_mask: torch.Tensor, batch: int, device,
                    generator: Optional[torch.Generator] = None) -> PatchMask:
        s = self.settings
        if s.mask_strategy == "text":
            return text_guided_mask(positive.cross_attentions, attention_mask, s.mask_rate, s.guide_token,
                                    s.mask_noise, generator)
        if s.mask_strategy == "random":
            return random_mask(batch, self.vit.num_patches, s.mask_rate, device, generator)
        raise ConfigError(f"mask_strategy must be 'text' or 'random', got {s.mask_strategy!r}")

    @torch.no_grad()
    def compute_mask(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     generator: Optional[torch.Generator] = None) -> PatchMask:
        """The mask pretraining would draw for these pairs (for pictures and inspection)."""
        image_embeds = self.image_embeds(pixel_values)
        positive = self.multimodal(input_ids, attention_mask, image_embeds,
                                   output_cross_attentions=self.settings.mask_strategy == "text")
        return self.choose_mask(positive, attention_mask, pixel_values.shape[0], pixel_values.device, generator)

    def _itm_loss(self, plain, image_embeds, positive, input_ids, attention_mask, idx, generator):
        """ITM with one hard negative image per text and one negative text per image, drawn from
        the frozen ITC projections: the plain ViT [CLS] (what ``vision_proj`` was trained on) and
        the unimodal text [CLS]."""
        blip = self.blip
        with torch.no_grad():
            image_feat = F.normalize(blip.vision_proj(plain[:, 0]), dim=-1)
            text_feat = blip.encode_text(input_ids, attention_mask)[1]
            temp = torch.tensor(self.settings.itm_neg_temp, device=plain.device)
            neg_img, neg_txt, valid_img, valid_txt = sample_hard_negatives(
                image_feat, text_feat, image_feat, text_feat, idx, idx, temp, generator)
        ids = torch.cat([input_ids, input_ids[neg_txt]])
        mask = torch.cat([attention_mask, attention_mask[neg_txt]])
        images = torch.cat([image_embeds[neg_img], image_embeds])
        logits = torch.cat([blip.itm_head(positive.last_hidden_state[:, 0]),
                            self.itm_logits(ids, mask, images)])
        return itm_loss(logits, torch.cat([valid_img, valid_txt]))

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                idx: torch.Tensor, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """Pretraining losses of a batch: ``loss_itm`` and ``loss_tmim`` (each times its weight).

        ``pixel_values`` ``[B, 3, H, W]``, ``input_ids``/``attention_mask`` ``[B, T]``, ``idx`` ``[B]``
        (same idx = same image: never drawn as each other's negative).
        """
        if self.decoder is None:
            raise RuntimeError("this ContextBLIP has no TMIM decoder (build_contextblip(..., tmim=...))")
        s = self.settings
        plain, image_embeds = self.vision_tokens(pixel_values)
        positive = self.multimodal(input_ids, attention_mask, image_embeds,
                                   output_cross_attentions=s.mask_strategy == "text")
        loss_itm = self._itm_loss(plain, image_embeds, positive, input_ids, attention_mask, idx.view(-1), generator)

        m = self.choose_mask(positive, attention_mask, pixel_values.shape[0], pixel_values.device, generator)
        visible = self.image_embeds(pixel_values, m.keep_idx)
        if s.tmim_condition == "masked":  # ours: the condition sees only what the decoder sees
            cond = self.multimodal(input_ids, attention_mask, visible).last_hidden_state
        else:  # released: the condition attended to the whole image
            cond = positive.last_hidden_state
        pred = self.decoder(visible, m.keep_idx, cond, attention_mask)
        target = tmim_targets(pixel_values, self.vit.arch.patch_size, s.tmim_norm_pix)
        return {"loss_itm": s.itm_weight * loss_itm, "loss_tmim": s.tmim_weight * tmim_loss(pred, target, m.mask)}


# ---------------------------------------------------------------------- building

def build_contextblip(arch: ContextBLIPArch, tokenizer, tmim: Optional[TMIMArch] = None,
                      settings: Optional[PretrainSettings] = None) -> ContextBLIP:
    """A ContextBLIP with random weights (``tmim``: with the TMIM decoder, for pretraining)."""
    blip = build_blip_retrieval(arch, tokenizer)
    vit = blip.visual_encoder
    taps = arch.adapter_taps or default_taps(len(vit.blocks))
    if arch.use_adapter and (any(not 1 <= t <= len(vit.blocks) for t in taps) or len(set(taps)) != len(taps)):
        # Checked here, not when the config loads: a run that scores plain BLIP never uses the taps.
        raise ConfigError(f"invalid value for config key 'adapter_taps': must be distinct block numbers in "
                         f"[1, {len(vit.blocks)}] (the ViT's depth), got {list(taps)}")
    if arch.use_adapter and vit.width % arch.adapter_reduction:
        raise ConfigError(f"invalid value for config key 'adapter_reduction': must divide the ViT width "
                         f"{vit.width}, got {arch.adapter_reduction}")
    decoder = None
    if tmim is not None:
        if vit.width % tmim.decoder_heads:
            raise ConfigError(f"invalid value for config key 'decoder_heads': must divide the ViT width "
                             f"{vit.width}, got {tmim.decoder_heads}")
        decoder = TMIMDecoder(vit.width, vit.num_patches, vit.arch.patch_size, blip.text_encoder.config.hidden_size,
                              depth=tmim.decoder_depth, heads=tmim.decoder_heads, mlp_ratio=tmim.decoder_mlp_ratio,
                              text_adapter_reduction=tmim.text_adapter_reduction)
    taps = taps if arch.use_adapter else default_taps(len(vit.blocks))
    return ContextBLIP(blip, taps, adapter_reduction=arch.adapter_reduction, use_adapter=arch.use_adapter,
                       decoder=decoder, settings=settings)
