"""Retrieval datasets: BLIP-json / caption-list / CSV train files (data/retrieval_train.py), eval files
(data/retrieval.py) and build_retrieval_datasets. Caption cleaning and image loading:
tests/test_data_utils.py; transforms: tests/test_data_transforms.py."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tasks.retrieval import RetrievalConfig
from data.retrieval import RetrievalEvalDataset, build_retrieval_datasets
from data.retrieval_train import RetrievalTrainDataset
from data.transforms import build_test_transform
from tests.scripts.data_files import _rgb, _write_json

# The data tests use 8-16 px images: a ViT with 8 px patches makes those sizes valid configs.
TINY_VIT = {"width": 8, "depth": 1, "heads": 1, "patch_size": 8}


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "images"
    for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        _rgb(root / f"img{i}.jpg", color)
    return root


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
