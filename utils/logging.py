"""Logging set-up: rank 0 talks (console + ``run.log``), other ranks only warn; proof of life for
loops that run without a progress bar (:class:`Heartbeat`)."""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Optional

from utils.errors import UserError

# The longest a running loop without a progress bar stays silent, in seconds (tests lower it).
HEARTBEAT_S = 30.0

_debug = False  # --debug: tracebacks of our own errors on the console too (utils.rundir.run_entry)


def set_debug(on: bool) -> None:
    global _debug
    _debug = on


def debug_enabled() -> bool:
    return _debug


_installed: list = []  # the handlers setup_logging added to the root logger


class _Deferred(logging.Handler):
    """Keeps the records of a run that has not committed yet (``utils.rundir``): they go to
    ``run.log`` when it commits, and nowhere when it fails before (its output_dir stays as it was)."""

    def __init__(self):
        super().__init__()
        self.records: list = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def setup_logging(output_dir: Optional[str] = None, rank: int = 0, level: int = logging.INFO,
                  defer: bool = False) -> None:
    """Console (stdout) and, on rank 0, ``output_dir/run.log``. A record logged with
    ``extra={"file_only": True}`` goes to the file only (the traceback behind a one-line error).
    ``defer``: no file yet; the records are kept until :func:`open_log_file` writes them."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(level if rank == 0 else logging.WARNING)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(_formatter(rank))
    console.addFilter(lambda record: not getattr(record, "file_only", False))
    _installed[:] = [console]
    if defer and rank == 0:
        _installed.append(_Deferred())
    for h in _installed:
        root.addHandler(h)
    if output_dir and rank == 0:
        open_log_file(output_dir, rank)


def _formatter(rank: int) -> logging.Formatter:
    return logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")


def open_log_file(output_dir, rank: int = 0) -> None:
    """Append from now on to ``output_dir/run.log``, first with the records kept so far (a
    deferred start). A no-op when a log file is open already."""
    if has_log_file():
        return
    root = logging.getLogger()
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    fh = logging.FileHandler(Path(output_dir) / "run.log")
    fh.setFormatter(_formatter(rank))
    for h in [h for h in _installed if isinstance(h, _Deferred)]:
        for record in h.records:
            fh.handle(record)
        root.removeHandler(h)
        _installed.remove(h)
    _installed.append(fh)
    root.addHandler(fh)
    logging.getLogger(__name__).info("versions: %s", software_versions(), extra={"file_only": True})


def software_versions() -> str:
    """``python 3.11.7, torch 2.x, torchvision ..., timm ..., transformers ...`` (from the installed
    distributions' metadata: nothing is imported), written to every ``run.log`` as it opens."""
    import platform
    from importlib import metadata
    parts = [f"python {platform.python_version()}"]
    for name in ("torch", "torchvision", "timm", "transformers"):
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name} (not installed)")
    return ", ".join(parts)


def reset_logging() -> None:
    """Undo :func:`setup_logging` (closing ``run.log``): the logging of a fresh process, so that a
    second run in the same process never writes into the first one's log."""
    root = logging.getLogger()
    for h in _installed:
        root.removeHandler(h)
        h.close()
    _installed.clear()
    root.setLevel(logging.WARNING)


def has_log_file() -> bool:
    """Whether :func:`setup_logging` has opened a ``run.log`` for the current run."""
    return any(isinstance(h, logging.FileHandler) for h in _installed)


