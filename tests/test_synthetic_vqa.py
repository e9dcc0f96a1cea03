"""The synthetic benchmark's VQA part: BLIP's VQA json layout, right majority answers, deterministic."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from data.synthetic import GENERATOR_VERSION, generate
from data.synthetic.scenes import COLOURS, POSITIONS, SHAPES
from data.synthetic.vocab import basic_tokenize, build_vocab
from data.synthetic.vqa import VQASpec
from tests.scripts import forked

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(n_train_images=40, n_val_images=8, n_test_images=10)
KEYS = {"question_id", "question", "answer", "image", "dataset", "answer_type", "question_type"}
ANSWER_TYPES = {"count": "number", "colour": "other", "shape": "other", "position": "other", "exists": "yes/no"}
RIGHT = {"count": {"1", "2", "3"}, "colour": set(COLOURS), "shape": set(SHAPES),
         "position": set(POSITIONS), "exists": {"yes", "no"}}


@pytest.fixture(scope="module")
def vqa(tmp_path_factory) -> dict:
    return generate(tmp_path_factory.mktemp("vqa") / "out", seed=0, parts="vqa", **SMALL)


def _load(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _splits(result: dict) -> dict[str, list[dict]]:
    return {s: _load(result["vqa"][f"{s}_file"]) for s in ("train", "val", "test")}


def _majority(answers: list[str]) -> str:
    (top, n), *rest = Counter(answers).most_common()
    assert not rest or rest[0][1] < n, answers  # a strict majority string
    return top


def test_paths_and_layout(vqa):
    p = vqa["vqa"]
    root = Path(vqa["out_dir"]) / "vqa"
    assert set(p) == {"root", "vqa_root", "image_root", "ann_root", "train_file", "val_file", "test_file",
                      "answer_list", "meta"}
    assert Path(p["root"]) == root and Path(p["image_root"]) == root / "images"
    for split in ("train", "val", "test"):
        assert Path(p[f"{split}_file"]) == root / "annotation" / f"vqa_{split}.json"
    assert Path(p["answer_list"]) == root / "annotation" / "answer_list.json"
    assert all(Path(v).exists() for v in p.values())
    pngs = sorted((root / "images").glob("*.png"))
    assert len(pngs) == 40 + 8 + 10
    with Image.open(pngs[0]) as im:
        im.load()
        assert im.format == "PNG" and im.size == (64, 64) and im.mode == "RGB" and len(im.getcolors(4096)) > 1
    meta = _load(p["meta"])
    assert meta["splits"]["train"]["questions"] == 40 * 4 and meta["vocab_size"] == vqa["vocab_size"]
    assert "vqa/" in (Path(vqa["out_dir"]) / "README.md").read_text()


def test_entries_are_blip_vqa_format(vqa):
    root = Path(vqa["vqa"]["root"])
    splits = _splits(vqa)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [40 * 4, 8 * 3, 10 * 3]
    ids = [e["question_id"] for es in splits.values() for e in es]
    assert len(set(ids)) == len(ids) and all(isinstance(i, int) for i in ids)
    for split, entries in splits.items():
        per_image: dict[str, list[str]] = {}
        for e in entries:
            assert set(e) == KEYS  # test included: our test split keeps its answers
            assert e["dataset"] == "vqa" and e["question"].endswith("?")
            assert e["answer_type"] == ANSWER_TYPES[e["question_type"]]
            assert len(e["answer"]) == 10 and all(isinstance(a, str) and a for a in e["answer"])
            assert e["image"].startswith("images/") and (root / e["image"]).is_file()
            per_image.setdefault(e["image"], []).append(e["question"])
        assert all(len(qs) == len(set(qs)) for qs in per_image.values())  # no repeated question


def test_majority_answer_is_right_and_in_answer_list(vqa):
    splits = _splits(vqa)
    answer_list = _load(vqa["vqa"]["answer_list"])
    assert answer_list == sorted(set(answer_list))
    majorities = set()
    types, yes_no = Counter(), Counter()
    for entries in splits.values():
        for e in entries:
            top = _majority(e["answer"])
            assert top in RIGHT[e["question_type"]]
            majorities.add(top)
            types[e["question_type"]] += 1
            if e["question_type"] == "exists":
                yes_no[top] += 1
            if e["question_type"] == "count":  # normalised as VQA v2's annotations: digits
                assert set(e["answer"]) <= {"1", "2", "3", "4"}
    assert set(answer_list) == majorities
    assert set(types) == set(ANSWER_TYPES) and max(types.values()) - min(types.values()) <= 3
    assert abs(yes_no["yes"] - yes_no["no"]) <= 3


def test_answers_are_right_for_the_scene(tmp_path):
    """With perfect annotators every answer is the truth of the drawn scene (checked on one-shape scenes)."""
    out = generate(tmp_path, seed=4, parts="vqa", n_train_images=30, n_val_images=1, n_test_images=1,
                   annotator_accuracy=1.0, scene_count_weights=(1.0,))
    for e in _load(out["vqa"]["train_file"]):
        assert len(set(e["answer"])) == 1  # all annotators agree
        if e["question_type"] == "count":
            assert set(e["answer"]) == {"1"}
    with pytest.raises(ValueError, match="annotator_accuracy"):
        VQASpec(annotator_accuracy=0.0)


def test_deterministic_and_skipped_when_up_to_date(vqa, tmp_path):
    again = generate(tmp_path / "again", seed=0, parts="vqa", **SMALL)
    a, b = _all_files(Path(vqa["out_dir"])), _all_files(Path(again["out_dir"]))
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    assert generate(tmp_path / "again", seed=0, parts="vqa", **SMALL)["skipped"]
    other = generate(tmp_path / "other", seed=1, parts="vqa", **SMALL)
    assert _all_files(Path(other["out_dir"]))["vqa/annotation/vqa_train.json"] != a["vqa/annotation/vqa_train.json"]


def test_all_words_are_in_the_tokenizer_vocab(vqa):
    vocab = set((Path(vqa["tokenizer"]) / "vocab.txt").read_text(encoding="utf-8").splitlines())
    for entries in _splits(vqa).values():
        for e in entries:
            for text in [e["question"], *e["answer"]]:
                assert set(basic_tokenize(text)) <= vocab, text


def _retrieval_digest(root: Path) -> str:
    """Every file of a generation: json/text bytes, PNG pixels (independent of zlib's version)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + b"\0")
            if p.suffix == ".png":
                with Image.open(p) as im:
                    h.update(im.mode.encode() + bytes(str(im.size), "ascii") + im.tobytes())
            else:
                h.update(p.read_bytes())
    return h.hexdigest()


def test_retrieval_alone_is_unchanged(tmp_path):
    ret = dict(n_train=60, n_val=12, n_test=12)
    alone = generate(tmp_path / "alone", seed=0, parts="retrieval", **ret)
    if GENERATOR_VERSION == 2:  # digest of this generation before the vqa part existed
        assert _retrieval_digest(Path(alone["out_dir"])) == \
            "a01bc6f7aa544bbbee483a1a3c313d66715442d7cd1e612beb0b5f97b4ff8dbf"
    both = generate(tmp_path / "both", seed=0, parts="retrieval,vqa", **ret, **SMALL)
    a, b = _all_files(Path(alone["out_dir"])), _all_files(Path(both["out_dir"]))
    # The retrieval files are the same; only the shared vocab (and what records its size) grows.
    for name in a:
        if name.startswith("retrieval/") and name != "retrieval/meta.json":
            assert a[name] == b[name], name
    words = set(a["tokenizer/vocab.txt"].decode().splitlines())
    assert "what" not in words and "what" in set(b["tokenizer/vocab.txt"].decode().splitlines())
    captions = [c for split in ("train", "val", "test")
                for e in _load(alone["retrieval"][f"{split}_file"])
                for c in ([e["caption"]] if isinstance(e["caption"], str) else e["caption"])]
    assert a["tokenizer/vocab.txt"].decode().splitlines() == build_vocab(captions)


def test_cli_vqa_part(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "data.synthetic", "--out", str(out), "--seed", "2", "--parts", "vqa",
           "--n_train_images", "6", "--n_val_images", "2", "--n_test_images", "2", "--questions_per_image", "5",
           "--annotator_accuracy", "0.7"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = forked.run_cmd(cmd, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "synthetic vqa written" in proc.stdout
    assert len(_load(out / "vqa/annotation/vqa_train.json")) == 30
    assert len(_load(out / "vqa/annotation/vqa_test.json")) == 6
    assert not (out / "retrieval").exists()
    again = forked.run_cmd(cmd, env=env, timeout=120)
    assert again.returncode == 0 and "up to date" in again.stdout
