"""Data and inference tools (`python -m tools ...`) on the synthetic benchmark with a tiny random BLIP:
pair scoring (multi-rank = single process, resume, bad rows), filtering, embedding, search, ensembles."""
from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.collate import tokenize
from data.pairs import read_pairs
from data.transforms import build_test_transform
from data.utils import load_image, pre_caption
from tasks.retrieval import RetrievalConfig
from utils.config import load_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, synthetic_small, tiny_train_config):
    """(config path, checkpoint path, annotation folder, image root) of a tiny random BLIP."""
    from tools.common import inference_model
    tmp = tmp_path_factory.mktemp("tools")
    ckpt = tmp / "tiny.pth"
    cfg_path = tiny_train_config(tmp, synthetic_small, pretrained=str(ckpt), batch_size_test=8)
    cfg, _ = load_config(cfg_path, RetrievalConfig, ["pretrained="])
    model, _ = inference_model(cfg, torch.device("cpu"))
    torch.save({"model": model.state_dict()}, ckpt)
    return cfg_path, ckpt, synthetic_small / "retrieval" / "annotation", synthetic_small / "retrieval" / "images"


def _model(cfg_path, **opts):
    from tools.common import inference_model
    cfg, _ = load_config(cfg_path, RetrievalConfig, [f"{k}={v}" for k, v in opts.items()])
    model, tokenizer = inference_model(cfg, torch.device("cpu"))
    return model, tokenizer, cfg


def _records(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _cli(main, *args):
    """A tool's ``main`` with a command line as a user types it (every argument a string)."""
    return main([str(a) for a in args])


def _score(cfg, out, inputs, *extra):
    from tools.score_pairs import main
    return _cli(main, "--config", cfg, "--output_dir", out, "--input", *inputs, *extra)


def _csv_copy(path: Path, ann: Path, n: int, bad_row: int | None = None) -> Path:
    """The first ``n`` captions of the test split as a CSV with columns (file, text)."""
    table = read_pairs(ann / "synthetic_test.json")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "text"])
        for r in range(n):
            w.writerow(["test/missing.png" if r == bad_row else table.image[r], table.caption[r]])
    return path


# ----------------------------------------------------------------------------- score

def test_scores_equal_a_direct_forward_of_each_pair(tiny, tmp_path):
    cfg_path, _, ann, root = tiny
    _score(cfg_path, tmp_path / "s", [ann / "synthetic_test.json"], "--shard_size", 10)
    records = _records(tmp_path / "s" / "scores.jsonl")
    assert [r["row"] for r in records] == list(range(32))
    report = json.loads((tmp_path / "s" / "score_report.json").read_text())
    assert report["pairs"] == 32 and report["errors"] == 0
    assert report["quantiles"]["itm"]["0"] <= report["quantiles"]["itm"]["0.5"] <= report["quantiles"]["itm"]["1"]
    assert Image.open(tmp_path / "s" / "score_hist.png").size[0] > 0

    model, tokenizer, cfg = _model(cfg_path)
    transform = build_test_transform(cfg.image_size)
    for r in (0, 1, 17, 31):  # one image at a time, full-length padding: the plain computation
        image = transform(load_image(root / records[r]["image"])).unsqueeze(0)
        ids, mask = tokenize(tokenizer, [pre_caption(records[r]["caption"])], cfg.max_tokens)
        with torch.no_grad():
            tokens, image_feat = model.encode_image(image)
            _, text_feat = model.encode_text(ids, mask)
            itm = model.itm_logits(ids, mask, image_tokens=tokens).softmax(-1)[0, 1]
        assert records[r]["itc"] == pytest.approx(float(image_feat[0] @ text_feat[0]), abs=1e-5)
        assert records[r]["itm"] == pytest.approx(float(itm), abs=1e-5)


