"""VQA data: BLIP's layouts (VQA v2 and Visual Genome entries, their weights and image roots), custom
CSV through the same reader, every shipped VQA config valid, and one-line errors naming file, entry
and field."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data.vqa import VQAColumns, VQADataset, read_answer_list, read_vqa_file
from utils.errors import DataError

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"vqa": "/coco", "vg": "/vg"}


def _write(tmp_path, name, entries):
    path = tmp_path / name
    path.write_text(json.dumps(entries) if not isinstance(entries, str) else entries)
    return path


def test_vqa_and_vg_entries_get_blips_weights_and_roots(tmp_path):
    path = _write(tmp_path, "train.json", [
        {"question_id": 1, "question": "What is it?!", "answer": ["a cat", "cat", "a cat"], "image": "train2014/1.jpg",
         "dataset": "vqa"},
        {"question_id": 2, "question": "Where?  ", "answer": "on the left", "image": "image/2.jpg", "dataset": "vg"}])
    ds = VQADataset([path], ROOTS, transform=None, train=True)
    assert [e.question for e in ds.entries] == ["what is it?", "where?"]  # pre_question: '!' out, '?' kept
    assert [e.image for e in ds.entries] == ["/coco/train2014/1.jpg", "/vg/image/2.jpg"]
    assert ds.targets(0) == (["a cat", "cat"], [1 / 3 + 1 / 3, 1 / 3])
    assert ds.targets(1) == (["on the left"], [0.2])
    assert VQADataset([path], ROOTS, transform=None, train=True, vg_weight=0.5).targets(1)[1] == [0.5]


def test_csv_questions_through_the_same_reader(tmp_path):
    path = _write(tmp_path, "qa.tsv", "img\tq\tanswers\tqid\tanswer_type\n"
                                      "a.png\tIs it red?\tyes|yes|no\t7\tyes/no\nb.png\tHow many?\t2 | 2\tq8\t\n")
    cols = VQAColumns(image="img", question="q", answer="answers", question_id="qid")
    entries, where = read_vqa_file(path, {"vqa": "/img", "vg": None}, need_answers=True, columns=cols)
    assert [(e.question_id, e.answers, e.image, e.answer_type) for e in entries] == [
        (7, ["yes", "yes", "no"], "/img/a.png", "yes/no"), ("q8", ["2", "2"], "/img/b.png", None)]
    assert where(1) == f"row 1 (line 3) of {path}"
    with pytest.raises(DataError, match=r"no column 'image' \(image_col\); the file's columns: img, q"):
        read_vqa_file(path, ROOTS, need_answers=False)


@pytest.mark.parametrize("entry,message", [
    ({"question": "q?", "image": "x.png", "answer": []}, r"entry 1 of .*field 'answer': expected a non-empty list"),
    ({"question": "q?", "image": "x.png", "answer": ["yes", 3]}, r"entry 1 of .*field 'answer': expected a non-empty"),
    ({"question": "q?", "image": "x.png", "answer": ["yes"], "dataset": "gqa"}, r"entry 1 of .*field 'dataset'"),
    ({"question_id": 1, "question": "q?", "image": "x.png", "answer": ["yes"]}, r"entry 1 of .*'question_id': 1 is "
                                                                                  r"also the id of entry 0"),
    ({"question": "", "image": "x.png", "answer": ["yes"]}, r"entry 1 of .*field 'question'"),
    ({"question": "q?", "answer": ["yes"]}, r"entry 1 of .*missing field 'image'"),
])
def test_bad_entries_name_file_entry_and_field(tmp_path, entry, message):
    path = _write(tmp_path, "train.json", [{"question_id": 1, "question": "q?", "image": "y.png", "answer": ["no"]},
                                           {"question_id": 2, **entry} if "question_id" not in entry else entry])
    with pytest.raises(DataError, match=message):
        read_vqa_file(path, ROOTS, need_answers=True)


def test_answer_list_and_empty_files(tmp_path):
    assert read_answer_list(_write(tmp_path, "a.json", ["yes", "no"])) == ["yes", "no"]
    with pytest.raises(DataError, match="entry 1: expected a non-empty answer string"):
        read_answer_list(_write(tmp_path, "b.json", ["yes", ""]))
    with pytest.raises(DataError, match="no questions"):
        read_vqa_file(_write(tmp_path, "c.json", []), ROOTS, need_answers=False)


@pytest.mark.parametrize("name", ["vqa.yaml", "dlip_vqa.yaml", "demo/vqa.yaml", "demo/dlip_vqa.yaml"])
def test_shipped_vqa_configs_validate(name):
    from tasks.vqa import VQAConfig, resolve
    from utils.config import load_config
    cfg, _ = load_config(REPO / "configs" / name, VQAConfig, [])
    assert cfg.inference == "rank" and cfg.k_test >= 1
    assert resolve(cfg, "vqa_train") == str(Path(cfg.ann_root) / "vqa_train.json")
    if name == "vqa.yaml":  # BLIP's own keys and values
        assert (cfg.train_files, cfg.image_size, cfg.k_test, cfg.init_lr, cfg.max_epoch, cfg.vit_drop_path_rate) == (
            ["vqa_train", "vqa_val", "vg_qa"], 480, 128, 2e-5, 10, 0.1)
