"""A loaded checkpoint's state dict onto a model, with a report.

Unlike the original BLIP loader, which silently drops shape-mismatched weights, every missing,
unexpected and mismatched key is reported (`LoadReport`) and `strict=True` turns them into errors
(``models/factory.py`` decides what of a report is an error: its loading policy). Also here: finding
the state dict in a checkpoint (`extract_state_dict`) and resizing ViT position embeddings to
another image size (`interpolate_pos_embed`).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from utils.errors import CheckpointError, CheckpointMismatchError, CheckpointValueError

logger = logging.getLogger(__name__)


def extract_state_dict(obj: Mapping[str, Any]) -> dict[str, Tensor]:
    """Find the state dict in a loaded checkpoint and strip a DDP `module.` prefix.

    Accepts `{'model': sd, ...}` (official BLIP and ours), `{'state_dict': sd, ...}` and a raw
    state dict whose values are all tensors.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a checkpoint dict, got {type(obj).__name__}")
    if isinstance(obj.get("model"), Mapping):
        sd = obj["model"]
    elif isinstance(obj.get("state_dict"), Mapping):
        sd = obj["state_dict"]
    elif obj and all(isinstance(v, Tensor) for v in obj.values()):
        sd = obj
    else:
        raise CheckpointError("no state dict found in checkpoint: expected a 'model' or "
                              "'state_dict' entry or a dict of tensors; top-level keys: "
                              f"{sorted(map(str, obj))}")
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"state dict has non-tensor entries: {bad[:10]}")
    # DDP prefixes every key; only strip when all have it, so a submodule named `module` survives.
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def interpolate_pos_embed(pos_embed: Tensor, num_patches: int, num_extra_tokens: int = 1) -> Tensor:
    """Resize ViT position embeddings to a new square patch grid.

    pos_embed [1, extra + g*g, D] -> [1, extra + g'*g', D] with g'*g' = `num_patches`. The extra
    (CLS) rows are kept as they are; the patch rows are treated as a [D, g, g] image and resized
    bicubically (align_corners=False), as the original BLIP loader does.
    """
    old_n = pos_embed.shape[1] - num_extra_tokens
    old_g, new_g = math.isqrt(old_n), math.isqrt(num_patches)
    if old_g * old_g != old_n or new_g * new_g != num_patches:
        raise CheckpointValueError(f"position embedding grids must be square: checkpoint has {old_n} patch "
                         f"positions, model wants {num_patches}")
    if old_n == num_patches:
        return pos_embed
    logger.info("reshape position embedding from %d to %d", old_n, num_patches)
    # antialias=False gives BLIP's plain bicubic; timm's default antialiased kernel differs from it by
    # up to ~0.4 on a 24x24 -> 32x32 resize of unit-variance embeddings.
    return resample_abs_pos_embed(pos_embed, [new_g, new_g], [old_g, old_g],
                                  num_prefix_tokens=num_extra_tokens, antialias=False)


# --------------------------------------------------------------------------- mapping onto a model

def _collapse(keys: list[str], max_items: int) -> list[str]:
    """Up to `max_items` lines: the keys if they fit, else the deepest prefix grouping that fits."""
    if len(keys) <= max_items:
        return list(keys)
    for depth in (3, 2, 1):
        groups: dict[str, int] = {}
        for k in keys:
            parts = k.split(".")
            prefix = ".".join(parts[:depth]) + ".*" if len(parts) > depth else k
            groups[prefix] = groups.get(prefix, 0) + 1
        if len(groups) <= max_items:
            break
    lines = [p if n == 1 else f"{p} ({n} keys)" for p, n in groups.items()]
    if len(lines) > max_items:
        lines = lines[:max_items] + [f"... and {len(lines) - max_items} more groups"]
    return lines


