"""Logging set-up: rank 0 talks (console + ``run.log``), other ranks only warn."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional


def setup_logging(output_dir: Optional[str] = None, rank: int = 0, level: int = logging.INFO) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(level if rank == 0 else logging.WARNING)
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    root.addHandler(console)
    if output_dir and rank == 0:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(Path(output_dir) / "run.log")
        fh.setFormatter(fmt)
        root.addHandler(fh)


def append_json_line(path, record: dict) -> None:
    """Append one JSON line (BLIP's ``log.txt`` / ``evaluate.txt`` format)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
