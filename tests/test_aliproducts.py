"""The product-retrieval (AliProducts-style) workflow as commands, with the official-layout fixture
model: CSV/TSV column mapping (a folder column + a file column) in the tools, the retrieval and
pretraining configs, and its errors before any model; `tools captions` (clean, templates);
`tools sweep` (checkpoints x caption columns, one table); submissions for test data without ground
truth from `tools search` and `tools ensemble`."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

FOLDERS = ("shoes", "bags")  # image i lives in FOLDERS[i % 2]/img<i>.png
SHARED = {0: "p01", 1: "p01"}  # two pictures of one product in the gallery


def _write_csv(path: Path, header, rows, delimiter=",") -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def products(tmp_path_factory, fixture_dir):
    """An AliProducts-like copy of the fixture's test split: images under ``root/<folder>/<file>``,
    ``products.csv`` (folder, file, title, title_aug, product_id; a row per caption), a gallery
    without captions and title queries without images."""
    tmp = tmp_path_factory.mktemp("aliproducts")
    root = tmp / "images"
    entries = json.loads((fixture_dir / "test.json").read_text())
    rows, gallery = [], []
    for i, entry in enumerate(entries):
        folder, file = FOLDERS[i % 2], Path(entry["image"]).name
        (root / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(fixture_dir / entry["image"], root / folder / file)
        for caption in entry["caption"]:
            rows.append([folder, file, caption.upper() + "!", "a photo of " + caption, f"p{i}"])
        gallery.append([folder, file, SHARED.get(i, f"p{i}")])
    header = ["folder", "file", "title", "title_aug", "product_id"]
    queries = [[f"q{k}", rows[r][2]] for k, r in enumerate((0, 3, 5, 8))]
    return {"root": root, "entries": entries, "rows": rows, "tmp": tmp,
            "csv": _write_csv(tmp / "products.csv", header, rows),
            "tsv": _write_csv(tmp / "products.tsv", header, rows, delimiter="\t"),
            "gallery": _write_csv(tmp / "gallery.csv", ["folder", "file", "product_id"], gallery),
            "queries": _write_csv(tmp / "queries.csv", ["query_id", "title"], queries)}


@pytest.fixture(scope="module")
def configs(products, fixture_config, fixture_dir, tmp_path_factory):
    """(config over products.csv, the fixture checkpoint, a second checkpoint: the fixture perturbed)."""
    tmp = tmp_path_factory.mktemp("aliproducts_cfg")
    cfg = fixture_config(tmp, image_root=str(products["root"]), ann_root=str(products["tmp"]),
                         test_file="products.csv", image_col="file", image_dir_col="folder", caption_col="title")
    state = torch.load(fixture_dir / "checkpoint.pth", map_location="cpu", weights_only=True)
    model = state["model"] if "model" in state else state
    g = torch.Generator().manual_seed(0)
    noisy = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in model.items()}
    (tmp / "ckpts").mkdir()
    first, second = tmp / "ckpts" / "a.pth", tmp / "ckpts" / "b.pth"
    shutil.copy(fixture_dir / "checkpoint.pth", first)
    torch.save({**state, "model": noisy} if "model" in state else noisy, second)
    return cfg, first, second


def _cli(main, *args):
    return main([str(a) for a in args])


# ----------------------------------------------------------------------------- column mapping

def test_folder_and_file_columns_in_the_tools_and_the_configs(products, tmp_path):
    from data.pairs import read_pairs
    from data.pretrain import build_pretrain_dataset
    from data.retrieval import RetrievalEvalDataset, build_retrieval_datasets
    from tasks.blip_pretrain import BlipPretrainConfig
    from tasks.retrieval import RetrievalConfig
    rows, n = products["rows"], len(products["entries"])
    paths = [f"{r[0]}/{r[1]}" for r in rows]

    table = read_pairs(products["tsv"], image_col="file", caption_col="title", image_dir_col="folder",
                       id_col="product_id")
    assert table.image == paths and table.caption == [r[2] for r in rows] and table.key == [r[4] for r in rows]
    assert table.image_fields == ["folder/file"]
    gallery = read_pairs(products["gallery"], image_col="file", image_dir_col="folder", need_caption=False)
    assert gallery.caption == [""] * n and len(gallery.first_rows_of_images()) == n

    cols = dict(image_col="file", image_dir_col="folder", image_id_col="product_id", dataset="custom",
                image_root=str(products["root"]), ann_root=str(products["tmp"]), image_size=16)
    data = build_retrieval_datasets(RetrievalConfig(**cols, caption_col="title_aug", train_file="products.tsv",
                                                    test_file="products.csv"), splits=("train", "test"))
    test, train = data["test"], data["train"]
    # The eval split groups the rows by image: BLIP's test layout, the same as the fixture's json.
    reference = RetrievalEvalDataset(Path(__file__).parent / "fixtures" / "blip_official_tiny" / "test.json",
                                     None, None)
    assert len(test) == n and test.img2txt == reference.img2txt and test.txt2img == reference.txt2img
    assert test.text == ["a photo of " + t for t in reference.text]
    assert test.image == list(dict.fromkeys(paths))
    assert train.num_images == n and train._idx == [i for i in range(n) for _ in range(2)]
    assert test.image_checks()[1](0) == f"row 0 (line 2) of {products['tmp'] / 'products.csv'}, field 'folder/file'"

    pre = build_pretrain_dataset(BlipPretrainConfig(train_file=[str(products["csv"])], image_root=str(products["root"]),
                                                    image_col="file", image_dir_col="folder", caption_col="title"),
                                 None)
    assert len(pre) == len(rows) and pre.image_path(2) == str(products["root"] / paths[2])
    assert pre.captions[0] == (rows[0][2].lower().replace("!", "").strip(),)

    from tools.pairs import main as pairs
    report = _cli(pairs, products["csv"], "--out", tmp_path / "pairs", "--image_col", "file", "--image_dir_col",
                  "folder", "--caption_col", "title_aug", "--pairs_image_root", products["root"])
    written = json.loads((tmp_path / "pairs" / "pairs.json").read_text())
    assert report["total"]["kept"] == len(rows) and written[0]["caption"] == rows[0][3]
    assert written[0]["image"] == str((products["root"] / paths[0]).resolve())


def test_a_missing_column_names_file_column_and_columns_before_any_model(products, configs, tmp_path):
    import train_retrieval
    from data.pretrain import build_pretrain_dataset
    from tasks.blip_pretrain import BlipPretrainConfig
    from tools.embed import main as embed
    from utils.errors import DataError
    cfg, _, _ = configs
    header = "['folder', 'file', 'title', 'title_aug', 'product_id']"
    # The tokenizer does not exist: had a model been built first, that would have been the error.
    with pytest.raises(DataError) as err:
        train_retrieval.main(["--config", str(cfg), "--output_dir", str(tmp_path / "dry"), "--dry_run", "--opts",
                              f"train_file={products['csv']}", "caption_col=name", "tokenizer=/nonexistent"])
    assert str(err.value) == (f"{products['csv']}: no column 'name' (caption_col) (columns: {header}); name the "
                              "file's columns with the config keys image_col / caption_col / image_dir_col")
    with pytest.raises(DataError, match=r"products\.csv: no column 'dir' \(image_dir_col\) \(columns: \["):
        train_retrieval.main(["--config", str(cfg), "--output_dir", str(tmp_path / "ev"), "--evaluate", "--opts",
                              "image_dir_col=dir", "tokenizer=/nonexistent"])
    with pytest.raises(DataError, match=r"no columns 'image' \(image_col\), 'caption' \(caption_col\)"):
        build_pretrain_dataset(BlipPretrainConfig(train_file=[str(products["csv"])]), None)
    with pytest.raises(SystemExit) as err:
        _cli(embed, "--config", cfg, "--output_dir", tmp_path / "e", "--input", products["csv"], "--image_col", "file",
             "--image_dir_col", "folder", "--caption_col", "name", "--opts", "tokenizer=/nonexistent")
    assert str(err.value) == (f"error: {products['csv']}: no column 'name' (--caption_col) (columns: {header}); "
                              "name the file's columns with --image_col / --caption_col / --image_dir_col")

    # And the right columns train: the dry run reads the CSV train file through the config keys.
    record = train_retrieval.main(["--config", str(cfg), "--output_dir", str(tmp_path / "ok"), "--dry_run",
                                   "--no_progress", "--opts", f"train_file={products['tsv']}", "batch_size_train=4",
                                   "queue_size=64"])
    assert json.loads((tmp_path / "ok" / "dry_run.json").read_text()) and record


# ----------------------------------------------------------------------------- caption variants

def test_captions_clean_and_template_write_a_new_column(products, tmp_path):
    from data.utils import pre_caption
    from tools.captions import main
    from utils.errors import DataError, UserError
    clean = tmp_path / "clean.csv"
    _cli(main, "--input", products["csv"], "--caption_col", "title", "--clean", "--max_words", 4, "--new_col",
         "title_clean", "--output", clean)
    with open(clean, newline="") as f:
        out = list(csv.reader(f))
    assert out[0] == ["folder", "file", "title", "title_aug", "product_id", "title_clean"]
    assert [r[:5] for r in out[1:]] == products["rows"]  # every other cell unchanged
    assert [r[5] for r in out[1:]] == [pre_caption(r[2], 4) for r in products["rows"]]
    assert out[1][5] == "a purple triangle on"

    prompt = tmp_path / "prompt.tsv"
    _cli(main, "--input", clean, "--template", "{{{product_id}}} a photo of {title_clean}", "--new_col", "prompt",
         "--output", prompt)
    with open(prompt, newline="") as f:
        out = list(csv.reader(f, delimiter="\t"))
    assert out[1][-1] == "{p0} a photo of a purple triangle on"

    js = tmp_path / "prompt.json"
    _cli(main, "--input", Path(__file__).parent / "fixtures" / "blip_official_tiny" / "test.json", "--template",
         "a photo of {caption}", "--clean", "--new_col", "prompt", "--output", js)
    entries = json.loads(js.read_text())
    assert entries[0]["prompt"] == ["a photo of " + pre_caption(c) for c in entries[0]["caption"]]

    with pytest.raises(DataError, match=r"no column 'brand' \(template placeholder\) \(columns: \['folder'"):
        _cli(main, "--input", products["csv"], "--template", "{brand} {title}", "--new_col", "x", "--output",
             tmp_path / "x.csv")
    with pytest.raises(DataError, match=r"no column 'caption' \(--caption_col\)"):
        _cli(main, "--input", products["csv"], "--clean", "--new_col", "x", "--output", tmp_path / "x.csv")
    with pytest.raises(UserError, match="has a column 'title_aug' already"):
        _cli(main, "--input", products["csv"], "--caption_col", "title", "--clean", "--new_col", "title_aug",
             "--output", tmp_path / "x.csv")
    with pytest.raises(UserError, match="a placeholder needs a column name"):
        _cli(main, "--input", products["csv"], "--template", "a {}", "--new_col", "x", "--output", tmp_path / "x.csv")
    assert not (tmp_path / "x.csv").exists()


# ----------------------------------------------------------------------------- sweep

def test_sweep_of_two_checkpoints_by_two_caption_columns(products, configs, tmp_path):
    from data.retrieval import build_retrieval_datasets
    from data.transforms import build_test_transform
    from tasks.retrieval import RetrievalConfig
    from tasks.retrieval_eval import evaluate_retrieval
    from tools.common import inference_model
    from tools.sweep import main
    from utils.config import load_config
    cfg_path, first, second = configs
    out = tmp_path / "sweep"
    record = _cli(main, "--config", cfg_path, "--output_dir", out, "--checkpoints", first.parent / "*.pth",
                  "--caption_cols", "title", "title_aug", "--no_progress")
    assert [r["path"] for r in record["checkpoints"]] == [str(first), str(second)]  # the glob, sorted

    # One cell evaluated directly: the second checkpoint on the augmented captions.
    cfg, _ = load_config(cfg_path, RetrievalConfig, ["caption_col=title_aug"])
    dataset = build_retrieval_datasets(cfg, splits=("test",),
                                       test_transform=build_test_transform(cfg.image_size))["test"]
    model, tokenizer = inference_model(cfg, torch.device("cpu"), pretrained=str(second))
    direct = evaluate_retrieval(model, dataset, tokenizer, k_test=cfg.k_test, max_tokens=cfg.max_tokens,
                                batch_size=cfg.batch_size_test, rerank_batch_size=cfg.rerank_batch_size,
                                progress=False).metrics
    assert record["checkpoints"][1]["results"]["title_aug"] == direct

    with open(out / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    columns = [f"{c}/{m}" for c in ("title", "title_aug") for m in ("txt_r1", "img_r1", "r_mean")]
    assert list(rows[0]) == ["checkpoint", "path"] + columns + ["best"]
    assert float(rows[1]["title_aug/r_mean"]) == pytest.approx(direct["r_mean"], abs=1e-4)
    md = (out / "sweep.md").read_text().splitlines()
    assert md[2] == "| checkpoint | " + " | ".join(c.replace("/", " ") for c in columns) + " |"
    for j, column in enumerate(columns):
        values = [float(r[column]) for r in rows]
        for i, row in enumerate(rows):
            is_best = values[i] == max(values)
            assert (column in row["best"].split()) == is_best
            cell = md[4 + i].split(" | ")[1 + j].rstrip(" |")
            assert cell == (f"**{values[i]:.2f}**" if is_best else f"{values[i]:.2f}")

    with pytest.raises(SystemExit, match="matches no file"):
        _cli(main, "--config", cfg_path, "--output_dir", tmp_path / "none", "--checkpoints", tmp_path / "*.pth")


# ----------------------------------------------------------------------------- submissions

def _submission(stem: Path):
    with open(stem.with_suffix(".csv"), newline="") as f:
        rows = list(csv.reader(f))
    return rows, json.loads(stem.with_suffix(".json").read_text())


def test_search_submission_on_a_gallery_without_ground_truth(products, configs, tmp_path):
    from data.collate import tokenize
    from data.utils import pre_caption
    from tasks.retrieval import RetrievalConfig
    from tools.common import inference_model
    from tools.embed import load_embeddings, main as embed
    from tools.search import main as search
    from utils.config import load_config
    cfg_path, first, _ = configs
    cols = ["--image_col", "file", "--image_dir_col", "folder", "--caption_col", "title"]
    _cli(embed, "--config", cfg_path, "--output_dir", tmp_path / "g", "--input", products["gallery"], "--what",
         "image", "--id_col", "product_id", *cols)
    stem = tmp_path / "sub" / "submission"
    _cli(search, "--config", cfg_path, "--gallery", tmp_path / "g", "--output_dir", tmp_path / "s", "--input",
         products["queries"], "--query_id_col", "query_id", "--k", 3, "--submission", stem, "--sheet_queries", 0,
         "--backend", "torch", *cols)
    rows, records = _submission(stem)
    assert rows[0] == ["query_id", "top1", "top2", "top3"]
    assert [r[0] for r in rows[1:]] == ["q0", "q1", "q2", "q3"] == [r["query_id"] for r in records]

    # The ranking is the cosine of the query and the best picture of each product, highest first.
    images, ids = load_embeddings(tmp_path / "g", "image")
    cfg, _ = load_config(cfg_path, RetrievalConfig)
    model, tokenizer = inference_model(cfg, torch.device("cpu"))
    titles = [r[1] for r in list(csv.reader(open(products["queries"])))[1:]]
    with torch.no_grad():
        text = model.encode_text(*tokenize(tokenizer, [pre_caption(t) for t in titles], cfg.max_tokens))[1].numpy()
    for q, (row, rec) in enumerate(zip(rows[1:], records)):
        best: dict = {}
        for g, record in enumerate(ids):
            best[record["key"]] = max(best.get(record["key"], -9.0), float(images[g] @ text[q]))
        want = sorted(best, key=lambda k: -best[k])[:3]
        assert row[1:] == rec["ids"] == want and len(set(want)) == 3
        assert rec["scores"] == pytest.approx([best[k] for k in want], abs=1e-5)
    assert ids[0]["image"] == "shoes/img0.png" and {r["key"] for r in ids} == {"p01", "p2", "p3", "p4", "p5"}


def test_search_submission_image_to_text(products, configs, tmp_path):
    """i2t: query pictures against a gallery of titles; the submission ranks products (each by its
    best title), ids from the gallery's product_id column, queries named by their image path."""
    from PIL import Image
    from data.transforms import build_test_transform
    from tasks.retrieval import RetrievalConfig
    from tools.common import inference_model
    from tools.embed import load_embeddings, main as embed
    from tools.search import main as search
    from utils.config import load_config
    cfg_path, _, _ = configs
    cols = ["--image_col", "file", "--image_dir_col", "folder", "--caption_col", "title"]
    _cli(embed, "--config", cfg_path, "--output_dir", tmp_path / "g", "--input", products["csv"], "--what", "text",
         "--id_col", "product_id", *cols)
    queries = [products["root"] / "shoes" / "img0.png", products["root"] / "bags" / "img3.png"]
    stem = tmp_path / "sub" / "i2t"
    _cli(search, "--config", cfg_path, "--gallery", tmp_path / "g", "--output_dir", tmp_path / "s", "--direction",
         "i2t", "--query_images", *queries, "--k", 3, "--submission", stem, "--sheet_queries", 0, "--backend", "torch")
    rows, records = _submission(stem)
    assert rows[0] == ["query_id", "top1", "top2", "top3"] and [r[0] for r in rows[1:]] == [str(q) for q in queries]
    texts, ids = load_embeddings(tmp_path / "g", "text")
    cfg, _ = load_config(cfg_path, RetrievalConfig)
    model, _ = inference_model(cfg, torch.device("cpu"))
    transform = build_test_transform(cfg.image_size)
    with torch.no_grad():
        pixels = torch.stack([transform(Image.open(q).convert("RGB")) for q in queries])
        feats = model.encode_image(pixels)[1].numpy()
    for q, (row, rec) in enumerate(zip(rows[1:], records)):
        best: dict = {}
        for t, record in enumerate(ids):
            best[record["key"]] = max(best.get(record["key"], -9.0), float(texts[t] @ feats[q]))
        want = sorted(best, key=lambda k: -best[k])[:3]
        assert row[1:] == rec["ids"] == want and len(set(want)) == 3
        assert rec["scores"] == pytest.approx([best[k] for k in want], abs=1e-5)


