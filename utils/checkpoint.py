"""Checkpoint I/O: find a file (local or URL), load it safely, map it onto a model with a report.

The official BLIP files are `{'model': state_dict, 'optimizer': ..., 'config': ..., 'epoch': ...}`.
Unlike the original loader, which silently drops shape-mismatched weights, every missing,
unexpected and mismatched key is reported (`LoadReport`) and `strict=True` turns them into errors.

Every read and write failure is one line naming the file and what happened (not a checkpoint,
truncated, permission denied, disk full); a failed write also says that the previous file is intact,
which the atomic write (temp file, fsync, rename) guarantees.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import json
import http.client
import logging
import math
import os
import pickle
import re
import secrets
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from utils import zoo
from utils.errors import UserError, json_error

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_ZIP_MAGIC = b"PK\x03\x04"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be obtained, read or interpreted."""


class WriteError(UserError, OSError):
    """A file could not be written (disk full, permission denied, ...); the message names it and says
    that the previous file is intact. ``errno`` is the cause's."""


class CheckpointDownloadError(CheckpointError):
    """A checkpoint URL could not be downloaded."""


class UnsafeCheckpointError(CheckpointError):
    """The pickle needs more than `torch.load(weights_only=True)` allows."""


class CheckpointValueError(CheckpointError, ValueError):
    """A checkpoint location or tensor that cannot be used as given (a ValueError too)."""


class CheckpointMismatchError(CheckpointError):
    """`strict=True` loading found missing, unexpected or shape-mismatched keys."""


# --------------------------------------------------------------------------- files and URLs

def default_cache_dir() -> Path:
    """`$CONTEXTBLIP_CACHE`, else `~/.cache/contextblip/checkpoints`."""
    env = os.environ.get("CONTEXTBLIP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "contextblip" / "checkpoints"


def _is_url(source: str | Path) -> bool:
    return isinstance(source, str) and source.lower().startswith(("http://", "https://"))


def _cache_path(url: str, cache_dir: Path) -> Path:
    # The URL hash prefix keeps `.../coco/model.pth` and `.../flickr/model.pth` apart.
    basename = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name or "checkpoint.pth"
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:12]
    return cache_dir / f"{digest}_{basename}"


# What _atomic_write names its temp files: `.<target name>.<pid>.<8 hex digits>.tmp` next to the target.
_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.\d+\.[0-9a-f]{8}\.tmp")

# The OSErrors that mean the file system refused the write (others, e.g. a dropped connection
# while a download is copied, keep their own type and message).
_WRITE_FAILURES = {
    errno.ENOSPC: "disk full (no space left on device)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
    errno.EIO: "input/output error (a failing disk or network file system)",
}


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None], what: str = "file") -> Path:
    """Run `write(f)` on a temp file next to `path`, fsync it, then `os.replace` it onto `path`.

    A failure (or a kill) part-way never leaves a half-written file under `path`, and any previous
    file there stays intact; on an exception the temp file is removed. A refused write (disk full,
    permission denied, ...; also one that `write` only chains, as torch.save does) becomes a
    one-line `WriteError` naming `what` and `path`.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # os.open with 0o666 (not mkstemp's 0o600) so the result gets the usual umask permissions.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:  # KeyboardInterrupt included: never leave the temp file behind
        tmp.unlink(missing_ok=True)
        cause = _os_error(err)
        if cause is None:
            raise
        raise _write_error(path, what, cause) from err
    if os.name == "posix":  # make the rename itself durable across a power loss
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def _os_error(err: BaseException) -> OSError | None:
    """The refused write in `err`'s chain, if any: torch.save reports a failed write as its own
    RuntimeError ('unexpected pos ...') with the OSError only chained."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, WriteError):
            return None  # already one line (a nested atomic write)
        if isinstance(err, OSError) and err.errno in _WRITE_FAILURES:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _write_error(path: Path, what: str, cause: OSError) -> WriteError:
    happened = _WRITE_FAILURES[cause.errno]
    if path.exists():
        kept = (f"the previous {path.name} is intact (it is replaced only by a complete new file: "
                "written to a temporary file, then renamed)")
    else:
        kept = f"no {path.name} was written"
    if cause.errno in (errno.ENOSPC, errno.EDQUOT):
        todo = f"free space in {str(path.parent)!r} and run again"
    elif cause.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        todo = f"make {str(path.parent)!r} writable, or write elsewhere (--output_dir)"
    else:
        todo = "check the disk and run again"
    err = WriteError(f"cannot write {what} {str(path)!r}: {happened}; {kept}; {todo}")
    err.errno = cause.errno
    return err


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temp files that hard-killed atomic writes left directly in `folder` (only names
    `_atomic_write` makes); returns them. Call it only while no other process writes there."""
    folder = Path(folder)
    stale = sorted(p for p in folder.glob(".*.tmp") if _TEMP_NAME.fullmatch(p.name) and p.is_file())
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file atomically through `write(binary_file)`: readers see the old file or the whole
    new one, never a part (used for every output a restarted job trusts, not only checkpoints)."""
    return _atomic_write(Path(path), write)


