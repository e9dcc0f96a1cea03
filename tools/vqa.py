"""Official VQA v2 / OK-VQA question + annotation files -> BLIP's VQA json layout (docs/FORMATS.md).

    # train / val (BLIP's vqa_train.json, vqa_val.json) and the answer list BLIP ranks at test time
    python -m tools vqa --questions v2_OpenEnded_mscoco_train2014_questions.json \\
        --annotations v2_mscoco_train2014_annotations.json --output data/vqa/vqa_train.json \\
        --answer_list data/vqa/answer_list.json --answer_list_size 3128 --check_images data/coco
    # test questions (no annotations): BLIP's test layout; test-dev images are in test2015/
    python -m tools vqa --questions v2_OpenEnded_mscoco_test-dev2015_questions.json \\
        --output data/vqa/vqa_test.json

With ``--annotations`` every question becomes ``{"question_id", "question", "answer": [the
annotators' answers in answer_id order, duplicates kept: BLIP weights an answer by count / len],
"image", "dataset", "answer_type", "question_type"}``; without, ``{"question_id", "question",
"image", "dataset"}``. ``image`` is ``--image_prefix`` (default: the file's ``data_subtype`` folder,
``test2015/`` for test-dev2015) + ``COCO_{subtype}_{image_id:012d}.jpg``. OK-VQA files have the same
layout; their ``answer`` (not ``raw_answer``) is used, as by its evaluation.

``--answer_list FILE`` writes the ``--answer_list_size`` (default 3128, BLIP's) most frequent
``multiple_choice_answer`` strings (ties: the first seen first) as a json list.

Errors, all before anything is written: unreadable json, a missing top-level key or entry field, a
question without annotation or the reverse, an image_id that differs between the two files, a
duplicate question_id, an empty answers list, two files of different splits, missing images
(``--check_images``), an output that exists (``--overwrite``) or is an input.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional

from data.utils import read_json, short_repr
from utils.atomic import atomic_write
from utils.errors import DataError, UserError
from utils.outputs import refuse_existing

logger = logging.getLogger("tools.vqa")

BLIP_ANSWER_LIST_SIZE = 3128
QUESTION_FIELDS = {"image_id": int, "question": str, "question_id": int}
ANNOTATION_FIELDS = {"question_id": int, "image_id": int, "question_type": str, "answer_type": str,
                     "multiple_choice_answer": str, "answers": list}
ANSWER_FIELDS = {"answer": str, "answer_id": int}


def _args(argv, prog):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--questions", required=True,
                   help="an official question file (v2_OpenEnded_mscoco_*_questions.json)")
    p.add_argument("--annotations", default=None,
                   help="its annotation file (v2_mscoco_*_annotations.json); without: BLIP's test layout")
    p.add_argument("--output", required=True, help="the BLIP vqa json to write")
    p.add_argument("--image_prefix", default=None,
                   help="folder of the images in 'image' (default: the data_subtype + '/', test-dev2015: 'test2015/'; "
                        "'' for none)")
    p.add_argument("--dataset_tag", default="vqa", help="the entries' 'dataset' field (BLIP: vqa, or vg)")
    p.add_argument("--answer_list", default=None, help="also write the most frequent answers here (json list)")
    p.add_argument("--answer_list_size", type=int, default=None,
                   help=f"how many answers --answer_list keeps (default {BLIP_ANSWER_LIST_SIZE}, BLIP's)")
    p.add_argument("--check_images", default=None, metavar="DIR",
                   help="every image must exist as DIR/<image>; else fail naming the first missing one")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    args = p.parse_args(argv)
    if args.answer_list_size is not None and args.answer_list is None:
        p.error("--answer_list_size needs --answer_list FILE")
    if args.answer_list is not None and args.annotations is None:
        p.error("--answer_list needs --annotations (the answers come from the annotation file)")
    if args.answer_list_size is None:
        args.answer_list_size = BLIP_ANSWER_LIST_SIZE
    if args.answer_list_size < 1:
        p.error(f"--answer_list_size must be >= 1, got {args.answer_list_size}")
    return args


def _top(path: str, data: Any, key: str, what: str) -> list:
    """``data[key]``, a list, of the json object of ``path`` (an official ``what`` file)."""
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a json object with a {key!r} list (an official VQA {what} file), "
                        f"got a {type(data).__name__}")
    if key not in data:
        raise DataError(f"{path}: no top-level key {key!r} (keys: {sorted(data)}); is it an official VQA {what} file?")
    if not isinstance(data[key], list):
        raise DataError(f"{path}: {key!r} must be a list, got {short_repr(data[key], 80)}")
    return data[key]


def _check_fields(entry: Any, fields: Dict[str, type], where: str) -> None:
    """Every field of ``fields`` in ``entry``, with its type (ints: not bools)."""
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object, got {short_repr(entry, 80)}")
    for name, kind in fields.items():
        if name not in entry:
            raise DataError(f"{where}: no field {name!r} (fields: {sorted(entry)})")
        value = entry[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            expected = {int: "an integer", str: "a string", list: "a list"}[kind]
            raise DataError(f"{where}: field {name!r} is {short_repr(value, 80)}, expected {expected}")


def _entry_where(path: str, key: str, k: int, entry: Any) -> str:
    qid = entry.get("question_id") if isinstance(entry, dict) else None
    return f"{path}: {key}[{k}]" + (f" (question_id {qid})" if isinstance(qid, int) else "")


def _by_question_id(path: str, entries: list, key: str, fields: Dict[str, type]) -> Dict[int, int]:
    """question_id -> index in ``entries`` (checked against ``fields``); a duplicate id is an error."""
    index: Dict[int, int] = {}
    for k, entry in enumerate(entries):
        _check_fields(entry, fields, _entry_where(path, key, k, entry))
        qid = entry["question_id"]
        if qid in index:
            raise DataError(f"{path}: duplicate question_id {qid} ({key}[{index[qid]}] and {key}[{k}])")
        index[qid] = k
    return index


def _unmatched(ids: List[int], index: Dict[int, int], key: str, path: str, what: str, other: str) -> None:
    if ids:
        raise DataError(f"{path}: {len(ids)} {what} with no match in {other}, first question_id {ids[0]} "
                        f"({key}[{index[ids[0]]}]); the two files must be the same split (and dataset)")


def _answers(path: str, k: int, ann: dict) -> List[str]:
    """The annotators' answers of annotation ``k`` in answer_id order, duplicates kept."""
    where = _entry_where(path, "annotations", k, ann)
    if not ann["answers"]:
        raise DataError(f"{where}: empty 'answers' list; every question needs its annotators' answers")
    for j, answer in enumerate(ann["answers"]):
        _check_fields(answer, ANSWER_FIELDS, f"{where}: answers[{j}]")
    return [a["answer"] for a in sorted(ann["answers"], key=lambda a: a["answer_id"])]


