"""BLIP's vision encoder: a timm ViT whose state-dict keys match ``visual_encoder.*``.

BLIP's ViT is a plain timm-style ViT (pre-norm blocks, LayerNorm eps 1e-6, qkv bias, exact GELU,
CLS token, learned absolute position embeddings) whose forward returns every token after the final
norm, with no head. We subclass timm's ``VisionTransformer`` so attention runs through
``F.scaled_dot_product_attention`` and weights load key for key; we only add what BLIP and
ContextBLIP need on top: checkpointing of the *last* ``ckpt_layer`` blocks (BLIP's recipe, rather
than timm's all-or-nothing switch), taps of intermediate block outputs (the ContextBLIP adapter), and
encoding a subset of patches (the visible patches of a masked image).
"""
from __future__ import annotations

from functools import partial
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from pydantic import ConfigDict, ValidationInfo, field_validator, model_validator
from timm.models.vision_transformer import VisionTransformer

from utils.checkpoint import load_checkpoint
from utils.config import Config, NonNegInt, PosFloat, PosInt, Probability, unused
from utils.errors import CheckpointError
from utils.state_dict import extract_state_dict, interpolate_pos_embed


class ViTArch(Config):
    """Width/depth/heads/patch of a ViT; ``base`` and ``large`` are BLIP's two sizes."""
    model_config = ConfigDict(frozen=True)

    width: PosInt               # embedding dim
    depth: PosInt               # number of transformer blocks
    heads: PosInt               # attention heads; must divide width
    patch_size: PosInt = 16
    mlp_ratio: PosFloat = 4.0   # MLP hidden dim = mlp_ratio * width

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.width % self.heads:
            raise ValueError(f"heads: must divide width {self.width}, got {self.heads}")
        return self


VIT_PRESETS = {
    "small": ViTArch(width=384, depth=12, heads=6, patch_size=16),   # ViT-S/16 (DeiT-small; DLIP's student)
    "base": ViTArch(width=768, depth=12, heads=12, patch_size=16),
    "large": ViTArch(width=1024, depth=24, heads=16, patch_size=16),
}
# BLIP trains ViT-L with stochastic depth 0.1 and ViT-B without.
DEFAULT_DROP_PATH = {"large": 0.1}


def known_vit_preset(vit):
    """A ``vit`` config value checked: a preset name of VIT_PRESETS, or a mapping (validated as ViTArch)."""
    if isinstance(vit, str) and vit not in VIT_PRESETS:
        raise ValueError(f"must be one of {sorted(VIT_PRESETS)} or a mapping "
                         f"{{width, depth, heads, patch_size, mlp_ratio}}, got {vit!r}")
    return vit


class ViTSettings(Config):
    """The config keys that build BLIP's ViT (flat, as in BLIP's YAML files)."""

    vit: Union[str, ViTArch] = "base"             # 'base' | 'large' | a ViTArch mapping
    image_size: PosInt = 384                      # square input resolution
    vit_grad_ckpt: bool = False                   # gradient checkpointing in the ViT (training only)
    vit_ckpt_layer: NonNegInt = 0                 # checkpoint the last N blocks (0 = all, if enabled)
    vit_drop_path_rate: Optional[Probability] = None  # None -> 0.1 for large, 0.0 otherwise
    vit_init: str = ''                            # local timm/DeiT ViT state dict (e.g. vit_small_patch16_224)
                                                  # to start the ViT from; '' = random (then `pretrained`)

    @field_validator("vit")
    @classmethod
    def _known_preset(cls, vit):
        return known_vit_preset(vit)

    @model_validator(mode="after")
    def _resolve_and_check(self, info: ValidationInfo):
        if self.vit_drop_path_rate is None:
            # Resolved here so checkpoints and the saved config record the rate actually used.
            self.vit_drop_path_rate = DEFAULT_DROP_PATH.get(self.vit, 0.0) if isinstance(self.vit, str) else 0.0
        arch = self.vit_arch
        if self.image_size % arch.patch_size:
            raise ValueError(f"image_size: must be a multiple of patch_size {arch.patch_size}, got {self.image_size}")
        if self.vit_grad_ckpt and "vit_grad_ckpt" not in unused(info) and self.vit_ckpt_layer > arch.depth:
            raise ValueError(f"vit_ckpt_layer: must be in [0, {arch.depth}] (the ViT's depth), "
                             f"got {self.vit_ckpt_layer}")
        return self

    @property
    def vit_arch(self) -> ViTArch:
        return VIT_PRESETS[self.vit] if isinstance(self.vit, str) else self.vit


