"""What a VQA run achieved per question type, next to the best constant answer per type.

    python -m analysis.vqa_report outputs/demo/vqa --train_file TRAIN.json --test_file TEST.json

Reads the run's ``vqa_result.json`` (nothing is re-answered) and the test file's annotator answers,
and writes into the run folder ``vqa_report.json`` and ``vqa_report.md``: per question type (and
overall) the run's VQA accuracy and that of the best *constant* answer of the type — of the
answers the training questions of that type were given, the one that, answered to every training
question of the type, scores the highest VQA accuracy (chosen on train, scored on test: a model
that only learnt each type's prior reaches it, so beating it means reading the image).
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

from data.utils import read_json
from tasks.vqa_metrics import question_accuracy, vqa_accuracy


def _by_type(entries: List[dict]) -> Dict[str, List[dict]]:
    groups: Dict[str, List[dict]] = defaultdict(list)
    for e in entries:
        groups[e.get("question_type") or e.get("answer_type") or "all"].append(e)
    return dict(groups)


def best_constants(train: List[dict]) -> Dict[str, str]:
    """Per question type, the answer that scores the highest mean VQA accuracy over that type's
    training questions when given to all of them (ties: the first candidate in sorted order)."""
    best = {}
    for qtype, entries in _by_type(train).items():
        candidates = sorted({a for e in entries for a in e["answer"]})
        scores = {c: sum(question_accuracy(c, e["answer"]) for e in entries) / len(entries) for c in candidates}
        best[qtype] = max(candidates, key=lambda c: (scores[c], -candidates.index(c)))
    return best


def report(run_dir: Path, train_file: Path, test_file: Path) -> dict:
    train, test = read_json(train_file), read_json(test_file)
    results = {r["question_id"]: r["answer"] for r in read_json(run_dir / "vqa_result.json")}
    constants = best_constants(train)
    annotations = [dict(e, question_type=e.get("question_type") or e.get("answer_type") or "all") for e in test]
    ours = vqa_accuracy(results, annotations)
    const_preds = {e["question_id"]: constants.get(e["question_type"], "") for e in annotations}
    const = vqa_accuracy(const_preds, annotations)
    rows = {qtype: {"questions": len(entries), "ours": ours["per_question_type"][qtype],
                    "constant": const["per_question_type"][qtype], "constant_answer": constants.get(qtype, "")}
            for qtype, entries in sorted(_by_type(annotations).items())}
    out = {"questions": len(test), "overall": {"ours": ours["overall"], "constant": const["overall"]},
           "per_question_type": rows}
    lines = ["# VQA accuracy by question type (test split)", "",
             "| question type | questions | ours | best constant answer | constant |", "|---|---|---|---|---|"]
    lines += [f"| {t} | {r['questions']} | {r['ours']:.1f} | \"{r['constant_answer']}\" | {r['constant']:.1f} |"
              for t, r in rows.items()]
    lines += [f"| **all** | {len(test)} | **{ours['overall']:.1f}** | per type | {const['overall']:.1f} |"]
    (run_dir / "vqa_report.json").write_text(json.dumps(out, indent=1))
    (run_dir / "vqa_report.md").write_text("\n".join(lines) + "\n")
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--train_file", type=Path, required=True)
    p.add_argument("--test_file", type=Path, required=True)
    args = p.parse_args(argv)
    out = report(args.run_dir, args.train_file, args.test_file)
    print((args.run_dir / "vqa_report.md").read_text())
    return out


if __name__ == "__main__":
    main()