@pytest.mark.dist
def test_two_rank_scores_merge_to_the_single_process_scores(tiny, tmp_path, run_torchrun):
    cfg_path, _, ann, _ = tiny
    inputs = [ann / "synthetic_val.json", _csv_copy(tmp_path / "extra.csv", ann, 20)]
    args = ["--image_col", "file", "--caption_col", "text", "--shard_size", 9]
    _score(cfg_path, tmp_path / "one", inputs, *args)
    run_torchrun("tools", ["score", "--config", cfg_path, "--output_dir", tmp_path / "two", "--input", *inputs,
                           *args])
    one, two = _records(tmp_path / "one" / "scores.jsonl"), _records(tmp_path / "two" / "scores.jsonl")
    assert len(one) == 32 + 20
    assert [(r["row"], r["image"], r["caption"], r["source"]) for r in two] == \
        [(r["row"], r["image"], r["caption"], r["source"]) for r in one]
    for key in ("itc", "itm"):
        assert np.allclose([r[key] for r in two], [r[key] for r in one], atol=1e-5)
    # Both ranks wrote shards (round-robin), and the sources are counted separately.
    assert len(list((tmp_path / "two" / "parts").glob("shard_*.jsonl"))) == 6
    report = json.loads((tmp_path / "two" / "score_report.json").read_text())
    assert report["per_source"] == {"synthetic_val.json": {"pairs": 32, "errors": 0},
                                    "extra.csv": {"pairs": 20, "errors": 0}}


def test_resume_skips_finished_shards_and_rows(tiny, tmp_path):
    cfg_path, _, ann, _ = tiny
    out, test_json = tmp_path / "s", ann / "synthetic_test.json"
    _score(cfg_path, out, [test_json], "--shard_size", 10)
    original = _records(out / "scores.jsonl")
    parts = out / "parts"
    # Shard 0 is done (marked with a sentinel score); shard 2 was killed after 3 rows and a torn line.
    done = [dict(r, itc=9.0) for r in _records(parts / "shard_000000.jsonl")]
    (parts / "shard_000000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in done))
    partial = [dict(r, itc=7.0) for r in _records(parts / "shard_000002.jsonl")[:3]]
    (parts / "shard_000002.partial").write_text("".join(json.dumps(r) + "\n" for r in partial) + '{"row": 23, "ima')
    (parts / "shard_000002.jsonl").unlink()

    _score(cfg_path, out, [test_json], "--shard_size", 10)
    resumed = _records(out / "scores.jsonl")
    assert [r["row"] for r in resumed] == list(range(32))
    assert [r["itc"] for r in resumed[:10]] == [9.0] * 10          # finished shard: not recomputed
    assert [r["itc"] for r in resumed[20:23]] == [7.0] * 3         # rows of the partial shard: kept
    assert np.allclose([r["itc"] for r in resumed[23:]], [r["itc"] for r in original[23:]], atol=1e-6)
    assert not (parts / "shard_000002.partial").exists()
    assert "resuming, 3 of 10 pairs already scored" in (out / "run.log").read_text()

    with pytest.raises(SystemExit, match="different shard_size"):  # never mix two plans' outputs
        _score(cfg_path, out, [test_json], "--shard_size", 16)


def test_a_missing_image_stops_scoring_before_the_model_naming_its_row(tiny, tmp_path):
    cfg_path, _, ann, _ = tiny
    broken = _csv_copy(tmp_path / "broken.csv", ann, 6, bad_row=2)
    # A tokenizer that does not exist: had the model been built first, that would be the error.
    with pytest.raises(SystemExit) as err:
        _score(cfg_path, tmp_path / "out", [broken], "--image_col", "file", "--caption_col", "text",
               "--opts", "tokenizer=/nonexistent/tokenizer")
    assert str(err.value).startswith(f"error: row 2 (line 4) of {broken}, field 'file': image file missing: ")
    assert "--opts skip_bad_images=true" in str(err.value)
    assert not (tmp_path / "out" / "scores.jsonl").exists() and not (tmp_path / "out" / "parts").exists()


def test_with_skip_bad_images_a_missing_image_is_reported_with_its_row_and_the_rest_scored(tiny, tmp_path):
    cfg_path, _, ann, _ = tiny
    args = ["--image_col", "file", "--caption_col", "text", "--scores", "itm"]
    clean = _csv_copy(tmp_path / "clean.csv", ann, 6)
    broken = _csv_copy(tmp_path / "broken.csv", ann, 6, bad_row=2)
    _score(cfg_path, tmp_path / "clean", [clean], *args)
    report = _score(cfg_path, tmp_path / "broken", [broken], *args, "--opts", "skip_bad_images=true")
    good, bad = _records(tmp_path / "clean" / "scores.jsonl"), _records(tmp_path / "broken" / "scores.jsonl")
    assert len(bad) == 6 and report["errors"] == 1
    assert bad[2]["itm"] is None
    assert "row 2 (line 4) of" in bad[2]["error"] and "image file missing" in bad[2]["error"]
    assert "row 2 (line 4)" in (tmp_path / "broken" / "run.log").read_text()
    others = [0, 1, 3, 4, 5]
    assert all("error" not in bad[r] for r in others)
    assert np.allclose([bad[r]["itm"] for r in others], [good[r]["itm"] for r in others], atol=1e-6)


# ----------------------------------------------------------------------------- filter

def _filter_inputs(tmp_path):
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps([{"image": "x0.jpg", "caption": "zero", "image_id": 5},
                               {"image": "x1.jpg", "caption": ["one", "two", "three"]},
                               {"image": "x2.jpg", "caption": ["four"]}]))
    table_csv = tmp_path / "b.csv"
    table_csv.write_text("path,text,extra\nx3.jpg,five,e5\nx4.jpg,six,e6\nx5.jpg,seven,e7\n")
    scores = [0.9, 0.2, 0.6, 0.5, 0.1, 0.7, None, 0.55]  # pair rows 0..7; row 6 could not be scored
    table = read_pairs([ann, table_csv], image_col="path", caption_col="text")
    lines = [json.dumps({"row": r, "source": table.source[r], "image": table.image[r], "caption": table.caption[r],
                         "itm": s, **({"error": "missing"} if s is None else {})}) for r, s in enumerate(scores)]
    (tmp_path / "scores.jsonl").write_text("\n".join(lines) + "\n")
    return ["--input", str(ann), str(table_csv), "--image_col", "path", "--caption_col", "text",
            "--scores", str(tmp_path / "scores.jsonl")]


