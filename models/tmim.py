"""Text-guided masked image modelling (TMIM), ContextBLIP's second pretraining task (docs/CONTEXTBLIP.md).

- :func:`text_guided_mask` / :func:`random_mask`: which patches to hide. The text-guided mask hides
  the patches one guide token of the caption attends to most in the positive ITM pass.
- :class:`TMIMDecoder`: mask tokens + visible (adapted) tokens + a decoder position embedding,
  transformer layers with cross-attention to the text condition, and a pixel head.
- :func:`patchify` and :func:`tmim_loss`: the targets and the MSE over masked patches only.

Randomness (guide token, noise, random masks) is drawn from an optional ``torch.Generator`` on the
data's device, so a training run can checkpoint and resume it exactly.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.adapter import TextAdapter
from utils.config import ConfigError

GUIDE_MODES = ("words", "any")


class PatchMask(NamedTuple):
    mask: torch.Tensor      # [B, N] bool, True = masked
    keep_idx: torch.Tensor  # [B, N - M] visible patch indices, ascending (spatial order)
    mask_idx: torch.Tensor  # [B, M] masked patch indices, ascending
    guide: torch.Tensor     # [B] guide token position, -1 for a random mask


def num_masked(mask_rate: float, num_patches: int) -> int:
    """``int(mask_rate * num_patches)``, checked to leave at least one patch on each side."""
    m = int(mask_rate * num_patches)
    if not 1 <= m < num_patches:
        raise ConfigError(f"mask_rate {mask_rate} masks {m} of {num_patches} patches; it must mask at "
                         "least one and keep at least one")
    return m


def _rand(shape, generator: Optional[torch.Generator], device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device)


def mask_from_scores(scores: torch.Tensor, m: int, guide: torch.Tensor) -> PatchMask:
    """Mask the ``m`` highest-scoring patches of each row of ``scores`` ``[B, N]``."""
    B, N = scores.shape
    top = scores.topk(m, dim=1).indices
    mask = torch.zeros(B, N, dtype=torch.bool, device=scores.device).scatter_(1, top, True)
    # A stable sort of the 0/1 mask lists unmasked positions first, each group in spatial order.
    order = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices
    return PatchMask(mask, order[:, :N - m], order[:, N - m:], guide)


def word_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` 1/0 padding mask -> ``[B, T]`` bool of real word tokens: not the first token
    ([CLS]/[ENC]), not the final [SEP], not padding."""
    words = attention_mask.bool().clone()
    words[:, 0] = False
    last = attention_mask.long().sum(dim=1) - 1
    words[torch.arange(words.shape[0], device=words.device), last.clamp_min(0)] = False
    return words


