"""ContextBLIP: a frozen BLIP with a multi-scale adapter, pretrained with ITM + text-guided masked
image modelling (CONTEXTBLIP.md). The API later stages build on:

    model = build_contextblip(cfg, tokenizer)            # cfg: a ContextBLIPConfig (or subclass)
    load_contextblip(model, "outputs/pretrain/checkpoint_last.pth")   # or a merged export / BLIP file
    emb = model.image_embeds(pixel_values)               # [B, 1 + N, D]: frozen ViT + adapter
    logits = model.itm_logits(input_ids, attention_mask, emb)         # [B, 2]
    cls = model.multimodal_cls(input_ids, attention_mask, emb)        # [B, Dt]: the [ENC] state

``input_ids`` start with [CLS] (as the collator produces them); the matching passes replace it by
[ENC], as BLIP does. ``model.blip`` is a :class:`BLIPRetrieval` without momentum encoders and queues.

Checkpoints (see :func:`load_contextblip`):
- pretraining checkpoints hold only the trainable parts (``adapter.*``, ``decoder.*``) and the full
  config, whose ``pretrained`` names the base BLIP to rebuild from;
- the merged export (``python pretrain.py --export CKPT``) holds everything (``blip.*`` too);
- a plain BLIP checkpoint fills ``blip`` and leaves the adapter at its random init, which is NOT
  plain BLIP: the adapter adds a ReLU residual to every image token. For BLIP's zero-shot numbers
  build with ``use_adapter: false`` (then ``image_embeds`` is exactly BLIP's ViT output).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.adapter import MultiScaleAdapter
from models.blip import BLIPRetrieval, build_blip_retrieval, load_blip_weights
from models.losses import itm_loss, sample_hard_negatives
from models.med import TextOutput
from models.tmim import PatchMask, TMIMDecoder, random_mask, text_guided_mask, tmim_loss, tmim_targets

logger = logging.getLogger(__name__)

PARTS = ("adapter.", "decoder.")


def default_taps(depth: int) -> List[int]:
    """Four evenly spaced 1-based blocks ending at the last: 3, 6, 9, 12 for a 12-block ViT."""
    return sorted({-(-depth * k // 4) for k in range(1, 5)})


@dataclass
class PretrainSettings:
    """The pretraining objective's knobs (``PretrainConfig`` fields of the same names)."""

    mask_strategy: str = "text"        # 'text' (text-guided) | 'random'
    mask_rate: float = 0.25
    guide_token: str = "words"         # 'words' (ours) | 'any' (released)
    mask_noise: float = 0.02
    tmim_condition: str = "masked"     # text condition from the pass on the 'masked' | 'unmasked' (released) image
    tmim_norm_pix: bool = False
    itm_neg_temp: float = 1.0
    itm_weight: float = 1.0
    tmim_weight: float = 1.0

    @classmethod
    def from_config(cls, cfg) -> "PretrainSettings":
        defaults = cls()
        return cls(**{k: getattr(cfg, k, getattr(defaults, k)) for k in vars(defaults)})


class LoadResult(NamedTuple):
    kind: str                 # 'pretrain' | 'merged' | 'blip'
    blip: Optional[object]    # LoadReport of the BLIP weights (None: not loaded here)
    parts: Optional[object]   # LoadReport of adapter/decoder (None: left at init)


class ContextBLIP(nn.Module):
    """``blip`` (frozen by default) + ``adapter`` (+ ``decoder`` for TMIM pretraining)."""

    def __init__(self, blip: BLIPRetrieval, taps: Sequence[int], adapter_reduction: int = 2,
                 use_adapter: bool = True, decoder: Optional[TMIMDecoder] = None,
                 settings: Optional[PretrainSettings] = None, freeze_blip: bool = True):
        super().__init__()
        depth = len(blip.visual_encoder.blocks)
        if not taps or any(not 1 <= t <= depth for t in taps):
            raise ValueError(f"adapter taps {list(taps)} must be 1-based block numbers in [1, {depth}]")
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
        raise ValueError(f"mask_strategy must be 'text' or 'random', got {s.mask_strategy!r}")

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
            raise RuntimeError("this ContextBLIP has no TMIM decoder (build_contextblip(..., with_decoder=True))")
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


