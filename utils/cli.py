"""The command line the fine-tuning entry scripts share: their flags (``add_train_eval_args``:
``--dry_run``, ``--evaluate``, ``--eval_splits``, ``--resume``, ``--no_progress``), the splits each mode
reads (``run_splits``), ``--evaluate`` once the model is loaded (``evaluate_splits``: ``evaluate.txt``)
and the config keys a run that does not train leaves unused (``NOT_TRAINING``,
``unused_when_evaluating``). ``--dry_run`` itself: ``utils/dry_run.py``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Dict

from utils import dist as du
from utils.config import ConfigError
from utils.dry_run import add_dry_run_arg
from utils.errors import UserError
from utils.logging import append_json_line
from utils.rundir import commit_run


def add_train_eval_args(parser) -> None:
    """The flags every fine-tuning entry script with an evaluation mode takes (BLIP's CLI)."""
    add_dry_run_arg(parser)
    parser.add_argument("--evaluate", action="store_true", help="only evaluate (no training)")
    parser.add_argument("--eval_splits", default=None,
                        help="comma-separated splits to evaluate with --evaluate (default: val,test "
                             "when a val file is configured, else test)")
    parser.add_argument("--resume", default=None, help="'auto' (checkpoint_last.pth in output_dir) or a path")
    parser.add_argument("--no_progress", action="store_true", help="disable progress bars")


# Config keys a run that does not train leaves unused (not cross-checked: an evaluation of a
# training run's config.yaml never fails on them).
NOT_TRAINING = ("vit_grad_ckpt", "max_epoch")


def evaluate_splits(datasets: Dict[str, object], evaluate: Callable[[str, object], Dict[str, float]], output_dir: Path,
                    log: logging.Logger) -> Dict[str, float]:
    """An entry script's ``--evaluate``, once its inputs are checked and its model loaded: the run
    is committed, ``evaluate(split, dataset) -> {<split>_<metric>: value}`` runs for every split
    (logged), and the metrics of all splits go to ``evaluate.txt`` as one JSON line (rank 0; none
    when no split produced a metric). Returns them."""
    commit_run()  # checked and loaded: the run's files are written from here on
    record: Dict[str, float] = {}
    for split, dataset in datasets.items():
        metrics = evaluate(split, dataset)
        record.update(metrics)
        log.info("%s: %s", split, {k: round(v, 2) if isinstance(v, float) else v for k, v in metrics.items()})
    if du.is_main_process() and record:
        append_json_line(Path(output_dir) / "evaluate.txt", record)
    return record


def unused_when_evaluating(args) -> tuple:
    """Config keys an ``--evaluate`` run does not use (not cross-checked)."""
    return NOT_TRAINING if args.evaluate else ()


def run_splits(args, configured: tuple) -> tuple:
    """The splits a run reads: ``train`` + the ``configured`` eval splits, with ``--dry_run`` only
    ``train``, or with ``--evaluate`` those of ``--eval_splits`` (val/test) or else the configured
    ones (at least one)."""
    if getattr(args, "dry_run", False):
        return ("train",)
    if not args.evaluate:
        return ("train",) + tuple(configured)
    if args.eval_splits:
        splits = tuple(s.strip() for s in args.eval_splits.split(",") if s.strip())
        if not splits or not set(splits) <= {"val", "test"}:
            raise ConfigError(f"--eval_splits {args.eval_splits!r}: only val and test can be evaluated")
        missing = [s for s in splits if s not in configured]
        if missing:
            raise UserError(f"--eval_splits {args.eval_splits!r}: the config has no {' or '.join(missing)} split "
                            f"(set {missing[0]}_file, or evaluate {', '.join(configured) or 'nothing'})")
        return splits
    if not configured:
        raise ConfigError("--evaluate needs a val_file or a test_file (dataset: custom)")
    return tuple(configured)
