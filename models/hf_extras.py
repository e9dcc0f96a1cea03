"""``blip_extras.safetensors``: what an HF folder holds of a BLIP file beyond transformers' weights.

What HF does not take goes into ``blip_extras.safetensors`` next to the weights (transformers ignores
the file): every tensor of the original file that the folder alone does not give back bit for bit,
and a metadata block (JSON) with the original key order and dtypes, the top-level entries
(``epoch``, ``config``, ``format`` ...) and the queue size. With it, official -> HF -> official is
bit-identical: :func:`make_extras` makes it (``tools convert --to hf``), :func:`read_extras` and
:func:`_apply_extras` give the original file back (``models/hf.py`` ``load_official``). Without it
(a folder from the hub), ``models/hf_keys.py`` ``official_from_hf`` synthesises what BLIP's
``__init__`` would. Top-level entries travel as JSON that decodes back to equal values
(:func:`_encode` / :func:`_decode`: tuples, non-finite floats and non-str keys tagged).
"""
from __future__ import annotations

import json
import logging
import math
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

from models.hf_keys import official_from_hf
from utils.atomic import atomic_write
from utils.checkpoint import safetensors_tensors
from utils.errors import CheckpointError
from utils.state_dict import extract_state_dict

logger = logging.getLogger(__name__)

EXTRAS_FILE = "blip_extras.safetensors"
EXTRAS_META = "blip_extras"          # the metadata field holding the JSON block
EXTRAS_VERSION = 1


# ---------------------------------------------------------------------- HF folder -> official checkpoint

def read_extras(folder: Path) -> Tuple[Dict[str, Tensor], Optional[dict]]:
    path = folder / EXTRAS_FILE
    if not path.is_file():
        return {}, None
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})[EXTRAS_META])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"cannot read {path}: {type(err).__name__}: {err}") from None
    if meta.get("version") != EXTRAS_VERSION:
        raise CheckpointError(f"{path}: extras version {meta.get('version')!r}; this code reads {EXTRAS_VERSION}")
    return tensors, meta


def _apply_extras(state: Mapping[str, Tensor], extras: Mapping[str, Tensor], meta: Mapping, path: Path) -> dict:
    keys: Mapping[str, str] = meta["keys"]
    missing = [k for k in keys if k not in extras and k not in state]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} keys of the original file are neither in the HF "
                              f"weights nor in the extras: {missing[:5]}")
    prefix = meta.get("prefix", "")
    sd = OrderedDict()
    for k, dtype in keys.items():
        t = extras[k] if k in extras else state[k]
        sd[prefix + k] = t if str(t.dtype) == dtype else t.to(_dtype(dtype))
    container = meta.get("container")
    if container is None:
        return sd
    entries = {k: _decode(v) for k, v in meta.get("entries", {}).items()}
    out = {}
    for k in meta.get("top_order", [container, *entries]):
        if k == container:
            out[k] = sd
        elif k in entries:
            out[k] = entries[k]
    return out


# ---------------------------------------------------------------------- official -> HF folder

def make_extras(ckpt: Mapping, hf_state: Mapping[str, Tensor], layout: str,
                name: str) -> Tuple[Dict[str, Tensor], dict]:
    """What the HF weights alone do not give back of ``ckpt``: every tensor that differs from (or
    is absent in) :func:`official_from_hf` of ``hf_state``, and the metadata block."""
    container = _container(ckpt)
    raw = ckpt[container] if container else ckpt
    orig = extract_state_dict(ckpt)
    prefix = "module." if raw and len(orig) == len(raw) and all(k.startswith("module.") for k in raw) else ""
    queue = orig.get("image_queue", orig.get("idx_queue"))
    queue_size = int(queue.shape[-1]) if queue is not None else None
    recon, _ = official_from_hf(hf_state, layout, queue_size=queue_size, copy=False, name=name)
    extras: Dict[str, Tensor] = {}
    for k, v in orig.items():
        r = recon.get(k)
        if r is None or r.shape != v.shape or not torch.equal(r.to(v.dtype), v):
            extras[k] = v
    entries, dropped = {}, []
    for k, v in ckpt.items():
        if k == container:
            continue
        try:
            entries[str(k)] = _encode(v)
        except _NotJSON:
            dropped.append(str(k))
    if dropped:
        logger.warning("%s: top-level entries %s hold tensors or objects and are not carried into the HF "
                       "folder (training state, not weights)", name, dropped)
    meta = {"version": EXTRAS_VERSION, "layout": layout, "container": container, "prefix": prefix,
            "queue_size": queue_size, "source": name,
            "top_order": [str(k) for k in ckpt if str(k) not in dropped] if container else [],
            "entries": entries if container else {}, "keys": {k: str(v.dtype) for k, v in orig.items()},
            "dropped_entries": dropped}
    return extras, meta


def _save_extras(path: Path, extras: Mapping[str, Tensor], meta: dict) -> None:
    from safetensors.torch import save
    # Tensors sharing memory (a pretraining file's tied decoder weights) are stored once per key.
    tensors = safetensors_tensors(extras)
    atomic_write(path, lambda f: f.write(save(tensors, metadata={EXTRAS_META: json.dumps(meta)})))


# ---------------------------------------------------------------------- top-level entries as JSON

class _NotJSON(Exception):
    pass


def _encode(value):
    """Plain Python values as JSON that decodes back to equal values (tuples and non-str keys tagged)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v) for k, v in value.items()}
        return {"__items__": [[_encode(k), _encode(v)] for k, v in value.items()]}
    raise _NotJSON(type(value).__name__)


def _decode(value):
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_decode(v) for v in value["__tuple__"])
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        if set(value) == {"__items__"}:
            return {_decode(k): _decode(v) for k, v in value["__items__"]}
        return {k: _decode(v) for k, v in value.items()}
    return value


def _container(ckpt: Mapping) -> Optional[str]:
    for key in ("model", "state_dict"):
        if isinstance(ckpt.get(key), Mapping):
            return key
    return None


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"unknown dtype {name!r} in {EXTRAS_FILE}")
    return dtype
