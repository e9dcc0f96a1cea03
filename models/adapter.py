"""ContextBLIP's adapters (docs/CONTEXTBLIP.md): the trainable parts that sit on a frozen BLIP.

- :class:`MultiScaleAdapter`: intermediate ViT blocks -> a residual on the final image tokens.
- :class:`TextAdapter`: a residual bottleneck on the text condition of the TMIM decoder.

Both are bias-free Linear + ReLU stacks, as released; every width comes from the caller.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class MultiScaleAdapter(nn.Module):
    """Per tap ``Linear(width -> width / r) + ReLU``; concatenate; ``Linear(n * width / r -> width)
    + ReLU``; add to the final tokens. For ViT-B (4 taps, r = 2): 2.36M parameters."""

    def __init__(self, width: int, num_taps: int, reduction: int = 2):
        super().__init__()
        if width % reduction:
            raise ValueError(f"adapter_reduction {reduction} must divide the ViT width {width}")
        hidden = width // reduction
        self.num_taps = num_taps
        self.down = nn.ModuleList(nn.Linear(width, hidden, bias=False) for _ in range(num_taps))
        self.up = nn.Linear(num_taps * hidden, width, bias=False)

    def forward(self, tokens: torch.Tensor, taps: Sequence[torch.Tensor]) -> torch.Tensor:
        """``tokens`` ``[B, L, D]`` (final ViT tokens), ``taps``: ``num_taps`` tensors ``[B, L, D]``
        (tapped block outputs after the ViT's final LayerNorm) -> adapted tokens ``[B, L, D]``."""
        if len(taps) != self.num_taps:
            raise ValueError(f"adapter expects {self.num_taps} taps, got {len(taps)}")
        hidden = torch.cat([F.relu(down(t)) for down, t in zip(self.down, taps)], dim=-1)
        return tokens + F.relu(self.up(hidden))


class TextAdapter(nn.Module):
    """``h + ReLU(Linear(ReLU(Linear(h))))``: width -> width / r -> width, no bias."""

    def __init__(self, width: int, reduction: int = 2):
        super().__init__()
        if width % reduction:
            raise ValueError(f"text_adapter_reduction {reduction} must divide the text width {width}")
        self.down = nn.Linear(width, width // reduction, bias=False)
        self.up = nn.Linear(width // reduction, width, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``[B, T, D] -> [B, T, D]``."""
        return h + F.relu(self.up(F.relu(self.down(h))))
