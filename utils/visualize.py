"""Pictures of what the text-guided mask picks: a PNG grid of images with their caption, the guide
token, and the masked patches overlaid (written by ``pretrain.py`` every epoch and on demand)."""
from __future__ import annotations

import logging
import textwrap
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from data.transforms import IMAGE_MEAN, IMAGE_STD

logger = logging.getLogger(__name__)

MASK_COLOUR = (1.0, 0.1, 0.1)
MASK_ALPHA = 0.55


def denormalize(pixel_values: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` mean/std-normalised -> ``[B, H, W, 3]`` floats in [0, 1]."""
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    x = pixel_values.detach().float().cpu() * std + mean
    return x.clamp(0, 1).permute(0, 2, 3, 1).numpy()


def overlay_mask(image: np.ndarray, mask: np.ndarray, patch_size: int) -> np.ndarray:
    """Tint the masked patches of ``image`` ``[H, W, 3]``; ``mask`` ``[N]`` bool in row-major patch order."""
    out = image.copy()
    grid = image.shape[1] // patch_size
    for n in np.flatnonzero(mask):
        r, c = divmod(int(n), grid)
        tile = out[r * patch_size:(r + 1) * patch_size, c * patch_size:(c + 1) * patch_size]
        tile[:] = (1 - MASK_ALPHA) * tile + MASK_ALPHA * np.array(MASK_COLOUR)
    return out


def caption_with_guide(tokens: Sequence[str], guide: int) -> str:
    """WordPiece tokens of a caption (no special tokens) with the guide token in [brackets]."""
    words = [f"[{t}]" if i == guide else t for i, t in enumerate(tokens)]
    return " ".join(words).replace(" ##", "")


def save_mask_grid(path: str | Path, pixel_values: torch.Tensor, mask: torch.Tensor, patch_size: int,
                   captions: Sequence[str], guides: Sequence[Optional[str]], title: str = "",
                   columns: int = 4) -> Path:
    """Write the grid: per image its caption, the guide token (``None``: random mask), and the
    masked patches tinted red; the original picture on the left of each cell for comparison."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = denormalize(pixel_values)
    masks = mask.detach().cpu().numpy().astype(bool)
    n = len(images)
    cols = min(columns, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(3.0 * cols, 2.0 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        r, c = divmod(i, cols)
        axes[r, 2 * c].imshow(images[i], interpolation="nearest")
        axes[r, 2 * c + 1].imshow(overlay_mask(images[i], masks[i], patch_size), interpolation="nearest")
        guide = "random mask" if guides[i] is None else f"guide: {guides[i]}"
        text = "\n".join(textwrap.wrap(captions[i], 38)[:4])
        axes[r, 2 * c].set_title(text, fontsize=6, loc="left")
        axes[r, 2 * c + 1].set_title(f"{guide}\n{int(masks[i].sum())}/{masks[i].size} masked", fontsize=6)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    logger.info("wrote mask grid %s", path)
    return path