def test_filter_with_a_threshold_keeps_the_expected_rows(tmp_path, capsys):
    from tools.filter_pairs import main
    report = main(_filter_inputs(tmp_path) + ["--key", "itm", "--threshold", "0.55", "--out_dir", str(tmp_path / "o")])
    kept = json.loads((tmp_path / "o" / "a.json").read_text())
    assert kept == [{"image": "x0.jpg", "caption": "zero", "image_id": 5},
                    {"image": "x1.jpg", "caption": ["two"]}]  # "four" (0.5) is below: its entry goes
    rows = list(csv.reader(open(tmp_path / "o" / "b.csv")))
    assert rows == [["path", "text", "extra"], ["x3.jpg", "five", "e5"], ["x5.jpg", "seven", "e7"]]
    assert report["per_source"] == {"a.json": {"pairs": 5, "kept": 2, "dropped": 3, "not_scored": 0},
                                    "b.csv": {"pairs": 3, "kept": 2, "dropped": 1, "not_scored": 1}}
    printed = capsys.readouterr().out
    assert "a.json" in printed and "b.csv" in printed and "itm >= 0.55" in printed


def test_filter_top_fraction_and_mismatched_inputs(tmp_path):
    from tools.filter_pairs import keep_mask, main
    report = main(_filter_inputs(tmp_path) + ["--top_fraction", "0.5", "--out_dir", str(tmp_path / "o")])
    assert report["kept"] == 4  # ceil(0.5 x 7 scored): 0.9, 0.7, 0.6, 0.55
    assert [e["caption"] for e in json.loads((tmp_path / "o" / "a.json").read_text())] == ["zero", ["two"]]
    # ties: the earlier row wins
    assert keep_mask(np.array([0.5, 0.7, 0.5, np.nan]), top_fraction=0.6).tolist() == [True, True, False, False]
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{"image": "y.jpg", "caption": ["a", "b", "c", "d", "e", "f", "g", "h"]}]))
    with pytest.raises(SystemExit, match="belong to other inputs"):
        main(["--input", str(other), "--scores", str(tmp_path / "scores.jsonl"), "--threshold", "0",
              "--out_dir", str(tmp_path / "o2")])


