"""Checkpoint files: read one safely, write ours atomically, in either of the two formats we write.

The official BLIP files are `{'model': state_dict, 'optimizer': ..., 'config': ..., 'epoch': ...}`,
read with `torch.load(weights_only=True)` only, after the file's structure is checked: every read
failure is one line naming the file and what happened (not a checkpoint, truncated, unsafe,
permission denied). Ours are written atomically (``utils.atomic``: a failed write says that the
previous file is intact), as a `.pth` or, with ``save_format: safetensors``, as a `.safetensors` file
plus its training state file. Where a checkpoint comes from: ``utils.download``; a run's checkpoint
files by name (the current one, copies, removal): ``utils.checkpoint_files``; mapping a state dict
onto a model with a report: ``utils.state_dict``.
"""
from __future__ import annotations

import glob
import json
import pickle
import secrets
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from utils.atomic import _atomic_write
from utils.download import resolve_checkpoint
from utils.errors import CheckpointError, UnsafeCheckpointError, json_error

_ZIP_MAGIC = b"PK\x03\x04"


# --------------------------------------------------------------------------- reading

def load_checkpoint(source: str | Path, map_location: Any = "cpu", mmap: bool = False,
                    with_state: bool = False, **resolve_kwargs: Any) -> dict:
    """Resolve `source` and `torch.load` it with `weights_only=True` (never anything less safe).

    The file's structure is checked first, so that a file that is no checkpoint at all (text, an
    HTML error page, empty), a truncated one and an unreadable one each fail with one line naming it
    rather than with whatever the unpickler trips over. `mmap=True` maps the tensors of a zip-format
    file instead of reading them (cheap when only the metadata is needed). `resolve_kwargs` go to
    `resolve_checkpoint` (cache_dir, timeout, progress).

    A `.safetensors` checkpoint (`save_format: safetensors`) reads as the same dict: `model` (its
    tensors) and the fields of its metadata block (`format`, `config`, `epoch`, `step`);
    `with_state=True` adds its training state file's entries (optimiser, loop, RNG: for resuming).
    """
    path = resolve_checkpoint(source, **resolve_kwargs)
    if is_safetensors(path):
        return load_safetensors_checkpoint(path, map_location, with_state=with_state)
    try:
        fmt, what = _file_format(path)
    except PermissionError:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: permission denied; make it readable "
                              "or give another path") from None
    if fmt == "other":
        raise CheckpointError(f"{str(path)!r} ({path.stat().st_size} bytes) is not a checkpoint: it is {what}, "
                              "while torch.save writes a zip archive (a pickle before torch 1.6); check the "
                              "path, or if it was downloaded, delete it to fetch it again")
    if fmt == "damaged":
        raise _corrupt(path, what)
    # Other errors than these come from a well-formed file: the cause lies elsewhere (e.g. a CUDA
    # map_location on a machine without CUDA), so they pass unchanged.
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and fmt == "zip")
    except pickle.UnpicklingError:
        if fmt == "legacy":
            raise _unsafe(path, "torch refused this legacy (pre-1.6) file and cannot list the globals "
                                "of that format; it may also be damaged") from None
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise _unsafe(path, f"it needs {', '.join(sorted(unsafe))}") from None
        raise _corrupt(path, "its data.pkl is no pickle that weights-only loading can read") from None
    except EOFError as err:
        raise _corrupt(path, "the pickle ends early") from err


def _file_format(path: Path) -> tuple[str, str]:
    """What the file is, from its bytes: ('zip', ...) (torch.save's format since torch 1.6: an intact
    archive holding a data.pkl), ('legacy', ...) (a bare pickle stream, the older format),
    ('damaged', what) (a zip archive cut short) or ('other', what) (not a checkpoint at all)."""
    try:
        with zipfile.ZipFile(path) as archive:
            has_pickle = any(Path(name).name == "data.pkl" for name in archive.namelist())
        return ("zip", "") if has_pickle else ("other", "a zip archive without data.pkl")
    except zipfile.BadZipFile:
        pass
    with open(path, "rb") as f:
        head = f.read(40)
    if head.startswith(_ZIP_MAGIC):
        return "damaged", "a zip archive cut short or damaged"
    if head.startswith(b"\x80"):  # the PROTO opcode every pickle of protocol 2 or later starts with
        return "legacy", ""
    if not head:
        return "other", "an empty file"
    text = head.decode("utf-8", "ignore")  # "ignore": the 40 bytes may end inside a character
    if not "".join(text.split()).isprintable():
        return "other", f"a binary file starting with {head[:8]!r}"
    first = text.strip().splitlines()[0] if text.strip() else text
    return "other", f"a text file starting with {first!r}"


