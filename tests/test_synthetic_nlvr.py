"""The synthetic benchmark's NLVR part: BLIP's NLVR2 layout, labels true of the scenes, no text-only shortcut."""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from PIL import Image

from data.synthetic import generate
from data.synthetic.nlvr import TEMPLATE_NAMES, NLVRSpec, template_of
from data.synthetic.vocab import basic_tokenize
from data.utils import pre_caption
from tests.scripts import forked

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(n_train_pairs=80, n_dev_pairs=40, n_test_pairs=40)
# BLIP's data/nlvr_dataset.py: split -> file name, read from ann_root.
BLIP_FILES = {"train": "nlvr_train.json", "val": "nlvr_dev.json", "test": "nlvr_test.json"}
SPLITS = ("train", "dev", "test")


@pytest.fixture(scope="module")
def nlvr(tmp_path_factory) -> dict:
    return generate(tmp_path_factory.mktemp("nlvr") / "out", seed=0, parts="nlvr", **SMALL)


def _load(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _splits(result: dict) -> dict[str, list[dict]]:
    return {s: _load(result["nlvr"][f"{s}_file"]) for s in SPLITS}


# ----------------------------------------------------------------------------- an independent reading of the sentences

def _has(scene: list[dict], **attrs) -> bool:
    return any(all(s[k] == v for k, v in attrs.items()) for s in scene)


def _truth(sentence: str, left: list[dict], right: list[dict]) -> bool:
    """What the sentence says about (left, right), read here from the words (not by the generator's code)."""
    t = " ".join(sentence.lower().rstrip(".").split())
    side = {"left": left, "right": right}
    if m := re.fullmatch(r"the (left|right) image has more shapes than the (left|right) image", t):
        return len(side[m[1]]) > len(side[m[2]])
    if m := re.fullmatch(r"the (left|right) image contains exactly (one|two|three) shapes?", t):
        return len(side[m[1]]) == {"one": 1, "two": 2, "three": 3}[m[2]]
    if m := re.fullmatch(r"the (left|right) image contains an? (\w+) shape", t):
        return _has(side[m[1]], colour=m[2])
    if m := re.fullmatch(r"the (left|right) image contains an? (\w+) (circle|square|triangle)", t):
        return _has(side[m[1]], colour=m[2], shape=m[3])
    if m := re.fullmatch(r"both images contain an? (\w+) shape", t):
        return _has(left, colour=m[1]) and _has(right, colour=m[1])
    if m := re.fullmatch(r"both images contain an? (circle|square|triangle)", t):
        return _has(left, shape=m[1]) and _has(right, shape=m[1])
    if t == "both images have the same number of shapes":
        return len(left) == len(right)
    if t == "each image contains only one shape":
        return len(left) == 1 and len(right) == 1
    if m := re.fullmatch(r"only one image contains an? (circle|square|triangle)", t):
        return _has(left, shape=m[1]) != _has(right, shape=m[1])
    if m := re.fullmatch(r"only one image contains an? (\w+) shape", t):
        return _has(left, colour=m[1]) != _has(right, colour=m[1])
    raise AssertionError(f"sentence of no known form: {sentence!r}")


def _blip_swap(sentence: str) -> str:
    """What BLIP's nlvr_dataset does to a sentence when it exchanges the two images."""
    return " ".join({"left": "right", "right": "left"}.get(w, w) for w in sentence.split(" "))


# ----------------------------------------------------------------------------- tests

def test_layout_reads_as_blip_nlvr_dataset_reads_it(nlvr):
    p = nlvr["nlvr"]
    root = Path(nlvr["out_dir"]) / "nlvr"
    assert Path(p["image_root"]) == root and Path(p["ann_root"]) == root / "annotation"
    assert all(Path(v).exists() for v in p.values())
    sizes = {"train": 80, "val": 40, "test": 40}
    for split, name in BLIP_FILES.items():  # image_root = nlvr/, ann_root = nlvr/annotation
        ann = _load(Path(p["ann_root"]) / name)
        assert len(ann) == sizes[split]
        for e in ann:
            assert {"images", "sentence", "label", "identifier"} <= set(e)
            assert e["label"] in ("True", "False") and isinstance(e["label"], str)
            assert len(e["images"]) == 2 and e["images"][0] != e["images"][1]
            for rel in e["images"]:
                assert rel.startswith("images/")
                with Image.open(os.path.join(p["image_root"], rel)) as im:
                    im.load()
                    assert im.format == "PNG" and im.size == (64, 64) and im.convert("RGB").getcolors(4096)
            words = pre_caption(e["sentence"], 40).split(" ")
            assert len(words) < 40 and "." not in words[-1]
            # BLIP's swap looks for the bare words: a sided sentence must hold them so.
            sided = e["template"] in ("more", "side_count", "side_colour", "side_kind")
            assert ("left" in words or "right" in words) == sided, e
    ids = [e["identifier"] for es in _splits(nlvr).values() for e in es]
    assert len(ids) == len(set(ids))
    assert len(list((root / "images").glob("*.png"))) == 2 * (80 + 40 + 40)
    assert "nlvr/" in (Path(nlvr["out_dir"]) / "README.md").read_text()


def test_balanced_per_split_template_and_sentence(nlvr):
    meta = _load(nlvr["nlvr"]["meta"])
    for split, entries in _splits(nlvr).items():
        labels = Counter(e["label"] for e in entries)
        assert labels["True"] == labels["False"] == len(entries) // 2
        by_template = defaultdict(Counter)
        by_sentence = defaultdict(Counter)
        for e in entries:
            assert template_of(e["sentence"]) == e["template"]
            by_template[e["template"]][e["label"]] += 1
            by_sentence[e["sentence"].lower()][e["label"]] += 1
        assert set(by_template) == set(TEMPLATE_NAMES)  # every template in every split of >= 20 pairs
        assert all(c["True"] == c["False"] for c in by_template.values()), by_template
        assert all(c["True"] == c["False"] for c in by_sentence.values())
        # the templates are used evenly (shuffled rounds)
        sizes = [sum(c.values()) for c in by_template.values()]
        assert max(sizes) - min(sizes) <= 2
        assert meta["splits"][split]["labels"] == {"True": len(entries) // 2, "False": len(entries) // 2}


def test_text_only_baseline_is_chance(nlvr):
    """Per distinct lower-cased sentence the train majority (unseen: the overall train majority)."""
    splits = _splits(nlvr)
    votes = defaultdict(Counter)
    for e in splits["train"]:
        votes[e["sentence"].lower()][e["label"]] += 1
    overall = Counter(e["label"] for e in splits["train"]).most_common(1)[0][0]
    meta = _load(nlvr["nlvr"]["meta"])["text_only_baseline"]
    for split in ("dev", "test"):
        preds = [votes[e["sentence"].lower()].most_common(1)[0][0] if e["sentence"].lower() in votes else overall
                 for e in splits[split]]
        acc = 100 * sum(p == e["label"] for p, e in zip(preds, splits[split])) / len(preds)
        assert 40 <= acc <= 60, (split, acc)
        assert 40 <= meta[split] <= 60
        # a sentence seen in train with both labels: any text rule is right half of the time on it
        seen = [e for e in splits[split] if e["sentence"].lower() in votes]
        assert seen, "dev/test reuse train sentences, so the baseline is tested on seen sentences"


def test_labels_are_true_of_the_scenes_and_survive_blips_swap(nlvr):
    for split in SPLITS:
        entries = _load(nlvr["nlvr"][f"{split}_file"])
        scenes = _load(nlvr["nlvr"][f"{split}_scenes"])
        assert [s["identifier"] for s in scenes] == [e["identifier"] for e in entries]
        for e, s in zip(entries, scenes):
            assert s["images"] == e["images"]
            left, right = s["shapes"]
            assert 1 <= len(left) <= 3 and 1 <= len(right) <= 3
            label = _truth(e["sentence"], left, right)
            assert label == (e["label"] == "True"), (e, s)
            # BLIP's training-time swap: images exchanged, and left/right exchanged when present
            sentence = pre_caption(e["sentence"], 40)
            words = sentence.split(" ")
            swapped = _blip_swap(sentence) if "left" in words or "right" in words else sentence
            assert _truth(swapped, right, left) == label, e


def test_hard_negatives_are_near_misses(tmp_path):
    out = generate(tmp_path, seed=3, parts="nlvr", n_train_pairs=100, n_dev_pairs=2, n_test_pairs=2,
                   hard_negative_frac=1.0)
    entries, scenes = _load(out["nlvr"]["train_file"]), _load(out["nlvr"]["train_scenes"])
    checked = Counter()
    for e, s in zip(entries, scenes):
        if e["label"] != "False":
            continue
        left, right = s["shapes"]
        if e["template"] == "both_colour":  # exactly one image has the colour
            colour = e["sentence"].split()[-2]
            assert _has(left, colour=colour) != _has(right, colour=colour)
        elif e["template"] == "more":  # the other image has more (not merely as many)
            assert _truth(_blip_swap(pre_caption(e["sentence"])), left, right)
        elif e["template"] == "only_one_shape":  # both images have it
            shape = e["sentence"].rstrip(".").split()[-1]
            assert _has(left, shape=shape) and _has(right, shape=shape)
        checked[e["template"]] += 1
    assert checked["both_colour"] and checked["more"] and checked["only_one_shape"]
    assert _load(out["nlvr"]["meta"])["splits"]["train"]["hard_negatives"] == 50


def test_deterministic_and_skipped_when_up_to_date(nlvr, tmp_path):
    again = generate(tmp_path / "again", seed=0, parts="nlvr", **SMALL)
    a, b = _all_files(Path(nlvr["out_dir"])), _all_files(Path(again["out_dir"]))
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    assert generate(tmp_path / "again", seed=0, parts="nlvr", **SMALL)["skipped"]
    other = _all_files(Path(generate(tmp_path / "other", seed=1, parts="nlvr", **SMALL)["out_dir"]))
    assert other["nlvr/annotation/nlvr_train.json"] != a["nlvr/annotation/nlvr_train.json"]
    # split streams are independent: more train pairs leave the test split as it was
    more = _all_files(Path(generate(tmp_path / "more", seed=0, parts="nlvr", **{**SMALL, "n_train_pairs": 100})["out_dir"]))
    assert more["nlvr/annotation/nlvr_test.json"] == a["nlvr/annotation/nlvr_test.json"]


def test_sentences_are_in_the_tokenizer_vocab(nlvr):
    vocab = set((Path(nlvr["tokenizer"]) / "vocab.txt").read_text(encoding="utf-8").splitlines())
    for entries in _splits(nlvr).values():
        for e in entries:
            assert set(basic_tokenize(e["sentence"])) <= vocab, e["sentence"]
    assert {"both", "only", "each", "more", "than"} <= vocab


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="n_dev_pairs must be even"):
        NLVRSpec(n_dev_pairs=201)
    with pytest.raises(ValueError, match="hard_negative_frac"):
        NLVRSpec(hard_negative_frac=1.5)


def test_cli_nlvr_and_video_parts(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "data.synthetic", "--out", str(out), "--seed", "2", "--parts", "nlvr,video",
           "--n_train_pairs", "20", "--n_dev_pairs", "4", "--n_test_pairs", "6", "--n_clips", "3", "--clip_frames", "8",
           "--motion_captions"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = forked.run_cmd(cmd, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "synthetic nlvr+video written" in proc.stdout
    assert len(_load(out / "nlvr/annotation/nlvr_test.json")) == 6
    lines = (out / "video/annotation/msrvtt_test.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all("moving" in json.loads(line)["caption"] for line in lines)
    assert not (out / "retrieval").exists()
