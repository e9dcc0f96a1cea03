"""The synthetic benchmark: real files in the real formats, deterministic, unambiguous, cached."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from PIL import Image

from data.synthetic import PARTS, generate
from data.synthetic.captions import MAX_WORDS, POSITION_PHRASES, clean
from data.synthetic.scenes import COLOURS, SHAPES, SIZES
from data.synthetic.vocab import SPECIAL_TOKENS
from tests.scripts import forked

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(n_train=60, n_val=12, n_test=12)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> dict:
    return generate(tmp_path_factory.mktemp("synth") / "out", seed=0, **SMALL)


def _load(path: str):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_images(synth):
    r = synth["retrieval"]
    image_root = Path(r["image_root"])
    assert image_root == Path(synth["out_dir"]) / "retrieval" / "images"
    for split, n in (("train", 60), ("val", 12), ("test", 12)):
        assert Path(r[f"{split}_file"]).name == f"synthetic_{split}.json"
        assert Path(r[f"{split}_file"]).parent == Path(r["ann_root"])
        files = sorted((image_root / split).glob("*.png"))
        assert len(files) == n
        for f in files[:5]:
            with Image.open(f) as im:
                im.load()
                assert im.format == "PNG" and im.size == (64, 64) and im.mode == "RGB"
                # Not a blank canvas: background plus at least one shape colour.
                assert len(im.getcolors(64 * 64)) > 1
    for name in ("README.md", ".complete", "tokenizer/vocab.txt", "retrieval/meta.json"):
        assert (Path(synth["out_dir"]) / name).is_file()


def test_train_json_is_blip_format_one_entry_per_caption(synth):
    entries = _load(synth["retrieval"]["train_file"])
    image_root = Path(synth["retrieval"]["image_root"])
    assert len(entries) == 60 * 3
    ids: dict[str, int] = {}
    for e in entries:
        assert set(e) == {"image", "caption", "image_id"}
        assert isinstance(e["caption"], str) and e["caption"].strip()
        assert e["image"].startswith("train/") and (image_root / e["image"]).is_file()
        ids.setdefault(e["image_id"], len(ids))
    # image_id -> contiguous idx in first-seen order, one image per id.
    assert len(ids) == 60 and list(ids.values()) == list(range(60))
    assert len({(e["image_id"], e["image"]) for e in entries}) == 60
    assert entries[3]["image_id"] == "synth_train_1"


@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_json_is_blip_format_one_entry_per_image(synth, split):
    entries = _load(synth["retrieval"][f"{split}_file"])
    image_root = Path(synth["retrieval"]["image_root"])
    assert len(entries) == 12
    for e in entries:
        assert set(e) == {"image", "caption"}
        assert e["image"].startswith(f"{split}/") and (image_root / e["image"]).is_file()
        assert isinstance(e["caption"], list) and len(e["caption"]) == 2
        assert all(isinstance(c, str) and c for c in e["caption"])


def test_captions_need_pre_caption_cleaning(synth):
    caps = [e["caption"] for e in _load(synth["retrieval"]["train_file"])]
    assert any(c != c.lower() for c in caps), "some captions should have capitals"
    assert any(c.endswith((".", "!")) for c in caps), "some captions should have final punctuation"
    assert all(len(clean(c).split()) <= MAX_WORDS for c in caps)


@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_split_is_unambiguous(synth, split):
    """Distinct signatures, and every caption names every attribute of every shape."""
    scenes = _load(synth["retrieval"][f"{split}_scenes"])
    entries = _load(synth["retrieval"][f"{split}_file"])
    assert [s["image"] for s in scenes] == [e["image"] for e in entries]
    signatures = [frozenset(tuple(sorted(sh.items())) for sh in s["shapes"]) for s in scenes]
    assert len(set(signatures)) == len(signatures)
    filler = {"on", "the", "at", "side", "near", "in", "of", "image", "picture"}
    position_words = {
        pos: {w for phrase in phrases for w in phrase.split()} - filler for pos, phrases in POSITION_PHRASES.items()
    }
    for scene, entry in zip(scenes, entries):
        for text in entry["caption"]:
            words = set(clean(text).replace(",", " ").split())
            assert len(clean(text).split()) <= MAX_WORDS
            for sh in scene["shapes"]:
                assert sh["colour"] in words and sh["size"] in words, text
                assert {sh["shape"], sh["shape"] + "s"} & words, text
                assert position_words[sh["position"]] & words, text


def test_attribute_vocabulary():
    assert len(COLOURS) == 8 and SHAPES == ("circle", "square", "triangle") and SIZES == ("small", "big")


def test_determinism(tmp_path):
    a = generate(tmp_path / "a", seed=3, n_train=20, n_val=5, n_test=5)
    b = generate(tmp_path / "b", seed=3, n_train=20, n_val=5, n_test=5)
    c = generate(tmp_path / "c", seed=4, n_train=20, n_val=5, n_test=5)
    files_a, files_b, files_c = (_all_files(Path(r["out_dir"])) for r in (a, b, c))
    assert files_a == files_b  # same json bytes, same PNG bytes, same vocab
    assert files_a.keys() == files_c.keys()
    for name in ("retrieval/annotation/synthetic_train.json", "retrieval/annotation/synthetic_test.json"):
        assert files_a[name] != files_c[name]
    pngs = [k for k in files_a if k.endswith(".png")]
    assert sum(files_a[k] != files_c[k] for k in pngs) > len(pngs) // 2
    # Split streams are independent: more train images leave the test split unchanged.
    d = generate(tmp_path / "d", seed=3, n_train=25, n_val=5, n_test=5)
    test_file = "retrieval/annotation/synthetic_test.json"
    assert _all_files(Path(d["out_dir"]))[test_file] == files_a[test_file]


def _tokenizer_from_vocab_file(path: Path):
    """`BertTokenizer(vocab_file=...)`; transformers >= 5 ignores that keyword (it silently builds
    a 5-token vocab) and takes `vocab=` instead."""
    from transformers import BertTokenizer

    tok = BertTokenizer(vocab_file=str(path))
    if len(tok) < 10:
        tok = BertTokenizer(vocab=str(path))
    return tok


def test_tokenizer_folder_covers_every_caption(synth):
    from transformers import BertTokenizer, BertTokenizerFast

    folder = Path(synth["tokenizer"])
    vocab = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert tuple(vocab[: len(SPECIAL_TOKENS)]) == SPECIAL_TOKENS
    assert len(vocab) == len(set(vocab)) == synth["tokenizer_vocab_size"]
    assert synth["vocab_size"] == len(vocab) + 2
    assert {"##s", ".", ","} <= set(vocab)
    assert _load(folder / "tokenizer_config.json") == {
        "do_lower_case": True,
        "model_max_length": 512,
        "tokenizer_class": "BertTokenizer",
    }
    r = synth["retrieval"]
    captions = [e["caption"] for e in _load(r["train_file"])]
    captions += [c for split in ("val", "test") for e in _load(r[f"{split}_file"]) for c in e["caption"]]
    tokenizers = [
        _tokenizer_from_vocab_file(folder / "vocab.txt"),
        BertTokenizer.from_pretrained(str(folder)),
        BertTokenizerFast.from_pretrained(str(folder)),
    ]
    for tok in tokenizers:
        assert len(tok) == len(vocab) and tok.pad_token_id == 0
        for text in captions:
            ids = tok(clean(text)).input_ids
            assert tok.unk_token_id not in ids, (text, tok.convert_ids_to_tokens(ids))
            assert len(ids) <= 35  # retrieval pads/truncates to 35: nothing is cut off
        assert tok.unk_token_id not in tok("A red circle, on the left!").input_ids


def test_meta_counts(synth):
    meta = _load(synth["retrieval"]["meta"])
    assert meta["splits"]["train"]["images"] == 60 and meta["splits"]["train"]["captions"] == 180
    assert (meta["splits"]["test"]["images"], meta["splits"]["test"]["captions"]) == (12, 24)
    assert sum(meta["splits"]["val"]["shapes_per_image"].values()) == 12
    assert meta["vocab_size"] == synth["vocab_size"] and meta["seed"] == 0
    assert meta["args"]["options"]["retrieval"]["n_train"] == 60


def test_stamp_skips_identical_run_and_reruns_on_change(tmp_path):
    out = tmp_path / "s"
    first = generate(out, seed=0, n_train=10, n_val=4, n_test=4)
    assert not first["skipped"]
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    second = generate(out, seed=0, n_train=10, n_val=4, n_test=4)
    assert second["skipped"] and second == {**first, "skipped": True}
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes
    third = generate(out, seed=0, n_train=8, n_val=4, n_test=4)  # other args: rewrite
    assert not third["skipped"]
    assert len(list((out / "retrieval/images/train").glob("*.png"))) == 8  # stale images removed
    assert generate(out, seed=0, n_train=8, n_val=4, n_test=4)["skipped"]


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(TypeError, match="n_train"):
        generate(tmp_path, n_trian=5)
    with pytest.raises(ValueError, match="unknown part"):
        generate(tmp_path, parts="retrieval,imagecodes")
    # 240 one-shape signatures exist: 241 distinct one-shape test images cannot.
    with pytest.raises(ValueError, match="distinct signatures"):
        generate(tmp_path, n_train=1, n_val=1, n_test=241, count_weights=(1.0,))


def test_cli(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "data.synthetic", "--out", str(out), "--seed", "1"]
    cmd += ["--n_train", "20", "--n_val", "5", "--n_test", "5"]
    cmd += ["--n_train_pairs", "20", "--n_dev_pairs", "4", "--n_test_pairs", "4", "--n_clips", "3"]  # nlvr, video
    cmd += ["--n_train_sets", "6", "--n_valid_sets", "2", "--n_test_sets", "2"]  # imagecode (10 images a set)
    cmd += ["--n_train_images", "10", "--n_val_images", "4", "--n_test_images", "4", "--pairs_per_pattern", "1"]  # vqa, mmvp
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = forked.run_cmd(cmd, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "written" in proc.stdout
    # without --parts the CLI writes every part (what `make demo` generates)
    assert list(PARTS) == ["retrieval", "imagecode", "mmvp", "vqa", "nlvr", "video"]
    assert all((out / part / "meta.json").is_file() for part in PARTS)
    assert _load(out / ".complete")["args"]["parts"] == list(PARTS)
    assert len(_load(out / "retrieval/annotation/synthetic_train.json")) == 60
    assert len(_load(out / "retrieval/annotation/synthetic_test.json")) == 5
    again = forked.run_cmd(cmd, env=env, timeout=120)
    assert again.returncode == 0 and "up to date" in again.stdout
