"""Pre-flight (docs/FORMATS.md, "Before the first step"): bad input stops a run before its model is
built, with a message naming the file, the entry (or CSV row and line) and the field, and nothing
trained or written; with ``skip_bad_images`` bad entries are dropped up front, train and eval alike,
with a count in the log. Through the entry points, as a user runs them, on a few tiny images."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.utils import BadImageError

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
SHAPES = ("square", "circle")


def _png(path: Path, colour, seed: int) -> Path:
    """A 32 px image: the colour plus noise (noise makes the PNG's pixel data long enough to cut)."""
    noise = np.random.default_rng(seed).integers(0, 60, (32, 32, 3))
    Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(path)
    return path


def _truncate(path: Path) -> None:
    """Cut the pixel data: the header still reads (pre-flight passes), decoding fails."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _nothing_written(out: Path) -> None:
    assert not list(out.glob("checkpoint*")) and not (out / "log.txt").exists()
    assert not (out / "evaluate.txt").exists() and not list(out.glob("scores_*"))


@pytest.fixture
def data(tmp_path) -> Path:
    """Retrieval data in the synthetic benchmark's layout (so ``tiny_train_config`` takes it): 8 train,
    4 val and 4 test images of 32 px, two captions each, and a tokenizer that knows every word."""
    from data.synthetic.vocab import write_tokenizer
    root = tmp_path / "data"
    ann, images = root / "retrieval" / "annotation", root / "retrieval" / "images"
    ann.mkdir(parents=True)
    images.mkdir(parents=True)
    names = [(c, s) for c in COLOURS for s in SHAPES]
    captions = []
    for split, count in (("train", 8), ("val", 4), ("test", 4)):
        entries = []
        for i in range(count):
            colour, shape = names[(i + {"train": 0, "val": 3, "test": 5}[split]) % len(names)]
            image = f"{split}_{i}.png"
            _png(images / image, COLOURS[colour], seed=len(captions))
            texts = [f"a {colour} {shape}", f"the {shape} is {colour} number {i}"]
            captions += texts
            entries.append({"image": image, "caption": texts})
        (ann / f"synthetic_{split}.json").write_text(json.dumps(entries))
    write_tokenizer(root / "tokenizer", captions)
    return root


@pytest.fixture
def run(tmp_path, data, tiny_train_config):
    """``run(*opts, evaluate=False, out="out") -> (record, output dir)``: train_retrieval.main on ``data``
    (an evaluation scores a checkpoint of random weights of the config, unless ``pretrained=`` is given)."""
    import train_retrieval
    from tests.scripts.campaign_world import random_checkpoint
    cfg = tiny_train_config(tmp_path, data, batch_size_train=4, batch_size_test=4, max_epoch=1)
    weights = random_checkpoint(cfg, tmp_path / "random.pth")

    def go(*opts, evaluate=False, out="out"):
        argv = ["--config", str(cfg), "--output_dir", str(tmp_path / out), "--no_progress"]
        argv += ["--evaluate", "--eval_splits", "test"] if evaluate else []
        if evaluate and not any(o.startswith("pretrained=") for o in opts):
            opts = (f"pretrained={weights}", *opts)
        return train_retrieval.main(argv + (["--opts", *opts] if opts else [])), tmp_path / out
    return go


def _ann(data: Path, split: str) -> Path:
    return data / "retrieval" / "annotation" / f"synthetic_{split}.json"


# ----------------------------------------------------------------------------- refusals

def test_a_missing_eval_image_stops_training_before_the_model_is_built(data, run, tmp_path):
    gone = data / "retrieval" / "images" / "test_1.png"
    gone.unlink()
    # A tokenizer that does not exist: had the model been built first, that would be the error.
    with pytest.raises(FileNotFoundError) as err:
        run("tokenizer=/nonexistent/tokenizer")
    message = str(err.value)
    assert f"entry 1 of {_ann(data, 'test')}, field 'image': image file missing: {gone}" in message
    assert "skip_bad_images: true" in message
    _nothing_written(tmp_path / "out")


def test_an_unreadable_header_in_a_csv_train_file_names_the_row_and_line(data, run, tmp_path):
    ann = data / "retrieval" / "annotation"
    (ann / "train.csv").write_text("image,caption\ntrain_0.png,a red square\n\n"
                                   "train_1.png,a red circle\ntrain_2.png,\"a green, square\"\n")
    (data / "retrieval" / "images" / "train_2.png").write_bytes(b"not an image at all")
    with pytest.raises(BadImageError) as err:
        run("train_file=train.csv")
    assert f"row 2 (line 5) of {ann / 'train.csv'}, field 'image': unreadable image:" in str(err.value)
    _nothing_written(tmp_path / "out")


@pytest.mark.parametrize("split, name, content", [
    ("train", "empty.json", "[]"),
    ("val", "header_only.csv", "image,caption\n"),
    ("test", "blank.csv", "image,caption\n\n  \n"),
])
def test_an_empty_split_is_an_error_naming_the_file(data, run, tmp_path, split, name, content):
    (data / "retrieval" / "annotation" / name).write_text(content)
    with pytest.raises(ValueError, match=rf"{name}: no entries"):
        run(f"{split}_file={name}")
    _nothing_written(tmp_path / "out")


def test_an_unquoted_comma_in_a_csv_row_is_an_error_naming_file_and_line(data, run, tmp_path):
    ann = data / "retrieval" / "annotation"
    (ann / "train.csv").write_text("image,caption,image_id\ntrain_0.png,a red square,r\n"
                                   "train_1.png,a red circle, sitting,c\n")
    with pytest.raises(ValueError) as err:
        run("train_file=train.csv")
    assert str(err.value).startswith(f"{ann / 'train.csv'}, line 3: row 1 has 4 fields but the header has 3 "
                                     "(image,caption,image_id)")
    assert "must be quoted" in str(err.value)
    _nothing_written(tmp_path / "out")


def test_a_blank_eval_caption_is_an_error_naming_the_entry(data, run, tmp_path):
    entries = json.loads(_ann(data, "val").read_text())
    entries[2]["caption"][1] = "  "
    _ann(data, "val").write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=rf"entry 2 of {_ann(data, 'val')}: invalid field 'caption': item 1 of the "
                                         r"caption list is empty or whitespace only"):
        run()
    _nothing_written(tmp_path / "out")


# ----------------------------------------------------------------------------- skip_bad_images

def test_skip_bad_images_drops_train_and_eval_entries_up_front_and_trains(data, run):
    images = data / "retrieval" / "images"
    (images / "train_3.png").unlink()
    (images / "val_0.png").write_bytes(b"")
    _truncate(images / "test_2.png")  # passes the header check, fails to decode in the evaluation
    record, out = run("skip_bad_images=true")
    log = (out / "run.log").read_text()
    assert "split 'train': dropped 1 of its 8 images (skip_bad_images; listed above), 14 items left" in log
    assert "split 'val': dropped 1 of its 4 images (skip_bad_images; listed above), 3 items left" in log
    assert "split 'test': checked 4 images" in log and "split 'test': dropped" not in log
    assert f"entry 3 of {_ann(data, 'train')}, field 'image': image file missing" in log
    assert "1 of 4 images could not be decoded (skip_bad_images): evaluated without them and their 2 captions" in log
    assert "[UNK] rate of the train captions: 0.00% of" in log
    assert record["epoch"] == 0 and "val_r_mean" in record and "test_r_mean" in record
    assert (out / "checkpoint_last.pth").is_file()


def test_an_image_that_fails_to_decode_is_evaluated_as_if_absent(data, run):
    """Left out with its captions, the metrics are those of the test file without it."""
    _truncate(data / "retrieval" / "images" / "test_2.png")
    with pytest.raises(BadImageError, match=r"test_2.png \(entry 2 of .*synthetic_test.json\)"):
        run(evaluate=True, out="strict")
    skipped, out = run("skip_bad_images=true", "--save_scores", evaluate=True, out="skipped")
    entries = json.loads(_ann(data, "test").read_text())
    without = _ann(data, "test").with_name("without.json")
    without.write_text(json.dumps(entries[:2] + entries[3:]))
    reference, _ = run(f"test_file={without}", evaluate=True, out="reference")
    assert skipped == reference
    scores = np.load(out / "scores_test.npz")
    assert scores["score_i2t"].shape == (3, 6) and scores["image_index"].tolist() == [0, 1, 3]
    assert scores["text_index"].tolist() == [0, 1, 2, 3, 6, 7]


def test_a_tokenizer_that_does_not_know_the_captions_is_warned_about(data, run, tmp_path):
    from data.synthetic.vocab import SPECIAL_TOKENS, TOKENIZER_CONFIG
    small = tmp_path / "small_vocab"  # without BERT's single-character pieces: unknown words are [UNK]
    small.mkdir()
    (small / "vocab.txt").write_text("\n".join([*SPECIAL_TOKENS, "a", "the", "red", "square"]) + "\n")
    (small / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    from tests.scripts.campaign_world import random_checkpoint
    cfg = tmp_path / "train.yaml"
    weights = random_checkpoint(cfg, tmp_path / "small_vocab.pth", tokenizer=str(small))  # embeddings of its size
    _, out = run(f"tokenizer={small}", f"pretrained={weights}", evaluate=True)
    log = (out / "run.log").read_text()
    assert "of the words of the test captions become [UNK] with the tokenizer" in log
    assert "'bert-base-uncased'" in log and "WARNING" in log


# ----------------------------------------------------------------------------- other entry points

def test_pretraining_refuses_a_missing_image_naming_the_entry(data, tmp_path):
    import pretrain
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{"image": "train_0.png", "caption": "a red square"},
                                 {"image": "nowhere.png", "caption": ["a red circle", "red"]}]))
    out = tmp_path / "pre"
    with pytest.raises(FileNotFoundError, match=rf"entry 1 of {pairs}, field 'image': image file missing: .*nowhere"):
        pretrain.main(["--config", "configs/demo/pretrain.yaml", "--output_dir", str(out), "--no_progress", "--opts",
                       f"train_file={pairs}", f"image_root={data / 'retrieval' / 'images'}", "device=cpu"])
    _nothing_written(out)


def test_above_the_lazy_threshold_existence_is_checked_and_headers_sampled(tmp_path, monkeypatch, caplog):
    from data import preflight
    from data.pretrain import PretrainDataset
    monkeypatch.setattr(preflight, "LAZY_CHECK_IMAGES", 3)
    monkeypatch.setattr(preflight, "HEADER_SAMPLE", 0)
    for i in range(5):
        _png(tmp_path / f"{i}.png", (10 * i, 0, 0), seed=i)
    (tmp_path / "3.png").write_bytes(b"corrupt")
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{"image": f"{i}.png", "caption": f"pair {i}"} for i in range(6)]))  # 5.png: missing
    dataset = PretrainDataset(pairs, tmp_path, None, skip_bad_images=True)
    with caplog.at_level(logging.INFO, logger="data.preflight"):
        assert preflight.check_splits({"train": dataset}, skip=True) == {"train": 1}
    assert "6 images, more than 3: checking that every file exists and reading the headers of a random sample of 0" \
        in caplog.text
    assert len(dataset) == 5 and "5.png" in caplog.text
    # The corrupt header was not sampled: found when loaded, skipped and counted.
    assert dataset[3][1] == "pair 4" and dataset.num_skipped == 1


def _imagecode(root: Path, valid: dict, train: dict | None = None) -> Path:
    for name in {**valid, **(train or {})}:
        (root / "image-sets" / name).mkdir(parents=True, exist_ok=True)
        for n in range(10):
            _png(root / "image-sets" / name / f"img{n}.png", (20 * n, 90, 90), seed=n)
    (root / "ann").mkdir()
    (root / "ann" / "valid_data.json").write_text(json.dumps(valid))
    (root / "ann" / "train_data.json").write_text(json.dumps(train or {}))
    return root


def test_zero_shot_refuses_an_unreadable_candidate_naming_set_and_position(tmp_path):
    import zero_shot
    root = _imagecode(tmp_path, {"open-images-7": {"3": "the fourth one"}})
    (root / "image-sets" / "open-images-7" / "img4.png").write_bytes(b"\x89PNG but not really")
    out = tmp_path / "zs"
    with pytest.raises(BadImageError, match=r"set 'open-images-7', candidate 4 of .*valid_data.json: unreadable image"):
        zero_shot.main(["--config", "configs/demo/imagecode_zeroshot.yaml", "--output_dir", str(out), "--no_progress",
                        "--opts", f"image_root={root / 'image-sets'}", f"ann_root={root / 'ann'}", "device=cpu"])
    assert not (out / "predictions.json").exists() and not (out / "evaluate.txt").exists()


def test_finetuning_refuses_an_empty_train_split(tmp_path):
    import finetune_imagecode
    root = _imagecode(tmp_path, {"open-images-7": {"3": "the fourth one"}}, train={})
    out = tmp_path / "ft"
    with pytest.raises(ValueError, match=r"train_data.json: no descriptions"):
        finetune_imagecode.main(["--config", "configs/demo/imagecode_stage1.yaml", "--output_dir", str(out),
                                 "--no_progress", "--opts", f"image_root={root / 'image-sets'}",
                                 f"ann_root={root / 'ann'}", "device=cpu"])
    _nothing_written(out)


def test_mmvp_refuses_an_unknown_type_naming_the_row(tmp_path):
    import eval_mmvp
    from tests.test_mmvp import official_rows, write_mmvp
    rows = official_rows(1)
    rows[4], rows[5] = (5, "Lighting", rows[4][2]), (6, "Lighting", rows[5][2])
    root = write_mmvp(tmp_path / "mmvp", rows)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"Questions.csv: row 5 \(Question ID 5\), field 'Type': 'Lighting' is not one "
                                         r"of the nine MMVP Types .*extra_patterns"):
        eval_mmvp.main(["--config", "configs/demo/mmvp.yaml", "--output_dir", str(out), "--opts",
                        f"data_root={root}", "pairs_per_pattern=1", "device=cpu"])
    assert not (out / "mmvp_results.json").exists()


@pytest.mark.dist
def test_under_torchrun_every_rank_refuses_or_drops_the_same_images(data, tmp_path, tiny_train_config, run_torchrun):
    """Rank 0 checks and broadcasts: a refusal ends every rank (no rank left waiting), and with
    skip_bad_images both ranks train on the same entries."""
    (data / "retrieval" / "images" / "val_1.png").unlink()
    cfg = tiny_train_config(tmp_path, data, batch_size_train=2, batch_size_test=4, max_epoch=1)
    args = ["--config", cfg, "--output_dir", tmp_path / "ddp", "--no_progress"]
    with pytest.raises(AssertionError, match=r"entry 1 of .*synthetic_val.json, field 'image': image file missing"):
        run_torchrun("train_retrieval.py", args, timeout=300)
    _nothing_written(tmp_path / "ddp")
    proc = run_torchrun("train_retrieval.py", args + ["--opts", "skip_bad_images=true"], timeout=300)
    console = proc.stdout + proc.stderr  # both ranks' console: warnings are said once, by rank 0
    assert console.count("split 'val': dropped 1 of its 4 images") == 1 and console.count("image file missing") == 1
    assert json.loads((tmp_path / "ddp" / "log.txt").read_text())["epoch"] == 0
