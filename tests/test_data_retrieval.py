"""Retrieval data: caption cleaning, image/json loading, transforms, BLIP-json datasets."""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from tasks.retrieval import RetrievalConfig
from data.retrieval import RetrievalEvalDataset, build_retrieval_datasets
from data.retrieval_train import RetrievalTrainDataset
from data.transforms import (IMAGE_MEAN, IMAGE_STD, OPS, RandomAugment, build_test_transform,
                             build_train_transform)
from data.utils import BadImageError, load_image, pre_caption, read_json

# The data tests use 8-16 px images: a ViT with 8 px patches makes those sizes valid configs.
TINY_VIT = {"width": 8, "depth": 1, "heads": 1, "patch_size": 8}


def _write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def _rgb(path: Path, color=(200, 30, 60), size=(20, 12)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "images"
    for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        _rgb(root / f"img{i}.jpg", color)
    return root


# ---------------------------------------------------------------- pre_caption
@pytest.mark.parametrize("raw, expected", [
    ("A Man riding a Horse.", "a man riding a horse"),
    ('"Hi!" (said) *the* #dog: ok; ~yes', "hi said the dog ok yes"),
    ("  lots   of\t\tspace \n here \n", "lots of space here"),
    ("keep, commas & hyphens-too?", "keep, commas & hyphens-too?"),
    ("...", ""),
])
def test_pre_caption_cleans_like_blip(raw, expected):
    assert pre_caption(raw) == expected


def test_pre_caption_truncates_to_max_words():
    caption = " ".join(f"w{i}" for i in range(40))
    assert pre_caption(caption).split() == [f"w{i}" for i in range(30)]
    assert pre_caption("one. two three", max_words=2) == "one two"


# ---------------------------------------------------------------- load_image
def _roundtrip(tmp_path: Path, img: Image.Image, name: str) -> Image.Image:
    path = tmp_path / name
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == img.size
    return out


def test_load_image_grayscale_and_bilevel(tmp_path):
    gray = _roundtrip(tmp_path, Image.new("L", (4, 3), 77), "l.png")
    assert gray.getpixel((0, 0)) == (77, 77, 77)
    bilevel = Image.new("1", (4, 3), 0)
    bilevel.putpixel((1, 1), 1)
    out = _roundtrip(tmp_path, bilevel, "one.png")
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 1)) == (255, 255, 255)


def test_load_image_alpha_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 3), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (10, 20, 30, 255))
    rgba.putpixel((2, 2), (0, 0, 0, 128))
    out = _roundtrip(tmp_path, rgba, "rgba.png")
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == (10, 20, 30)
    assert all(abs(c - 127) <= 1 for c in out.getpixel((2, 2)))  # half-transparent black

    la = Image.new("LA", (4, 3), (0, 0))
    la.putpixel((1, 1), (40, 255))
    out = _roundtrip(tmp_path, la, "la.png")
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (40, 40, 40)


def test_load_image_palette_with_and_without_transparency(tmp_path):
    pal = Image.new("P", (4, 3), 0)
    pal.putpalette([0, 0, 0, 250, 10, 20] + [0] * 762)
    pal.putpixel((1, 1), 1)
    out = _roundtrip(tmp_path, pal, "p.png")
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 1)) == (250, 10, 20)

    path = tmp_path / "p_trns.png"
    pal.save(path, transparency=0)
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" in check.info
    out = load_image(path)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (250, 10, 20)


def test_load_image_cmyk(tmp_path):
    cmyk = Image.new("CMYK", (4, 3), (0, 0, 0, 0))
    cmyk.putpixel((1, 1), (0, 255, 255, 0))  # full magenta + yellow = red
    out = _roundtrip(tmp_path, cmyk, "cmyk.tif")
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (255, 0, 0)


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_load_image_16bit_scales_by_257(tmp_path, mode):
    img = Image.new(mode, (4, 1))
    for x, value in enumerate([0, 257, 25700, 65535]):
        img.putpixel((x, 0), value)
    path = tmp_path / "g16.png"
    img.save(path)
    out = load_image(path)
    assert [out.getpixel((x, 0))[0] for x in range(4)] == [0, 1, 100, 255]


