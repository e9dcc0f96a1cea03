"""Where an HF BLIP source is, and its weights: a local folder (``config.json`` + weights) or a
hub id (``owner/name``) resolved to its snapshot in the local Hugging Face cache, downloaded only
when not cached and ``HF_HUB_OFFLINE`` is unset (every failure one line naming the id and the
cache); then the folder's tensors under HF's names (``model.safetensors``, sharded or not, else
``pytorch_model.bin``). ``models/hf.py`` reads folders through these; ``models/factory.py``
asks :func:`is_hf_source` which sources are folders or hub ids.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, Mapping

from torch import Tensor

from models.hf_extras import EXTRAS_FILE
from utils.checkpoint import load_checkpoint, load_safetensors_checkpoint
from utils.errors import CheckpointError
from utils.state_dict import extract_state_dict

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_CKPT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".tar", ".pkl", ".zip", ".json", ".yaml")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def hub_cache_dir() -> Path:
    """The HF hub cache as huggingface_hub resolves it, read now (tests set it per test)."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    home = os.environ.get("HF_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "huggingface") / "hub"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def is_hf_source(source: Any) -> bool:
    """A local folder with ``config.json``, or a hub id (``owner/name`` that is not a local path
    and does not look like a checkpoint file name)."""
    if isinstance(source, Mapping) or source is None:
        return False
    text = str(source)
    if not text or "://" in text:
        return False
    path = Path(text).expanduser()
    if path.is_dir():
        return (path / "config.json").is_file()
    if path.exists():
        return False
    return bool(_HUB_ID.match(text)) and not text.lower().endswith(_CKPT_SUFFIXES)


def _has_weights(folder: Path) -> bool:
    return any((folder / f).is_file() for f in WEIGHT_FILES)


def resolve_hf_folder(source) -> Path:
    """The local folder of ``source``: itself, or the hub id's snapshot in the local HF cache
    (downloaded only when not cached and ``HF_HUB_OFFLINE`` is unset, with bounded waits)."""
    path = Path(str(source)).expanduser()
    if path.is_dir():
        return path
    repo_id, cache = str(source), hub_cache_dir()
    from huggingface_hub import snapshot_download
    try:
        folder = Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
        if (folder / "config.json").is_file() and _has_weights(folder):
            return folder
    except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError and kin): maybe download
        pass
    where = (f"no local file or folder of that name, and the hub id is not in the local Hugging Face cache "
             f"{cache} (HF_HUB_CACHE / HF_HOME)")
    if _offline():
        raise CheckpointError(f"{repo_id!r}: {where}; HF_HUB_OFFLINE is set, so it is not downloaded. Run "
                              f"`huggingface-cli download {repo_id}` where there is internet and copy the cache, "
                              "or give a local folder")
    logger.info("downloading %s into %s", repo_id, cache)
    try:
        first = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors",
                 EXTRAS_FILE, "*.txt", "tokenizer*", "special_tokens_map.json", "preprocessor_config.json",
                 "processor_config.json"]
        folder = Path(snapshot_download(repo_id, cache_dir=cache, allow_patterns=first, etag_timeout=10))
        if not _has_weights(folder):
            folder = Path(snapshot_download(repo_id, cache_dir=cache, etag_timeout=10,
                                            allow_patterns=["pytorch_model.bin", "pytorch_model*.bin",
                                                            "pytorch_model.bin.index.json"]))
    except Exception as err:  # noqa: BLE001 - network failures come in many types
        line = str(err).splitlines()[0] if str(err) else ""
        raise CheckpointError(f"{repo_id!r}: {where}, and the download failed "
                              f"({type(err).__name__}: {line}); check the id and the network, or give a local "
                              "folder") from None
    return folder


def _load_safetensors(path: Path) -> Dict[str, Tensor]:
    return load_safetensors_checkpoint(path)["model"]


def read_weights(folder: Path, name: str) -> Dict[str, Tensor]:
    """The HF weights of ``folder`` (safetensors, sharded or not; else ``pytorch_model.bin``,
    loaded weights-only)."""
    for index, load in (("model.safetensors.index.json", _load_safetensors),
                        ("pytorch_model.bin.index.json", lambda p: extract_state_dict(load_checkpoint(p)))):
        single = folder / index.replace(".index.json", "")
        if single.is_file():
            return dict(load(single))
        if (folder / index).is_file():
            shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            state: Dict[str, Tensor] = {}
            for shard in shards:
                state.update(load(folder / shard))
            return state
    raise CheckpointError(f"{name}: no model.safetensors or pytorch_model.bin in {folder}")