def test_filter_refuses_to_write_nothing_and_warns_at_the_extremes(tmp_path, caplog):
    from tools.filter_pairs import main
    inputs = _filter_inputs(tmp_path)
    with pytest.raises(SystemExit) as err:
        main(inputs + ["--threshold", "0.95", "--out_dir", str(tmp_path / "none")])
    assert str(err.value) == ("error: the rule itm >= 0.95 keeps none of the 8 pairs (7 scored, itm from 0.1 to 0.9); "
                              "nothing written. Pass --allow_empty to write empty files")
    assert not (tmp_path / "none").exists()
    with caplog.at_level(logging.WARNING, logger="tools.filter"):
        report = main(inputs + ["--threshold", "0.95", "--allow_empty", "--out_dir", str(tmp_path / "empty")])
    assert report["kept"] == 0 and json.loads((tmp_path / "empty" / "a.json").read_text()) == []
    assert "the rule itm >= 0.95 keeps 0 of 8 pairs (0.0%)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tools.filter"):
        main(inputs + ["--threshold", "0.3", "--out_dir", str(tmp_path / "most")])  # 5 of 8: no warning
        assert caplog.text == ""
        many = tmp_path / "many.json"
        many.write_text(json.dumps([{"image": "x.jpg", "caption": [f"c{i}" for i in range(300)]}]))
        (tmp_path / "many_scores.jsonl").write_text("".join(
            json.dumps({"row": r, "source": "many.json", "image": "x.jpg", "caption": f"c{r}", "itm": r / 300}) + "\n"
            for r in range(300)))
        main(["--input", str(many), "--scores", str(tmp_path / "many_scores.jsonl"), "--threshold", "0.001",
              "--out_dir", str(tmp_path / "all")])
    assert "keeps 299 of 300 pairs (99.7%): check the --key and the threshold" in caplog.text


# ----------------------------------------------------------------------------- progress lines

def test_long_tools_log_progress_with_rate_and_eta(tiny, tmp_path, monkeypatch):
    import utils.logging
    from tools.embed import main
    monkeypatch.setattr(utils.logging, "HEARTBEAT_S", 0.0)  # a line per step instead of every 30 s
    cfg_path, _, ann, _ = tiny
    _cli(main, "--config", cfg_path, "--output_dir", tmp_path / "e", "--input", ann / "synthetic_test.json")
    _score(cfg_path, tmp_path / "s", [ann / "synthetic_test.json"])
    embed_log, score_log = (tmp_path / "e" / "run.log").read_text(), (tmp_path / "s" / "run.log").read_text()
    assert re.search(r"the inputs: checking images: 16/16 images \(100.0%\), [\d.]+ images/s, ETA 0s", embed_log)
    assert re.search(r"embed \(this rank\): 16/48 rows \(33.3%\), [\d.]+ rows/s, ETA \d+s", embed_log)
    assert re.search(r"score \(this rank\): 32/32 pairs \(100.0%\), [\d.]+ pairs/s, ETA 0s", score_log)


# ----------------------------------------------------------------------------- embed and search

def _brute_force(queries: np.ndarray, gallery: np.ndarray, k: int):
    sims = queries.astype(np.float64) @ gallery.astype(np.float64).T
    return np.argsort(-sims, axis=1, kind="stable")[:, :k], np.sort(sims, axis=1)[:, ::-1][:, :k]


def test_embed_shards_hold_the_model_features(tiny, tmp_path):
    from tools.embed import load_embeddings, main
    cfg_path, _, ann, root = tiny
    test_json = ann / "synthetic_test.json"
    for fmt in ("npy", "safetensors"):
        _cli(main, "--config", cfg_path, "--output_dir", tmp_path / fmt, "--input", test_json, "--shard_size", 7,
             "--array_format", fmt)
    images, image_ids = load_embeddings(tmp_path / "npy", "image")
    texts, text_ids = load_embeddings(tmp_path / "npy", "text")
    assert images.shape == (16, 16) and texts.shape == (32, 16) and (tmp_path / "npy" / "image_000002.npy").exists()
    assert np.array_equal(images, load_embeddings(tmp_path / "safetensors", "image")[0])
    assert np.array_equal(texts, load_embeddings(tmp_path / "safetensors", "text")[0])
    assert [r["id"] for r in image_ids] == list(range(16))
    assert text_ids[3]["image_id"] == 1 and text_ids[3]["image"] == image_ids[1]["image"]

    model, tokenizer, cfg = _model(cfg_path)
    pix = torch.stack([build_test_transform(cfg.image_size)(load_image(root / r["image"])) for r in image_ids])
    ids, mask = tokenize(tokenizer, [pre_caption(r["caption"]) for r in text_ids], cfg.max_tokens)
    with torch.no_grad():
        assert np.allclose(images, model.encode_image(pix)[1].numpy(), atol=1e-5)
        assert np.allclose(texts, model.encode_text(ids, mask)[1].numpy(), atol=1e-5)


