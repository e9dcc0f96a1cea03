"""The outputs of ``tools caption`` (``tools/caption.py``): the finished shards merged in image order
(with ``--filter``'s threshold applied here) into ``captions.jsonl``, ``pairs.json`` and the report's
counts, overall and per source, and the report's log lines.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator, List, Optional

import numpy as np

from tools.caption_inputs import Inputs
from tools.common import JsonlShard, ShardPlan, read_jsonl, write_lines_atomic

logger = logging.getLogger("tools.caption")


# ----------------------------------------------------------------------------- merge and report

def merged_records(parts: Path, plan: ShardPlan, inputs: Inputs, threshold: Optional[float]) -> Iterator[dict]:
    """The final ``captions.jsonl`` records, in image order (``threshold`` None: no filter)."""
    missing = [s for s in range(plan.n_shards) if not JsonlShard(parts, s).complete]
    if missing:
        raise RuntimeError(f"cannot merge: shards {missing[:10]} of {plan.n_shards} are not complete in {parts}")
    expected = 0
    for s in range(plan.n_shards):
        for rec in read_jsonl(JsonlShard(parts, s).final):
            i = rec["row"]
            if i != expected or rec["image"] != inputs.path(i):  # the shards must tile the images, in order
                raise RuntimeError(f"shard {s}: found image {i} ({rec['image']}), expected {expected}")
            expected += 1
            out = {"row": i, "image": rec["image"], "source": inputs.source(i), "captions": rec["captions"]}
            if threshold is not None:
                out["itm"] = rec["itm"]
                out["kept"] = [bool(c.strip()) and x > threshold for c, x in zip(rec["captions"], rec["itm"])]
                out["originals"] = [
                    {"caption": inputs.table.caption[r], "source": inputs.table.source[r], "itm": x,
                     "kept": x is not None and x > threshold, "image": inputs.table.image[r]}
                    for r, x in zip(inputs.originals(i), rec["original_itm"])]
            if "error" in rec:
                out["error"] = rec["error"]
            yield out
    if expected != len(inputs):
        raise RuntimeError(f"cannot merge: the shards hold {expected} of {len(inputs)} images")


def _counts(filtering: bool) -> dict:
    if filtering:
        return {"images": 0, "errors": 0, "original": {"kept": 0, "dropped": 0, "not_scored": 0},
                "generated": {"kept": 0, "dropped": 0, "empty": 0}}
    return {"images": 0, "errors": 0, "generated": {"captions": 0, "written": 0, "empty": 0}}


def write_outputs(output_dir: Path, parts: Path, plan: ShardPlan, inputs: Inputs, threshold: Optional[float]) -> dict:
    """``captions.jsonl``, ``pairs.json`` and the report (rank 0)."""
    filtering = threshold is not None
    total, per_source = _counts(filtering), {}
    itm = {"original": [], "generated": []}
    errors: List[str] = []

    def jsonl_lines():
        for rec in merged_records(parts, plan, inputs, threshold):
            for c in (total, per_source.setdefault(rec["source"], _counts(filtering))):
                c["images"] += 1
                c["errors"] += "error" in rec
                g = c["generated"]
                if filtering:
                    for kept, caption in zip(rec["kept"], rec["captions"]):
                        g["kept" if kept else "dropped"] += 1
                        g["empty"] += not caption.strip()
                else:
                    g["captions"] += len(rec["captions"])
                    g["empty"] += sum(not caption.strip() for caption in rec["captions"])
                    g["written"] = g["captions"] - g["empty"]
            if filtering:
                for o in rec["originals"]:
                    for c in (total, per_source.setdefault(o["source"], _counts(filtering))):
                        c["original"]["not_scored" if o["itm"] is None else "kept" if o["kept"] else "dropped"] += 1
                    if o["itm"] is not None:
                        itm["original"].append(o["itm"])
                itm["generated"].extend(rec["itm"])
            if "error" in rec:
                errors.append(rec["error"])
            yield json.dumps(rec, ensure_ascii=False) + "\n"

    write_lines_atomic(output_dir / "captions.jsonl", jsonl_lines())

    def pair_lines():
        first = True
        yield "["
        for rec in merged_records(parts, plan, inputs, threshold):
            pairs = []
            if filtering:
                pairs += [(o["image"], o["caption"]) for o in rec["originals"] if o["kept"]]
                pairs += [(rec["image"], c) for c, kept in zip(rec["captions"], rec["kept"]) if kept]
            else:
                pairs += [(rec["image"], c) for c in rec["captions"] if c.strip()]
            for image, caption in pairs:
                yield ("\n" if first else ",\n") + json.dumps({"image": image, "caption": caption}, ensure_ascii=False)
                first = False
        yield "\n]\n"

    write_lines_atomic(output_dir / "pairs.json", pair_lines())
    report = {"images": total["images"], "errors": total["errors"], "per_source": per_source,
              "first_errors": errors[:20]}
    if filtering:
        o, g = total["original"], total["generated"]
        report.update(threshold=threshold, rule=f"itm > {threshold:g}", original=o, generated=g,
                      kept=o["kept"] + g["kept"], dropped=o["dropped"] + g["dropped"], not_scored=o["not_scored"],
                      mean_itm={k: float(np.mean(v)) if v else None for k, v in itm.items()})
        report["pairs"] = report["kept"]
    else:
        report.update(generated=total["generated"], pairs=total["generated"]["written"])
    return report


def _log_report(report: dict, output_dir: Path) -> None:
    if "threshold" in report:
        o, g = report["original"], report["generated"]
        logger.info("%s: kept %d of %d original captions (%d not scored) and %d of %d generated ones; wrote %s "
                    "(%d pairs)", report["rule"], o["kept"], o["kept"] + o["dropped"], o["not_scored"], g["kept"],
                    g["kept"] + g["dropped"], output_dir / "pairs.json", report["pairs"])
        for source, c in report["per_source"].items():
            logger.info("  %s: %d images (%d not captioned); original kept %d / dropped %d / not scored %d; "
                        "generated kept %d / dropped %d", source, c["images"], c["errors"], c["original"]["kept"],
                        c["original"]["dropped"], c["original"]["not_scored"], c["generated"]["kept"],
                        c["generated"]["dropped"])
    else:
        g = report["generated"]
        logger.info("captioned %d of %d images (%d generated captions, %d empty); wrote %s and %s (%d pairs)",
                    report["images"] - report["errors"], report["images"], g["captions"], g["empty"],
                    output_dir / "captions.jsonl", output_dir / "pairs.json", report["pairs"])
