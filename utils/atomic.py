"""Atomic file writes: readers see the old file or the whole new one, never a part.

A file is written to a temp file next to its target (``.<name>.<pid>.<8 hex>.tmp``), fsynced and
renamed onto the target, whose folder is fsynced too. A write the file system refuses (disk full,
permission denied, ...) is one line naming the file and saying that the previous file is intact
(``WriteError``); a hard kill can leave only a temp file, which ``remove_stale_temp_files`` clears.
Used for checkpoints and for every output a restarted job trusts (``config.yaml``, tool outputs).
"""
from __future__ import annotations

import errno
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO

from utils.errors import UserError


class WriteError(UserError, OSError):
    """A file could not be written (disk full, permission denied, ...); the message names it and says
    that the previous file is intact. ``errno`` is the cause's."""


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
