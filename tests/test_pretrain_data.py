"""Pretraining pair lists (docs/FORMATS.md 2): caption string or list, several files, absolute or
image_root-relative paths, BLIP train files as lists, and errors that name file, entry and field."""
from __future__ import annotations

import json
import random

import pytest
from PIL import Image

from data.pretrain import PretrainDataset, build_pretrain_dataset
from tasks.contextblip_pretrain import PretrainConfig
from utils.config import load_config


@pytest.fixture()
def pairs(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for i, colour in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (20, 20), colour).save(root / "sub" / f"{i}.png")
    outside = tmp_path / "elsewhere.png"
    Image.new("RGB", (20, 20), "white").save(outside)
    a = tmp_path / "a.json"
    a.write_text(json.dumps([
        {"image": "sub/0.png", "caption": "A red Square."},
        {"image": "sub/1.png", "caption": ["a green one", "green: the colour", "GREEN!"]},
        {"image": str(outside), "caption": "white", "image_id": 7, "extra": [1, 2]},
    ]))
    b = tmp_path / "b.json"
    b.write_text(json.dumps([{"image": "sub/2.png", "caption": "blue"},
                             {"image": "sub/0.png", "caption": "red again"}]))
    return tmp_path, root, a, b


def test_string_and_list_captions_from_several_files_with_absolute_and_relative_paths(pairs):
    tmp_path, root, a, b = pairs
    ds = PretrainDataset([a, b], root, transform=None)
    assert len(ds) == 5 and ds.num_images == 4   # sub/0.png appears in both files: one image
    image, caption, idx = ds[0]
    assert caption == "a red square" and idx == 0 and image.getpixel((0, 0)) == (255, 0, 0)
    assert ds[2][0].getpixel((0, 0)) == (255, 255, 255)          # absolute path, root ignored
    assert ds[4][2] == ds[0][2] and ds[3][2] not in (ds[0][2], ds[1][2])
    picked = set()
    for seed in range(40):
        random.seed(seed)
        picked.add(ds[1][1])
    assert picked == {"a green one", "green the colour", "green"}  # cleaned, one drawn at random


def test_config_builds_the_dataset_and_a_blip_train_file_is_a_valid_list(pairs, synthetic_small):
    tmp_path, root, a, b = pairs
    cfg = load_config(None, PretrainConfig, [f"train_file={a}", f"image_root={root}"])[0]
    assert len(build_pretrain_dataset(cfg, None)) == 3
    blip = synthetic_small / "retrieval"
    cfg = load_config(None, PretrainConfig, [f"train_file=[{blip / 'annotation' / 'synthetic_train.json'}]",
                                             f"image_root={blip / 'images'}"])[0]
    ds = build_pretrain_dataset(cfg, None)
    assert len(ds) == 96 * 3 and ds.num_images == 96
    assert ds[0][0].size == (32, 32)


@pytest.mark.parametrize("content, message", [
    ({"image": "x.png"}, "bad.json: expected a json list"),
    ([["x.png", "c"]], "entry 0 of .*bad.json: expected an object"),
    ([{"image": "sub/0.png", "caption": "ok"}, {"caption": "c"}], "entry 1 of .*bad.json: missing field 'image'"),
    ([{"image": "sub/0.png"}], "entry 0 of .*bad.json: missing field 'caption'"),
    ([{"image": "sub/0.png", "caption": 3}], "entry 0 of .*bad.json: invalid field 'caption'"),
    ([{"image": "sub/0.png", "caption": []}], "invalid field 'caption': the caption list is empty"),
    ([{"image": "sub/0.png", "caption": ["a", None]}], "invalid field 'caption'"),
    ([{"image": "sub/0.png", "caption": " \t"}], "entry 0 of .*bad.json: invalid field 'caption': the caption is"),
    ([{"image": "sub/0.png", "caption": ["a", ""]}], "invalid field 'caption': item 1 of the caption list is empty"),
    ([{"image": "", "caption": "c"}], "invalid field 'image'"),
    ([{"image": "  ", "caption": "c"}], "invalid field 'image'"),
    ([], "bad.json: no entries"),
])
def test_bad_entries_are_errors_naming_file_entry_and_field(pairs, content, message):
    tmp_path, root, a, b = pairs
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        PretrainDataset([a, bad], root, None)


def test_missing_image_names_path_and_entry_and_can_be_skipped(pairs):
    tmp_path, root, a, b = pairs
    bad = tmp_path / "missing.json"
    bad.write_text(json.dumps([{"image": "sub/0.png", "caption": "x"}, {"image": "nope.png", "caption": "y"}]))
    with pytest.raises(FileNotFoundError, match=r"nope.png \(entry 1 of .*missing.json\)"):
        PretrainDataset(bad, root, None)[1]
    ds = PretrainDataset(bad, root, None, skip_bad_images=True)
    assert ds[1][1] == "x" and ds.num_skipped == 1
    with pytest.raises(FileNotFoundError, match="json file not found"):
        PretrainDataset(tmp_path / "absent.json", root, None)
