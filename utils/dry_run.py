"""``--dry_run``: a run's config checked end to end without training, its one output ``dry_run.json``.

The flag every entry script takes (``add_dry_run_arg``) and the flags it cannot be combined with
(``refuse_dry_run_with``); a training run's check (``DryRun.dry_run``, a mixin of
``utils.engine.Trainer``: one eval-mode forward of the first batch, no optimiser step) and an
evaluation-only script's record (``write_dry_run``). Both commit the run
(``utils.rundir.commit_run``) before they write.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
from torch.utils.data import DataLoader

from utils import dist as du
from utils.config import ConfigError
from utils.errors import NonFiniteLossError, UserError
from utils.precision import autocast
from utils.rundir import commit_run

logger = logging.getLogger("utils.engine")  # the Trainer's log lines keep the engine's name


def add_dry_run_arg(parser, help: Optional[str] = None) -> None:
    """``--dry_run``, which every entry script takes (training: ``Trainer.dry_run``; evaluation-only
    scripts: their first batch and :func:`write_dry_run`, described by ``help``)."""
    parser.add_argument("--dry_run", action="store_true",
                        help=help or "check the config: pre-flight, build, load, one eval-mode forward of the first "
                                     "batch (test transform, no optimiser step); writes output_dir/dry_run.json and exits")


def refuse_dry_run_with(args, *flags: str) -> None:
    """``--dry_run`` checks a training run: together with a flag that makes the run something else
    (``--evaluate``, ``--visualize``, ``--export``) it is refused in one line, before ``output_dir``
    is touched."""
    if not getattr(args, "dry_run", False):
        return
    for flag in flags:
        if getattr(args, flag.lstrip("-")):
            raise UserError(f"--dry_run checks a training run (one forward of its first batch); it cannot be "
                            f"combined with {flag}: drop one of the two")


def write_dry_run(output_dir: Path, record: Dict[str, object], log: logging.Logger) -> Dict[str, object]:
    """``--dry_run`` of an evaluation-only entry script (``eval_nocaps.py``, ``eval_retrieval_video.py``),
    once its inputs are checked, its model loaded and its first batch run: the run is committed and
    ``record`` written to ``output_dir/dry_run.json`` (rank 0), its only output. Returns it."""
    commit_run()
    if du.is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "dry_run.json").write_text(json.dumps(record, indent=1) + "\n")
        log.info("dry run: %s", output_dir / "dry_run.json")
    return record


class DryRun:
    """``Trainer.dry_run`` (a mixin of ``utils.engine.Trainer``: it uses the attributes
    ``Trainer.__init__`` sets)."""

    def dry_run(self, loader: DataLoader, loss_fn: Callable, extra: Optional[dict] = None) -> dict:
        """``--dry_run``: one forward of ``loader``'s first batch in eval mode (no dropout), under
        no_grad, with ``ctx["dry_run"] = True`` (a task's loss then uses its config values as they
        are, e.g. ``alpha`` without its ramp); no backward, no optimiser step, no checkpoint. Writes
        ``output_dir/dry_run.json`` (rank 0): every loss term as a float (under torchrun, the mean
        over ranks), their sum, the per-rank batch size and the number of parameters; ``extra``
        joins it. Returns that record."""
        self.model.eval()
        t0 = time.perf_counter()
        try:
            batch = next(iter(loader))
        except StopIteration:
            raise ConfigError("--dry_run: the training data gives no batch (fewer pairs than one batch "
                             "with drop_last?)") from None
        if hasattr(loader, "set_epoch"):
            batch = self._stream_batch(batch, 0, record=False)
        batch = {k: v.to(self.info.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        ctx = {"epoch": 0, "batch_index": 0, "batches_per_epoch": len(loader), "generator": self.generator,
               "dry_run": True}
        with torch.no_grad(), autocast(self.info.device, self.precision):
            losses = loss_fn(self.model, batch, ctx)
        # Every rank's terms are averaged (equal batches per rank: the global batch's mean).
        names = list(losses)
        stacked = torch.stack([losses[k].detach().float().reshape(()) for k in names]) if names else None
        if stacked is not None and self.info.distributed:
            du.all_reduce_sum(stacked)
            stacked = stacked / self.info.world_size
        terms = {k: float(v) for k, v in zip(names, stacked.tolist())} if names else {}
        first = next((v for v in batch.values() if torch.is_tensor(v)), None)
        record = {"losses": terms, "total": sum(terms.values()),
                  "batch_size": int(first.shape[0]) if first is not None else 0,
                  "world_size": self.info.world_size, "precision": self.precision,
                  "parameters": sum(p.numel() for p in self.raw_model.parameters()),
                  "trainable_parameters": sum(p.numel() for p in self.raw_model.parameters() if p.requires_grad),
                  "seconds": round(time.perf_counter() - t0, 3), **(extra or {})}
        record.update(terms)  # each term also at the top level: dry_run.json["loss_ita"]
        bad = [k for k, v in terms.items() if not math.isfinite(v)]
        self.committed = True
        commit_run(output_dir=self.output_dir)  # the checks passed: the dry run's report is its output
        if self.info.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "dry_run.json").write_text(json.dumps(record, indent=1) + "\n")
            logger.info("dry run: %s -> %s", " ".join(f"{k}={v:.6g}" for k, v in terms.items()),
                        self.output_dir / "dry_run.json")
        if bad:
            raise NonFiniteLossError(f"--dry_run: non-finite loss term(s) {', '.join(bad)} on the first batch "
                                     f"(see {self.output_dir / 'dry_run.json'})")
        return record
