"""BLIP's retrieval losses, apart from the encoders.

- :func:`itc_momentum_loss`: image-text contrastive loss against momentum keys (batch + queue) with
  soft targets mixing the momentum model's similarities and the idx-positives (docs/BLIP.md).
- :func:`sample_hard_negatives` + :func:`itm_loss`: one hard negative image per text and one hard
  negative text per image, drawn from ``softmax(sim / temp)`` with same-idx entries removed.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def positive_targets(idx: torch.Tensor, idx_all: torch.Tensor) -> torch.Tensor:
    """``idx`` ``[B]``, ``idx_all`` ``[K]`` -> row-normalised positives ``[B, K]`` (same idx = positive)."""
    pos = (idx[:, None] == idx_all[None, :]).float()
    return pos / pos.sum(dim=1, keepdim=True).clamp_min(1.0)


def itc_momentum_loss(image_feat: torch.Tensor, text_feat: torch.Tensor,
                      image_keys: torch.Tensor, text_keys: torch.Tensor,
                      image_feat_m: torch.Tensor, text_feat_m: torch.Tensor,
                      idx: torch.Tensor, idx_keys: torch.Tensor, temp: torch.Tensor,
                      alpha: float) -> torch.Tensor:
    """ITC with momentum distillation.

    ``image_feat``/``text_feat`` ``[B, E]``: online features (normalised).
    ``image_keys``/``text_keys`` ``[K, E]``: momentum features of the batch followed by the queue.
    ``image_feat_m``/``text_feat_m`` ``[B, E]``: momentum features of the batch (the distillation
    teacher's queries). ``idx`` ``[B]``, ``idx_keys`` ``[K]``: contrastive ids of queries and keys.
    Returns the mean of the image->text and text->image cross-entropies.
    """
    with torch.no_grad():
        targets = positive_targets(idx, idx_keys)
        if alpha > 0:
            t_i2t = alpha * F.softmax(image_feat_m @ text_keys.t() / temp, dim=1) + (1 - alpha) * targets
            t_t2i = alpha * F.softmax(text_feat_m @ image_keys.t() / temp, dim=1) + (1 - alpha) * targets
        else:
            t_i2t = t_t2i = targets
    loss_i2t = -(F.log_softmax(image_feat @ text_keys.t() / temp, dim=1) * t_i2t).sum(dim=1).mean()
    loss_t2i = -(F.log_softmax(text_feat @ image_keys.t() / temp, dim=1) * t_t2i).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


def _draw(weights: torch.Tensor, generator: Optional[torch.Generator]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw one column per row of ``weights`` ``[B, N]``. Rows with no valid candidate (all zero:
    a batch of one image, or every sample sharing one idx) cannot have a true negative: they draw
    uniformly and are flagged invalid so the loss ignores them instead of crashing."""
    weights = torch.nan_to_num(weights.float(), nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0)
    valid = weights.sum(dim=1) > 0
    weights = torch.where(valid[:, None], weights, torch.ones_like(weights))
    return torch.multinomial(weights, 1, generator=generator).squeeze(1), valid


@torch.no_grad()
def sample_hard_negatives(image_feat: torch.Tensor, text_feat: torch.Tensor,
                          image_feat_pool: torch.Tensor, text_feat_pool: torch.Tensor,
                          idx: torch.Tensor, idx_pool: torch.Tensor, temp: torch.Tensor,
                          generator: Optional[torch.Generator] = None):
    """Hard negatives for ITM.

    Queries are the local batch (``[B, E]`` features, ``idx`` ``[B]``); candidates are a pool
    (``[P, E]``, ``idx_pool`` ``[P]``) — the local batch, or every rank's with ``negative_all_rank``.
    Returns ``(neg_image [B], neg_text [B], valid_image [B], valid_text [B])``: for each text the
    pool index of a negative image, for each image the pool index of a negative text.
    """
    same = idx[:, None] == idx_pool[None, :]
    w_t2i = F.softmax(text_feat @ image_feat_pool.t() / temp, dim=1).masked_fill(same, 0)
    w_i2t = F.softmax(image_feat @ text_feat_pool.t() / temp, dim=1).masked_fill(same, 0)
    neg_image, valid_image = _draw(w_t2i, generator)
    neg_text, valid_text = _draw(w_i2t, generator)
    return neg_image, neg_text, valid_image, valid_text


def itm_loss(logits: torch.Tensor, valid_neg: torch.Tensor) -> torch.Tensor:
    """``logits`` ``[3B, 2]`` for (positives, text+negative image, image+negative text);
    ``valid_neg`` ``[2B]`` marks negatives that are true negatives. Labels are 1, 0, 0."""
    B = logits.shape[0] // 3
    labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)]).to(logits.device)
    weight = torch.cat([torch.ones(B, dtype=torch.bool, device=logits.device), valid_neg]).float()
    losses = F.cross_entropy(logits.float(), labels, reduction="none")
    # With every negative valid this is exactly BLIP's mean over 3B.
    return (losses * weight).sum() / weight.sum()