class BlipViT(VisionTransformer):
    """timm ViT returning all tokens ``[B, 1 + N, D]`` after the final LayerNorm."""

    def __init__(self, image_size: int, arch: ViTArch, drop_path_rate: float = 0.0,
                 ckpt_layer: int = 0):
        super().__init__(
            img_size=image_size, patch_size=arch.patch_size, embed_dim=arch.width,
            depth=arch.depth, num_heads=arch.heads, mlp_ratio=arch.mlp_ratio, qkv_bias=True,
            num_classes=0, global_pool="", class_token=True, drop_path_rate=drop_path_rate,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), act_layer=nn.GELU,
        )
        if image_size % arch.patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch size {arch.patch_size}")
        self.arch = arch
        self.image_size = image_size
        # Checkpoint the last `ckpt_layer` blocks in training: those hold the largest activations
        # that the backward pass needs least often relative to their memory (BLIP's choice).
        self.ckpt_layer = ckpt_layer
        for block in self.blocks:
            block.compile_region = True  # compiled by `compile: true` (utils/compile.py)

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    @property
    def width(self) -> int:
        return self.embed_dim

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch + CLS + position embedding: ``[B, 3, H, W] -> [B, 1 + N, D]``."""
        x = self.patch_embed(pixel_values)
        x = self._pos_embed(x)
        return self.norm_pre(x)

    def embed_visible(self, pixel_values: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        """Embed only the kept patches, each with its own position embedding (MAE-style).

        ``keep_idx`` ``[B, K]`` holds patch indices in ``[0, N)``. Returns ``[B, 1 + K, D]`` with the
        CLS token first, so running the blocks on it equals running the ViT on the kept tokens.
        """
        patches = self.patch_embed(pixel_values)  # [B, N, D]
        pos = self.pos_embed[:, 1:, :].expand(patches.shape[0], -1, -1)
        gather = keep_idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1])
        kept = torch.gather(patches + pos, 1, gather)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(patches.shape[0], -1, -1)
        return self.norm_pre(self.pos_drop(torch.cat([cls, kept], dim=1)))

    def run_blocks(self, x: torch.Tensor, taps: Sequence[int] = ()) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Run the blocks and the final norm. ``taps`` are 1-based block numbers whose raw outputs
        (before the final norm) are returned as well."""
        tapped: List[torch.Tensor] = []
        first_ckpt = len(self.blocks) - self.ckpt_layer
        for i, blk in enumerate(self.blocks):
            if self.training and i >= first_ckpt and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            if i + 1 in taps:
                tapped.append(x)
        return self.norm(x), tapped

    def forward(self, pixel_values: torch.Tensor, keep_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[B, 3, H, W] -> [B, 1 + N, D]`` (or ``[B, 1 + K, D]`` with ``keep_idx``)."""
        x = self.embed(pixel_values) if keep_idx is None else self.embed_visible(pixel_values, keep_idx)
        return self.run_blocks(x)[0]


def build_vit(settings: ViTSettings) -> BlipViT:
    """BLIP's ViT from its config keys (gradient checkpointing of the last ``vit_ckpt_layer`` blocks
    only when ``vit_grad_ckpt`` is on), started from ``vit_init`` when given."""
    arch = settings.vit_arch
    vit = BlipViT(settings.image_size, arch, drop_path_rate=settings.vit_drop_path_rate,
                  ckpt_layer=min(settings.vit_ckpt_layer, arch.depth) if settings.vit_grad_ckpt else 0)
    if settings.vit_init:
        load_timm_vit(vit, settings.vit_init)
    return vit


# Keys of a timm / DeiT classifier that a feature ViT has no use for.
CLASSIFIER_KEYS = ("head.", "head_dist.", "fc_norm.", "pre_logits.")


def load_timm_vit(vit: BlipViT, path) -> None:
    """Start ``vit`` from a timm or DeiT ImageNet checkpoint (a state dict, or ``{'model': ...}`` as
    DeiT's releases; weights_only). Mapped key for key: ``cls_token``, ``pos_embed`` (resized to the
    model's patch grid), ``patch_embed.proj.*``, ``blocks.N.{norm1, attn.qkv, attn.proj, norm2,
    mlp.fc1, mlp.fc2}.*``, ``norm.*`` -> the same names under ``visual_encoder.``; the classifier
    (``head.*``, DeiT's ``head_dist.*``) is dropped. A distilled DeiT's ``dist_token`` has no place in
    BLIP's ViT and is refused; so is any missing or mis-shaped key."""
    state = dict(extract_state_dict(load_checkpoint(str(path))))
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if "dist_token" in state:
        raise CheckpointError(f"vit_init {path}: a distilled DeiT (dist_token); use the plain DeiT or timm ViT weights")
    state = {k: v for k, v in state.items() if not k.startswith(CLASSIFIER_KEYS)}
    if "pos_embed" in state and state["pos_embed"].shape != vit.pos_embed.shape:
        state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], vit.num_patches)
    own = vit.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        raise CheckpointError(f"vit_init {path} does not fit the {vit.arch.width}x{vit.arch.depth} ViT: missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}, mismatched {sorted(mismatched)[:5]}")
    vit.load_state_dict(state, strict=True)