def test_load_image_int32_and_float(tmp_path):
    # int32 values inside 0..65535 are 16-bit data (older Pillow opens 16-bit PNGs as "I").
    i32 = Image.fromarray(np.array([[0, 25700, 65535]], dtype=np.int32))
    assert i32.mode == "I"
    out = _roundtrip(tmp_path, i32, "i32.tif")
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 100, 255]
    # float in [0, 1] is a normalised intensity; anything else is stretched min..max.
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    out = _roundtrip(tmp_path, unit, "unit.tif")
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    depth = Image.fromarray(np.array([[-10.0, 10.0, 41.0]], dtype=np.float32))
    out = _roundtrip(tmp_path, depth, "depth.tif")
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 100, 255]


def test_load_image_missing_and_corrupt_messages(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing") as err:
        load_image(tmp_path / "nope.jpg", context="entry 17 of ann.json")
    assert "nope.jpg" in str(err.value) and "entry 17 of ann.json" in str(err.value)

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(BadImageError, match="unreadable") as err:
        load_image(bad, context="entry 3 of x.json")
    assert isinstance(err.value, ValueError)
    assert str(bad) in str(err.value) and "entry 3 of x.json" in str(err.value)

    truncated = tmp_path / "trunc.jpg"
    _rgb(tmp_path / "full.jpg", size=(64, 64))
    truncated.write_bytes((tmp_path / "full.jpg").read_bytes()[:200])
    with pytest.raises(BadImageError, match="trunc.jpg"):
        load_image(truncated)


# ---------------------------------------------------------------- read_json
def test_read_json_errors_name_file_and_position(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.json"):
        read_json(tmp_path / "absent.json")
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"image": "a.jpg",\n   "caption": "x" oops}\n]')
    with pytest.raises(ValueError) as err:
        read_json(broken)
    message = str(err.value)
    assert str(broken) in message and "line 3" in message
    assert "column" in message and "char" in message
    assert read_json(_write_json(tmp_path / "ok.json", [1, 2])) == [1, 2]


