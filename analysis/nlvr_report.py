"""What an NLVR2 run achieved on dev and test, per sentence template, next to chance and the best text-only baseline.

    python -m analysis.nlvr_report outputs/demo/nlvr --data outputs/demo/data/nlvr

Reads the run's prediction files ``nlvr_result_<split>.json`` (``dev``, or BLIP's split name ``val``,
and ``test``; one entry per pair with ``identifier`` and/or ``index``, ``prediction`` (1 / "True" /
true = the sentence holds), optionally ``label``; nothing is re-predicted), its ``log.txt`` if there
is one (JSON lines), and the NLVR2 annotation files ``annotation/nlvr_{train,dev,test}.json`` of
``--data``. Writes into the run folder ``nlvr_report.json`` and ``nlvr_report.md``: per split (and
per sentence template) the run's accuracy, chance (50%) and the accuracy of the best text-only
predictor, computed here from the annotation files: for each distinct lower-cased sentence the
majority label of its train pairs, the overall train majority for sentences train does not hold.
Beating it means reading the images. The template of a pair is the annotation's ``template`` field
when present (the synthetic benchmark writes it), else recovered from the sentence, else ``other``.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

from data.synthetic.nlvr import template_of, text_only_predictions
from data.utils import read_json
from utils.errors import UserError

SPLITS = ("dev", "test")
RESULT_NAMES = {"dev": ("nlvr_result_dev.json", "nlvr_result_val.json"), "test": ("nlvr_result_test.json",)}
CHANCE = 50.0


def _read_list(path: Path, what: str) -> List[dict]:
    try:
        data = read_json(path)
    except FileNotFoundError as e:
        raise UserError(f"{what} not found: {path}") from e
    except ValueError as e:
        raise UserError(str(e)) from e
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of entries, got {type(data).__name__}")
    for i, e in enumerate(data):
        if not isinstance(e, dict):
            raise UserError(f"{path}: entry {i}: expected an object, got {type(e).__name__}")
    return data


def _truth(value, path: Path, i: int, field: str) -> bool:
    """True/False from "True"/"False", true/false, 1/0 (an int or its string)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "false", "0"):
        return value.strip().lower() in ("true", "1")
    raise UserError(f"{path}: entry {i}: field {field!r}: expected \"True\"/\"False\" or 1/0, got {value!r}")


def _annotation_dir(data: Path) -> Path:
    for folder in (data / "annotation", data / "nlvr" / "annotation"):
        if folder.is_dir():
            return folder
    raise UserError(f"no NLVR2 annotation folder under {data} (expected {data / 'annotation'}/nlvr_*.json)")


def _annotations(folder: Path, split: str) -> List[dict]:
    path = folder / f"nlvr_{split}.json"
    entries = _read_list(path, f"NLVR2 {split} annotation file")
    for i, e in enumerate(entries):
        for field in ("sentence", "label"):
            if field not in e:
                raise UserError(f"{path}: entry {i}: missing field {field!r}")
        if not isinstance(e["sentence"], str):
            raise UserError(f"{path}: entry {i}: field 'sentence': expected a string, got {e['sentence']!r}")
        e["label"] = "True" if _truth(e["label"], path, i, "label") else "False"
    return entries


def _template(entry: dict) -> str:
    return entry.get("template") or template_of(entry["sentence"]) or "other"


def _match(preds: List[dict], path: Path, annotations: List[dict], ann_path: Path) -> List[tuple]:
    """(annotation entry, predicted truth) per prediction, joined on identifier (else index)."""
    by_id = {e["identifier"]: i for i, e in enumerate(annotations) if "identifier" in e}
    seen, out = set(), []
    for i, p in enumerate(preds):
        if "prediction" not in p:
            raise UserError(f"{path}: entry {i}: missing field 'prediction'")
        if p.get("identifier") is not None and by_id:
            if p["identifier"] not in by_id:
                raise UserError(f"{path}: entry {i}: field 'identifier': {p['identifier']!r} is not in {ann_path}")
            k = by_id[p["identifier"]]
        elif isinstance(p.get("index"), int) and not isinstance(p["index"], bool):
            k = p["index"]
            if not 0 <= k < len(annotations):
                raise UserError(f"{path}: entry {i}: field 'index': {k} is outside {ann_path} "
                                f"({len(annotations)} entries)")
        else:
            raise UserError(f"{path}: entry {i}: needs an 'identifier' of {ann_path} or an integer 'index'")
        if k in seen:
            raise UserError(f"{path}: entry {i}: pair {k} of {ann_path} is predicted twice")
        seen.add(k)
        ann = annotations[k]
        if "label" in p and p["label"] is not None and _truth(p["label"], path, i, "label") != (ann["label"] == "True"):
            raise UserError(f"{path}: entry {i}: field 'label': {p['label']!r} differs from {ann_path} entry {k} "
                            f"({ann['label']!r}): the predictions are not of this data")
        out.append((ann, _truth(p["prediction"], path, i, "prediction")))
    return out


