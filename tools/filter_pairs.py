"""Write new annotation files keeping the pairs above a score threshold, or the top fraction.

    python -m tools filter --input data/cc3m.json --scores outputs/score_cc3m/scores.jsonl \\
        --key itm --threshold 0.5 --out_dir data/cc3m_clean
    python -m tools filter --input a.json b.csv --scores scores.jsonl --key itc --top_fraction 0.8 --out_dir out

``--input`` (and ``--format``/``--image_col``/``--caption_col``/``--source_key``) must be what
``tools score`` was given: the scores are matched to pairs by row, and every row's image and
caption are checked. Each input is written to ``out_dir`` under its own name and in its own format
(a json entry with a caption list keeps its kept captions). A pair kept: score >= threshold, or
among the ceil(fraction x scored pairs) highest (ties: the earlier row). Pairs that could not be
scored (missing image) are dropped. Prints, and writes to ``filter_report.json``, how many pairs were
kept and dropped per source. Keeping under ``WARN_BELOW`` (5%) or over ``WARN_ABOVE`` (99.5%) of the
pairs is warned about (a threshold on the wrong scale or key); keeping none writes nothing unless
``--allow_empty``. Reading the scores logs progress at least every 30 s.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
from pathlib import Path

import numpy as np

from data.pairs import PairTable, filtered_names, write_filtered
from tools.common import add_pair_args, read_jsonl, read_pair_args
from utils.outputs import refuse_existing
from utils.logging import Heartbeat

logger = logging.getLogger("tools.filter")

# A rule that keeps almost nothing or almost everything is more likely a mistake (itc vs itm scale,
# a percentage given as a fraction) than an intent: say so.
WARN_BELOW, WARN_ABOVE = 0.05, 0.995


def read_scores(path: Path, key: str, table: PairTable) -> np.ndarray:
    """Scores ``[n_pairs]`` (NaN where not scored) from a ``tools score`` output, checked against ``table``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scores file not found: {path}")
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            records = list(csv.DictReader(f))
    else:
        records = list(read_jsonl(path))
    if len(records) != len(table):
        raise ValueError(f"{path} has {len(records)} scored pairs but the inputs have {len(table)}: give "
                         "the same --input files (and options) as to `tools score`")
    values = np.full(len(table), np.nan)
    progress = Heartbeat(f"reading {path.name}", len(records), "records", logger)
    for line, rec in enumerate(records):
        progress.update()
        r = int(rec["row"])
        if r != line or rec["image"] != table.image[r] or rec["caption"] != table.caption[r]:
            raise ValueError(f"{path}, record {line}: row {r} is ({rec['image']!r}, {rec['caption']!r}) but "
                             f"pair {line} of the inputs ({table.where(line)}) is ({table.image[line]!r}, "
                             f"{table.caption[line]!r}): the scores belong to other inputs")
        if key not in rec:
            raise ValueError(f"{path}: no {key!r} scores (fields: {sorted(rec)}); choose --key")
        if rec[key] not in (None, ""):
            values[r] = float(rec[key])
    return values


def keep_mask(values: np.ndarray, threshold: float | None = None, top_fraction: float | None = None) -> np.ndarray:
    """Which pairs to keep: ``values >= threshold``, or the top ``top_fraction`` of the scored ones."""
    scored = np.isfinite(values)
    if threshold is not None:
        return scored & (values >= threshold)
    if not 0.0 <= top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in [0, 1], got {top_fraction}")
    n_keep = math.ceil(top_fraction * int(scored.sum()))
    order = np.argsort(-np.where(scored, values, -np.inf), kind="stable")  # highest first, ties: earlier row
    keep = np.zeros(len(values), dtype=bool)
    keep[order[:n_keep]] = True
    return keep


def per_source_counts(table: PairTable, keep: np.ndarray, values: np.ndarray) -> dict:
    counts: dict = {}
    for r, src in enumerate(table.source):
        c = counts.setdefault(src, {"pairs": 0, "kept": 0, "dropped": 0, "not_scored": 0})
        c["pairs"] += 1
        c["kept" if keep[r] else "dropped"] += 1
        c["not_scored"] += int(not np.isfinite(values[r]))
    return counts


def _args(argv, prog):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    add_pair_args(p)
    p.add_argument("--scores", required=True, help="scores.jsonl or scores.csv written by `tools score`")
    p.add_argument("--key", default="itm", help="score to filter on: itm or itc")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--threshold", type=float, help="keep pairs whose score is >= this")
    how.add_argument("--top_fraction", type=float, help="keep this fraction of the scored pairs, highest first")
    p.add_argument("--out_dir", required=True, help="folder for the filtered annotation files")
    p.add_argument("--allow_empty", action="store_true",
                   help="write the files even when the rule keeps no pair (otherwise an error)")
    p.add_argument("--overwrite", action="store_true", help="replace files of a previous run in --out_dir")
    return p.parse_args(argv)


def main(argv=None, prog: str = "python -m tools filter") -> dict:
    args = _args(argv, prog)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    table = read_pair_args(args)
    refuse_existing([Path(args.out_dir, n) for n in filtered_names(table)] + [Path(args.out_dir, "filter_report.json")],
                    args.overwrite, "--out_dir", inputs=table.files)
    try:
        values = read_scores(Path(args.scores), args.key, table)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    keep = keep_mask(values, args.threshold, args.top_fraction)
    rule = (f"{args.key} >= {args.threshold}" if args.threshold is not None
            else f"top {args.top_fraction:g} by {args.key}")
    kept = int(keep.sum())
    if kept == 0 and not args.allow_empty:
        scored = values[np.isfinite(values)]
        span = f", {args.key} from {scored.min():.4g} to {scored.max():.4g}" if scored.size else ""
        raise SystemExit(f"error: the rule {rule} keeps none of the {len(table)} pairs ({scored.size} scored{span}); "
                         "nothing written. Pass --allow_empty to write empty files")
    if not WARN_BELOW <= kept / len(table) <= WARN_ABOVE:
        logger.warning("the rule %s keeps %d of %d pairs (%.1f%%): check the --key and the threshold", rule, kept,
                       len(table), 100.0 * kept / len(table))
    written = write_filtered(table, keep, args.out_dir)
    counts = per_source_counts(table, keep, values)
    report = {"rule": rule, "pairs": len(table), "kept": int(keep.sum()), "dropped": int((~keep).sum()),
              "per_source": counts, "written": [str(w) for w in written]}
    Path(args.out_dir, "filter_report.json").write_text(json.dumps(report, indent=1))
    width = max([len("source")] + [len(s) for s in counts])
    print(f"filter: keep {rule}")
    print(f"{'source':<{width}}  {'pairs':>9} {'kept':>9} {'dropped':>9} {'not scored':>11}")
    for src, c in counts.items():
        print(f"{src:<{width}}  {c['pairs']:>9} {c['kept']:>9} {c['dropped']:>9} {c['not_scored']:>11}")
    print(f"{'total':<{width}}  {len(table):>9} {report['kept']:>9} {report['dropped']:>9}")
    print("wrote " + ", ".join(report["written"]))
    return report


if __name__ == "__main__":
    main()
