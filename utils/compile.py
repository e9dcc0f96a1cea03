"""``compile: true``: regional ``torch.compile`` of a model's repeated blocks (the modules that
mark themselves ``compile_region = True``: every ViT block and every text layer, the momentum
copies included), not of the whole model.

Compiling the blocks in place (``nn.Module.compile``) keeps every state-dict key, so checkpoints,
resume, DDP (which wraps the model afterwards) and the loading policy see the same model. One block
class compiles once and its graph serves every instance (torch passes module parameters as graph
inputs), so compile time is a few graphs, not a whole-model trace. A ViT block starts with static
shapes (the image size is fixed; a second batch size recompiles it once with dynamic shapes). A
text layer, which meets a new caption length in nearly every batch (captions are padded per batch)
and several batch sizes (ITC, ITM with its negatives), marks itself ``compile_dynamic = True`` and
is compiled with dynamic shapes from the start: one graph per mode (training or ``no_grad``, with
or without cross-attention, under autocast or not) instead of a static one first and a dynamic one
after. Gradient checkpointing (``vit_grad_ckpt``) recomputes a compiled block like an eager one.

Past ``torch._dynamo.config.recompile_limit`` graphs of one block (torch's default is 8) dynamo
stops compiling it and runs it eager with one warning: a silently slower run. The text layers of
one retrieval run needed 8 static-then-dynamic graphs (measured), so the limit is raised to
``RECOMPILE_LIMIT`` here.
"""
from __future__ import annotations

import logging

from torch import nn

from utils.config import ConfigError

logger = logging.getLogger(__name__)

RECOMPILE_LIMIT = 32


def compile_regions(model: nn.Module, backend: str = "inductor") -> int:
    """Compile every ``compile_region`` module of ``model`` in place; returns how many."""
    regions = [m for m in model.modules() if getattr(m, "compile_region", False)]
    if not regions:
        raise ConfigError(f"compile: true, but {type(model).__name__} has no block marked for compilation")
    import torch._dynamo
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # its older name
    if getattr(config, name) < RECOMPILE_LIMIT:
        logger.info("compile: torch._dynamo.config.%s %d -> %d (a block past it would run eager)",
                    name, getattr(config, name), RECOMPILE_LIMIT)
        setattr(config, name, RECOMPILE_LIMIT)
    for module in regions:
        module.compile(backend=backend, dynamic=True if getattr(module, "compile_dynamic", False) else None)
    kinds = sorted({type(m).__name__ for m in regions})
    logger.info("compile: %d blocks (%s) compiled with torch.compile (%s); the first steps include the compile "
                "time", len(regions), ", ".join(kinds), backend)
    return len(regions)
