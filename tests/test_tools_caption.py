"""`python -m tools caption` (CapFilt) with the official-layout fixtures: the captioner
(tests/fixtures/blip_caption_tiny) and, as the filter, the retrieval model (blip_official_tiny).
Beam captions equal the release's, seeded sampling is per image (shards, ranks and restarts change
nothing), the filter's counts follow ITM scores computed by `tools score`, resume, every input kind,
bad input before the model."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data.pairs import read_pairs
from data.pretrain import PretrainDataset
from data.transforms import build_test_transform
from data.utils import load_image

CAPTION = Path(__file__).resolve().parent / "fixtures" / "blip_caption_tiny"
REFERENCE = torch.load(CAPTION / "reference.pt", weights_only=True)
N_IMAGES = 8
SAMPLE = ["sample=true", "top_p=0.9", "repetition_penalty=1.1", "seed=5"]  # BLIP's CapFilt sampling


@pytest.fixture(scope="module")
def configs(tmp_path_factory, fixture_config):
    """(caption config, filter config): the caption fixture (beam 3, max 20, min 5, as its
    reference) and the retrieval fixture as the filter; both read the caption fixture's images."""
    tmp = tmp_path_factory.mktemp("caption_tool")
    cap = {
        "image_root": str(CAPTION), "pretrained": str(CAPTION / "checkpoint.pth"), "strict_load": "true",
        "vit": "{width: 64, depth: 2, heads: 4, patch_size: 16}", "image_size": 64,
        "med_config": str(CAPTION / "med_config.json"), "tokenizer": str(CAPTION / "tokenizer"),
        "num_beams": 3, "max_length": 20, "min_length": 5, "batch_size_test": 3, "num_workers": 0,
        "device": "cpu", "deterministic": "true",
    }
    cap_path = tmp / "caption.yaml"
    cap_path.write_text("".join(f"{k}: {v}\n" for k, v in cap.items()))
    return cap_path, fixture_config(tmp, image_root=str(CAPTION))


def _caption(cfg, out, *args):
    from tools.caption import main
    return main([str(a) for a in ("--config", cfg, "--output_dir", out, *args)])