# ---------------------------------------------------------------- transforms
def test_test_transform_equals_torchvision():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    reference = transforms.Compose([
        transforms.Resize((24, 24), interpolation=InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(IMAGE_MEAN, IMAGE_STD),
    ])
    out = build_test_transform(24)(img)
    assert out.shape == (3, 24, 24)
    assert torch.equal(out, reference(img))


def test_train_transform_shape_and_randomness():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    tf = build_train_transform(32)
    assert any(isinstance(t, RandomAugment) for t in tf.transforms)
    torch.manual_seed(0)
    random.seed(0)
    a = tf(img)
    b = tf(img)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert not torch.equal(a, b)
    plain = build_train_transform(32, hflip=False, randaug=False)
    assert not any(isinstance(t, (RandomAugment, transforms.RandomHorizontalFlip))
                   for t in plain.transforms)


def test_every_randaugment_op_runs_on_rgb():
    assert set(OPS) == {"Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize",
                        "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(30, 220, (24, 32, 3), dtype=np.uint8))
    random.seed(0)
    for name, op in OPS.items():
        out = op(img, 8)
        assert out.mode == "RGB" and out.size == img.size, name
        if name != "Identity":
            assert out.tobytes() != img.tobytes(), f"{name} left the image unchanged"
    # BLIP's enhance mapping 0.1 + 1.8 * m/10 is exactly 1.0 at its magnitude 5: a no-op there.
    for name in ("Brightness", "Sharpness"):
        assert OPS[name](img, 5).tobytes() == img.tobytes(), name
    # Geometric ops expose the grey fill colour in the corners they move out of view.
    random.seed(0)
    rotated = OPS["Rotate"](img, 10)
    assert rotated.getpixel((0, 0)) == (128, 128, 128)


def test_random_augment_p_and_validation():
    img = Image.new("RGB", (16, 16), (10, 200, 40))
    img.putpixel((3, 3), (255, 255, 255))
    assert RandomAugment(n=3, magnitude=10, p=0.0)(img) is img
    with pytest.raises(ValueError, match="Solarize"):
        RandomAugment(ops=("Identity", "Solarize"))
    with pytest.raises(ValueError, match="magnitude"):
        RandomAugment(magnitude=11)


# ---------------------------------------------------------------- datasets
def test_train_idx_first_seen_order_across_files(tmp_path, images):
    a = _write_json(tmp_path / "a.json", [
        {"image": "img1.jpg", "caption": "Green. One", "image_id": "x1"},
        {"image": "img0.jpg", "caption": "red one", "image_id": 7},
        {"image": "img1.jpg", "caption": "green two", "image_id": "x1"},
    ])
    b = _write_json(tmp_path / "b.json", [
        {"image": "img2.jpg", "caption": "blue", "image_id": "7"},  # str "7" != int 7
        {"image": "img0.jpg", "caption": "red two", "image_id": 7},
    ])
    ds = RetrievalTrainDataset([a, b], images, build_test_transform(16))
    assert len(ds) == 5 and ds.num_images == 3 and len(ds.annotation) == 5
    assert [ds[i][2] for i in range(5)] == [0, 1, 0, 2, 1]
    image, caption, idx = ds[0]
    assert image.shape == (3, 16, 16) and caption == "green one" and isinstance(idx, int)
    # green image: the G channel is high after normalisation, R low
    assert image[1].mean() > 1.0 and image[0].mean() < -1.0
    assert ds.source(4) == f"entry 1 of {b}"


@pytest.mark.parametrize("entry, field", [
    ({"caption": "c", "image_id": 1}, "image"),
    ({"image": "img0.jpg", "image_id": 1}, "caption"),
    ({"image": "img0.jpg", "caption": "c"}, "image_id"),
    ({"image": "img0.jpg", "caption": {"text": "c"}, "image_id": 1}, "caption"),
    ({"image": "img0.jpg", "caption": "", "image_id": 1}, "caption"),
    ({"image": "img0.jpg", "caption": " \t\n", "image_id": 1}, "caption"),
    ({"image": "img0.jpg", "caption": [], "image_id": 1}, "caption"),
    ({"image": "img0.jpg", "caption": []}, "caption"),
    ({"image": "img0.jpg", "caption": ["fine", 3]}, "caption"),
    ({"image": "img0.jpg", "caption": ["fine", None]}, "caption"),
    ({"image": "img0.jpg", "caption": ["fine", ["nested"]]}, "caption"),
    ({"image": "img0.jpg", "caption": ["fine", ""]}, "caption"),
    ({"image": "img0.jpg", "caption": ["fine", "  "]}, "caption"),
    ({"image": "img0.jpg", "caption": "c", "image_id": 1.5}, "image_id"),
    ({"image": "img0.jpg", "caption": ["c"], "image_id": True}, "image_id"),
    ({"image": "img0.jpg", "caption": ["c"], "image_id": None}, "image_id"),
    ({"caption": ["c"]}, "image"),
])
def test_train_entry_validation_names_index_and_field(tmp_path, images, entry, field):
    ann = _write_json(tmp_path / "train.json", [
        {"image": "img0.jpg", "caption": "ok", "image_id": 0}, entry])
    with pytest.raises(ValueError) as err:
        RetrievalTrainDataset([ann], images, None)
    assert f"entry 1 of {ann}" in str(err.value) and f"'{field}'" in str(err.value)


def test_train_caption_list_bad_item_names_its_position(tmp_path, images):
    ann = _write_json(tmp_path / "flickr_train.json", [
        {"image": "img0.jpg", "caption": ["a", "b"]}, {"image": "img1.jpg", "caption": ["a", "b", 7]}])
    with pytest.raises(ValueError) as err:
        RetrievalTrainDataset([ann], images, None)
    message = str(err.value)
    assert f"entry 1 of {ann}" in message and "'caption'" in message and "item 2" in message


def test_train_caption_list_one_pair_per_caption(tmp_path, images):
    """Flickr30k / EasyNLP layout: one item per caption, the image path is the image key."""
    entries = [
        {"image": "img0.jpg", "caption": ["Red. One", "red two", "red three"]},
        {"image": "img1.jpg", "caption": ["green one"]},
        {"image": "img0.jpg", "caption": ["red four"]},            # same image again: same idx
        {"image": "img2.jpg", "caption": "blue one", "image_id": "img2.jpg"},  # id == path
        {"image": "img2.jpg", "caption": ["blue two", "blue three"]},
    ]
    ann = _write_json(tmp_path / "flickr30k_train.json", entries)
    ds = RetrievalTrainDataset(ann, images, build_test_transform(8), max_words=2)
    assert len(ds) == 8 and len(ds.annotation) == 8 and ds.num_images == 3
    assert ds.captions == ["red one", "red two", "red three", "green one", "red four", "blue one",
                           "blue two", "blue three"]  # pre_caption, max_words applied
    assert ds._idx == [0, 0, 0, 1, 0, 2, 2, 2]
    assert ds.img_ids == {"img0.jpg": 0, "img1.jpg": 1, "img2.jpg": 2}
    assert [ds.source(i) for i in range(8)] == [
        f"entry {k} of {ann}" for k in (0, 0, 0, 1, 2, 3, 4, 4)]
    assert ds.annotation[1] is ds.annotation[0] and ds.annotation[4]["caption"] == ["red four"]
    image, caption, idx = ds[6]
    assert image.shape == (3, 8, 8) and (caption, idx) == ("blue two", 2)
    assert image[2].mean() > 1.0 and image[0].mean() < -1.0  # the blue image
    with pytest.raises(FileNotFoundError, match=r"gone\.jpg.*entry 1 of .*gone\.json"):
        RetrievalTrainDataset(_write_json(tmp_path / "gone.json", [
            {"image": "img0.jpg", "caption": ["x"]}, {"image": "gone.jpg", "caption": ["y", "z"]}]),
            images, None)[2]


def test_train_mixed_file_groups_by_image_and_explicit_id_wins(tmp_path, images):
    a = _write_json(tmp_path / "a.json", [
        {"image": "img0.jpg", "caption": ["red a", "red b"]},          # id given later: 7
        {"image": "img1.jpg", "caption": "green a", "image_id": "g"},
        {"image": "img2.jpg", "caption": ["blue a"]},                   # no explicit id: the path
        {"image": "img1.jpg", "caption": ["green b", "green c"]},     # -> "g"
        {"image": "img0.jpg", "caption": "red c", "image_id": 7},
    ])
    b = _write_json(tmp_path / "b.json", [
        {"image": "img2.jpg", "caption": "blue b", "image_id": "img2.jpg"},
        {"image": "img0.jpg", "caption": ["red d"], "image_id": 7},   # a list may carry one
        {"image": "img1.jpg", "caption": ["green d"]},
        {"image": "sub/img0.jpg", "caption": ["other path"], "image_id": "g"},  # explicit wins
    ])
    ds = RetrievalTrainDataset([a, b], images, None)
    assert ds.captions == ["red a", "red b", "green a", "blue a", "green b", "green c", "red c",
                           "blue b", "red d", "green d", "other path"]
    assert ds._idx == [0, 0, 1, 2, 1, 1, 0, 2, 0, 1, 1]
    assert ds.img_ids == {7: 0, "g": 1, "img2.jpg": 2} and ds.num_images == 3
    assert ds.source(8) == f"entry 1 of {b}" and ds.source(5) == f"entry 3 of {a}"
    assert [ds[i][1:] for i in (0, 9)] == [("red a", 0), ("green d", 1)]


def test_train_ambiguous_default_image_id_is_an_error(tmp_path, images):
    two_ids = _write_json(tmp_path / "two_ids.json", [
        {"image": "img0.jpg", "caption": "a", "image_id": 1},
        {"image": "img0.jpg", "caption": "b", "image_id": 2},   # allowed: explicit wins
        {"image": "img0.jpg", "caption": ["c"]},                # but which one is this?
    ])
    with pytest.raises(ValueError) as err:
        RetrievalTrainDataset([two_ids], images, None)
    message = str(err.value)
    assert f"entry 2 of {two_ids}" in message and "'image_id'" in message
    assert "img0.jpg" in message and f"entry 1 of {two_ids}" in message

    taken = _write_json(tmp_path / "taken.json", [
        {"image": "img1.jpg", "caption": "a", "image_id": "img0.jpg"},  # another image's path
        {"image": "img0.jpg", "caption": ["b", "c"]},
    ])
    with pytest.raises(ValueError) as err:
        RetrievalTrainDataset([taken], images, None)
    message = str(err.value)
    assert f"entry 1 of {taken}" in message and "'image_id'" in message and "img1.jpg" in message
    taken_ok = _write_json(tmp_path / "taken_ok.json", [
        {"image": "img1.jpg", "caption": "a", "image_id": "img0.jpg"},
        {"image": "img0.jpg", "caption": ["b", "c"], "image_id": "zero"}])
    assert RetrievalTrainDataset([taken_ok], images, None)._idx == [0, 1, 1]


def test_train_csv_blank_image_id_resolves_and_bad_caption_names_row(tmp_path, images):
    csv_file = tmp_path / "train.csv"
    csv_file.write_text("image,caption,image_id\n"
                        "img0.jpg,Red. A,r\n"
                        "img1.jpg,green a,\n"
                        "img0.jpg,red b,\n"     # blank: the explicit id of img0.jpg, "r"
                        "img1.jpg,green b,\n")
    ds = RetrievalTrainDataset(csv_file, images, None)
    assert ds.captions == ["red a", "green a", "red b", "green b"] and ds._idx == [0, 1, 0, 1]
    assert ds.img_ids == {"r": 0, "img1.jpg": 1}
    no_col = tmp_path / "no_col.tsv"
    no_col.write_text("image\tcaption\nimg0.jpg\ta\nimg0.jpg\tb\nimg1.jpg\tc\n")
    assert RetrievalTrainDataset(no_col, images, None)._idx == [0, 0, 1]
    # and a json train file may use the CSV's default: the image path
    js = _write_json(tmp_path / "more.json", [{"image": "img1.jpg", "caption": ["green c"]}])
    assert RetrievalTrainDataset([csv_file, js], images, None)._idx == [0, 1, 0, 1, 1]

    bad = tmp_path / "bad.csv"
    bad.write_text("image,caption\nimg0.jpg,a\nimg1.jpg,b\nimg2.jpg,  \n")
    with pytest.raises(ValueError) as err:
        RetrievalTrainDataset(bad, images, None)
    assert f"row 2 (line 4) of {bad}" in str(err.value) and "'caption'" in str(err.value)


def test_build_custom_with_caption_list_train_file(tmp_path, images):
    _write_json(tmp_path / "train.json", [{"image": "img0.jpg", "caption": ["a", "b"]},
                                          {"image": "img1.jpg", "caption": "c", "image_id": 1}])
    _write_json(tmp_path / "test.json", [{"image": "img0.jpg", "caption": ["a", "b"]}])
    cfg = RetrievalConfig(vit=TINY_VIT, dataset="custom", ann_root=str(tmp_path), image_root=str(images),
                          train_file="train.json", test_file="test.json", image_size=8)
    ds = build_retrieval_datasets(cfg, splits=("train", "test"))
    assert len(ds["train"]) == 3 and ds["train"].num_images == 2
    assert [ds["train"][i][1:] for i in range(3)] == [("a", 0), ("b", 0), ("c", 1)]
    assert ds["train"][0][0].shape == (3, 8, 8)


def test_eval_entry_validation_names_index_and_field(tmp_path, images):
    ann = _write_json(tmp_path / "test.json", [
        {"image": "img0.jpg", "caption": ["a"]}, {"image": "img1.jpg", "caption": ["b"]},
        {"image": "img2.jpg"}])
    with pytest.raises(ValueError, match=r"entry 2 of .*test\.json.*'caption'"):
        RetrievalEvalDataset(ann, images, None)
    ann = _write_json(tmp_path / "test2.json", [{"caption": ["a"]}])
    with pytest.raises(ValueError, match=r"entry 0 of .*test2\.json.*'image'"):
        RetrievalEvalDataset(ann, images, None)


def test_train_missing_image_names_path_and_entry(tmp_path, images):
    ann = _write_json(tmp_path / "train.json", [
        {"image": "img0.jpg", "caption": "a", "image_id": 0},
        {"image": "gone.jpg", "caption": "b", "image_id": 1}])
    ds = RetrievalTrainDataset([ann], images, None)
    with pytest.raises(FileNotFoundError) as err:
        ds[1]
    assert str(images / "gone.jpg") in str(err.value) and f"entry 1 of {ann}" in str(err.value)


def test_train_skip_bad_images_logs_counts_and_substitutes(tmp_path, images, caplog):
    (images / "corrupt.jpg").write_bytes(b"\x00" * 10)
    ann = _write_json(tmp_path / "train.json", [
        {"image": "img0.jpg", "caption": "a", "image_id": 0},
        {"image": "gone.jpg", "caption": "b", "image_id": 1},
        {"image": "corrupt.jpg", "caption": "c", "image_id": 2},
        {"image": "img2.jpg", "caption": "d", "image_id": 3}])
    ds = RetrievalTrainDataset([ann], images, None, skip_bad_images=True)
    with caplog.at_level(logging.WARNING, logger="data.retrieval_train"):
        image, caption, idx = ds[1]
    assert (caption, idx) == ("d", 3) and image.size == (20, 12)
    assert ds.num_skipped == 2
    assert "gone.jpg" in caplog.text and "corrupt.jpg" in caplog.text
    caplog.clear()
    assert ds[2][1] == "d" and ds.num_skipped == 2 and caplog.text == ""  # known bad: no re-log

    all_bad = _write_json(tmp_path / "bad.json", [
        {"image": "gone.jpg", "caption": "b", "image_id": 1}])
    with pytest.raises(RuntimeError, match="could be loaded"):
        RetrievalTrainDataset([all_bad], images, None, skip_bad_images=True)[0]


def _eval_ann(tmp_path: Path) -> Path:
    return _write_json(tmp_path / "test.json", [
        {"image": "img0.jpg", "caption": ["Red A.", "red b"]},
        {"image": "gone.jpg", "caption": ["lost"]},
        {"image": "img1.jpg", "caption": "green only"},
        {"image": "img2.jpg", "caption": ["blue a", "blue b", "blue c"]},
    ])


def test_eval_mappings(tmp_path, images):
    ds = RetrievalEvalDataset(_eval_ann(tmp_path), images, build_test_transform(8))
    assert ds.text == ["red a", "red b", "lost", "green only", "blue a", "blue b", "blue c"]
    assert ds.img2txt == {0: [0, 1], 1: [2], 2: [3], 3: [4, 5, 6]}
    assert ds.txt2img == {0: 0, 1: 0, 2: 1, 3: 2, 4: 3, 5: 3, 6: 3}
    image, i = ds[3]
    assert image.shape == (3, 8, 8) and i == 3
    with pytest.raises(FileNotFoundError, match=r"gone\.jpg.*entry 1 of .*test\.json"):
        ds[1]


def test_eval_skip_bad_images_drops_entry_with_captions(tmp_path, images, caplog):
    from data.preflight import check_splits
    (images / "img1.jpg").write_bytes(b"garbage")
    ds = RetrievalEvalDataset(_eval_ann(tmp_path), images, None, skip_bad_images=True)
    with caplog.at_level(logging.WARNING, logger="data.preflight"):
        assert check_splits({"test": ds}, skip=True) == {"test": 2}
    assert "gone.jpg" in caplog.text and "img1.jpg" in caplog.text
    assert "split 'test': dropped 2 of its 4 images (skip_bad_images; listed above), 2 items left" in caplog.text
    assert ds.image == ["img0.jpg", "img2.jpg"] and len(ds) == 2 and len(ds.annotation) == 2
    assert ds.text == ["red a", "red b", "blue a", "blue b", "blue c"]
    assert ds.img2txt == {0: [0, 1], 1: [2, 3, 4]}
    assert ds.txt2img == {0: 0, 1: 0, 2: 1, 3: 1, 4: 1}
    assert ds[1][0].getpixel((0, 0))[2] > 200  # the blue image


# ---------------------------------------------------------------- build_retrieval_datasets
def _coco_like(root: Path, names: dict[str, str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for split, name in names.items():
        if split == "train":
            _write_json(root / name, [{"image": "img0.jpg", "caption": split, "image_id": 0}])
        else:
            _write_json(root / name, [{"image": "img0.jpg", "caption": [split]}])


def test_build_defaults_for_coco_and_flickr(tmp_path, images):
    ann_root = tmp_path / "ann"
    _coco_like(ann_root, {"train": "coco_karpathy_train.json", "val": "coco_karpathy_val.json",
                          "test": "coco_karpathy_test.json", "ftest": "flickr30k_test.json"})
    cfg = RetrievalConfig(vit=TINY_VIT, dataset="coco", ann_root=str(ann_root), image_root=str(images),
                          image_size=16)
    ds = build_retrieval_datasets(cfg)
    assert isinstance(ds["train"], RetrievalTrainDataset)
    assert isinstance(ds["val"], RetrievalEvalDataset) and ds["val"].text == ["val"]
    assert ds["test"].text == ["test"] and ds["test"].ann_file.endswith("coco_karpathy_test.json")
    assert ds["train"][0][0].shape == (3, 16, 16) and ds["test"][0][0].shape == (3, 16, 16)

    cfg.dataset = "flickr"
    ds = build_retrieval_datasets(cfg, splits=("test",))
    assert list(ds) == ["test"] and ds["test"].text == ["ftest"]
    with pytest.raises(FileNotFoundError, match="flickr30k_val.json"):
        build_retrieval_datasets(cfg, splits=("val",))


def test_build_custom_and_overrides(tmp_path, images):
    ann_root = tmp_path / "ann"
    _coco_like(ann_root, {"train": "t1.json", "val": "v.json", "test": "x.json"})
    _write_json(tmp_path / "t2.json", [{"image": "img1.jpg", "caption": "more", "image_id": 5}])
    cfg = RetrievalConfig(vit=TINY_VIT, dataset="custom", ann_root=str(ann_root), image_root=str(images),
                          train_file=["t1.json", str(tmp_path / "t2.json")], val_file="v.json",
                          test_file="x.json", max_words=1, skip_bad_images=False, image_size=8)
    ds = build_retrieval_datasets(cfg, test_transform=lambda img: img.size)
    assert len(ds["train"]) == 2 and ds["train"].num_images == 2
    assert ds["val"][0] == ((20, 12), 0)  # the passed test transform is used
    cfg.test_file = None
    with pytest.raises(ValueError, match="test_file"):
        build_retrieval_datasets(cfg)
    assert list(build_retrieval_datasets(cfg, splits=("val",))) == ["val"]

    cfg = RetrievalConfig(vit=TINY_VIT, dataset="coco", ann_root=str(ann_root), image_root=str(images),
                          test_file="x.json", image_size=8)
    assert build_retrieval_datasets(cfg, splits=("test",))["test"].text == ["test"]


def test_build_unknown_dataset_lists_valid_ones(tmp_path):
    with pytest.raises(ValueError) as err:
        build_retrieval_datasets(RetrievalConfig.model_construct(dataset="imagenet", ann_root=str(tmp_path)))
    assert "imagenet" in str(err.value)
    assert all(name in str(err.value) for name in ("coco", "flickr", "custom"))
