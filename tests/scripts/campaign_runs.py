"""The bad-input campaign's runs (``tests/scripts/bad_inputs.py``): how a case is described, run and
observed. A :class:`Case` ``make(world, tmp)`` returns a :class:`Run` (the argv, the exit status and
first-line message parts it must give, what must not change); :func:`run_inprocess` runs it as
``python target argv`` in this process, :func:`run_subprocess` in a checkout's own interpreter, and
:func:`snapshot`, :func:`changes` and :func:`first_line` observe what came of it.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List

from tests.scripts.forked import run_main

if TYPE_CHECKING:
    from tests.scripts.campaign_world import World

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Run:
    argv: List[str]                 # [script.py | "tools", args...]
    code: int                       # expected exit status
    message: List[str]              # parts of the first line of stderr (code != 0) or of the output
    watch: List[Path] = field(default_factory=list)    # folders/files whose every byte must stay
    absent: List[Path] = field(default_factory=list)   # paths that must not exist afterwards
    shows: List[Path] = field(default_factory=list)    # outputs the table reports (+name/) when created
    env: Dict[str, str] = field(default_factory=dict)


@dataclass
class Case:
    id: str
    title: str
    make: Callable[["World", Path], Run]


def refused(cmd: Callable[["World", Path], List[str]], code: int, message: List[str], out: str = "out"):
    """A case whose command (``cmd(world, its output path)`` -> argv) must fail with ``code`` and
    ``message`` and create nothing at that output path."""
    def make(w: "World", tmp: Path) -> Run:
        return Run(cmd(w, tmp / out), code, message, absent=[tmp / out])
    return make


def snapshot(paths) -> dict:
    """Every file under ``paths`` with its bytes and modification time: equal means nothing was written."""
    out = {}
    for root in paths:
        root = Path(root)
        if not root.exists():
            continue
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = (p.read_bytes(), p.stat().st_mtime_ns)
    return out


def changes(before: dict, after: dict) -> List[str]:
    """What a run wrote: ``+new``, ``~changed``, ``-removed`` file names (relative to their parents)."""
    out = [f"+{Path(p).name}" for p in after if p not in before]
    out += [f"~{Path(p).name}" for p in after if p in before and after[p] != before[p]]
    out += [f"-{Path(p).name}" for p in before if p not in after]
    return out


def run_inprocess(monkeypatch, capsys, target: str, *argv) -> tuple:
    """Run ``target`` (an entry script, or ``tools``) as ``python target argv`` would, in this
    process: ``(exit status, stdout, stderr)`` (``tests.scripts.forked.run_main``; ``sys.argv``
    restored through ``monkeypatch`` too, should the run leave it changed)."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    code = run_main(target, argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def run_subprocess(run: Run, tree: Path, timeout: float = 600) -> tuple:
    script = run.argv[0]
    cmd = [sys.executable, str(tree / script), *run.argv[1:]] if script.endswith(".py") else \
        [sys.executable, "-m", script, *run.argv[1:]]
    env = {**os.environ, "PYTHONPATH": str(tree), "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", **run.env}
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "", "timed out"
    return proc.returncode, proc.stdout, proc.stderr


def first_line(code: int, out: str, err: str) -> str:
    """The line a user reads: the error (the last line of a traceback); for a run that succeeded,
    its first warning, else its last line."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if code != 0 and lines:
        if any(ln.startswith("Traceback") for ln in lines):
            return lines[-1]
        errors = [ln for ln in lines if "error" in ln.lower()]
        return (errors or lines)[0]
    text = [ln for ln in (out + "\n" + err).splitlines() if ln.strip()]
    warned = [ln for ln in text if " WARNING " in ln]
    return (warned or text[-1:] or [""])[0]
