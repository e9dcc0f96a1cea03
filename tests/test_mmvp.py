"""MMVP-VLM: the reader (layout and error messages), the official protocol with a stub scorer
whose choices are known, the synthetic MMVP part, and eval_mmvp.py end to end."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.mmvp import (IMAGE_FOLDER, PATTERNS, TYPE_FOLDERS, MMVPItem, MMVPPair, choose, evaluate_pairs,
                       markdown_table, read_mmvp)

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "blip_official_tiny"


def write_mmvp(root: Path, rows, images=True, header=("Question ID", "Type", "Statement")) -> Path:
    """A folder in the release's layout: Questions.csv + `MLLM_VLM Images/<Type>/<qid>.jpg`."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "Questions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    if images:
        for qid, qtype, *_ in rows:
            path = root / IMAGE_FOLDER / qtype / f"{qid}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (int(qid) * 10 % 255, 50, 90)).save(path)
    return root


def official_rows(pairs_per_pattern: int):
    """Rows like the release: pattern blocks in order, Types with spaces, 2 rows per pair."""
    rows, qid = [], 0
    for k, qtype in enumerate(TYPE_FOLDERS):
        for j in range(pairs_per_pattern):
            for side in ("left", "right"):
                qid += 1
                rows.append((qid, qtype, f"The thing of pattern {k} pair {j} faces {side}."))
    return rows


# ---------------------------------------------------------------- reader

def test_reader_follows_the_release_layout(tmp_path):
    root = write_mmvp(tmp_path / "MMVP VLM", official_rows(2))
    pairs = read_mmvp(root, pairs_per_pattern=2)
    assert len(pairs) == 18
    assert [p.pattern for p in pairs] == [p for p in PATTERNS for _ in range(2)]
    last = pairs[-1]
    assert (last.first.qid, last.second.qid) == (35, 36)
    assert last.first.image == root / "MLLM_VLM Images" / "Camera Perspective" / "35.jpg"
    assert last.second.statement == "The thing of pattern 8 pair 1 faces right."


@pytest.mark.parametrize("rows, header, match", [
    ([(1, "Color", "a"), (2, "Color", "b"), (3, "Color", "c")], None,
     r"3 data rows, an odd number.*Question ID 3"),
    ([(1, "Color", "a", "x"), (2, "Color", "b", "y")], ("Question ID", "Type", "Statement", "Answer"),
     r"expected the columns Question ID,Type,Statement, got Question ID,Type,Statement,Answer"),
    ([(1, "Color", "a"), (2, "Color", "b")], ("qid", "Type", "Statement"), r"expected the columns"),
    ([(1, "Color", "a"), (2, "Color")], None, r"row 2 has 2 fields, expected 3"),
    ([("one", "Color", "a"), (2, "Color", "b")], None, r"row 1, field 'Question ID': 'one' is not an integer"),
    ([(1, "Color", "a"), (2, "Text", "b")], None, r"rows 1 and 2 form pair 0 but their field 'Type' differs"),
    ([(1, "Color", "a"), (1, "Color", "b")], None, r"row 2, field 'Question ID': 1 repeats row 1"),
    ([(1, "Color", ""), (2, "Color", "b")], None, r"row 1 \(Question ID 1\), field 'Statement' is empty"),
    ([], None, r"no data rows"),
])
def test_reader_errors_name_file_row_and_field(tmp_path, rows, header, match):
    root = write_mmvp(tmp_path / "m", rows, images=False, header=header or ("Question ID", "Type", "Statement"))
    with pytest.raises(ValueError, match=match) as err:
        read_mmvp(root, check_images=False)
    assert "Questions.csv" in str(err.value)


def test_reader_rejects_more_pairs_than_the_patterns_hold(tmp_path):
    root = write_mmvp(tmp_path / "m", official_rows(2), images=False)
    with pytest.raises(ValueError, match=r"18 pairs of the nine Types, but 9 patterns x 1 pairs hold at most 9"):
        read_mmvp(root, pairs_per_pattern=1, check_images=False)