def append_json_line(path, record: dict) -> None:
    """Append one JSON line (BLIP's ``log.txt`` / ``evaluate.txt`` format)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def format_duration(seconds: float) -> str:
    """``42s``, ``3m 05s``, ``1h 02m``; ``unknown`` for infinity (no rate yet)."""
    if seconds == float("inf"):
        return "unknown"
    minutes, s = divmod(int(round(seconds)), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h {m:02d}m" if hours else f"{m}m {s:02d}s" if m else f"{s}s"


class Heartbeat:
    """Time-based progress lines for loops without a progress bar (logs, ``--no_progress``): at most
    one line every ``every`` seconds (default :data:`HEARTBEAT_S`), none before the first interval
    has passed, e.g. ``val ITM rerank: 1200/4480 pairs (26.8%), 85.3 pairs/s, ETA 38s``::

        beat = Heartbeat("val ITM rerank", total=len(pairs), unit="pairs", log=logger)
        for start in range(0, len(pairs), chunk):
            ...
            beat.tick(start + chunk)     # or beat.update(chunk): counts from the last call

    Checking the clock costs nothing on the device, so a loop can tick after every batch.
    """

    def __init__(self, what: str, total: Optional[int] = None, unit: str = "items",
                 log: Optional[logging.Logger] = None, every: Optional[float] = None, initial: int = 0):
        """``initial``: already done when the loop starts (a resumed epoch); the rate counts from there."""
        self.what, self.total, self.unit = what, total, unit
        self.log = log or logging.getLogger(__name__)
        self.every = HEARTBEAT_S if every is None else every
        self.done = self.initial = initial
        self.start = self.last = time.monotonic()

    def due(self) -> bool:
        """Whether a line is due (``every`` seconds since the last one, or since the start)."""
        return time.monotonic() - self.last >= self.every

    def rate(self, done: int) -> float:
        """Items per second since the start."""
        return (done - self.initial) / max(time.monotonic() - self.start, 1e-9)

    def eta(self, done: int, total: Optional[int] = None) -> str:
        """Time left until ``total`` at the rate so far, formatted."""
        total = self.total if total is None else total
        rate = self.rate(done)
        return format_duration((total - done) / rate if rate > 0 and total is not None else float("inf"))

    def logged(self) -> None:
        """Restart the interval: the caller has just logged a line of its own."""
        self.last = time.monotonic()

    def tick(self, done: int, total: Optional[int] = None) -> bool:
        """Record that ``done`` items are finished (of ``total``, if it changed); log a line when one
        is due. Returns whether it logged."""
        self.done = done
        if total is not None:
            self.total = total
        if not self.due():
            return False
        of = f"/{self.total} {self.unit} ({100.0 * done / max(self.total, 1):.1f}%)" if self.total is not None \
            else f" {self.unit}"
        self.log.info("%s: %d%s, %.1f %s/s, ETA %s", self.what, done, of, self.rate(done), self.unit,
                      self.eta(done))
        self.logged()
        return True

    def update(self, n: int = 1) -> bool:
        """:meth:`tick` counting ``n`` more items than the last call."""
        return self.tick(self.done + n)


# ---------------------------------------------------------------------- TensorBoard

def _numeric_leaves(values: dict, prefix: str = ""):
    """``(name, float)`` for every finite number in ``values``, nested dicts joined with ``/``."""
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _numeric_leaves(value, name + "/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            yield name, float(value)


class TensorBoard:
    """``report_to: tensorboard``: the run's scalars and pictures as TensorBoard events in
    ``log_dir`` (the trainer makes one on rank 0 only). ``purge_step``: a resumed run drops the
    events its previous attempt wrote at or after the step it resumes from."""

    def __init__(self, log_dir, purge_step: Optional[int] = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise UserError(f"report_to: tensorboard needs the tensorboard package ({err}); pip install tensorboard, "
                            "or set report_to: none") from None
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def scalars(self, values: dict, step: int, prefix: str) -> None:
        for name, value in _numeric_leaves(values):
            self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def picture(self, tag: str, path, step: int) -> None:
        """A PNG/JPEG we drew (mask overlays, contact sheets) as an image event."""
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"))
        self.writer.add_image(tag, pixels, step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    """``report_to: wandb``: the same scalars and pictures as a Weights & Biases run (rank 0 only),
    as open_clip and HF's Trainer report them: one step axis, ``<prefix>/<name>`` keys, the resolved
    config as the run's config. ``mode`` offline (the default) needs no network: the run is written
    under ``root/wandb/offline-run-*`` for ``wandb sync``; online uploads as it goes. Each attempt
    of a resumed run is its own wandb run in the same group (the output folder's name)."""

    def __init__(self, root, project: str, mode: str, config: dict, group: str):
        try:
            import wandb
        except ImportError as err:
            raise UserError(f"report_to: wandb needs the wandb package ({err}); pip install wandb, "
                            "or drop wandb from report_to") from None
        self.wandb = wandb
        self.run = wandb.init(project=project, dir=str(root), mode=mode, config=config, group=group,
                              job_type="train", reinit="create_new",
                              settings=wandb.Settings(console="off", silent=True))

    def scalars(self, values: dict, step: int, prefix: str) -> None:
        self.run.log({f"{prefix}/{name}": value for name, value in _numeric_leaves(values)}, step=step)

    def picture(self, tag: str, path, step: int) -> None:
        self.run.log({tag: self.wandb.Image(str(path))}, step=step)

    def flush(self) -> None:
        pass  # wandb writes in its own process

    def close(self) -> None:
        self.run.finish()


class Reporters:
    """Every ``report_to`` backend behind the one interface the trainer calls."""

    def __init__(self, backends: list):
        self.backends = backends

    def scalars(self, values: dict, step: int, prefix: str) -> None:
        for b in self.backends:
            b.scalars(values, step, prefix)

    def picture(self, tag: str, path, step: int) -> None:
        for b in self.backends:
            b.picture(tag, path, step)

    def flush(self) -> None:
        for b in self.backends:
            b.flush()

    def close(self) -> None:
        for b in self.backends:
            b.close()