def _copy_response(response: Any, f: IO[bytes], url: str, progress: bool) -> None:
    total = response.headers.get("Content-Length")
    total = int(total) if total and total.isdigit() else None
    bar = None
    if progress and sys.stderr.isatty():
        try:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=Path(url).name)
        except ImportError:
            pass
    written = 0
    try:
        while chunk := response.read(_CHUNK):
            f.write(chunk)
            written += len(chunk)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    if total is not None and written != total:
        raise CheckpointDownloadError(f"connection closed after {written} of {total} bytes")


def _describe(err: BaseException, timeout: float) -> str:
    if isinstance(err, CheckpointDownloadError):
        return str(err)
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    reason = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(reason, TimeoutError):
        return f"no answer within the {timeout:g} s timeout"
    return f"{type(reason).__name__}: {reason}"


def resolve_checkpoint(source: str | Path, cache_dir: str | Path | None = None,
                       timeout: float = 30.0, progress: bool = True) -> Path:
    """Return a local path for `source`: an existing file, an http(s) URL downloaded once, or an
    official checkpoint's name (`blip/model_base`: `utils.zoo`), which stands for its URL.

    URLs are cached as `<cache_dir>/<sha256(url)[:12]>_<basename>` and reused without network.
    `timeout` (seconds) bounds the connect and every single read, so a dead server never hangs us.
    Raises FileNotFoundError for a missing local path, ZooError for an unknown name (before any
    download) and CheckpointDownloadError (a RuntimeError) naming the URL and the cause for any
    network failure.
    """
    if zoo.is_zoo_name(source):
        source = zoo.zoo_url(source)
    if not _is_url(source):
        if isinstance(source, str) and "://" in source:
            raise CheckpointValueError(f"unsupported checkpoint location {source!r}: give a local path "
                             "or an http(s):// URL")
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {str(path)!r} (local path; URLs must "
                                    "start with http:// or https://)")
        if path.is_dir():
            raise IsADirectoryError(f"checkpoint path {str(path)!r} is a directory, not a file")
        return path

    url = str(source)
    dest = _cache_path(url, Path(cache_dir).expanduser() if cache_dir else default_cache_dir())
    if dest.is_file():
        logger.info("using cached checkpoint %s for %s", dest, url)
        return dest
    logger.info("downloading %s to %s", url, dest)
    # Not torch.hub.download_url_to_file: when a server hangs up early it moves the short file into
    # place as if complete (http.client reports EOF, not IncompleteRead), and it takes no timeout.
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            _atomic_write(dest, lambda f: _copy_response(response, f, url, progress))
    # HTTPError < URLError < OSError, and TimeoutError / ConnectionResetError are OSErrors too;
    # HTTPException covers malformed answers (BadStatusLine, IncompleteRead).
    except (OSError, http.client.HTTPException, CheckpointDownloadError) as err:
        raise CheckpointDownloadError(
            f"could not download checkpoint {url}: {_describe(err, timeout)}. You can download the "
            "file manually and pass its local path instead.") from err
    return dest


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


def save_checkpoint_atomic(obj: Any, path: str | Path) -> Path:
    """`torch.save(obj)` to `path` atomically: a failure or kill mid-save keeps any old file intact.

    Parent directories are created. A hard kill can leave a `.<name>.<pid>.<rand>.tmp` file next to
    `path`, never a half-written `path`.
    """
    return _atomic_write(Path(path), lambda f: torch.save(obj, f), "checkpoint")