def _records(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _captions(out: Path):
    return [r["captions"] for r in _records(out / "captions.jsonl")]


def _captioner(cfg_path):
    from models.factory import create_model
    from tasks.caption import CaptionConfig
    from utils.config import load_config
    cfg, _ = load_config(cfg_path, CaptionConfig, SAMPLE)
    model, _ = create_model(cfg, "caption", "cpu")
    return model.eval(), cfg


# ----------------------------------------------------------------------------- beam search, inputs

def test_beam_captions_of_a_pair_file_a_folder_and_a_list_equal_the_reference(configs, tmp_path):
    cfg, _ = configs
    reference = REFERENCE["beam3_max20_min5"]
    report = _caption(cfg, tmp_path / "pairs", "--input", CAPTION / "test.json", "--shard_size", 5)
    records = _records(tmp_path / "pairs" / "captions.jsonl")
    assert [r["captions"] for r in records] == [[c] for c in reference]  # 16 pairs, 8 images: each once
    assert [(r["row"], r["image"], r["source"]) for r in records] == \
        [(i, f"images/img{i}.png", "test.json") for i in range(N_IMAGES)]
    assert report["images"] == N_IMAGES and report["errors"] == 0 and report["pairs"] == N_IMAGES
    assert report["generated"] == {"captions": 8, "written": 8, "empty": 0}

    # pairs.json is BLIP's pretraining json, paths as the input wrote them (under image_root).
    pairs = json.loads((tmp_path / "pairs" / "pairs.json").read_text())
    assert pairs == [{"image": f"images/img{i}.png", "caption": c} for i, c in enumerate(reference)]
    assert read_pairs(tmp_path / "pairs" / "pairs.json").caption == reference
    data = PretrainDataset(tmp_path / "pairs" / "pairs.json", CAPTION, build_test_transform(64))
    image, caption, idx = data[7]
    assert image.shape == (3, 64, 64) and caption == reference[7] and idx == 7

    # A folder (recursive, sorted; other files ignored): its paths as DIR/relative.
    folder = tmp_path / "photos"
    shutil.copytree(CAPTION / "images", folder / "b")
    (folder / "a").mkdir()
    shutil.move(folder / "b" / "img0.png", folder / "a" / "img0.png")
    (folder / "b" / "notes.md").write_text("not an image")
    _caption(cfg, tmp_path / "folder", "--images", folder)
    records = _records(tmp_path / "folder" / "captions.jsonl")
    assert [r["image"] for r in records] == [str(folder / "a" / "img0.png")] + \
        [str(folder / "b" / f"img{i}.png") for i in range(1, N_IMAGES)]
    assert [r["captions"] for r in records] == [[c] for c in reference]
    assert {r["source"] for r in records} == {"photos"}

    # An image list (.txt under image_root), a repeated image captioned once.
    listing = tmp_path / "list.txt"
    listing.write_text("images/img3.png\n\nimages/img1.png\nimages/img3.png\n")
    _caption(cfg, tmp_path / "list", "--images", listing)
    assert [(r["image"], r["captions"]) for r in _records(tmp_path / "list" / "captions.jsonl")] == \
        [("images/img3.png", [reference[3]]), ("images/img1.png", [reference[1]])]


def test_img2dataset_folders_give_the_image_and_its_txt_caption(configs, tmp_path, monkeypatch):
    import utils.logging
    monkeypatch.setattr(utils.logging, "HEARTBEAT_S", 0.0)  # a progress line per batch instead of every 30 s
    cfg, filter_cfg = configs
    root = tmp_path / "cc_download"
    for i in range(4):  # img2dataset's layout: NNNNN/KEY.{png,txt,json} + NNNNN.parquet, NNNNN_stats.json
        shard = root / f"{i // 2:05d}"
        shard.mkdir(parents=True, exist_ok=True)
        key = f"{i // 2:05d}{i % 2:04d}"
        shutil.copy(CAPTION / "images" / f"img{i}.png", shard / f"{key}.png")
        if i != 2:  # sample 2 came without a caption
            (shard / f"{key}.txt").write_text(f"web text {i}\n")
        (shard / f"{key}.json").write_text(json.dumps({"key": key, "status": "success", "url": f"http://x/{i}"}))
    (root / "00000_stats.json").write_text("{}")
    (root / "00000.parquet").write_bytes(b"PAR1")
    report = _caption(cfg, tmp_path / "out", "--img2dataset", root, "--filter", "--filter_config", filter_cfg,
                      "--threshold", 0.0)
    records = _records(tmp_path / "out" / "captions.jsonl")
    assert [r["image"] for r in records] == [str(root / shard / f"{key}.png") for shard, key in (
        ("00000", "000000000"), ("00000", "000000001"), ("00001", "000010000"), ("00001", "000010001"))]
    assert [r["captions"] for r in records] == [[c] for c in REFERENCE["beam3_max20_min5"][:4]]
    assert [[o["caption"] for o in r["originals"]] for r in records] == [["web text 0"], ["web text 1"], [],
                                                                         ["web text 3"]]
    # threshold 0: everything is kept; the pair list holds the web texts and the captions, per image.
    assert report["original"] == {"kept": 3, "dropped": 0, "not_scored": 0}
    assert report["per_source"] == {"cc_download": {"images": 4, "errors": 0,
                                                    "original": {"kept": 3, "dropped": 0, "not_scored": 0},
                                                    "generated": {"kept": 4, "dropped": 0, "empty": 0}}}
    pairs = json.loads((tmp_path / "out" / "pairs.json").read_text())
    assert [p["caption"] for p in pairs[:3]] == ["web text 0", REFERENCE["beam3_max20_min5"][0], "web text 1"]
    assert len(pairs) == 7 and len(PretrainDataset(tmp_path / "out" / "pairs.json", None, None)) == 7
    assert re.search(r"caption \(this rank\): 4/4 images \(100.0%\), [\d.]+ images/s, ETA 0s",
                     (tmp_path / "out" / "run.log").read_text())


# ----------------------------------------------------------------------------- sampling

def test_seeded_sampling_is_per_image_whatever_the_shards_and_batches(configs, tmp_path):
    from tools.caption_generate import image_seed
    cfg, _ = configs
    common = ["--input", CAPTION / "test.json", "--num_captions", 3]
    _caption(cfg, tmp_path / "one", *common, "--shard_size", 8, "--opts", *SAMPLE, "batch_size_test=8")
    _caption(cfg, tmp_path / "many", *common, "--shard_size", 3, "--opts", *SAMPLE, "batch_size_test=2")
    one, many = _captions(tmp_path / "one"), _captions(tmp_path / "many")
    assert one == many and all(len(c) == 3 for c in one)
    assert len({c for caps in one for c in caps}) > N_IMAGES  # samples, not the beam's one caption per image

    # Each image's samples are what the model's own generate draws for it alone, with its generator.
    model, mcfg = _captioner(cfg)
    settings = mcfg.generation_settings(num_return_sequences=3)
    pixels = build_test_transform(64)(load_image(CAPTION / "images" / "img6.png")).unsqueeze(0)
    ids = model.generate_ids(pixels, settings, generator=torch.Generator().manual_seed(image_seed(5, 6)))
    assert model.decode(ids) == one[6]

    _caption(cfg, tmp_path / "other", *common, "--shard_size", 8, "--opts", *SAMPLE, "batch_size_test=8", "seed=6")
    assert _captions(tmp_path / "other") != one


@pytest.mark.dist
def test_two_ranks_write_the_single_process_captions_and_scores(configs, tmp_path, run_torchrun):
    cfg, filter_cfg = configs
    args = ["--input", CAPTION / "test.json", "--num_captions", 2, "--shard_size", 2, "--filter", "--filter_config",
            filter_cfg, "--opts", *SAMPLE]
    _caption(cfg, tmp_path / "one", *args)
    run_torchrun("tools", ["caption", "--config", cfg, "--output_dir", tmp_path / "two", *args])
    one, two = _records(tmp_path / "one" / "captions.jsonl"), _records(tmp_path / "two" / "captions.jsonl")
    assert [r["captions"] for r in two] == [r["captions"] for r in one]
    assert np.allclose([r["itm"] for r in two], [r["itm"] for r in one], atol=1e-5)
    assert len(list((tmp_path / "two" / "parts").glob("shard_*.jsonl"))) == 4


# ----------------------------------------------------------------------------- filter

def test_filter_keeps_the_captions_whose_itm_from_tools_score_is_above_the_threshold(configs, tmp_path):
    from tools.score_pairs import main as score
    cfg, filter_cfg = configs
    extra = tmp_path / "extra.csv"  # one more caption of img1 (already in test.json) and a missing image
    extra.write_text("image,caption\nimages/img1.png,a yellow square\nimages/gone.png,a ghost\n")
    out = tmp_path / "capfilt"
    args = ["--input", CAPTION / "test.json", extra, "--num_captions", 2, "--shard_size", 4, "--filter",
            "--filter_config", filter_cfg, "--opts", "skip_bad_images=true"]
    first = _caption(cfg, out, *args)
    records = _records(out / "captions.jsonl")
    assert len(records) == 9 and records[8]["image"] == "images/gone.png"
    assert "image file missing" in records[8]["error"] and records[8]["captions"] == []
    assert first["kept"] == 0  # the tiny filter's ITM stays near 0.2: nothing is a "match" at 0.5

    # The same pairs scored independently, by `tools score` (the filter config, one pair per caption).
    listed = [{"image": r["image"], "caption": c} for r in records[:8] for c in r["captions"]] + \
             [{"image": r["image"], "caption": o["caption"]} for r in records[:8] for o in r["originals"]]
    (tmp_path / "listed.json").write_text(json.dumps(listed))
    score(["--config", str(filter_cfg), "--output_dir", str(tmp_path / "scores"), "--input",
           str(tmp_path / "listed.json"), "--scores", "itm"])
    itm = [s["itm"] for s in _records(tmp_path / "scores" / "scores.jsonl")]
    ours = [x for r in records[:8] for x in r["itm"]] + [o["itm"] for r in records[:8] for o in r["originals"]]
    assert np.allclose(ours, itm, atol=1e-5)

    # A threshold between two scores near the median: some kept, some dropped. Only the merge reruns.
    values = np.sort(itm)
    k = int(np.argmax(np.diff(values)[len(values) // 4: 3 * len(values) // 4])) + len(values) // 4
    threshold = float(values[k] + values[k + 1]) / 2
    assert values[k + 1] - values[k] > 1e-5  # far from every score, at the tolerance above
    report = _caption(cfg, out, *args, "--threshold", threshold)
    assert "0 of 3 shards to write (3 already complete)" in (out / "run.log").read_text()
    kept = [x > threshold for x in itm]
    n_gen = 16
    assert report["generated"] == {"kept": sum(kept[:n_gen]), "dropped": n_gen - sum(kept[:n_gen]), "empty": 0}
    assert report["original"] == {"kept": sum(kept[n_gen:]), "dropped": 17 - sum(kept[n_gen:]), "not_scored": 1}
    assert 0 < report["kept"] < 33 and report["kept"] + report["dropped"] == 33
    by_source = report["per_source"]
    assert by_source["test.json"]["images"] == 8 and by_source["extra.csv"]["images"] == 1  # img1 is test.json's
    assert by_source["extra.csv"]["errors"] == 1 and by_source["extra.csv"]["original"]["not_scored"] == 1
    assert by_source["test.json"]["original"]["kept"] + by_source["extra.csv"]["original"]["kept"] == \
        report["original"]["kept"]
    assert json.loads((out / "caption_report.json").read_text()) == report
    log = (out / "run.log").read_text()
    assert f"itm > {threshold:g}: kept {report['original']['kept']} of 17 original captions" in log

    # pairs.json: exactly the kept pairs, readable by both pair readers.
    want = sorted((p["image"], p["caption"]) for p, keep in zip(listed, kept) if keep)
    pairs = json.loads((out / "pairs.json").read_text())
    assert sorted((p["image"], p["caption"]) for p in pairs) == want
    table = read_pairs(out / "pairs.json")
    assert len(table) == report["kept"] and len(PretrainDataset(out / "pairs.json", CAPTION, None)) == report["kept"]


# ----------------------------------------------------------------------------- resume

def test_a_restart_skips_finished_shards_and_images_and_ends_with_the_same_outputs(configs, tmp_path):
    cfg, _ = configs
    out = tmp_path / "s"
    args = ["--input", CAPTION / "test.json", "--num_captions", 2, "--shard_size", 3, "--opts", *SAMPLE]
    _caption(cfg, out, *args)
    original = (out / "captions.jsonl").read_text()
    parts = out / "parts"
    # Shard 0 finished (marked with a sentinel caption); shard 1 killed after one image and a torn line.
    done = [dict(r, captions=["SENTINEL", "SENTINEL"]) for r in _records(parts / "shard_000000.jsonl")]
    (parts / "shard_000000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in done))
    first = _records(parts / "shard_000001.jsonl")[0]
    (parts / "shard_000001.partial").write_text(json.dumps(first) + '\n{"row": 4, "ima')
    (parts / "shard_000001.jsonl").unlink()
    shard2 = parts / "shard_000002.jsonl"
    os.utime(shard2, (1_000_000, 1_000_000))

    _caption(cfg, out, *args)
    log = (out / "run.log").read_text()
    assert "1 of 3 shards to write (2 already complete)" in log
    assert "shard_000001.partial: resuming, 1 of 3 images already captioned" in log
    assert shard2.stat().st_mtime == 1_000_000 and not (parts / "shard_000001.partial").exists()
    resumed = _records(out / "captions.jsonl")
    assert [r["captions"] for r in resumed[:3]] == [["SENTINEL"] * 2] * 3  # finished shard: not recomputed
    # Image 4 is sampled again in its first run's batch (images 3 and 4): the same captions as then.
    assert (out / "captions.jsonl").read_text().splitlines()[3:] == original.splitlines()[3:]

    with pytest.raises(SystemExit, match="different generation"):  # never mix two settings' captions
        _caption(cfg, out, *args[:-len(SAMPLE) - 1], "--opts", *SAMPLE[:-1], "seed=7")
    _caption(cfg, out, *args, "--overwrite")
    assert (out / "captions.jsonl").read_text() == original


# ----------------------------------------------------------------------------- bad input

def test_image_lists_are_read_with_their_roots_and_bad_ones_named(tmp_path):
    from argparse import Namespace
    from tools.caption_inputs import read_inputs

    def read(root="", **given):
        args = Namespace(input=None, images=None, img2dataset=None, image_col="image", caption_col="caption",
                         format="auto", source_key=None)
        for k, v in given.items():
            setattr(args, k, [str(x) for x in v])
        return read_inputs(args, Namespace(image_root=root))

    listing = tmp_path / "list.json"
    listing.write_text(json.dumps(["a.png", {"image": "b.png", "caption": "not read"}, "./a.png"]))
    (tmp_path / "photos" / "x").mkdir(parents=True)
    (tmp_path / "photos" / "x" / "c.PNG").write_bytes(b"")
    inputs = read(root="/data", images=[listing, tmp_path / "photos"])
    assert [inputs.path(i) for i in range(len(inputs))] == ["a.png", "b.png", str(tmp_path / "photos" / "x" / "c.PNG")]
    assert inputs.load == ["/data/a.png", "/data/b.png", str(tmp_path / "photos" / "x" / "c.PNG")]  # folders: as given
    assert [inputs.source(i) for i in range(3)] == ["list.json", "list.json", "photos"]
    assert [inputs.originals(i) for i in range(3)] == [[], [], []] and inputs.image_of_row.tolist() == [0, 1, 0, 2]
    assert inputs.where(1) == f"entry 1 of {listing}, field 'image'"
    assert inputs.where(2) == f"file 0 of folder {tmp_path / 'photos'}"

    listing.write_text(json.dumps(["a.png", " "]))
    with pytest.raises(SystemExit, match=f"error: entry 1 of {listing}: empty image path"):
        read(images=[listing])
    (tmp_path / "list.csv").write_text("path\na.png\n")
    with pytest.raises(SystemExit, match="no column 'image'.*--image_col"):
        read(images=[tmp_path / "list.csv"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="empty: no image files"):
        read(images=[tmp_path / "empty"])
    with pytest.raises(SystemExit, match="not a folder"):
        read(img2dataset=[listing])
    with pytest.raises(SystemExit, match="exactly one of"):
        read()


def test_a_missing_image_stops_before_the_model_naming_its_row(configs, tmp_path):
    cfg, _ = configs
    broken = tmp_path / "broken.csv"
    broken.write_text("file\nimages/img0.png\nimages/missing.png\n")
    # A tokenizer that does not exist: had the model been built first, that would be the error.
    with pytest.raises(SystemExit) as err:
        _caption(cfg, tmp_path / "out", "--images", broken, "--image_col", "file", "--opts",
                 "tokenizer=/nonexistent/tokenizer")
    assert str(err.value).startswith(f"error: row 1 (line 3) of {broken}, field 'file': image file missing: ")
    assert "skip_bad_images=true" in str(err.value)
    assert not (tmp_path / "out" / "parts").exists() and not (tmp_path / "out" / "captions.jsonl").exists()

    with pytest.raises(SystemExit, match="--num_captions 4: .*num_beams >= N, or sample=true"):
        _caption(cfg, tmp_path / "out2", "--images", CAPTION / "images", "--num_captions", 4)
    with pytest.raises(SystemExit, match="--filter needs --filter_config"):
        _caption(cfg, tmp_path / "out3", "--images", CAPTION / "images", "--filter")
    with pytest.raises(SystemExit, match="exactly one of --input"):
        _caption(cfg, tmp_path / "out4", "--images", CAPTION / "images", "--input", CAPTION / "test.json")