def choose_guide_tokens(attention_mask: torch.Tensor, mode: str = "words",
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One guide position per caption ``[B]``.

    ``words`` (ours): uniform over real word tokens; a caption without words falls back to
    position 0. ``any`` (released): uniform over every position, [ENC] and padding included.
    """
    if mode not in GUIDE_MODES:
        raise ValueError(f"guide token mode must be one of {GUIDE_MODES}, got {mode!r}")
    B, T = attention_mask.shape
    if mode == "any":
        weights = torch.ones(B, T, device=attention_mask.device)
    else:
        weights = word_positions(attention_mask).float()
        weights[weights.sum(dim=1) == 0, 0] = 1.0
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def mean_cross_attention(cross_attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-layer probabilities ``[B, H, T, 1 + N]`` -> mean over layers and heads without the CLS
    column, detached: ``[B, T, N]`` (accumulated, so no ``[B, L, H, T, 1 + N]`` stack is built)."""
    total = None
    for probs in cross_attentions:
        layer = probs.detach().float().mean(dim=1)
        total = layer if total is None else total + layer
    return (total / len(cross_attentions))[:, :, 1:]


def text_guided_mask(cross_attentions: Sequence[torch.Tensor], attention_mask: torch.Tensor,
                     mask_rate: float, guide_mode: str = "words", noise: float = 0.02,
                     generator: Optional[torch.Generator] = None) -> PatchMask:
    """Mask the ``int(mask_rate * N)`` patches most attended by one guide token per caption.

    The guide token's attention row (averaged over layers and heads) is L2-normalised, uniform
    noise ``* noise`` breaks ties, and the top entries are masked.
    """
    attn = mean_cross_attention(cross_attentions)
    B, T, N = attn.shape
    guide = choose_guide_tokens(attention_mask, guide_mode, generator)
    row = F.normalize(attn[torch.arange(B, device=attn.device), guide], dim=-1)
    scores = row + noise * _rand(row.shape, generator, row.device)
    return mask_from_scores(scores, num_masked(mask_rate, N), guide)


def random_mask(batch: int, num_patches: int, mask_rate: float, device,
                generator: Optional[torch.Generator] = None) -> PatchMask:
    """The ablation baseline: ``int(mask_rate * N)`` patches chosen uniformly at random."""
    scores = _rand((batch, num_patches), generator, device)
    guide = torch.full((batch,), -1, dtype=torch.long, device=device)
    return mask_from_scores(scores, num_masked(mask_rate, num_patches), guide)


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[B, C, H, W] -> [B, N, p * p * C]``, patches in the ViT's row-major order, each patch's
    values ordered (row, column, channel)."""
    B, C, H, W = pixel_values.shape
    p = patch_size
    x = pixel_values.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify` for a square grid: ``[B, N, p * p * C] -> [B, C, H, W]``."""
    B, N, _ = patches.shape
    g, p = int(round(N ** 0.5)), patch_size
    x = patches.reshape(B, g, g, p, p, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(B, channels, g * p, g * p)


def tmim_targets(pixel_values: torch.Tensor, patch_size: int, norm_pix: bool = False) -> torch.Tensor:
    """Regression targets ``[B, N, p * p * 3]``: the input pixels (already mean/std normalised by
    the transform) per patch, or with ``norm_pix`` each patch normalised to zero mean, unit
    variance (MAE's variant)."""
    target = patchify(pixel_values.float(), patch_size)
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    return target


def tmim_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over masked patches only: ``pred``/``target`` ``[B, N, P]``, ``mask``
    ``[B, N]`` (True = masked). Each masked patch's MSE counts once; visible patches not at all."""
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    weight = mask.float()
    return (per_patch * weight).sum() / weight.sum().clamp_min(1.0)


class DecoderLayer(nn.Module):
    """Pre-norm transformer layer: bidirectional self-attention, cross-attention to the text
    condition (keys/values of the text width), GELU MLP."""

    def __init__(self, width: int, heads: int, text_width: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.cross_attn = nn.MultiheadAttention(width, heads, kdim=text_width, vdim=text_width, batch_first=True)
        self.norm3 = nn.LayerNorm(width, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, cond_padding: Optional[torch.Tensor]) -> torch.Tensor:
        """``x`` ``[B, L, D]``, ``cond`` ``[B, T, Dt]``, ``cond_padding`` ``[B, T]`` bool (True = pad)."""
        h = self.norm1(x)
        x = x + self.self_attn(h, h, h, need_weights=False)[0]
        x = x + self.cross_attn(self.norm2(x), cond, cond, key_padding_mask=cond_padding, need_weights=False)[0]
        return x + self.mlp(self.norm3(x))


class TMIMDecoder(nn.Module):
    """Reconstructs masked patches from the visible adapted tokens and the text condition.

    Input sequence (spatial order, CLS first): the visible tokens at their positions, a learnable
    mask token elsewhere, plus a learnable decoder position embedding ``[1, 1 + N, D]``. The text
    condition is ``h + TextAdapter(h)``. Output: predicted pixels of every patch ``[B, N, p*p*3]``
    (the loss reads the masked ones).
    """

    def __init__(self, width: int, num_patches: int, patch_size: int, text_width: int, depth: int = 4,
                 heads: int = 8, mlp_ratio: float = 4.0, text_adapter_reduction: int = 2, channels: int = 3):
        super().__init__()
        if width % heads:
            raise ConfigError(f"decoder_heads {heads} must divide the decoder width {width}")
        self.num_patches = num_patches
        self.patch_size = patch_size
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, width))
        self.text_adapter = TextAdapter(text_width, text_adapter_reduction)
        self.layers = nn.ModuleList(DecoderLayer(width, heads, text_width, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, patch_size * patch_size * channels)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def assemble(self, visible: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        """``visible`` ``[B, 1 + K, D]`` (CLS first) and ``keep_idx`` ``[B, K]`` -> the full
        sequence ``[B, 1 + N, D]`` with mask tokens at the other positions (no position embedding)."""
        B, _, D = visible.shape
        base = self.mask_token.to(visible.dtype).expand(B, self.num_patches, D)
        patches = base.scatter(1, keep_idx.unsqueeze(-1).expand(-1, -1, D), visible[:, 1:])
        return torch.cat([visible[:, :1], patches], dim=1)

    def forward(self, visible: torch.Tensor, keep_idx: torch.Tensor, text_states: torch.Tensor,
                text_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``visible`` ``[B, 1 + K, D]``, ``keep_idx`` ``[B, K]``, ``text_states`` ``[B, T, Dt]``,
        ``text_mask`` ``[B, T]`` 1/0 -> predicted patches ``[B, N, p * p * 3]``."""
        x = self.assemble(visible, keep_idx) + self.pos_embed
        cond = self.text_adapter(text_states)
        padding = None if text_mask is None else ~text_mask.bool()
        for layer in self.layers:
            x = layer(x, cond, padding)
        return self.head(self.norm(x))[:, 1:]


# ---------------------------------------------------------------------- reference implementation

def embed_visible_per_patch(vit, pixel_values: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """The released per-patch path of the visible-patch embedding, kept as the reference that the
    tests and ``bench/bench_pretrain.py`` compare the batched path (``BlipViT.embed_visible``)
    against; training does not use it.

    Each kept patch is cut out of the image and embedded on its own (one conv call per patch), then
    given its position embedding, as the ContextBLIP release does. ``vit`` is a ``BlipViT``;
    ``pixel_values`` ``[B, 3, H, W]``, ``keep_idx`` ``[B, K]`` patch indices in ``[0, N)`` ->
    ``[B, 1 + K, D]`` (CLS first): the same tokens as ``vit.embed_visible(pixel_values, keep_idx)``.
    """
    p = vit.arch.patch_size
    grid = vit.image_size // p
    cls = vit.cls_token[0] + vit.pos_embed[0, :1]
    rows = []
    for b in range(pixel_values.shape[0]):
        tokens = [cls]
        for n in keep_idx[b].tolist():
            r, c = divmod(n, grid)
            patch = pixel_values[b:b + 1, :, r * p:(r + 1) * p, c * p:(c + 1) * p]
            token = vit.patch_embed.norm(vit.patch_embed.proj(patch).flatten(2).transpose(1, 2))[0]
            tokens.append(token + vit.pos_embed[0, 1 + n:2 + n])
        rows.append(torch.cat(tokens))
    return vit.norm_pre(vit.pos_drop(torch.stack(rows)))