def _unsafe_globals(path: Path) -> list[str]:
    """The globals in the checkpoint's pickle beyond what `weights_only=True` allows, found by reading
    the opcodes without executing them; empty if the pickle cannot be read that far."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except ValueError:  # pickletools stops at a damaged opcode
        return []


def _unsafe(path: Path, why: str) -> UnsafeCheckpointError:
    # Not chained to torch's error: its message recommends weights_only=False, which we never do.
    return UnsafeCheckpointError(
        f"refusing to load {str(path)!r} for safety: weights-only loading allows tensors and plain "
        f"containers, and unpickling anything else can run arbitrary code ({why}). Re-save it as a "
        "plain state dict from a trusted environment.")


def _corrupt(path: Path, why: str) -> CheckpointError:
    size = path.stat().st_size
    return CheckpointError(f"cannot read checkpoint {str(path)!r} ({size} bytes): it is truncated or "
                           f"damaged ({why}); if it was downloaded, delete it to fetch it again")


# --------------------------------------------------------------------------- writing

def save_checkpoint_atomic(obj: Any, path: str | Path) -> Path:
    """`torch.save(obj)` to `path` atomically: a failure or kill mid-save keeps any old file intact.

    Parent directories are created. A hard kill can leave a `.<name>.<pid>.<rand>.tmp` file next to
    `path`, never a half-written `path`.
    """
    return _atomic_write(Path(path), lambda f: torch.save(obj, f), "checkpoint")


# --------------------------------------------------------------------------- safetensors checkpoints
#
# `save_format: safetensors` writes a run's checkpoint as two files: `<stem>.safetensors` (the model's
# tensors, and a JSON metadata block under META_KEY: format tag, config, epoch, step, save id) and
# `<stem>.<save id>.state.pth` (optimiser, scaler, loop and RNG state: a weights_only torch file).
# The state file is written first under a fresh name; the weights file, renamed into place after it,
# is the commit: a kill at any moment leaves a weights file whose state file exists.

SAFETENSORS_SUFFIX = ".safetensors"
META_KEY = "blip_checkpoint"
_META_FIELDS = ("format", "config", "epoch", "step")


def is_safetensors(path: str | Path) -> bool:
    """A ``.safetensors`` file (by name; a safetensors header otherwise: 8-byte length, then JSON)."""
    path = Path(path)
    if path.suffix == SAFETENSORS_SUFFIX:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < (1 << 28)


def state_file_of(path: Path, save_id: str) -> Path:
    return path.with_name(f"{path.stem}.{save_id}.state.pth")


def safetensors_tensors(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous, and no two entries sharing memory (tied weights are stored twice, as
    safetensors requires; loading ties them again through the model)."""
    out: dict[str, Tensor] = {}
    storages: set[int] = set()
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(f"safetensors checkpoint: state entry {key!r} is a {type(value).__name__}, "
                                  "not a tensor")
        t = value.detach().cpu().contiguous()
        if t.numel():
            if t.untyped_storage().data_ptr() in storages:
                t = t.clone()
            storages.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def save_safetensors_checkpoint(obj: Mapping[str, Any], path: str | Path) -> Path:
    """``obj`` (a checkpoint dict: ``model`` + training state) as ``path`` (.safetensors) and its
    state file, atomically (see above); older state files of the same stem are removed after."""
    from safetensors.torch import save as st_save

    path = Path(path)
    rest = {k: v for k, v in obj.items() if k != "model"}
    meta = {k: rest.pop(k) for k in _META_FIELDS if k in rest}
    meta["save_id"] = secrets.token_hex(6) if rest else None
    state_path = state_file_of(path, meta["save_id"]) if rest else None
    if state_path is not None:
        save_checkpoint_atomic(rest, state_path)
    tensors = safetensors_tensors(obj["model"])
    header = {META_KEY: json.dumps(meta)}
    _atomic_write(path, lambda f: f.write(st_save(tensors, metadata=header)), "checkpoint")
    for old in path.parent.glob(f"{glob.escape(path.stem)}.*.state.pth"):
        if old != state_path:
            old.unlink(missing_ok=True)
    return path


def safetensors_metadata(path: str | Path) -> dict:
    """The metadata block of one of our ``.safetensors`` checkpoints (``{}`` for a plain file)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as err:  # safetensors raises its own SafetensorError for a damaged header
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: not a readable safetensors file ({err})") from None
    if META_KEY not in raw:
        return {}
    try:
        return json.loads(raw[META_KEY])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{str(path)!r}: its metadata block {META_KEY!r} is not JSON ({json_error(err)})") from None


def load_safetensors_checkpoint(path: str | Path, map_location: Any = "cpu", with_state: bool = False,
                                weights: bool = True) -> dict:
    """A ``.safetensors`` checkpoint as the dict ``load_checkpoint`` returns (see there); any plain
    safetensors file of tensors reads as ``{"model": tensors}``. ``weights=False``: metadata only."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = safetensors_metadata(path)
    out: dict = {k: meta[k] for k in _META_FIELDS if k in meta}
    if weights:
        device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
        try:
            out["model"] = load_file(str(path), device=device)
        except Exception as err:
            raise _corrupt(path, f"safetensors: {err}") from None
    if with_state:
        save_id = meta.get("save_id")
        state_path = state_file_of(path, save_id) if save_id else None
        if state_path is None or not state_path.is_file():
            raise CheckpointError(f"{str(path)!r} holds weights only: its training state file "
                                  f"{state_path.name if state_path else '<stem>.<id>.state.pth'} is not next to it, "
                                  "so it can be loaded as `pretrained` but not resumed")
        state = load_checkpoint(state_path, map_location)
        out.update({k: v for k, v in state.items() if k not in out})
    return out
