"""A BLIP checkpoint's architecture, as ``load_blip`` (``models/inference.py``) resolves it.

The architecture: our own checkpoints (written through ``utils/resume.py``) carry the run's config and
it is used (``vit``, ``image_size``, ``med_config``, ``tokenizer``, ``prompt``, ``embed_dim``). Official
files carry little, so the ViT is read off the state dict's shapes (width, depth, patch size, MLP
ratio; image size from the position-embedding grid unless the file's config or ``image_size=`` says
otherwise; heads: 12 for width 768, 16 for 1024, else width // 64, or ``vit_heads=``), the text side
is ``configs/med_config.json`` (bert-base) and the tokenizer ``bert-base-uncased``. Every setting
can be overridden by keyword (``load_blip``'s arguments); :func:`_arch` validates the values into
the model's architecture group, every problem one line.
"""
from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch
from pydantic import ValidationError

from models.blip import BlipArch
from models.caption import CaptionArch
from models.vit import VIT_PRESETS, ViTArch
from utils.errors import CheckpointError
from utils.config import ConfigError

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MED_CONFIG = "configs/med_config.json"   # bert-base, as BLIP's base and large models use
DEFAULT_TOKENIZER = "bert-base-uncased"
DEFAULT_PROMPT = CaptionArch.model_fields["prompt"].default
HEADS_BY_WIDTH = {768: 12, 1024: 16}             # BLIP's ViT-B/16 and ViT-L/16