def test_chunked_search_equals_brute_force():
    from tools.search import search
    g = torch.Generator().manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(203, 16, generator=g), dim=1).numpy()
    queries = torch.nn.functional.normalize(torch.randn(37, 16, generator=g), dim=1).numpy()
    want_i, want_s = _brute_force(queries, gallery, 10)
    for chunk in (7, 64, 100000):
        s, i = search(queries, gallery, 10, backend="torch", chunk_size=chunk)
        assert np.array_equal(i, want_i) and np.allclose(s, want_s, atol=1e-6)
    s, i = search(queries, gallery[:4], 10, backend="torch", chunk_size=3)  # k > gallery size
    assert i.shape == (37, 4) and np.array_equal(i, _brute_force(queries, gallery[:4], 4)[0])


def test_faiss_search_equals_torch_search():
    pytest.importorskip("faiss")
    from tools.search import search
    g = torch.Generator().manual_seed(1)
    gallery = torch.nn.functional.normalize(torch.randn(500, 32, generator=g), dim=1).numpy()
    queries = torch.nn.functional.normalize(torch.randn(50, 32, generator=g), dim=1).numpy()
    s_t, i_t = search(queries, gallery, 20, backend="torch", chunk_size=64)
    s_f, i_f = search(queries, gallery, 20, backend="faiss")
    assert np.array_equal(i_t, i_f) and np.allclose(s_t, s_f, atol=1e-5)


def test_search_cli_equals_brute_force_and_rerank_matches_itm(tiny, tmp_path):
    from tools.embed import load_embeddings, main as embed
    from tools.search import main as search_main
    cfg_path, _, ann, root = tiny
    _cli(embed, "--config", cfg_path, "--output_dir", tmp_path / "g", "--input", ann / "synthetic_test.json")
    images, _ = load_embeddings(tmp_path / "g", "image")
    texts, text_ids = load_embeddings(tmp_path / "g", "text")
    common = ["--config", cfg_path, "--gallery", tmp_path / "g", "--k", 5, "--chunk_size", 3, "--backend", "torch"]

    results = _cli(search_main, *common, "--output_dir", tmp_path / "t2i", "--query_embeddings", tmp_path / "g")
    want_i, want_s = _brute_force(texts, images, 5)
    assert [[r["gallery_index"] for r in q["results"]] for q in results] == want_i.tolist()
    assert np.allclose([[r["score"] for r in q["results"]] for q in results], want_s, atol=1e-5)
    assert json.loads((tmp_path / "t2i" / "results.json").read_text())[0]["results"][0]["rank"] == 1
    assert Image.open(tmp_path / "t2i" / "contact_sheet.png").size[1] > 4 * 128  # 4 query rows of thumbnails

    queries = ["a big red circle", "two small blue squares at the top"]
    reranked = _cli(search_main, *common, "--output_dir", tmp_path / "rr", "--queries", *queries, "--rerank")
    model, tokenizer, cfg = _model(cfg_path)
    transform = build_test_transform(cfg.image_size)
    for query, res in zip(queries, reranked):
        scores = [r["score"] for r in res["results"]]
        assert scores == sorted(scores, reverse=True) and len(scores) == 5
        ids, mask = tokenize(tokenizer, [pre_caption(query)], cfg.max_tokens)
        for r in res["results"][:2]:
            pix = transform(load_image(root / r["image"])).unsqueeze(0)
            with torch.no_grad():
                tokens, image_feat = model.encode_image(pix)
                itm = model.itm_logits(ids, mask, image_tokens=tokens)[0, 1]
                itc = image_feat[0] @ model.encode_text(ids, mask)[1][0]
            assert r["itm"] == pytest.approx(float(itm), abs=1e-4) and r["itc"] == pytest.approx(float(itc), abs=1e-5)
            assert r["score"] == pytest.approx(float(itm + itc), abs=1e-4)

    i2t = _cli(search_main, *common, "--output_dir", tmp_path / "i2t", "--direction", "i2t",
               "--query_images", root / "test" / "test_00003.png")
    want_i, _ = _brute_force(images[3:4], texts, 5)
    assert [r["gallery_index"] for r in i2t[0]["results"]] == want_i[0].tolist()
    assert i2t[0]["results"][0]["caption"] == text_ids[want_i[0, 0]]["caption"]

    # A query image that is not there: named before any model is built, or left out with skip_bad_images.
    gone = tmp_path / "gone.png"
    with pytest.raises(SystemExit, match=rf"error: query image 1: image file missing: {gone}"):
        _cli(search_main, *common, "--output_dir", tmp_path / "bad", "--direction", "i2t",
             "--query_images", root / "test" / "test_00003.png", gone, "--opts", "tokenizer=/nonexistent")
    kept = _cli(search_main, *common, "--output_dir", tmp_path / "skip", "--direction", "i2t",
                "--query_images", root / "test" / "test_00003.png", gone, "--opts", "skip_bad_images=true")
    assert kept == i2t


