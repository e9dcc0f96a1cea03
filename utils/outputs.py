"""What every tool that writes named files checks first: never over one of its inputs, never over
an existing file unless ``--overwrite`` (the ``output_dir`` tools check theirs through
``utils.rundir.start_run``'s ``outputs``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from utils.errors import UserError


def refuse_existing(paths: Iterable, overwrite: bool, flag: str, inputs: Iterable = ()) -> None:
    """Before any work: the files a command would write must not be one of its ``inputs`` (never),
    nor exist already unless ``overwrite``; else a UserError naming them and ``flag``."""
    paths = [Path(p) for p in paths]
    inputs = [Path(i) for i in inputs]
    for p in paths:
        for src in inputs:
            if p.exists() and src.exists() and os.path.samefile(p, src):
                raise UserError(f"{flag}: it would write {p}, which is the input {src}; write elsewhere")
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise UserError(f"{flag}: {', '.join(existing[:3])}{' ...' if len(existing) > 3 else ''} exist(s) already; "
                        "pass --overwrite to replace, or write elsewhere")