def _block_count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"blocks\.(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def vit_from_state_dict(state: Mapping[str, torch.Tensor], heads: Optional[int] = None,
                        prefix: str = "visual_encoder.") -> tuple:
    """``(ViTArch, image_size of the pos_embed grid)`` read off a BLIP state dict's shapes.

    Heads leave no trace in the weights: 12 for width 768, 16 for 1024 (BLIP's two ViTs), otherwise
    ``width // 64`` (with a warning) unless ``heads`` is given."""
    needed = [f"{prefix}cls_token", f"{prefix}pos_embed", f"{prefix}patch_embed.proj.weight",
              f"{prefix}blocks.0.mlp.fc1.weight"]
    absent = [k for k in needed if k not in state]
    if absent:
        raise CheckpointError(f"cannot read the ViT off the checkpoint: it has no {absent[0]} "
                              "(is it a BLIP checkpoint?); pass vit= to say which ViT it holds")
    width = int(state[f"{prefix}cls_token"].shape[-1])
    depth = _block_count(state, prefix)
    patch = int(state[f"{prefix}patch_embed.proj.weight"].shape[-1])
    mlp_ratio = float(state[f"{prefix}blocks.0.mlp.fc1.weight"].shape[0]) / width
    if heads is None:
        heads = HEADS_BY_WIDTH.get(width)
        if heads is None:
            heads = max(1, width // 64)
            logger.warning("ViT width %d is neither BLIP's base (768) nor large (1024): assuming %d attention "
                           "heads (width // 64); pass vit_heads= if it was trained with another count",
                           width, heads)
    try:
        arch = ViTArch(width=width, depth=depth, heads=int(heads), patch_size=patch, mlp_ratio=mlp_ratio)
    except ValidationError as e:
        raise ConfigError(f"ViT read off the checkpoint (width {width}, depth {depth}, patch {patch}) with "
                          f"{heads} heads: {_one_line(e)}") from None
    return arch, grid_image_size(state, patch, prefix)


def grid_image_size(state: Mapping[str, torch.Tensor], patch_size: int, prefix: str = "visual_encoder.") -> int:
    """The image size the checkpoint's position embeddings were trained at (grid x patch size)."""
    key = f"{prefix}pos_embed"
    if key not in state:
        raise CheckpointError(f"the checkpoint has no {key}: pass image_size=")
    tokens = int(state[key].shape[1]) - 1
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise CheckpointError(f"{key} has {tokens} patch positions, not a square grid; pass image_size=")
    return grid * patch_size


def _one_line(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(map(str, err.get("loc", ()))) or "value"
    return f"{where}: {err.get('msg', str(e))}"


def _vit_arch(vit: Any, heads: Optional[int]) -> Union[str, ViTArch]:
    """``vit=`` (a preset name, a mapping or a ViTArch) with ``vit_heads=`` applied."""
    if isinstance(vit, str):
        if vit not in VIT_PRESETS:
            raise ConfigError(f"vit: must be one of {sorted(VIT_PRESETS)} or a mapping "
                              f"{{width, depth, heads, patch_size, mlp_ratio}}, got {vit!r}")
        if heads is None:
            return vit
        vit = VIT_PRESETS[vit]
    try:
        arch = vit if isinstance(vit, ViTArch) else ViTArch.model_validate(dict(vit))
        if heads is not None:
            arch = ViTArch.model_validate({**arch.model_dump(), "heads": heads})
    except (ValidationError, TypeError, ValueError) as e:
        why = _one_line(e) if isinstance(e, ValidationError) else str(e)
        raise ConfigError(f"vit: not a ViT architecture ({why})") from None
    return arch


def _local(value: str, what: str, source: str) -> str:
    """A relative path from a stored config is tried from the working directory, then from the
    repository root (where the runs were started)."""
    if os.path.isabs(value) or os.path.exists(value):
        return value
    if (REPO / value).exists():
        return str(REPO / value)
    if what == "med_config":
        raise ConfigError(f"med_config {value!r} ({source}) does not exist; pass med_config= "
                          "(the BERT json the model was trained with; configs/med_config.json for BLIP's)")
    return value  # a tokenizer hub id, or a folder build_tokenizer reports itself


def _arch_values(ckpt: Mapping, state: Mapping[str, torch.Tensor], *, image_size, vit, vit_heads,
                 med_config, tokenizer, prompt) -> Dict[str, Any]:
    stored = ckpt.get("config") if isinstance(ckpt.get("config"), Mapping) else {}
    # Our checkpoints carry a format tag and the run's whole config; official ones neither (their
    # `config`, when present, holds paths of BLIP's repository: only `prompt` and `image_size` count).
    ours = ckpt.get("format") is not None and "vit" in stored
    origin = "the checkpoint's stored config" if ours else "default for official BLIP files"
    grid_size = None
    if vit is not None:
        arch = _vit_arch(vit, vit_heads)
    elif ours:
        arch = _vit_arch(stored["vit"], vit_heads)
    else:
        arch, grid_size = vit_from_state_dict(state, vit_heads)
    if image_size is None:
        stored_size = stored.get("image_size")
        image_size = stored_size if isinstance(stored_size, int) and not isinstance(stored_size, bool) else grid_size
    if image_size is None:  # vit= given, or our config without image_size: the grid tells
        image_size = grid_image_size(state, (VIT_PRESETS[arch] if isinstance(arch, str) else arch).patch_size)
    if med_config is None:
        med_config = _local(str(stored["med_config"]), "med_config", origin) if ours and stored.get("med_config") \
            else str(REPO / DEFAULT_MED_CONFIG)
    if tokenizer is None:
        tokenizer = _local(str(stored["tokenizer"]), "tokenizer", origin) if ours and stored.get("tokenizer") \
            else DEFAULT_TOKENIZER
    if prompt is None:
        prompt = stored.get("prompt") if isinstance(stored.get("prompt"), str) else DEFAULT_PROMPT
    if ours and isinstance(stored.get("embed_dim"), int):
        embed_dim = stored["embed_dim"]
    elif "vision_proj.weight" in state:
        embed_dim = int(state["vision_proj.weight"].shape[0])
    else:
        embed_dim = BlipArch.model_fields["embed_dim"].default
    return {"vit": arch, "image_size": int(image_size), "med_config": str(med_config),
            "tokenizer": str(tokenizer), "prompt": prompt, "embed_dim": int(embed_dim)}


def _arch(group, values: Mapping[str, Any]):
    keys = {k: v for k, v in values.items() if k in group.model_fields}
    try:
        return group.model_validate(keys)
    except ValidationError as e:
        raise ConfigError(f"load_blip: {_one_line(e)}") from None