def _accuracy(hits: List[bool]) -> float:
    return 100.0 * sum(hits) / len(hits)


def _split_report(matched: List[tuple], train: List[dict]) -> dict:
    entries = [ann for ann, _ in matched]
    text_only = text_only_predictions(train, entries)
    ours_hit = [pred == (ann["label"] == "True") for ann, pred in matched]
    text_hit = [t == ann["label"] for t, ann in zip(text_only, entries)]
    groups: Dict[str, List[int]] = defaultdict(list)
    for i, ann in enumerate(entries):
        groups[_template(ann)].append(i)
    per_template = {
        name: {"pairs": len(idx), "accuracy": _accuracy([ours_hit[i] for i in idx]),
               "text_only": _accuracy([text_hit[i] for i in idx]),
               "true_share": _accuracy([entries[i]["label"] == "True" for i in idx])}
        for name, idx in sorted(groups.items())
    }
    return {"pairs": len(entries), "accuracy": _accuracy(ours_hit), "chance": CHANCE,
            "text_only": _accuracy(text_hit), "true_share": _accuracy([e["label"] == "True" for e in entries]),
            "per_template": per_template}


def _log_summary(path: Path) -> Optional[dict]:
    """The last JSON line of log.txt with its numbers (accuracies, epoch), or None without one."""
    if not path.is_file():
        return None
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    if not records:
        return {"records": 0, "last": {}}
    last = {k: v for k, v in records[-1].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {"records": len(records), "last": last}


def _markdown(out: dict) -> str:
    splits = list(out["splits"])
    lines = ["# NLVR2 accuracy (%) against chance and the best text-only baseline", "",
             "| split | pairs | ours | chance | text-only | ours - text-only |", "|---|---|---|---|---|---|"]
    for s in splits:
        r = out["splits"][s]
        lines.append(f"| {s} | {r['pairs']} | **{r['accuracy']:.1f}** | {r['chance']:.0f} | {r['text_only']:.1f} "
                     f"| {r['accuracy'] - r['text_only']:+.1f} |")
    templates = sorted({t for s in splits for t in out["splits"][s]["per_template"]})
    head = "| template | " + " | ".join(f"{s} pairs | {s} ours | {s} text-only" for s in splits) + " |"
    lines += ["", "Per sentence template:", "", head, "|---|" + "---|" * (3 * len(splits))]
    for t in templates:
        cells = []
        for s in splits:
            r = out["splits"][s]["per_template"].get(t)
            cells += [str(r["pairs"]), f"{r['accuracy']:.1f}", f"{r['text_only']:.1f}"] if r else ["0", "-", "-"]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    if out["log"]:
        last = ", ".join(f"{k} {v:g}" for k, v in out["log"]["last"].items())
        lines += ["", f"log.txt: {out['log']['records']} records; last: {last or '(no numbers)'}"]
    if out["missing_splits"]:
        lines += ["", "No prediction file for: " + ", ".join(out["missing_splits"])]
    return "\n".join(lines) + "\n"


def report(run_dir: Path, data: Path) -> dict:
    run_dir, data = Path(run_dir), Path(data)
    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}")
    ann_dir = _annotation_dir(data)
    train = _annotations(ann_dir, "train")
    splits, missing = {}, []
    for split in SPLITS:
        path = next((run_dir / n for n in RESULT_NAMES[split] if (run_dir / n).is_file()), None)
        if path is None:
            missing.append(split)
            continue
        annotations = _annotations(ann_dir, split)
        preds = _read_list(path, f"{split} prediction file")
        if not preds:
            raise UserError(f"{path}: no predictions")
        splits[split] = _split_report(_match(preds, path, annotations, ann_dir / f"nlvr_{split}.json"), train)
        splits[split]["result_file"] = path.name
        splits[split]["unpredicted"] = len(annotations) - splits[split]["pairs"]
    if not splits:
        names = ", ".join(n for s in SPLITS for n in RESULT_NAMES[s])
        raise UserError(f"{run_dir}: no NLVR2 prediction file ({names})")
    out = {"splits": splits, "missing_splits": missing, "train_pairs": len(train), "log": _log_summary(run_dir / "log.txt")}
    (run_dir / "nlvr_report.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    (run_dir / "nlvr_report.md").write_text(_markdown(out), encoding="utf-8")
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path, help="a train_nlvr.py output folder")
    p.add_argument("--data", type=Path, required=True,
                   help="the NLVR2 folder holding annotation/nlvr_{train,dev,test}.json (or the synthetic benchmark's root)")
    args = p.parse_args(argv)
    try:
        out = report(args.run_dir, args.data)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    print((args.run_dir / "nlvr_report.md").read_text(encoding="utf-8"))
    return out


if __name__ == "__main__":
    main()