def test_reader_names_a_missing_image_and_its_row(tmp_path):
    root = write_mmvp(tmp_path / "m", official_rows(1))
    missing = root / IMAGE_FOLDER / "Structural Character" / "14.jpg"
    missing.unlink()
    with pytest.raises(FileNotFoundError) as err:
        read_mmvp(root, pairs_per_pattern=1)
    assert str(missing) in str(err.value) and "Question ID 14, row 14" in str(err.value)
    with pytest.raises(FileNotFoundError, match="Questions.csv"):
        read_mmvp(tmp_path / "nowhere")


def test_reader_warns_when_a_type_sits_in_another_patterns_block(tmp_path, caplog):
    rows = official_rows(1)
    rows[0], rows[1] = (1, "Color", rows[0][2]), (2, "Color", rows[1][2])
    root = write_mmvp(tmp_path / "m", rows)
    with caplog.at_level(logging.WARNING):
        pairs = read_mmvp(root, pairs_per_pattern=1)
    assert pairs[0].pattern == "Orientation and Direction"  # by position, as the official script
    assert "Type 'Color'" in caplog.text


# ---------------------------------------------------------------- protocol

def _pairs(n_patterns: int = 9, per: int = 15):
    out = []
    for p in range(n_patterns * per):
        a = MMVPItem(2 * p + 1, "T", f"first {p}", Path(f"{2 * p + 1}.jpg"), 2 * p + 1)
        b = MMVPItem(2 * p + 2, "T", f"second {p}", Path(f"{2 * p + 2}.jpg"), 2 * p + 2)
        out.append(MMVPPair(p, PATTERNS[p // per], a, b))
    return out


# scores[t][i] for statement t and image i; the right answer is image t for statement t.
CASES = {
    "right": ([[2, 1], [1, 2]], True),
    "first statement wrong": ([[1, 2], [1, 2]], False),
    "second statement wrong": ([[2, 1], [2, 1]], False),
    "both wrong": ([[1, 2], [2, 1]], False),
    "tie on the first statement goes to image 2": ([[1, 1], [1, 2]], False),
    "tie on the second statement goes to image 2": ([[2, 1], [3, 3]], True),
}


@pytest.mark.parametrize("case", CASES)
def test_pair_logic_and_tie_rule(case):
    scores, correct = CASES[case]
    pairs = _pairs(1, 1)
    result = evaluate_pairs(pairs, lambda chunk, prompts: np.array([scores] * len(chunk)))
    assert result.records[0]["correct"] is correct
    assert result.accuracy["Orientation and Direction"] == (100.0 if correct else 0.0)
    assert choose(np.array([[5.0, 5.0], [5.0, 5.0]])).tolist() == [1, 1]


def test_patterns_by_pair_index_per_pattern_accuracy_and_average():
    """Pair p is answered right iff p % 15 <= pattern index: pattern k gets (k+1)/15."""
    pairs = _pairs()
    seen_prompts = []

    def scorer(chunk, prompts):
        seen_prompts.extend(prompts)
        out = []
        for pair in chunk:
            k = PATTERNS.index(pair.pattern)
            # Wrong pairs alternate between a tie and a wrong first statement.
            wrong = [[1, 1], [1, 2]] if pair.index % 2 else [[1, 2], [1, 2]]
            out.append([[2, 1], [1, 2]] if pair.index % 15 <= k else wrong)
        return np.array(out)

    result = evaluate_pairs(pairs, scorer, batch_size=7)
    expected = {p: 100.0 * (k + 1) / 15 for k, p in enumerate(PATTERNS)}
    for p in PATTERNS:
        assert result.accuracy[p] == pytest.approx(expected[p])
        assert result.counts[p] == (PATTERNS.index(p) + 1, 15)
    assert result.accuracy["Average"] == pytest.approx(np.mean(list(expected.values())))
    assert list(result.accuracy) == [*PATTERNS, "Average"]
    assert seen_prompts[0] == ("a photo of first 0", "a photo of second 0") and len(seen_prompts) == 135
    assert result.records[16]["chosen"] == [33, 34] and result.records[16]["pattern"] == PATTERNS[1]


def test_scorer_shape_is_checked_and_table_has_the_published_rows():
    with pytest.raises(ValueError, match=r"expected \(1, 2, 2\)"):
        evaluate_pairs(_pairs(1, 1), lambda chunk, prompts: np.zeros((1, 2)))
    table = markdown_table({p: 20.0 for p in PATTERNS} | {"Average": 20.0}, "mine")
    assert "| mine | 20.0 |" in table and "| Viewpoint and Perspective | Average |" in table
    assert "19.3" in table and "37.8" in table and "39.3" in table and "33.3" in table


# ---------------------------------------------------------------- synthetic part

@pytest.fixture(scope="module")
def synth_mmvp(tmp_path_factory):
    from data.synthetic import generate
    return generate(tmp_path_factory.mktemp("mmvp") / "out", seed=0, parts="retrieval,mmvp", image_size=32,
                    n_train=8, n_val=4, n_test=4, pairs_per_pattern=2)


def test_synthetic_part_is_in_the_release_layout(synth_mmvp):
    root = Path(synth_mmvp["mmvp"]["data_root"])
    pairs = read_mmvp(root, pairs_per_pattern=2)
    assert len(pairs) == 18
    assert sorted(p.name for p in (root / "MLLM_VLM Images").iterdir()) == sorted(TYPE_FOLDERS)
    for pair in pairs:
        assert pair.first.type == TYPE_FOLDERS[PATTERNS.index(pair.pattern)]
        assert pair.first.statement != pair.second.statement
        a, b = (np.asarray(Image.open(it.image)) for it in pair.items)
        assert a.shape == (32, 32, 3) and np.abs(a.astype(int) - b.astype(int)).max() > 25  # more than jitter
    assert json.loads(Path(synth_mmvp["mmvp"]["meta"]).read_text())["pairs"] == 18


def test_synthetic_statements_are_in_the_tokenizer_vocab(synth_mmvp):
    from models.tokenizer import build_tokenizer
    from data.utils import pre_caption
    tok = build_tokenizer(synth_mmvp["tokenizer"])
    pairs = read_mmvp(synth_mmvp["mmvp"]["data_root"], pairs_per_pattern=2)
    for pair in pairs:
        for it in pair.items:
            ids = tok(pre_caption("a photo of " + it.statement)).input_ids
            pieces = tok.convert_ids_to_tokens(ids)
            assert tok.unk_token_id not in ids and not any(p.startswith("##") for p in pieces), pieces


def test_adding_the_mmvp_part_keeps_the_retrieval_part(synth_mmvp, tmp_path):
    from data.synthetic import generate
    alone = generate(tmp_path / "alone", seed=0, image_size=32, n_train=8, n_val=4, n_test=4)
    a, b = Path(alone["retrieval"]["root"]), Path(synth_mmvp["retrieval"]["root"])
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != "meta.json")
    assert files and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


# ---------------------------------------------------------------- entry point

@pytest.mark.slow
def test_eval_mmvp_end_to_end_with_the_official_layout_checkpoint(synth_mmvp, tmp_path, run_script):
    """The fixture BLIP (official state-dict layout) scores the synthetic pairs; the outputs agree."""
    out = tmp_path / "out"
    args = ["--config", "configs/demo/mmvp.yaml", "--output_dir", out, "--opts",
            f"data_root={synth_mmvp['mmvp']['data_root']}", "pairs_per_pattern=2", "batch_size=4",
            f"pretrained={FIXTURE / 'checkpoint.pth'}", f"med_config={FIXTURE / 'med_config.json'}",
            f"tokenizer={FIXTURE / 'tokenizer'}", "embed_dim=32", "score=itm+itc", "device=cpu"]
    run_script("eval_mmvp.py", args, timeout=300)
    results = json.loads((out / "mmvp_results.json").read_text())
    assert list(results) == [*PATTERNS, "Average"]
    records = json.loads((out / "mmvp_pairs.json").read_text())
    assert len(records) == 18
    for p in PATTERNS:
        mine = [r["correct"] for r in records if r["pattern"] == p]
        assert results[p] == pytest.approx(100.0 * sum(mine) / len(mine), abs=1e-3)
    assert results["Average"] == pytest.approx(np.mean([results[p] for p in PATTERNS]), abs=1e-3)
    r = records[0]
    picks = [r["qids"][int(not s[0] > s[1])] for s in r["scores"]]
    assert r["chosen"] == picks and r["correct"] == (picks == r["qids"])
    assert "| Average |" in (out / "mmvp_results.md").read_text()
    with Image.open(out / "mmvp_results.png") as im:
        assert im.format == "PNG" and im.size[0] > 300
    assert (out / "config.yaml").is_file()


@pytest.mark.slow
def test_eval_mmvp_scores_a_stage2_checkpoint_as_two_candidate_sets(synth_mmvp, tmp_path):
    """A stage-2 ImageCoDe model scores each pair as a 2-candidate set without position embedding,
    even when it was trained with all_pos; the scores match scoring each statement on its own."""
    import torch
    import eval_mmvp
    from data.collate import tokenize
    from data.transforms import build_test_transform
    from data.utils import load_image, pre_caption
    from models.imagecode import build_imagecode_model, score_candidates
    from models.tokenizer import build_tokenizer
    from tasks.imagecode import ImageCodeConfig
    from utils.config import config_to_dict

    med = tmp_path / "med.json"
    med.write_text('{"vocab_size": null, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,'
                   ' "intermediate_size": 64, "max_position_embeddings": 40, "encoder_width": 32}')
    cfg = ImageCodeConfig(vit={'width': 32, 'depth': 1, 'heads': 2}, image_size=32, med_config=str(med),
                          tokenizer=synth_mmvp["tokenizer"], embed_dim=16, stage=2, all_pos=True,
                          context_layers=1, context_heads=2, context_dropout=0.0)
    torch.manual_seed(0)
    model = build_imagecode_model(cfg, build_tokenizer(cfg.tokenizer)).eval()
    with torch.no_grad():
        model.context.position.weight.normal_(0, 5.0)  # would change every score if it were applied
    ckpt = tmp_path / "stage2.pth"
    torch.save({"model": model.state_dict(), "config": config_to_dict(cfg)}, ckpt)

    out = tmp_path / "out"
    eval_mmvp.main(["--config", "configs/demo/mmvp.yaml", "--output_dir", str(out), "--opts",
                    f"data_root={synth_mmvp['mmvp']['data_root']}", "pairs_per_pattern=2", "batch_size=5",
                    "model_type=finetuned", f"pretrained={ckpt}", "device=cpu"])
    records = json.loads((out / "mmvp_pairs.json").read_text())
    assert len(records) == 18 and list(json.loads((out / "mmvp_results.json").read_text()))[-1] == "Average"

    model.all_pos = False
    tok, transform = build_tokenizer(cfg.tokenizer), build_test_transform(32)
    for pair, rec in zip(read_mmvp(synth_mmvp["mmvp"]["data_root"], 2)[:3], records[:3]):
        images = torch.stack([transform(load_image(it.image)) for it in pair.items])
        for t, it in enumerate(pair.items):
            ids, mask = tokenize(tok, [pre_caption("a photo of " + it.statement)], cfg.max_tokens)
            expected = score_candidates(model, images, ids, mask, video=False)
            assert np.allclose(rec["scores"][t], expected.numpy(), atol=1e-4), (rec["scores"][t], expected)
