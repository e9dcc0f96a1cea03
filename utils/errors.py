"""The errors a person running us can fix, as opposed to bugs.

Their message is the whole story in one or two lines: what happened, where (the file, entry or key)
and what to do. Entry scripts print just that message and exit with status 1; the traceback goes to
``output_dir/run.log`` (and to the console with ``--debug``), see ``utils.engine.run_entry``.
Anything else is a bug and keeps its full traceback on the console.
"""
from __future__ import annotations


class UserError(Exception):
    """Base of the errors whose message tells the user what to fix (config, checkpoint, data,
    output directory, a diverged run)."""


class DataError(UserError, ValueError):
    """A data file or image that does not fit its format; the message names the file and entry.
    A ValueError too, so callers that catch ValueError keep working."""