def image_path(prefix: str, subtype: str, image_id: int) -> str:
    """``prefix`` + the COCO file name of ``image_id`` in split ``subtype`` (test-dev2015: test2015)."""
    folder = "test2015" if subtype == "test-dev2015" else subtype
    return f"{prefix}COCO_{folder}_{image_id:012d}.jpg"


def default_prefix(subtype: str) -> str:
    return ("test2015" if subtype == "test-dev2015" else subtype) + "/"


def _subtype(path: str, data: dict) -> str:
    subtype = data.get("data_subtype")
    if subtype is None:
        raise DataError(f"{path}: no top-level key 'data_subtype' (keys: {sorted(data)}); it names the COCO image "
                        "split (train2014, val2014, test2015, test-dev2015)")
    if not isinstance(subtype, str) or not subtype.strip():
        raise DataError(f"{path}: 'data_subtype' is {short_repr(subtype, 80)}, expected a split name such as val2014")
    return subtype


def convert(args) -> tuple[list, Optional[List[str]], dict]:
    """(BLIP entries, the answer list or None, the report) of the parsed arguments."""
    q_path, a_path = args.questions, args.annotations
    q_data = read_json(q_path)
    questions = _top(q_path, q_data, "questions", "question")
    subtype = _subtype(q_path, q_data)
    prefix = default_prefix(subtype) if args.image_prefix is None else args.image_prefix
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    q_index = _by_question_id(q_path, questions, "questions", QUESTION_FIELDS)
    if not questions:
        raise DataError(f"{q_path}: 'questions' is empty")
    anns: list = []
    a_index: Dict[int, int] = {}
    if a_path is not None:
        a_data = read_json(a_path)
        anns = _top(a_path, a_data, "annotations", "annotation")
        a_subtype = a_data.get("data_subtype")
        if isinstance(a_subtype, str) and a_subtype != subtype:
            raise DataError(f"{a_path}: data_subtype {a_subtype!r} but the questions ({q_path}) are {subtype!r}; "
                            "give the annotation file of the same split")
        a_index = _by_question_id(a_path, anns, "annotations", ANNOTATION_FIELDS)
        _unmatched([q for q in q_index if q not in a_index], q_index, "questions", q_path, "question(s)", a_path)
        _unmatched([q for q in a_index if q not in q_index], a_index, "annotations", a_path, "annotation(s)", q_path)
    entries, n_answers, types, answers, mc = [], [], Counter(), Counter(), []
    for k, q in enumerate(questions):
        qid = q["question_id"]
        entry = {"question_id": qid, "question": q["question"]}
        if a_path is not None:
            j = a_index[qid]
            ann = anns[j]
            if ann["image_id"] != q["image_id"]:
                raise DataError(f"question_id {qid}: image_id {q['image_id']} in {q_path} (questions[{k}]) but "
                                f"{ann['image_id']} in {a_path} (annotations[{j}])")
            entry["answer"] = _answers(a_path, j, ann)
        entry["image"] = image_path(prefix, subtype, q["image_id"])
        entry["dataset"] = args.dataset_tag
        if a_path is not None:
            entry["answer_type"], entry["question_type"] = ann["answer_type"], ann["question_type"]
            n_answers.append(len(entry["answer"]))
            types[ann["answer_type"]] += 1
            answers.update(entry["answer"])
            mc.append(ann["multiple_choice_answer"])
        entries.append(entry)
    report: Dict[str, Any] = {"questions": len(entries), "images": len({q["image_id"] for q in questions}),
                              "data_subtype": subtype, "image_prefix": prefix,
                              "layout": "train" if a_path is not None else "test"}
    answer_list = None
    if a_path is not None:
        report.update(answers_per_question={"min": min(n_answers), "mean": round(sum(n_answers) / len(n_answers), 3),
                                            "max": max(n_answers)},
                      answer_types=dict(types.most_common()), distinct_answers=len(answers),
                      distinct_multiple_choice_answers=len(set(mc)))
        if args.answer_list is not None:
            answer_list = most_frequent(mc, args.answer_list_size)
            kept = set(answer_list)
            report["answer_list"] = {"size": len(answer_list),
                                     "coverage": round(sum(a in kept for a in mc) / len(mc), 4)}
            if len(answer_list) < args.answer_list_size:
                logger.warning("--answer_list_size %d: only %d distinct multiple_choice_answers, all kept",
                               args.answer_list_size, len(answer_list))
    return entries, answer_list, report