@dataclass
class LoadReport:
    """What happens when a state dict is mapped onto a model (``models/factory.py`` decides what
    of it is an error: its loading policy)."""

    missing: list[str] = field(default_factory=list)      # model keys the checkpoint lacks
    unexpected: list[str] = field(default_factory=list)   # checkpoint keys the model lacks
    # (key, checkpoint shape, model shape); these keys were not loaded
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    expected_extra: list[str] = field(default_factory=list)  # known unused checkpoint keys
    num_loaded: int = 0
    new: list[str] = field(default_factory=list)          # model keys the layout declares new (initialised here)
    fresh: list[str] = field(default_factory=list)        # bookkeeping buffers started afresh (queue labels, pointer)
    loadable: dict = field(default_factory=dict, repr=False, compare=False)  # until applied

    @property
    def is_clean(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, max_items: int = 10) -> str:
        lines = [f"checkpoint load: {self.num_loaded} loaded, {len(self.missing)} missing, "
                 f"{len(self.unexpected)} unexpected, {len(self.mismatched)} shape-mismatched "
                 f"(not loaded), {len(self.expected_extra)} expected extra (unused)"
                 + (f", {len(self.new)} new (initialised here)" if self.new else "")]
        for title, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("new (initialised here)", self.new), ("expected extra", self.expected_extra)):
            if keys:
                lines.append(f"  {title}:")
                lines += [f"    {k}" for k in _collapse(keys, max_items)]
        if self.mismatched:
            lines.append("  shape-mismatched (checkpoint vs model):")
            lines += [f"    {k}: {tuple(a)} vs {tuple(b)}"
                      for k, a, b in self.mismatched[:max_items]]
            if len(self.mismatched) > max_items:
                lines.append(f"    ... and {len(self.mismatched) - max_items} more")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def collapse_keys(keys: list[str], max_items: int = 4) -> str:
    """``a.b.* (12 keys), c`` : a short list of keys for a one-line message."""
    return ", ".join(_collapse(list(keys), max_items))


def load_state_dict_with_report(model: nn.Module, state_dict: Mapping[str, Tensor], *,
                                strict: bool = False,
                                expected_extra_prefixes: tuple[str, ...] = (),
                                expected_extra_keys: tuple[str, ...] = (),
                                ignore_missing_prefixes: tuple[str, ...] = (),
                                new_prefixes: tuple[str, ...] = (),
                                apply: bool = True) -> LoadReport:
    """Map `state_dict` onto `model.state_dict()`: every key whose name and shape match is loadable,
    the rest reported.

    Shape-mismatched keys are not loaded but are reported. Checkpoint keys matching
    `expected_extra_*` (e.g. a pretraining file's `text_decoder.*` when building a retrieval model)
    go to `expected_extra`; model keys under `ignore_missing_prefixes` (bookkeeping started afresh)
    go to `fresh`, those under `new_prefixes` (parts the layout declares new) to `new`, not to
    `missing`. With `strict=True` anything missing, unexpected or mismatched raises
    `CheckpointMismatchError` before the model is touched. `apply=False`: nothing is loaded yet
    (:func:`apply_load` does it, once the caller has judged the report).
    """
    model_sd = model.state_dict()  # parameters and persistent buffers
    report = LoadReport()
    to_load: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key in model_sd:
            if value.shape == model_sd[key].shape:
                to_load[key] = value
            else:
                report.mismatched.append((key, tuple(value.shape), tuple(model_sd[key].shape)))
        elif key in expected_extra_keys or key.startswith(expected_extra_prefixes):
            report.expected_extra.append(key)
        else:
            report.unexpected.append(key)
    for k in model_sd:
        if k in state_dict:
            continue
        if ignore_missing_prefixes and k.startswith(ignore_missing_prefixes):
            report.fresh.append(k)
        elif new_prefixes and k.startswith(new_prefixes):
            report.new.append(k)
        else:
            report.missing.append(k)
    report.num_loaded = len(to_load)
    report.loadable = to_load

    if strict and not report.is_clean:
        raise CheckpointMismatchError(report.summary())
    if apply:
        apply_load(model, report)
    return report


def apply_load(model: nn.Module, report: LoadReport) -> None:
    """Load what :func:`load_state_dict_with_report` found loadable (names and shapes of the model)."""
    model.load_state_dict(report.loadable, strict=False)
    report.loadable = {}
    (logger.info if report.is_clean else logger.warning)("%s", report.summary())
