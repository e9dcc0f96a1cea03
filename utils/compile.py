"""``compile: true``: regional ``torch.compile`` of a model's repeated blocks (the modules that
mark themselves ``compile_region = True``: every ViT block and every text layer, the momentum
copies included), not of the whole model.

Compiling the blocks in place (``nn.Module.compile``) keeps every state-dict key, so checkpoints,
resume, DDP (which wraps the model afterwards) and the loading policy see the same model. One block
class compiles once and its graph serves every instance (torch passes module parameters as graph
inputs), so compile time is a few graphs, not a whole-model trace. Shapes start static; a block
that meets a second shape (captions are padded per batch) is recompiled once with dynamic shapes.
Gradient checkpointing (``vit_grad_ckpt``) recomputes a compiled block like an eager one.
"""
from __future__ import annotations

import logging

from torch import nn

from utils.config import ConfigError

logger = logging.getLogger(__name__)


def compile_regions(model: nn.Module, backend: str = "inductor") -> int:
    """Compile every ``compile_region`` module of ``model`` in place; returns how many."""
    regions = [m for m in model.modules() if getattr(m, "compile_region", False)]
    if not regions:
        raise ConfigError(f"compile: true, but {type(model).__name__} has no block marked for compilation")
    for module in regions:
        module.compile(backend=backend)
    kinds = sorted({type(m).__name__ for m in regions})
    logger.info("compile: %d blocks (%s) compiled with torch.compile (%s); the first steps include the compile "
                "time", len(regions), ", ".join(kinds), backend)
    return len(regions)