# ----------------------------------------------------------------------------- ensemble

@pytest.mark.slow
def test_ensemble_of_a_model_with_itself_equals_the_model(tiny, tmp_path):
    from tools.ensemble import main
    cfg_path, ckpt, _, _ = tiny
    other = tmp_path / "other.pth"
    model, _, _ = _model(cfg_path, pretrained="", seed=7)
    torch.save({"model": model.state_dict()}, other)

    same = _cli(main, "--config", cfg_path, "--output_dir", tmp_path / "same", "--checkpoints", ckpt, ckpt,
                "--no_progress")
    member = same["members"][0]
    assert same["score_fusion"] == member["protocol"]
    assert same["feature_fusion"] == member["itc"]
    assert json.loads((tmp_path / "same" / "ensemble.json").read_text())["score_fusion"] == member["protocol"]

    weighted = _cli(main, "--config", cfg_path, "--output_dir", tmp_path / "w", "--checkpoints", ckpt, other,
                    "--weights", 1, 0, "--no_progress")
    assert weighted["members"][0]["protocol"] == member["protocol"]
    assert weighted["score_fusion"] == member["protocol"] and weighted["feature_fusion"] == member["itc"]


# ----------------------------------------------------------------------------- custom data as CSV

def _json_to_csv(src: Path, dest: Path, with_ids: bool) -> Path:
    entries = json.loads(src.read_text())
    with open(dest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"] + (["image_id"] if with_ids else []))
        for e in entries:
            for c in ([e["caption"]] if isinstance(e["caption"], str) else e["caption"]):
                w.writerow([e["image"], c] + ([e["image_id"]] if with_ids else []))
    return dest


def test_custom_csv_annotations_read_like_blip_json_and_evaluate(tiny, tmp_path):
    """docs/RETRIEVAL.md, "Bring your own data": captions in CSV files, `dataset: custom`."""
    import train_retrieval
    from data.retrieval import build_retrieval_datasets
    cfg_path, ckpt, ann, root = tiny
    _json_to_csv(ann / "synthetic_train.json", tmp_path / "train.csv", with_ids=True)
    _json_to_csv(ann / "synthetic_test.json", tmp_path / "test.csv", with_ids=False)
    common = dict(dataset="custom", image_root=str(root), image_size=32)
    js = build_retrieval_datasets(RetrievalConfig(**common, ann_root=str(ann), train_file="synthetic_train.json",
                                                  test_file="synthetic_test.json"), splits=("train", "test"))
    cs = build_retrieval_datasets(RetrievalConfig(**common, ann_root=str(tmp_path), train_file="train.csv",
                                                  test_file="test.csv"), splits=("train", "test"))
    assert cs["train"].captions == js["train"].captions and cs["train"]._idx == js["train"]._idx
    assert cs["test"].text == js["test"].text and cs["test"].img2txt == js["test"].img2txt
    assert cs["test"].image == js["test"].image

    records = [train_retrieval.main(["--config", str(cfg_path), "--output_dir", str(tmp_path / name), "--evaluate",
                                     "--no_progress", "--eval_splits", "test", "--opts", f"ann_root={folder}",
                                     f"test_file={test}"])
               for name, folder, test in (("js", ann, "synthetic_test.json"), ("csv", tmp_path, "test.csv"))]
    assert records[0] == records[1] and "test_r_mean" in records[0]
