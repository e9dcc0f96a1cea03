"""`python -m tools pairs` over miniatures of every source format (data/corpora.py), and the DLIP
all.json / Kaggle Flickr30k results.csv read directly by the pretraining dataset."""
from __future__ import annotations

import json
import tarfile

import pytest
from PIL import Image

from data.pretrain import PretrainDataset
from tools.pairs import main as pairs_main
from utils.errors import DataError


def _image(path, color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path


def _json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


KAGGLE = ("image_name| comment_number| comment\n"
          '10.jpg| 0| Two young guys with "shaggy" hair , look at their hands .\n'
          "10.jpg| 1| A man in a blue shirt .\n"
          "11.jpg| 4   A dog runs across the grass .\n"        # the released file's malformed row
          "11.jpg| 0| A dog runs across the grass .\n"
          "\n"
          "11.jpg| 1|  \n")                                      # empty comment


@pytest.fixture
def corpora(tmp_path):
    """One miniature of each source; the expected counts are in the tests."""
    s = {}
    # 1. img2dataset files output: 2 good samples, a failed download, a missing image, an empty caption.
    i2d = tmp_path / "cc3m"
    shard = i2d / "00000"
    for k, caption in ((0, "A dog on grass."), (1, "A red car.")):
        _image(shard / f"00000000{k}.jpg")
        (shard / f"00000000{k}.txt").write_text(caption)
        _json(shard / f"00000000{k}.json", {"caption": caption, "key": f"00000000{k}", "status": "success"})
    _json(shard / "000000002.json", {"caption": "lost", "key": "000000002", "status": "failed_to_download"})
    (shard / "000000003.txt").write_text("no image here")
    _json(shard / "000000003.json", {"caption": "no image here", "key": "000000003", "status": "success"})
    _image(shard / "000000004.png")
    (shard / "000000004.txt").write_text("   ")
    (i2d / "00000.parquet").write_bytes(b"PAR1 not read")
    _json(i2d / "00000_stats.json", {"count": 5, "successes": 4})
    s["i2d"] = i2d
    # 2. Visual Genome region descriptions.
    vg_root = tmp_path / "vg" / "VG_100K"
    _image(vg_root / "1.jpg"), _image(vg_root / "2.jpg")
    region = lambda phrase, w, h: {"region_id": 0, "image_id": 0, "phrase": phrase, "x": 0, "y": 0,
                                   "width": w, "height": h}
    s["vg"] = _json(tmp_path / "vg" / "region_descriptions.json", [
        {"id": 1, "regions": [region("a man riding a brown horse", 100, 100), region("red hat", 300, 300),
                              region("a tall tree behind the fence", 10, 10),
                              region("A man riding a brown horse.", 120, 90), region(" ", 300, 300)]},
        {"id": 2, "regions": [region("two people walking on the beach", 200, 50)]}])
    s["vg_root"] = vg_root
    # 3. COCO Karpathy train: two captions of A, one of B, one of a missing image.
    coco = tmp_path / "coco"
    a, b = "val2014/COCO_val2014_000000000001.jpg", "train2014/COCO_train2014_000000000002.jpg"
    _image(coco / a), _image(coco / b)
    s["coco"] = _json(tmp_path / "ann" / "coco_karpathy_train.json", [
        {"image": a, "caption": "a cat on a mat", "image_id": "coco_1"},
        {"image": a, "caption": "a cat sleeping", "image_id": "coco_1"},
        {"image": b, "caption": "a bus", "image_id": "coco_2"},
        {"image": "val2014/COCO_val2014_000000000003.jpg", "caption": "gone", "image_id": "coco_3"}])
    s["coco_root"] = coco
    # 4. DLIP all.json: a duplicate of the img2dataset pair, a new caption, an empty caption.
    dog = str(shard / "000000000.jpg")
    s["dlip"] = _json(tmp_path / "dlip" / "all.json", [
        {"caption": "a dog on grass", "image_root": dog, "id": 0},
        {"caption": "a dog on the grass", "image_root": dog, "id": 1},
        {"caption": "", "image_root": dog, "id": 2}])
    # 5. Kaggle Flickr30k results.csv.
    flickr = tmp_path / "flickr" / "flickr30k_images"
    _image(flickr / "10.jpg"), _image(flickr / "11.jpg")
    s["kaggle"] = tmp_path / "flickr" / "results.csv"
    s["kaggle"].write_text(KAGGLE)
    s["flickr_root"] = flickr
    # 6. Our own pair list: one caption duplicates VG's, one is new.
    s["mine"] = _json(tmp_path / "mine.json", [
        {"image": str(vg_root / "2.jpg"), "caption": ["Two people walking on the beach", "a sunny beach"]}])
    return s


def _run(s, out, *extra):
    args = ["--out", str(out), str(s["i2d"]), f"vg:{s['vg']}", str(s["coco"]), str(s["dlip"]),
            str(s["kaggle"]), str(s["mine"]), "--vg_image_root", str(s["vg_root"]),
            "--coco_image_root", str(s["coco_root"]), "--flickr_image_root", str(s["flickr_root"]), *extra]
    return pairs_main(args)


def test_every_source_counted_filtered_and_deduplicated(corpora, tmp_path, capsys):
    out = tmp_path / "out"
    _run(corpora, out, "--check_images")
    report = json.loads((out / "report.json").read_text())
    got = {r["source"]: (r["kind"], r["read"], r["kept"], r["duplicates"], r["skipped"]) for r in report["sources"]}
    assert got == {
        "cc3m": ("img2dataset", 5, 2, 0, {"empty caption": 1, "failed download (status)": 1,
                                          "missing image file": 1}),
        "region_descriptions.json": ("vg", 6, 2, 1, {"empty caption": 1, "too-short VG phrase": 1,
                                                     "too-small VG region": 1}),
        "coco_karpathy_train.json": ("coco", 4, 3, 0, {"missing image file": 1}),
        "all.json": ("dlip", 3, 1, 1, {"empty caption": 1}),
        "results.csv": ("flickr_kaggle", 5, 3, 0, {"empty caption": 1, "malformed row": 1}),
        "mine.json": ("pairs", 2, 1, 1, {}),
    }
    assert report["total"] == {"read": 25, "kept": 12, "skipped_total": 10, "duplicates": 3}
    assert report["dedup"] == {"duplicates_removed": 3, "pairs": 12, "images": 8,
                               "images_with_several_captions": 4, "max_captions_per_image": 2}
    assert report["sources"][4]["skipped_examples"]["malformed row"] == [f"row 2 (line 4) of {corpora['kaggle']}"]
    pairs = json.loads((out / "pairs.json").read_text())
    shard, vg, coco, fl = corpora["i2d"] / "00000", corpora["vg_root"], corpora["coco_root"], corpora["flickr_root"]
    assert [(p["image"], p["caption"], p["source"]) for p in pairs] == [
        (str(shard / "000000000.jpg"), "A dog on grass.", "cc3m"),
        (str(shard / "000000001.jpg"), "A red car.", "cc3m"),
        (str(vg / "1.jpg"), "a man riding a brown horse", "region_descriptions.json"),
        (str(vg / "2.jpg"), "two people walking on the beach", "region_descriptions.json"),
        (str(coco / "val2014/COCO_val2014_000000000001.jpg"), "a cat on a mat", "coco_karpathy_train.json"),
        (str(coco / "val2014/COCO_val2014_000000000001.jpg"), "a cat sleeping", "coco_karpathy_train.json"),
        (str(coco / "train2014/COCO_train2014_000000000002.jpg"), "a bus", "coco_karpathy_train.json"),
        (str(shard / "000000000.jpg"), "a dog on the grass", "all.json"),
        (str(fl / "10.jpg"), 'Two young guys with "shaggy" hair , look at their hands .', "results.csv"),
        (str(fl / "10.jpg"), "A man in a blue shirt .", "results.csv"),
        (str(fl / "11.jpg"), "A dog runs across the grass .", "results.csv"),
        (str(vg / "2.jpg"), "a sunny beach", "mine.json"),
    ]
    table = capsys.readouterr().out
    assert "12 pairs of 8 images (4 with several captions); 3 exact duplicates removed" in table
    # The output is a valid pretraining list.
    assert len(PretrainDataset(out / "pairs.json", None, None)) == 12


def test_without_check_images_and_relative_to_image_root(corpora, tmp_path):
    out = tmp_path / "out"
    report = _run(corpora, out, "--image_root", str(tmp_path))
    coco = next(r for r in report["sources"] if r["kind"] == "coco")
    assert (coco["read"], coco["kept"], coco["skipped"]) == (4, 4, {})  # the missing image is not looked for
    pairs = json.loads((out / "pairs.json").read_text())
    assert pairs[0]["image"] == "cc3m/00000/000000000.jpg"
    assert len(PretrainDataset(out / "pairs.json", tmp_path, None)) == 13


def test_source_errors_name_the_file_entry_and_option(corpora, tmp_path):
    with pytest.raises(DataError, match="give its image folder with --vg_image_root"):
        pairs_main(["--out", str(tmp_path / "o"), str(corpora["vg"])])
    bad = _json(tmp_path / "all.json", [{"caption": "a dog", "image_root": "/x.jpg"}, {"caption": "a dog", "image": 3}])
    with pytest.raises(DataError, match=r"entry 1 of .*all.json: missing field 'image_root'"):
        pairs_main(["--out", str(tmp_path / "o"), str(bad)])
    tars = tmp_path / "wds"
    tars.mkdir()
    with tarfile.open(tars / "00000.tar", "w"):
        pass
    with pytest.raises(DataError, match="webdataset .tar shards .* not supported by `tools pairs`.*name the shards in train_file"):
        pairs_main(["--out", str(tmp_path / "o"), str(tars)])
    assert not (tmp_path / "o").exists()


def test_pretraining_reads_dlip_all_json_and_kaggle_csv_directly(corpora, tmp_path, caplog):
    kaggle = tmp_path / "kaggle.csv"  # without the empty comment: an error in pretraining (below)
    kaggle.write_text(KAGGLE.rsplit("\n\n", 1)[0] + "\n")
    ds = PretrainDataset([kaggle], corpora["flickr_root"], None)
    assert len(ds) == 3
    assert [c for (c,) in ds.captions] == ["two young guys with shaggy hair , look at their hands",
                                           "a man in a blue shirt", "a dog runs across the grass"]
    assert ds.source(2) == f"row 3 (line 5) of {kaggle}"
    assert "malformed row" in caplog.text and "line 4" in caplog.text
    dog = str(corpora["i2d"] / "00000" / "000000000.jpg")
    all_json = _json(tmp_path / "dlip_all.json", [{"caption": "A dog.", "image_root": dog, "id": 0},
                                                   {"caption": "a red car", "image_root": str(
                                                       corpora["i2d"] / "00000" / "000000001.jpg"), "id": 1}])
    ds = PretrainDataset([all_json, kaggle], corpora["flickr_root"], None)
    assert len(ds) == 5 and ds.captions[:2] == [("a dog",), ("a red car",)]
    assert ds.image_path(0) == dog and ds[0][1] == "a dog" and ds.image_idx(4) == 3
    # Broken entries: errors naming the file, entry (row, line) and field.
    with pytest.raises(DataError, match=r"entry 2 of .*all\.json: invalid field 'caption': the caption is empty"):
        PretrainDataset(corpora["dlip"], None, None)
    no_caption = _json(tmp_path / "a2.json", [{"caption": "a dog", "image_root": dog}, {"image_root": dog}])
    with pytest.raises(DataError, match=r"entry 1 of .*a2\.json: missing field 'caption'"):
        PretrainDataset(no_caption, None, None)
    blank = tmp_path / "blank.csv"
    blank.write_text("image_name| comment_number| comment\n10.jpg| 0| a dog\n10.jpg| 1|   \n")
    with pytest.raises(DataError, match=r"row 1 \(line 3\) of .*blank\.csv: invalid field 'comment': .*empty"):
        PretrainDataset(blank, corpora["flickr_root"], None)
    with pytest.raises(DataError, match=r"row 4 \(line 7\) of .*results\.csv: invalid field 'comment'"):
        PretrainDataset(corpora["kaggle"], corpora["flickr_root"], None)


def test_pairs_is_a_tools_command():
    # Imported here, not at collection: runpy warns when `python -m tools` finds tools.__main__ loaded.
    from tools.__main__ import COMMANDS
    assert COMMANDS["pairs"][0] == "tools.pairs"
