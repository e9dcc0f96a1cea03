"""NLVR2 data: BLIP's layout (string labels, two images relative to image_root, pre_caption 40),
the training-time swap of images and left/right (reproducible per sample, never in evaluation),
both images checked before any model, one-line errors naming file, entry and field, and the shipped
config equal to BLIP's."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from data.nlvr import NLVRCollator, NLVRDataset, read_nlvr_file, swap_sides
from data.preflight import check_splits
from utils.errors import DataError

REPO = Path(__file__).resolve().parents[1]

# BLIP's configs/nlvr.yaml, key for key (the release's values).
BLIP_NLVR_YAML = {
    "image_root": "/export/share/datasets/vision/NLVR2/", "ann_root": "annotation",
    "pretrained": "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_base_nlvr.pth",
    "vit": "base", "batch_size_train": 16, "batch_size_test": 64, "vit_grad_ckpt": False, "vit_ckpt_layer": 0,
    "max_epoch": 15, "image_size": 384, "weight_decay": 0.05, "init_lr": 3e-5, "min_lr": 0,
}


def _write(tmp_path, name, entries):
    path = tmp_path / name
    path.write_text(entries if isinstance(entries, str) else json.dumps(entries))
    return path


def _pair(a="a.png", b="b.png", sentence="The left image has a dog.", label="True", **extra):
    return {"images": [a, b], "sentence": sentence, "label": label, **extra}


def test_blips_layout_string_and_boolean_labels_paths_and_identifier(tmp_path):
    path = _write(tmp_path, "nlvr_dev.json", [
        _pair(sentence="The LEFT image: two dogs!", identifier="dev-850-0-0"),
        _pair("x/c.png", "/abs/d.png", sentence="Both images show (exactly) one cat.", label="False"),
        _pair(label=True), _pair(label=False)])
    entries, where = read_nlvr_file(path, "/nlvr2")
    assert [e.label for e in entries] == [1, 0, 1, 0]
    assert entries[0].sentence == "the left image two dogs"          # pre_caption: punctuation, case
    assert entries[0].text == "The LEFT image: two dogs!" and entries[0].identifier == "dev-850-0-0"
    assert entries[1].paths == ("/nlvr2/x/c.png", "/abs/d.png") and entries[1].images == ("x/c.png", "/abs/d.png")
    assert entries[1].identifier is None and where(1) == f"entry 1 of {path}"
    long = read_nlvr_file(_write(tmp_path, "long.json", [_pair(sentence=" ".join(["w"] * 50))]))[0][0]
    assert long.sentence.split(" ") == ["w"] * 40                     # BLIP's pre_caption(sentence, 40)


@pytest.mark.parametrize("entry,message", [
    ({"images": ["a.png"], "sentence": "s", "label": "True"}, r"entry 1 of .*field 'images': expected a list of "
                                                               r"exactly 2 image paths .*got 1"),
    ({"images": ["a.png", "b.png", "c.png"], "sentence": "s", "label": "True"}, r"field 'images': .* got 3"),
    ({"images": "a.png", "sentence": "s", "label": "True"}, r"entry 1 of .*field 'images'"),
    ({"images": ["a.png", ""], "sentence": "s", "label": "True"}, r"entry 1 of .*field 'images\[1\]'"),
    ({"images": ["a.png", "b.png"], "sentence": "s", "label": "yes"}, r"entry 1 of .*field 'label': expected "
                                                                      r"\"True\" or \"False\".*got 'yes'"),
    ({"images": ["a.png", "b.png"], "sentence": "s", "label": "true"}, r"field 'label'.*got 'true'"),
    ({"images": ["a.png", "b.png"], "sentence": "s", "label": 1}, r"field 'label'.*got 1"),
    ({"images": ["a.png", "b.png"], "sentence": "", "label": "True"}, r"entry 1 of .*field 'sentence'"),
    ({"images": ["a.png", "b.png"], "sentence": "...", "label": "True"}, r"field 'sentence'.*empty once cleaned"),
    ({"images": ["a.png", "b.png"], "label": "True"}, r"entry 1 of .*missing field 'sentence'"),
    ({"images": ["a.png", "b.png"], "sentence": "s", "label": "True", "identifier": [1]},
     r"entry 1 of .*field 'identifier'"),
])
def test_bad_entries_name_file_entry_and_field(tmp_path, entry, message):
    path = _write(tmp_path, "nlvr_train.json", [_pair(), entry])
    with pytest.raises(DataError, match=message):
        read_nlvr_file(path)
    with pytest.raises(DataError, match="nlvr_train.json"):
        read_nlvr_file(path)


def test_files_that_are_not_a_list_of_entries(tmp_path):
    with pytest.raises(DataError, match="no entries"):
        read_nlvr_file(_write(tmp_path, "a.json", []))
    with pytest.raises(DataError, match="expected a json list"):
        read_nlvr_file(_write(tmp_path, "b.json", {"images": []}))
    with pytest.raises(DataError, match=r"b2.json: malformed JSON"):
        read_nlvr_file(_write(tmp_path, "b2.json", "[{"))
    with pytest.raises(FileNotFoundError, match="c.json"):
        read_nlvr_file(tmp_path / "c.json")


def test_swap_sides_is_blips_word_swap():
    assert swap_sides("the left image has more shapes than the right image") == \
        "the right image has more shapes than the left image"
    assert swap_sides("both images contain a red shape") == "both images contain a red shape"
    # Words are split on single spaces as the release does: 'left,' or 'leftmost' are not 'left'.
    assert swap_sides("left, leftmost right") == "left, leftmost left"


def _images(tmp_path, n):
    """n images of distinct flat colours, and the transform that reads a colour back as a tensor."""
    for i in range(n):
        Image.new("RGB", (4, 4), (10 * i, 0, 0)).save(tmp_path / f"i{i}.png")
    return lambda img: torch.tensor(img.getpixel((0, 0))[0])


def test_training_swaps_images_and_sides_at_random_evaluation_never(tmp_path):
    from utils.sampling import SeededItems
    transform = _images(tmp_path, 2)
    entries = [_pair("i0.png", "i1.png", sentence="The left image is darker than the right image.")] * 64
    path = _write(tmp_path, "nlvr_train.json", entries)
    train = SeededItems(NLVRDataset(path, str(tmp_path), transform, train=True), seed=7)
    items = [train[i] for i in range(64)]
    swapped = [it for it in items if int(it[0]) == 10]
    kept = [it for it in items if int(it[0]) == 0]
    assert len(swapped) + len(kept) == 64 and 16 < len(swapped) < 48
    assert all(int(it[1]) == 0 and it[2] == "the right image is darker than the left image" for it in swapped)
    assert all(int(it[1]) == 10 and it[2] == "the left image is darker than the right image" for it in kept)
    assert all(it[3] == 1 for it in items)                          # the swap keeps the label right
    again = SeededItems(NLVRDataset(path, str(tmp_path), transform, train=True), seed=7)
    assert [again[i][2] for i in range(64)] == [it[2] for it in items]   # a function of (seed, epoch, index)
    again.epoch = 1
    assert [again[i][2] for i in range(64)] != [it[2] for it in items]
    test = NLVRDataset(path, str(tmp_path), transform, train=False)
    assert all((int(test[i][0]), test[i][2]) == (0, "the left image is darker than the right image")
               for i in range(64))


def test_both_images_are_checked_before_any_model_naming_the_field(tmp_path):
    _images(tmp_path, 3)
    path = _write(tmp_path, "nlvr_dev.json", [_pair("i0.png", "i1.png"), _pair("i2.png", "missing.png"),
                                              _pair("gone.png", "i0.png")])
    ds = NLVRDataset(path, str(tmp_path), None, train=False)
    with pytest.raises(FileNotFoundError, match=r"entry 1 of .*nlvr_dev.json, field 'images\[1\]': image file "
                                                r"missing: .*missing.png; missing or unreadable: 2 of the 5"):
        check_splits({"val": ds}, skip=False)
    assert check_splits({"val": ds}, skip=True) == {"val": 2}
    assert len(ds) == 1 and ds.entries[0].images == ("i0.png", "i1.png") and ds.source(0).startswith("entry 0 ")
    (tmp_path / "bad.png").write_text("not an image")
    bad = NLVRDataset(_write(tmp_path, "t.json", [_pair("bad.png", "i0.png")]), str(tmp_path), None, train=False)
    with pytest.raises(ValueError, match=r"entry 0 of .*t.json, field 'images\[0\]': unreadable image"):
        check_splits({"test": bad}, skip=False)


def test_collate_stacks_both_sides_and_tokenizes_the_sentences():
    seen = []

    def tokenize(sentences):
        seen.append(list(sentences))
        return torch.ones(len(sentences), 3, dtype=torch.long), torch.ones(len(sentences), 3, dtype=torch.long)

    batch = NLVRCollator(tokenize)([(torch.zeros(3, 2, 2), torch.ones(3, 2, 2), "a b", 1),
                                    (torch.zeros(3, 2, 2), torch.ones(3, 2, 2), "c", 0)])
    assert seen == [["a b", "c"]] and batch["labels"].tolist() == [1, 0]
    assert batch["pixel_values0"].shape == (2, 3, 2, 2) and batch["pixel_values1"].sum() == 24
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 3)


def test_the_shipped_config_is_blips_and_validates():
    from ruamel.yaml import YAML
    raw = dict(YAML(typ="safe").load((REPO / "configs" / "nlvr.yaml").read_text()))
    assert {k: raw[k] for k in BLIP_NLVR_YAML} == BLIP_NLVR_YAML
    assert set(raw) - set(BLIP_NLVR_YAML) == {"output_dir"}
    from tasks.nlvr import NLVRConfig, resolve
    from utils.config import load_config
    cfg, _ = load_config(REPO / "configs" / "nlvr.yaml", NLVRConfig, [])
    assert (cfg.image_size, cfg.init_lr, cfg.min_lr, cfg.max_epoch, cfg.batch_size_train, cfg.batch_size_test,
            cfg.weight_decay, cfg.vit, cfg.vit_drop_path_rate) == (384, 3e-5, 0.0, 15, 16, 64, 0.05, "base", 0.1)
    assert [resolve(cfg, f) for f in (cfg.train_file, cfg.val_file, cfg.test_file)] == [
        "annotation/nlvr_train.json", "annotation/nlvr_dev.json", "annotation/nlvr_test.json"]
