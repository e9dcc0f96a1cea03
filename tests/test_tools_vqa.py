"""`python -m tools vqa`: official VQA v2 / OK-VQA question + annotation files (written here by hand,
in the official layout) -> BLIP's vqa json layout; the answer list; every error before any write."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tools.vqa import main
from utils.errors import DataError, UserError
from tests.scripts import forked

REPO = Path(__file__).resolve().parents[1]


def _answers(*answers, raw=False):
    out = [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(answers)]
    if raw:
        for a in out:
            a["raw_answer"] = a["answer"].upper()
    return out


def _official(tmp_path: Path, subtype="train2014", annotations=True, name="v"):
    """(questions file, annotations file or None): 3 questions on 2 images, in the official layout."""
    questions = [{"image_id": 458752, "question": "What is this photo taken looking through?", "question_id": 458752000},
                 {"image_id": 458752, "question": "Is the dog waiting?", "question_id": 458752001},
                 {"image_id": 262146, "question": "How many skiers?", "question_id": 262146000}]
    q = {"info": {"description": "VQA v2"}, "task_type": "Open-Ended", "data_type": "mscoco",
         "data_subtype": subtype, "questions": questions, "license": {"name": "CC BY 4.0"}}
    q_path = tmp_path / f"{name}_questions.json"
    q_path.write_text(json.dumps(q))
    if not annotations:
        return q_path, None
    # answers listed out of answer_id order: the output must follow answer_id
    net = _answers("net", "netting", "net", "net", "mesh", "net", "net", "net", "net", "net")
    net = net[5:] + net[:5]
    anns = [{"question_id": 458752000, "image_id": 458752, "question_type": "what is this", "answer_type": "other",
             "multiple_choice_answer": "net", "answers": net},
            {"question_id": 262146000, "image_id": 262146, "question_type": "how many", "answer_type": "number",
             "multiple_choice_answer": "2", "answers": _answers("2", "2", "3", raw=True)},
            {"question_id": 458752001, "image_id": 458752, "question_type": "is the", "answer_type": "yes/no",
             "multiple_choice_answer": "yes", "answers": _answers("yes", "no", "yes", "yes")}]
    a = {"info": {}, "license": {}, "data_subtype": subtype, "data_type": "mscoco", "annotations": anns}
    a_path = tmp_path / f"{name}_annotations.json"
    a_path.write_text(json.dumps(a))
    return q_path, a_path


def _edit(path: Path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _run(*args):
    return main([str(a) for a in args])


def test_train_layout(tmp_path, capsys):
    q, a = _official(tmp_path)
    out = tmp_path / "out" / "vqa_train.json"
    report = _run("--questions", q, "--annotations", a, "--output", out)
    entries = json.loads(out.read_text())
    assert [e["question_id"] for e in entries] == [458752000, 458752001, 262146000]  # the questions' order
    assert entries[0] == {
        "question_id": 458752000, "question": "What is this photo taken looking through?",
        "answer": ["net", "netting", "net", "net", "mesh", "net", "net", "net", "net", "net"],  # answer_id order
        "image": "train2014/COCO_train2014_000000458752.jpg", "dataset": "vqa",
        "answer_type": "other", "question_type": "what is this"}
    assert entries[1]["answer"] == ["yes", "no", "yes", "yes"]  # duplicates kept: BLIP's weights 3/4, 1/4
    assert entries[2]["answer"] == ["2", "2", "3"]  # OK-VQA's raw_answer is not used
    assert (entries[2]["answer_type"], entries[2]["question_type"]) == ("number", "how many")
    assert report["questions"] == 3 and report["images"] == 2
    assert report["answers_per_question"] == {"min": 3, "mean": 5.667, "max": 10}
    assert report["answer_types"] == {"other": 1, "yes/no": 1, "number": 1}
    assert report["distinct_answers"] == 7  # net netting mesh yes no 2 3
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"wrote {out}: 3 questions of 2 images") and "min 3 / mean 5.667 / max 10" in line


def test_prefix_tag_and_check_images(tmp_path):
    q, a = _official(tmp_path, subtype="val2014")
    out = tmp_path / "vqa_val.json"
    _run("--questions", q, "--annotations", a, "--output", out, "--image_prefix", "coco/val", "--dataset_tag", "vg")
    entries = json.loads(out.read_text())
    assert entries[0]["image"] == "coco/val/COCO_val2014_000000458752.jpg" and entries[0]["dataset"] == "vg"
    root = tmp_path / "images"
    (root / "val2014").mkdir(parents=True)
    (root / "val2014" / "COCO_val2014_000000458752.jpg").write_bytes(b"x")
    out2 = tmp_path / "checked.json"
    with pytest.raises(DataError, match=r"1 of 2 images missing, first .*val2014/COCO_val2014_000000262146\.jpg"):
        _run("--questions", q, "--annotations", a, "--output", out2, "--check_images", root)
    assert not out2.exists()
    (root / "val2014" / "COCO_val2014_000000262146.jpg").write_bytes(b"x")
    assert _run("--questions", q, "--annotations", a, "--output", out2, "--check_images", root)["images_checked"] == 2


def test_test_layout_and_test_dev_images(tmp_path):
    q, _ = _official(tmp_path, subtype="test-dev2015", annotations=False)
    out = tmp_path / "vqa_test.json"
    report = _run("--questions", q, "--output", out)
    entries = json.loads(out.read_text())
    assert entries[1] == {"question_id": 458752001, "question": "Is the dog waiting?",
                          "image": "test2015/COCO_test2015_000000458752.jpg", "dataset": "vqa"}
    assert report["layout"] == "test" and "answer_types" not in report


def test_answer_list_ties_and_coverage(tmp_path):
    q, a = _official(tmp_path)
    # multiple_choice_answers: b, a, b, a, c -> counts b 2, a 2, c 1; tie b/a: b seen first
    _edit(q, lambda d: d["questions"].extend(
        {"image_id": 1, "question": f"q{k}?", "question_id": k} for k in (1, 2)))

    def answers(d):
        for ann, mc in zip(d["annotations"], "bab"):
            ann["multiple_choice_answer"] = mc
        d["annotations"] += [{"question_id": k, "image_id": 1, "question_type": "what", "answer_type": "other",
                              "multiple_choice_answer": mc, "answers": _answers(mc)} for k, mc in ((1, "a"), (2, "c"))]
    _edit(a, answers)
    out, al = tmp_path / "train.json", tmp_path / "answer_list.json"
    report = _run("--questions", q, "--annotations", a, "--output", out, "--answer_list", al,
                  "--answer_list_size", 2)
    assert json.loads(al.read_text()) == ["b", "a"]
    assert report["answer_list"]["size"] == 2 and report["answer_list"]["coverage"] == 0.8
    assert report["distinct_multiple_choice_answers"] == 3
    al3 = tmp_path / "all.json"
    _run("--questions", q, "--annotations", a, "--output", tmp_path / "t2.json", "--answer_list", al3)  # 3128 > 3
    assert json.loads(al3.read_text()) == ["b", "a", "c"]


ERRORS = [
    ("questions", lambda d: d.pop("questions"), r"_questions\.json: no top-level key 'questions'"),
    ("annotations", lambda d: d.pop("annotations"), r"_annotations\.json: no top-level key 'annotations'"),
    ("questions", lambda d: d.pop("data_subtype"), r"_questions\.json: no top-level key 'data_subtype'"),
    ("questions", lambda d: d["questions"][1].pop("image_id"),
     r"_questions\.json: questions\[1\] \(question_id 458752001\): no field 'image_id'"),
    ("questions", lambda d: d["questions"][2].update(question_id="x"),
     r"_questions\.json: questions\[2\]: field 'question_id' is 'x', expected an integer"),
    ("annotations", lambda d: d["annotations"][2].pop("answer_type"),
     r"_annotations\.json: annotations\[2\] \(question_id 458752001\): no field 'answer_type'"),
    ("annotations", lambda d: d["annotations"][1]["answers"][2].pop("answer"),
     r"_annotations\.json: annotations\[1\] \(question_id 262146000\): answers\[2\]: no field 'answer'"),
    ("annotations", lambda d: d["annotations"][1].update(answers=[]),
     r"annotations\[1\] \(question_id 262146000\): empty 'answers' list"),
    ("questions", lambda d: d["questions"][2].update(question_id=458752000),
     r"_questions\.json: duplicate question_id 458752000 \(questions\[0\] and questions\[2\]\)"),
    ("annotations", lambda d: d["annotations"].pop(1),
     r"_questions\.json: 1 question\(s\) with no match in .*_annotations\.json, first question_id 262146000 "
     r"\(questions\[2\]\)"),
    ("questions", lambda d: d["questions"].pop(0),
     r"_annotations\.json: 1 annotation\(s\) with no match in .*_questions\.json, first question_id 458752000 "
     r"\(annotations\[0\]\)"),
    ("annotations", lambda d: d["annotations"][2].update(image_id=7),
     r"question_id 458752001: image_id 458752 in .*_questions\.json \(questions\[1\]\) but 7 in "
     r".*_annotations\.json \(annotations\[2\]\)"),
    ("annotations", lambda d: d.update(data_subtype="val2014"), r"data_subtype 'val2014' but the questions"),
]


@pytest.mark.parametrize("which, change, message", ERRORS)
def test_errors_name_file_entry_field(tmp_path, which, change, message):
    q, a = _official(tmp_path)
    _edit(q if which == "questions" else a, change)
    out = tmp_path / "out.json"
    with pytest.raises(DataError, match=message) as err:
        _run("--questions", q, "--annotations", a, "--output", out, "--answer_list", tmp_path / "al.json")
    assert "\n" not in str(err.value)
    assert not out.exists() and not (tmp_path / "al.json").exists()


def test_unreadable_json(tmp_path):
    q, a = _official(tmp_path)
    a.write_text('{"annotations": [{"question_id": 1,}]}')
    with pytest.raises(DataError, match=r"_annotations\.json: malformed JSON: .* at line 1, column 36 \(char 35\)"):
        _run("--questions", q, "--annotations", a, "--output", tmp_path / "out.json")


def test_refuses_to_overwrite(tmp_path):
    q, a = _official(tmp_path)
    out, al = tmp_path / "out.json", tmp_path / "al.json"
    out.write_text("old")
    with pytest.raises(UserError, match=r"--output: .*out\.json exist\(s\) already; pass --overwrite"):
        _run("--questions", q, "--annotations", a, "--output", out)
    assert out.read_text() == "old"
    al.write_text("old")
    with pytest.raises(UserError, match=r"--answer_list: .*al\.json exist\(s\) already"):
        _run("--questions", q, "--annotations", a, "--output", tmp_path / "new.json", "--answer_list", al)
    assert not (tmp_path / "new.json").exists()
    _run("--questions", q, "--annotations", a, "--output", out, "--answer_list", al, "--overwrite")
    assert len(json.loads(out.read_text())) == 3 and json.loads(al.read_text())[0] == "net"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_output_is_an_input(tmp_path):
    q, a = _official(tmp_path)
    for target in (q, a):
        with pytest.raises(UserError, match=r"it would write .* which is the input"):
            _run("--questions", q, "--annotations", a, "--output", target, "--overwrite")
    with pytest.raises(UserError, match=r"it would write .* which is the input"):
        _run("--questions", q, "--annotations", a, "--output", tmp_path / "o.json", "--answer_list", a, "--overwrite")
    with pytest.raises(UserError, match=r"--answer_list .* is the --output file"):
        _run("--questions", q, "--annotations", a, "--output", tmp_path / "o.json", "--answer_list",
             tmp_path / "o.json")
    assert json.loads(a.read_text())["annotations"] and not (tmp_path / "o.json").exists()


def test_cli_one_line_error(tmp_path):
    q, a = _official(tmp_path)
    _edit(a, lambda d: d["annotations"][0].pop("answers"))
    out = tmp_path / "out.json"
    proc = forked.run_cmd([sys.executable, "-m", "tools", "vqa", "--questions", str(q), "--annotations", str(a),
                           "--output", str(out)],
                          env={**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "annotations[0]" in lines[0] \
        and "no field 'answers'" in lines[0], proc.stderr
    assert not out.exists()
