"""ImageCoDe data: numeric frame order, target mapping, video/static, bad input messages, the
synthetic part's official layout, the submission format and the analysis tables."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from data.imagecode import ImageCodeDataset, ImageCodeSetCollator, ImageCodeSets, build_imagecode_dataset, is_video
from data.transforms import build_test_transform
from data.utils import BadImageError

REPO = Path(__file__).resolve().parents[1]

FRAMES = [2, 9, 10, 11, 20, 100, 101, 3, 5, 7]  # text order would put img10, img100 before img2


def _colour(n: int) -> tuple:
    return (n * 2 % 256, 255 - n * 2 % 256, (n * 37) % 256)


def _make_set(root: Path, name: str, frames=FRAMES) -> None:
    folder = root / "image-sets" / name
    folder.mkdir(parents=True, exist_ok=True)
    for n in frames:
        Image.new("RGB", (20, 16), _colour(n)).save(folder / f"img{n}.png")


@pytest.fixture()
def tiny(tmp_path) -> Path:
    _make_set(tmp_path, "MSR-VTT-clip1")
    _make_set(tmp_path, "open-images-42", frames=range(10))
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "valid_data.json").write_text(json.dumps({
        "MSR-VTT-clip1": {"2": "the third frame", "9": "the last frame"},
        "open-images-42": {"0": "the first image"}}))
    (ann / "test_data_unlabeled.json").write_text(json.dumps({
        "open-images-42": ["one", "two"], "MSR-VTT-clip1": ["three"]}))
    return tmp_path


def _dataset(root: Path, name="valid_data.json", **kw) -> ImageCodeDataset:
    return ImageCodeDataset(root / "ann" / name, root / "image-sets", transforms.ToTensor(), **kw)


def test_frames_are_in_numeric_order_and_the_target_maps_to_the_right_file(tiny):
    ds = _dataset(tiny)
    assert len(ds) == 3
    item = ds.items[0]
    assert item.candidates == [f"img{n}.png" for n in sorted(FRAMES)]  # img9 before img10 before img11
    assert item.candidates[:5] == ["img2.png", "img3.png", "img5.png", "img7.png", "img9.png"]
    images, text, target, index = ds[0]
    assert (text, target, index) == ("the third frame", 2, 0)
    assert images.shape == (10, 3, 16, 20)
    # Position 2 in numeric order is img5 (2, 3, 5, ...): its pixels are img5's colour.
    expected = torch.tensor(_colour(5), dtype=torch.float32) / 255
    assert torch.allclose(images[target][:, 0, 0], expected, atol=1 / 255)
    assert ds.items[1].target == 9 and ds.items[1].candidates[9] == "img101.png"


def test_video_and_static_from_the_set_name(tiny):
    ds = _dataset(tiny)
    assert [it.video for it in ds.items] == [True, True, False]
    assert is_video("YouCook-abc") and is_video("video-storytelling-7") and not is_video("open-images-1_x")


def test_unlabelled_test_file_keeps_description_order(tiny):
    ds = _dataset(tiny, "test_data_unlabeled.json")
    assert not ds.labelled
    assert [(it.set_name, it.description, it.target) for it in ds.items] == [
        ("open-images-42", "one", None), ("open-images-42", "two", None), ("MSR-VTT-clip1", "three", None)]
    assert ds[0][2] == -1


def test_set_view_embeds_each_set_once(tiny):
    ds = _dataset(tiny)
    sets = ImageCodeSets(ds)
    assert sets.groups == [[0, 1], [2]]

    class Tok:
        def __call__(self, texts, **kw):
            n = max(len(t.split()) for t in texts)
            return {"input_ids": torch.ones(len(texts), n, dtype=torch.long),
                    "attention_mask": torch.ones(len(texts), n, dtype=torch.long)}

    batch = ImageCodeSetCollator(ds, Tok(), 30)([sets[0], sets[1]])
    assert batch["pixel_values"].shape[:2] == (2, 10)
    assert batch["set_index"].tolist() == [0, 0, 1] and batch["index"].tolist() == [0, 1, 2]
    assert batch["video"].tolist() == [True, True, False]


def test_shared_randomness_gives_every_frame_the_same_crop(tmp_path):
    # Ten identical frames: with one shared draw the ten outputs are identical, without they differ.
    folder = tmp_path / "image-sets" / "MSR-VTT-same"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    for n in range(10):
        img.save(folder / f"img{n}.png")
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "train_data.json").write_text(json.dumps({"MSR-VTT-same": {"0": "x"}}))
    crop = transforms.Compose([transforms.RandomResizedCrop(16, scale=(0.2, 1.0)), transforms.ToTensor()])
    shared = ImageCodeDataset(tmp_path / "ann" / "train_data.json", tmp_path / "image-sets", crop)[0][0]
    assert all(torch.equal(shared[0], shared[i]) for i in range(10))
    own = ImageCodeDataset(tmp_path / "ann" / "train_data.json", tmp_path / "image-sets", crop,
                           shared_randomness=False)[0][0]
    assert not all(torch.equal(own[0], own[i]) for i in range(10))


# ----------------------------------------------------------------------------- bad input

def _write(root: Path, data: dict, name="valid_data.json") -> None:
    (root / "ann" / name).write_text(json.dumps(data))


def test_a_set_without_ten_images_is_named(tiny):
    (tiny / "image-sets" / "MSR-VTT-clip1" / "img100.png").unlink()
    with pytest.raises(ValueError, match=r"valid_data.json, set 'MSR-VTT-clip1': expected 10 images img<N>.jpg "
                                         r"in .*MSR-VTT-clip1, found 9 \(img2.png, img3.png"):
        _dataset(tiny)


def test_a_set_name_without_a_folder_is_named(tiny):
    _write(tiny, {"YouCook-missing": {"0": "x"}})
    with pytest.raises(FileNotFoundError, match=r"valid_data.json, set 'YouCook-missing': no image folder "
                                                r".*image-sets/YouCook-missing"):
        _dataset(tiny)


@pytest.mark.parametrize("key, message", [("10", "target position 10 is out of range 0-9"),
                                           ("-1", "target position -1 is out of range 0-9"),
                                           ("first", "target position 'first' is not an integer")])
def test_a_bad_target_position_is_named(tiny, key, message):
    _write(tiny, {"MSR-VTT-clip1": {key: "a description"}})
    with pytest.raises(ValueError, match=rf"valid_data.json, set 'MSR-VTT-clip1', position '{key}': {message}"):
        _dataset(tiny)


def test_an_unreadable_image_is_named_when_loaded(tiny):
    (tiny / "image-sets" / "MSR-VTT-clip1" / "img11.png").write_bytes(b"not an image")
    ds = _dataset(tiny)
    with pytest.raises(BadImageError, match=r"unreadable image: .*img11.png \(set 'MSR-VTT-clip1', candidate 6 of "
                                            r".*valid_data.json\)"):
        ds[0]


def test_wrong_shapes_of_the_json_are_named(tiny):
    _write(tiny, {"MSR-VTT-clip1": ["a list in a labelled file"]})
    with pytest.raises(ValueError, match=r"set 'MSR-VTT-clip1': expected \{\"<position>\": description\}, got list"):
        ImageCodeDataset(tiny / "ann" / "valid_data.json", tiny / "image-sets", transforms.ToTensor(), labelled=True)
    _write(tiny, {"MSR-VTT-clip1": {"3": ""}})
    with pytest.raises(ValueError, match=r"position '3': description must be a non-empty string"):
        _dataset(tiny)
    _write(tiny, [1, 2])
    with pytest.raises(ValueError, match=r"expected a json object \{set_name: descriptions\}, got list"):
        _dataset(tiny)


# ----------------------------------------------------------------------------- outputs and analysis

def test_predictions_and_submission_format(tiny, tmp_path):
    from tasks.imagecode import write_outputs

    test = _dataset(tiny, "test_data_unlabeled.json")
    scores = torch.zeros(3, 10)
    scores[0, 4] = scores[1, 7] = scores[2, 0] = 1.0
    out = tmp_path / "out"
    assert write_outputs(out, test, scores) == {}
    assert json.loads((out / "submission.json").read_text()) == {"open-images-42": [4, 7], "MSR-VTT-clip1": [0]}
    preds = json.loads((out / "predictions.json").read_text())
    assert preds[0] == {"set": "open-images-42", "description": "one", "target": None, "pred": 4,
                        "candidates": [f"img{i}.png" for i in range(10)], "scores": [0.0] * 4 + [1.0] + [0.0] * 5,
                        "video": False}
    valid = _dataset(tiny)
    scores = torch.zeros(3, 10)
    scores[0, 2] = scores[1, 3] = scores[2, 0] = 1.0  # right, wrong, right
    metrics = write_outputs(tmp_path / "valid", valid, scores)
    assert metrics["acc"] == pytest.approx(200 / 3) and metrics["acc_video"] == 50.0 and metrics["acc_static"] == 100.0
    assert (metrics["n"], metrics["n_video"], metrics["n_static"]) == (3, 2, 1)
    assert not (tmp_path / "valid" / "submission.json").exists()


def _pred(set_name, desc, target, pred, video=True):
    return {"set": set_name, "description": desc, "target": target, "pred": pred, "candidates": [], "scores": [],
            "video": video}


def test_analysis_report_and_compare(tmp_path):
    from analysis.imagecode import main

    a = [_pred("v1", "the red circle is furthest left", 0, 0), _pred("v1", "just before it turns green", 4, 5),
         _pred("s1", "a big red square " + "word " * 12, 3, 3, video=False)]
    b = [_pred("v1", "the red circle is furthest left", 0, 1), _pred("v1", "just before it turns green", 4, 4),
         _pred("s1", "a big red square " + "word " * 12, 3, 3, video=False)]
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    (tmp_path / "tags.yaml").write_text("v1:\n  '0': {description: x, annotation: 's,cmp', visualization_id: '0'}\n"
                                        "  4: {description: y, annotation: 't,col,cmp', visualization_id: '0'}\n"
                                        "s1:\n  '3': {description: z, annotation: '', visualization_id: '0'}\n")
    main(["report", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--names", "zs,s2", "--tags",
          str(tmp_path / "tags.yaml"), "--out", str(tmp_path / "rep")])
    rows = {(r["group"], r["category"]): r for r in json.loads((tmp_path / "rep" / "report.json").read_text())}
    assert rows[("all", "all")]["n"] == 3 and rows[("all", "all")]["zs"] == pytest.approx(200 / 3)
    assert rows[("type", "video")]["zs"] == 50.0 and rows[("type", "video")]["s2"] == 50.0
    assert rows[("tag", "cmp")]["n"] == 2 and rows[("tag", "t")]["s2"] == 100.0 and rows[("tag", "t")]["zs"] == 0.0
    assert rows[("tag", "other")]["n"] == 1
    assert rows[("length", "1-10 words")]["n"] == 2 and rows[("length", "11-20 words")]["n"] == 1
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| tag cmp (comparative;" in md and "| video | 2 | 50.0 | 50.0 |" in md
    assert (tmp_path / "rep" / "report.png").stat().st_size > 1000

    main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--names", "zs,s2", "--out",
          str(tmp_path / "cmp")])
    out = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    overall = out["rows"][0]
    assert (overall["both"], overall["only_zs"], overall["only_s2"], overall["neither"]) == (1, 1, 1, 0)
    assert out["only_s2"][0]["description"] == "just before it turns green" and out["only_s2"][0]["pred_zs"] == 5


def test_analysis_names_bad_prediction_entries(tmp_path):
    from analysis.imagecode import load_predictions

    (tmp_path / "p.json").write_text(json.dumps([_pred("a", "b", 1, 1), {"set": "a", "description": "c"}]))
    with pytest.raises(ValueError, match=r"p.json, entry 1: missing field\(s\) \['target', 'pred', 'video'\]"):
        load_predictions(tmp_path / "p.json")


# ----------------------------------------------------------------------------- synthetic part

@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> dict:
    from data.synthetic import generate
    return generate(tmp_path_factory.mktemp("ic"), seed=0, parts="imagecode", n_train_sets=30, n_valid_sets=12,
                    n_test_sets=6, image_size=32)


def test_synthetic_part_has_the_official_layout(synth):
    ic = synth["imagecode"]
    root = Path(ic["image_root"])
    assert root.name == "image-sets" and Path(ic["train_file"]).name == "train_data.json"
    assert Path(ic["test_file"]).name == "test_data_unlabeled.json"
    assert Path(ic["tag_file"]).relative_to(ic["ann_root"]) == Path("analysis/manual_annotation_valid.yaml")
    gaps, crosses = [], 0
    for split in ("train", "valid", "test"):
        data = json.loads(Path(ic[f"{split}_file"]).read_text())
        for set_name, descs in data.items():
            assert 1 <= len(descs) <= 3
            if split == "test":
                assert isinstance(descs, list) and all(isinstance(d, str) and d for d in descs)
            else:
                assert all(0 <= int(k) <= 9 for k in descs) and len(set(descs.values())) == len(descs)
            files = sorted((root / set_name).iterdir())
            assert len(files) == 10 and all(re.fullmatch(r"img\d+\.jpg", f.name) for f in files)
            frames = sorted(int(f.stem[3:]) for f in files)
            if "open-images" in set_name:
                assert frames == list(range(10))
            else:
                gaps.append(min(b - a for a, b in zip(frames, frames[1:])))
                crosses += frames[0] < 10 <= frames[-1]
            with Image.open(files[0]) as im:
                assert im.format == "JPEG" and im.size == (32, 32)
    assert min(gaps) >= 2  # video frame numbers are never contiguous
    assert crosses > 0  # some sets cross img9 -> img10, where text order goes wrong
    ds = build_imagecode_dataset(type("C", (), {"ann_root": ic["ann_root"], "image_root": ic["image_root"],
                                                "max_words": 30})(), "valid", build_test_transform(32))
    assert any(it.video for it in ds.items) and any(not it.video for it in ds.items)


def test_synthetic_tags_cover_valid_and_the_tokenizer_knows_every_word(synth):
    from transformers import BertTokenizerFast

    from analysis.imagecode import load_tags
    ic = synth["imagecode"]
    valid = json.loads(Path(ic["valid_file"]).read_text())
    tags = load_tags(ic["tag_file"])
    assert set(tags) == {(s, int(p)) for s, d in valid.items() for p in d}
    codes = {c for cs in tags.values() for c in cs}
    assert {"s", "cmp", "t", "col"} <= codes
    comparative = [d for s, by in valid.items() for p, d in by.items() if "cmp" in tags[(s, int(p))]]
    assert any("furthest" in d or "closest" in d or "highest" in d or "lowest" in d or "as " in d for d in comparative)
    tok = BertTokenizerFast.from_pretrained(synth["tokenizer"])
    texts = [d for split in ("train", "valid") for by in json.loads(Path(ic[f"{split}_file"]).read_text()).values()
             for d in by.values()]
    for text in texts:
        assert tok.unk_token_id not in tok(text).input_ids, text


def test_synthetic_video_targets_follow_the_frames(synth):
    """Colour-change descriptions point at the frames around the change: check the pixels."""
    ic = synth["imagecode"]
    valid = json.loads(Path(ic["train_file"]).read_text())
    checked = 0
    for set_name, by in valid.items():
        for pos, text in by.items():
            m = re.match(r"the last frame before the (\w+) turns (\w+)$", text)
            if not m:
                continue
            files = sorted((Path(ic["image_root"]) / set_name).iterdir(), key=lambda f: int(f.stem[3:]))
            from data.synthetic.scenes import COLOURS
            new = np.array(COLOURS[m.group(2)], dtype=float)

            def has_new(f):
                px = np.asarray(Image.open(f).convert("RGB"), dtype=float).reshape(-1, 3)
                return (np.abs(px - new).max(axis=1) < 40).sum() > 4

            t = int(pos)
            assert not has_new(files[t]) and has_new(files[t + 1]), (set_name, text)
            checked += 1
    assert checked > 0


def test_synthetic_part_is_the_same_in_every_process(tmp_path):
    """Same seed, same bytes, whatever PYTHONHASHSEED a process draws (no set-order dependence)."""
    import os
    import subprocess
    import sys

    outs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / hash_seed
        code = ("from data.synthetic import generate; generate(%r, seed=3, parts='imagecode', n_train_sets=25, "
                "n_valid_sets=4, n_test_sets=2, image_size=32)" % str(out))
        subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=300,
                       env={**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)})
        outs.append({str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
    assert outs[0] == outs[1]