def test_ensemble_submission_without_ground_truth_from_fused_scores(products, configs, tmp_path):
    from tools.ensemble import main as ensemble
    from tools.embed import main as embed
    from tools.search import main as search
    cfg_path, first, second = configs
    cols = ["--image_col", "file", "--image_dir_col", "folder", "--caption_col", "title"]
    common = ["--config", cfg_path, "--checkpoints", first, second, "--gallery", products["gallery"], "--queries",
              products["queries"], "--query_id_col", "query_id", *cols, "--no_progress"]
    record = _cli(ensemble, *common, "--output_dir", tmp_path / "e", "--id_col", "product_id", "--k", 4)
    rows, records = _submission(tmp_path / "e" / "submission")
    assert record["mode"] == "submission" and record["queries"] == 4 and record["gallery"] == 6
    assert rows[0] == ["query_id", "top1", "top2", "top3", "top4"] and len(rows) == 5
    for rec in records:
        assert len(rec["ids"]) == 4 and len(set(rec["ids"])) == 4
        assert rec["scores"] == sorted(rec["scores"], reverse=True)

    # One member at full weight ranks as that model's BLIP protocol: `tools search --rerank` over the
    # same k_test (3) candidates, ids = image paths (all distinct).
    _cli(ensemble, *common, "--output_dir", tmp_path / "w", "--weights", 1, 0, "--k", 3, "--submission",
         tmp_path / "w" / "sub")
    _cli(embed, "--config", cfg_path, "--output_dir", tmp_path / "g", "--input", products["gallery"], "--what",
         "image", *cols)
    _cli(search, "--config", cfg_path, "--gallery", tmp_path / "g", "--output_dir", tmp_path / "s", "--input",
         products["queries"], "--query_id_col", "query_id", "--k", 3, "--rerank", "--submission",
         tmp_path / "s" / "sub", "--sheet_queries", 0, "--backend", "torch", *cols, "--opts", f"pretrained={first}")
    fused, alone = _submission(tmp_path / "w" / "sub")[1], _submission(tmp_path / "s" / "sub")[1]
    assert [r["ids"] for r in fused] == [r["ids"] for r in alone]
    assert all(i.startswith(("shoes/", "bags/")) for r in fused for i in r["ids"])
    # Feature fusion at weights (1, 0): the first model's ITC ranking, scores its cosines.
    _cli(ensemble, *common, "--output_dir", tmp_path / "f", "--weights", 1, 0, "--k", 3, "--fusion", "feature",
         "--submission", tmp_path / "f" / "sub")
    _cli(search, "--config", cfg_path, "--gallery", tmp_path / "g", "--output_dir", tmp_path / "s2", "--input",
         products["queries"], "--query_id_col", "query_id", "--k", 3, "--submission", tmp_path / "s2" / "sub",
         "--sheet_queries", 0, "--backend", "torch", *cols)
    fused, alone = _submission(tmp_path / "f" / "sub")[1], _submission(tmp_path / "s2" / "sub")[1]
    assert [r["ids"] for r in fused] == [r["ids"] for r in alone]
    assert np.allclose([r["scores"] for r in fused], [r["scores"] for r in alone], atol=1e-5)