# ---------------------------------------------------------------------- building and loading

def build_contextblip(cfg, tokenizer, with_decoder: bool = False) -> ContextBLIP:
    """A ContextBLIP from a config with the model keys (``ContextBLIPConfig`` or a subclass).
    BLIP's weights are NOT loaded here: see :func:`load_contextblip`."""
    blip = build_blip_retrieval(cfg, tokenizer, with_momentum=False)
    vit = blip.visual_encoder
    taps = getattr(cfg, "adapter_taps", None) or default_taps(len(vit.blocks))
    decoder = None
    if with_decoder:
        decoder = TMIMDecoder(vit.width, vit.num_patches, vit.arch.patch_size, blip.text_encoder.config.hidden_size,
                              depth=getattr(cfg, "decoder_depth", 4), heads=getattr(cfg, "decoder_heads", 8),
                              mlp_ratio=getattr(cfg, "decoder_mlp_ratio", 4.0),
                              text_adapter_reduction=getattr(cfg, "text_adapter_reduction", 2))
    return ContextBLIP(blip, taps, adapter_reduction=getattr(cfg, "adapter_reduction", 2),
                       use_adapter=getattr(cfg, "use_adapter", True), decoder=decoder,
                       settings=PretrainSettings.from_config(cfg))


def checkpoint_kind(state: Dict[str, torch.Tensor]) -> str:
    """'merged' (``blip.*`` present), 'pretrain' (only adapter/decoder) or 'blip' (BLIP's layout)."""
    if any(k.startswith("blip.") for k in state):
        return "merged"
    if state and all(k.startswith(PARTS) for k in state):
        return "pretrain"
    return "blip"


def _load_parts(model: ContextBLIP, state: Dict[str, torch.Tensor], strict: bool):
    from utils.checkpoint import load_state_dict_with_report
    parts = {k: v for k, v in state.items() if k.startswith(PARTS)}
    # A model built without a decoder (fine-tuning, zero-shot) has no use for the TMIM decoder.
    extra = ("decoder.",) if model.decoder is None else ()
    return load_state_dict_with_report(model, parts, strict=strict, expected_extra_prefixes=extra,
                                       ignore_missing_prefixes=("blip.",))


def load_contextblip(model: ContextBLIP, source, base: Optional[str] = "auto", strict: bool = False) -> LoadResult:
    """Load weights into ``model`` from any of the three checkpoint kinds (see the module doc).

    ``base`` applies to a pretraining checkpoint only: ``'auto'`` loads the BLIP that its config's
    ``pretrained`` names, a path loads that one, ``None`` keeps ``model.blip`` as it is (already
    loaded by the caller). Returns which kind it was and the load reports.
    """
    from utils.checkpoint import CheckpointError, extract_state_dict, load_checkpoint

    ckpt = load_checkpoint(source)
    state = extract_state_dict(ckpt)
    kind = checkpoint_kind(state)
    if kind == "blip":
        report = load_blip_weights(model.blip, state, strict=strict)
        if model.use_adapter:
            logger.warning("%s is a plain BLIP checkpoint: the adapter stays at its random init, so this "
                           "is not BLIP's zero-shot model (set use_adapter: false for that)", source)
        return LoadResult(kind, report, None)
    if kind == "merged":
        blip_state = {k[len("blip."):]: v for k, v in state.items() if k.startswith("blip.")}
        return LoadResult(kind, load_blip_weights(model.blip, blip_state, strict=strict),
                          _load_parts(model, state, strict))
    blip_report = None
    if base == "auto":
        base = (ckpt.get("config") or {}).get("pretrained") if isinstance(ckpt, dict) else None
        if not base:
            raise CheckpointError(f"{source} holds only the adapter/decoder and its config names no "
                                  "'pretrained' BLIP; pass base=<BLIP checkpoint> or load BLIP first (base=None)")
    if base:
        blip_report = load_blip_weights(model.blip, base, strict=strict)
    return LoadResult(kind, blip_report, _load_parts(model, state, strict))
