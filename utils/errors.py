"""The errors a person running us can fix, as opposed to bugs.

Their message is the whole story in one or two lines: what happened, where (the file, entry or key)
and what to do. Entry scripts print just that message and exit with status 1; the traceback goes to
``output_dir/run.log`` (and to the console with ``--debug``), see ``utils.rundir.run_entry``.
Anything else is a bug and keeps its full traceback on the console.
"""
from __future__ import annotations


class UserError(Exception):
    """Base of the errors whose message tells the user what to fix (config, checkpoint, data,
    output directory, a diverged run)."""


class DataError(UserError, ValueError):
    """A data file or image that does not fit its format; the message names the file and entry.
    A ValueError too, so callers that catch ValueError keep working."""


class NonFiniteLossError(UserError, RuntimeError):
    """A training loss (or a ``--dry_run`` loss term) is not finite; the message names where, and
    the last good checkpoint is kept (``utils.engine.Trainer``)."""


# ----------------------------------------------------------------------------- checkpoints

class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be obtained, read or interpreted."""


class CheckpointDownloadError(CheckpointError):
    """A checkpoint URL could not be downloaded."""


class UnsafeCheckpointError(CheckpointError):
    """The pickle needs more than `torch.load(weights_only=True)` allows."""


class CheckpointValueError(CheckpointError, ValueError):
    """A checkpoint location or tensor that cannot be used as given (a ValueError too)."""


class CheckpointMismatchError(CheckpointError):
    """`strict=True` loading found missing, unexpected or shape-mismatched keys."""


def json_error(err: Exception) -> str:
    """A JSON file's parse error as the end of a one-line message: ``malformed JSON: unterminated
    string starting at line 3, column 5`` (``json``'s own ``msg`` of some errors ends in a dangling
    "at"), or ``not UTF-8 text (...)``."""
    if isinstance(err, UnicodeDecodeError):
        return f"not UTF-8 text (byte {err.object[err.start:err.start + 1]!r} at position {err.start})"
    msg = getattr(err, "msg", str(err))
    if msg.endswith(" at"):
        msg = msg[:-3]
    msg = msg[:1].lower() + msg[1:]
    line, col = getattr(err, "lineno", None), getattr(err, "colno", None)
    return f"malformed JSON: {msg}" + (f" at line {line}, column {col}" if line is not None else "")
