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

from dataclasses import dataclass
from functools import partial
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from timm.models.vision_transformer import VisionTransformer


@dataclass(frozen=True)
class ViTArch:
    """Width/depth/heads/patch of a ViT; ``base`` and ``large`` are BLIP's two sizes."""

    width: int
    depth: int
    heads: int
    patch_size: int = 16
    mlp_ratio: float = 4.0


VIT_PRESETS = {
    "base": ViTArch(width=768, depth=12, heads=12, patch_size=16),
    "large": ViTArch(width=1024, depth=24, heads=16, patch_size=16),
}


def resolve_vit_arch(vit) -> Tuple[ViTArch, str]:
    """Turn the config's ``vit`` (``'base'``, ``'large'`` or a mapping/dataclass) into a ViTArch.

    Returns the arch and a name (``'base'``, ``'large'`` or ``'custom'``) used for defaults such as
    drop-path (BLIP always trains ViT-L with drop_path 0.1).
    """
    if isinstance(vit, str):
        if vit not in VIT_PRESETS:
            raise ValueError(f"config key 'vit': unknown preset {vit!r}; use 'base', 'large' or a "
                             "mapping {width, depth, heads, patch_size}")
        return VIT_PRESETS[vit], vit
    fields = vit if isinstance(vit, dict) else vars(vit)
    try:
        arch = ViTArch(**{k: fields[k] for k in ("width", "depth", "heads") },
                       patch_size=fields.get("patch_size", 16), mlp_ratio=fields.get("mlp_ratio", 4.0))
    except KeyError as e:
        raise ValueError(f"config key 'vit': mapping is missing {e.args[0]!r}") from None
    if arch.width % arch.heads:
        raise ValueError(f"config key 'vit': width {arch.width} is not divisible by heads {arch.heads}")
    return arch, "custom"


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


def build_vit(vit, image_size: int, drop_path_rate: Optional[float] = None, grad_ckpt: bool = False,
              ckpt_layer: int = 0) -> BlipViT:
    """Build BLIP's ViT from the config's ``vit`` value."""
    arch, name = resolve_vit_arch(vit)
    if drop_path_rate is None:
        drop_path_rate = 0.1 if name == "large" else 0.0
    if grad_ckpt and not 0 <= ckpt_layer <= arch.depth:
        raise ValueError(f"config key 'vit_ckpt_layer': {ckpt_layer} is outside [0, {arch.depth}]")
    return BlipViT(image_size, arch, drop_path_rate=drop_path_rate, ckpt_layer=ckpt_layer if grad_ckpt else 0)