def most_frequent(answers: List[str], n: int) -> List[str]:
    """The ``n`` most frequent strings of ``answers``; ties: the one seen first comes first."""
    counts = Counter(answers)  # insertion order = first occurrence; sorted() is stable
    return [a for a, _ in sorted(counts.items(), key=lambda kv: -kv[1])[:n]]


def missing_images(root: Path, images: List[str]) -> List[str]:
    """The ``images`` (relative to ``root``) that are not files there, in order; one listing per folder."""
    listed: Dict[Path, set] = {}
    missing = []
    for image in images:
        path = root / image
        folder = path.parent
        if folder not in listed:
            try:
                listed[folder] = {e.name for e in os.scandir(folder) if e.is_file()}
            except (FileNotFoundError, NotADirectoryError):
                listed[folder] = set()
        if path.name not in listed[folder]:
            missing.append(image)
    return missing


def _write_json(path: Path, value: Any) -> None:
    data = json.dumps(value, ensure_ascii=False).encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


def summary(report: dict) -> str:
    line = (f"{report['questions']} questions of {report['images']} images ({report['data_subtype']}, "
            f"{report['layout']} layout)")
    if "answers_per_question" in report:
        a = report["answers_per_question"]
        types = ", ".join(f"{t} {n}" for t, n in report["answer_types"].items())
        line += (f"; answers per question min {a['min']} / mean {a['mean']:g} / max {a['max']}; answer types: {types}; "
                 f"{report['distinct_answers']} distinct answers "
                 f"({report['distinct_multiple_choice_answers']} distinct multiple_choice_answers)")
    if "answer_list" in report:
        al = report["answer_list"]
        line += (f"; answer list of {al['size']}: {100 * al['coverage']:.2f}% of the questions' "
                 "multiple_choice_answer in it")
    return line


def main(argv=None, prog: str = "python -m tools vqa") -> dict:
    args = _args(argv, prog)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    inputs = [args.questions] + ([args.annotations] if args.annotations else [])
    out = Path(args.output)
    refuse_existing([out], args.overwrite, "--output", inputs=inputs)
    if args.answer_list is not None:
        al_path = Path(args.answer_list)
        if os.path.abspath(al_path) == os.path.abspath(out) or (
                al_path.exists() and out.exists() and os.path.samefile(al_path, out)):
            raise UserError(f"--answer_list {al_path} is the --output file; write the answer list elsewhere")
        refuse_existing([al_path], args.overwrite, "--answer_list", inputs=inputs)
    if args.check_images is not None and not Path(args.check_images).is_dir():
        raise UserError(f"--check_images {args.check_images}: not a folder")
    entries, answer_list, report = convert(args)
    if args.check_images is not None:
        images = list(dict.fromkeys(e["image"] for e in entries))
        missing = missing_images(Path(args.check_images), images)
        logger.info("--check_images: %d of %d images missing under %s", len(missing), len(images), args.check_images)
        for image in missing[:10]:
            logger.warning("missing image: %s", Path(args.check_images, image))
        if missing:
            raise DataError(f"--check_images {args.check_images}: {len(missing)} of {len(images)} images missing, "
                            f"first {Path(args.check_images, missing[0])} (image prefix {report['image_prefix']!r}); "
                            "nothing written")
        report["images_checked"] = len(images)
    _write_json(out, entries)
    report["output"] = str(out)
    if answer_list is not None:
        _write_json(Path(args.answer_list), answer_list)
        report["answer_list"]["output"] = str(args.answer_list)
    line = summary(report)
    logger.info("%s", line)
    print(f"wrote {out}: {line}")
    return report


if __name__ == "__main__":
    main()
