"""A run's checkpoint files by name in its folder: which one is current (``.pth`` or ``.safetensors``),
its epoch without its weights, the files one checkpoint consists of (a safetensors one has a state
file), kept copies (``checkpoint_epochNNN``: hard links, else copies) and their removal.
"""
from __future__ import annotations

import glob
import os
import secrets
from pathlib import Path
from typing import Any

from utils.checkpoint import SAFETENSORS_SUFFIX, is_safetensors, load_checkpoint, safetensors_metadata, state_file_of


def find_checkpoint(folder: str | Path, stem: str) -> Path:
    """``folder/<stem>.pth`` or ``folder/<stem>.safetensors``, whichever exists (the newer if both:
    a run whose ``save_format`` changed); the ``.pth`` name if neither does."""
    folder = Path(folder)
    found = [p for p in (folder / f"{stem}.pth", folder / f"{stem}{SAFETENSORS_SUFFIX}") if p.is_file()]
    if not found:
        return folder / f"{stem}.pth"
    return max(found, key=lambda p: p.stat().st_mtime_ns)


def checkpoint_epoch(path: str | Path) -> Any:
    """The ``epoch`` entry of a checkpoint without reading its weights (None if it has none)."""
    path = Path(path)
    if is_safetensors(path):
        return safetensors_metadata(path).get("epoch")
    return load_checkpoint(path, mmap=True).get("epoch")


def checkpoint_files(path: str | Path) -> list[Path]:
    """The files of one checkpoint: the file itself and, for a safetensors one, its state file."""
    path = Path(path)
    files = [path]
    if is_safetensors(path) and path.is_file():
        save_id = safetensors_metadata(path).get("save_id")
        if save_id and state_file_of(path, save_id).is_file():
            files.append(state_file_of(path, save_id))
    return files


def link_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Keep a copy of checkpoint ``src`` as ``dst`` (same suffix): hard links where the file system
    has them (no second write; ``src`` being replaced later does not touch ``dst``), else copies;
    a safetensors checkpoint's state file comes along under ``dst``'s stem."""
    import shutil

    src, dst = Path(src), Path(dst)
    targets = [dst]
    files = checkpoint_files(src)
    if len(files) == 2:
        save_id = safetensors_metadata(src)["save_id"]
        targets.append(state_file_of(dst, save_id))
    for a, b in zip(reversed(files), reversed(targets)):  # state file first, weights (the commit) last
        tmp = b.with_name(f".{b.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            os.link(a, tmp)
        except OSError:
            shutil.copyfile(a, tmp)
        os.replace(tmp, b)
    return dst


def remove_checkpoint(path: str | Path) -> None:
    """Delete a checkpoint and, for a safetensors one, every state file of its stem."""
    path = Path(path)
    if is_safetensors(path):
        for state in path.parent.glob(f"{glob.escape(path.stem)}.*.state.pth"):
            state.unlink(missing_ok=True)
    path.unlink(missing_ok=True)


def epoch_checkpoints(output_dir: Path) -> list:
    """The run's ``checkpoint_epochNNN`` files (``save_every``), oldest epoch first."""
    import re
    pattern = re.compile(r"checkpoint_epoch(\d+)\.(pth|safetensors)")
    found = [(int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint_epoch*")
             if (m := pattern.fullmatch(p.name))]
    return [p for _, p in sorted(found)]
