"""Mask-rate sweep for ContextBLIP pretraining (``bash run.sh sweep-mask "0.1 0.25 0.5 0.75" [CONFIG]``).

One pretraining per item into ``<out>/<label>/``, launched through ``run.sh pretrain`` (so ``NPROC``
and torchrun apply), then ``summary.csv`` and ``summary.md`` in ``<out>`` with the final epoch's
losses per run. Items: a rate (text-guided masking at that rate), ``random`` (random masking at the
config's rate) or ``random:R``. A ``random`` run at the config's rate is added unless the list names
one. A failed run is reported in the table (status and exit code) and the sweep goes on; the exit
status is 1 if any run failed. Running the same sweep again resumes each run (finished runs are kept).

    python -m tasks.sweep_mask --items "0.25 0.5" --config configs/demo/pretrain.yaml --out outputs/sweep \\
        -- --opts max_epoch=1
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

logger = logging.getLogger("sweep")
REPO = Path(__file__).resolve().parents[1]
COLUMNS = ("run", "mask_strategy", "mask_rate", "status", "exit_code", "epochs", "train_loss_itm",
           "train_loss_tmim", "output_dir")


@dataclass
class SweepRun:
    label: str
    opts: List[str]   # --opts entries of this run
    strategy: str
    rate: str         # as given ('' = the config's)


def parse_items(items: str) -> List[SweepRun]:
    """``"0.1 0.25 random random:0.5"`` -> runs; a ``random`` run is appended if none is named."""
    runs: List[SweepRun] = []
    for item in items.replace(",", " ").split():
        strategy, _, rate = item.partition(":") if item.startswith("random") else ("text", "", item)
        if strategy != "random" and strategy != "text":
            raise ValueError(f"sweep item {item!r}: expected a rate, 'random' or 'random:RATE'")
        if rate:
            try:
                float(rate)
            except ValueError:
                raise ValueError(f"sweep item {item!r}: {rate!r} is not a number") from None
        opts = [f"mask_strategy={strategy}"] + ([f"mask_rate={rate}"] if rate else [])
        label = f"{strategy}_{rate}" if rate else strategy
        runs.append(SweepRun(label, opts, strategy, rate))
    if not runs:
        raise ValueError("no sweep items given")
    if not any(r.strategy == "random" for r in runs):
        runs.append(SweepRun("random", ["mask_strategy=random"], "random", ""))
    return runs


def final_record(output_dir: Path) -> Optional[dict]:
    log = output_dir / "log.txt"
    if not log.is_file():
        return None
    lines = [l for l in log.read_text().splitlines() if l.strip()]
    return json.loads(lines[-1]) if lines else None


def run_one(run: SweepRun, config: str, out: Path, extra: List[str]) -> dict:
    output_dir = out / run.label
    # --opts may be given several times: the run's own overrides come last and win. --resume auto:
    # running the sweep again continues unfinished runs and leaves finished ones as they are.
    cmd = ["bash", str(REPO / "run.sh"), "pretrain", config, "--output_dir", str(output_dir), "--resume", "auto",
           *extra, "--opts", *run.opts]
    logger.info("sweep run %s: %s", run.label, " ".join(cmd))
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "sweep_stdout.txt", "w") as fh:
        code = subprocess.call(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
    record = final_record(output_dir) if code == 0 else None
    status = "ok" if code == 0 and record is not None else "failed"
    if status == "failed":
        logger.error("sweep run %s failed (exit code %d); see %s", run.label, code, output_dir / "sweep_stdout.txt")
    rec = record or {}
    return {"run": run.label, "mask_strategy": run.strategy, "mask_rate": run.rate or "(config)",
            "status": status, "exit_code": code, "epochs": rec.get("epoch", -1) + 1 if rec else 0,
            "train_loss_itm": rec.get("train_loss_itm"), "train_loss_tmim": rec.get("train_loss_tmim"),
            "output_dir": str(output_dir)}


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_summary(rows: List[dict], out: Path) -> Tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "summary.csv", out / "summary.md"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    md_path.write_text("# Mask-rate sweep: final-epoch training losses\n\n" + "\n".join(lines) + "\n")
    return csv_path, md_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", required=True, help='rates and random runs, e.g. "0.1 0.25 0.5 0.75 random"')
    p.add_argument("--config", default="configs/pretrain.yaml")
    p.add_argument("--out", default="outputs/sweep_mask")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: arguments for every pretrain.py run")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    try:
        runs = parse_items(args.items)
    except ValueError as err:
        p.error(str(err))
    out = Path(args.out)
    rows = [run_one(r, args.config, out, extra) for r in runs]
    csv_path, md_path = write_summary(rows, out)
    print(md_path.read_text())
    failed = [r["run"] for r in rows if r["status"] != "ok"]
    print(f"summary: {csv_path} and {md_path}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
