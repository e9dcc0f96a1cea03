"""Bad-input cases of the tools (``tests/scripts/bad_inputs.py``): ``python -m tools`` ensemble,
search, convert, sweep, embed, caption, captions, filter, pairs and score, and HF folders given as a
checkpoint.
"""
from __future__ import annotations

import json

from tests.scripts.campaign_runs import Case, Run, refused
from tests.scripts.campaign_world import OFFICIAL, _bad_hf, _caption_tool, _copy, _prev_run, _tool
from tests.scripts.tiny import tiny_values, write_yaml


def _r2(w, tmp):
    out = tmp / "ens"
    good = w.run / "checkpoint_last.pth"
    return Run(_tool("ensemble", w, out, "--checkpoints", str(good), str(w.wide)), 1,
               ["member 2 of --checkpoints", str(w.wide), "does not fit", "vit (width"], absent=[out])


def _r9(w, tmp):
    out = tmp / "search"
    wide = write_yaml(tmp / "embed32.yaml", {**tiny_values(w.data, w.med), "embed_dim": 32})
    return Run(_tool("search", w, out, "--gallery", str(w.gallery), "--queries", "a red square", cfg=wide), 1,
               ["was embedded with embed_dim 16", "embed_dim 32"], watch=[w.gallery], absent=[out])


def _r10(w, tmp):
    bad = _bad_hf(w, tmp, "vision_config", "hidden_size", "64")
    out = tmp / "eval"
    return Run(["train_retrieval.py", "--config", str(w.fixture_cfg), "--output_dir", str(out), "--evaluate",
                "--no_progress", "--opts", f"pretrained={bad}"], 1,
               [str(bad / "config.json"), "vision_config.hidden_size is a string ('64')", "an integer"], absent=[out])


def _r11(w, tmp):
    bad = _bad_hf(w, tmp, "vision_config", "hidden_size", "64")
    return Run(["tools", "convert", "--to", "blip", "--input", str(bad), "--output", str(tmp / "back.pth")], 1,
               ["vision_config.hidden_size is a string"], absent=[tmp / "back.pth"])


def _r12(w, tmp):
    target = _copy(w.run / "checkpoint_last.pth", tmp / "keep" / "checkpoint_copy.pth")
    return Run(["tools", "convert", "--to", "blip", "--input", str(w.hf), "--output", str(target)], 1,
               ["--output", "exists already", "--overwrite"], watch=[target])


def _r13(w, tmp):
    out = _copy(w.hf, tmp / "hf_existing")
    return Run(["tools", "convert", "--to", "hf", "--config", str(w.fixture_cfg), "--output_dir", str(out)], 1,
               ["--output_dir", "is not empty", "--overwrite"], watch=[out])


def _r15(w, tmp):
    out = tmp / "sweep"
    good = w.run / "checkpoint_last.pth"
    return Run(_tool("sweep", w, out, "--checkpoints", str(good), str(w.wide)), 1,
               ["checkpoint 2 of --checkpoints", str(w.wide), "does not fit"], absent=[out])


def _o27(w, tmp):
    gallery = _copy(w.gallery, tmp / "gallery")
    return Run(_tool("embed", w, gallery, "--input", str(w.test_file()), "--what", "image", "--opts",
                     "max_words=5"), 1, ["holds a run with different model"], watch=[gallery])


def _o28(w, tmp):
    out = tmp / "search"
    out.mkdir()
    (out / "results.json").write_text("[]")
    return Run(_tool("search", w, out, "--gallery", str(w.gallery), "--queries", "a red square", "--opts",
                     f"pretrained={w.run / 'checkpoint_last.pth'}"), 1,
               ["holds the outputs of a previous run", "results.json", "--overwrite"], watch=[out])


def _o30(w, tmp):
    out = tmp / "search"
    queries = _copy(w.gallery, tmp / "queries")
    manifest = json.loads((queries / "manifest.json").read_text())
    manifest["embed_dim"] = 32
    (queries / "manifest.json").write_text(json.dumps(manifest))
    return Run(_tool("search", w, out, "--gallery", str(w.gallery), "--query_embeddings", str(queries)), 1,
               ["the query embeddings", "embed_dim 32"], absent=[out])


def _o31(w, tmp):
    out = tmp / "search"
    stem = tmp / "sub" / "submission"
    stem.parent.mkdir()
    (stem.parent / "submission.csv").write_text("query_id,top1\n")
    return Run(_tool("search", w, out, "--gallery", str(w.gallery), "--queries", "a red square", "--submission",
                     str(stem), "--opts", f"pretrained={w.run / 'checkpoint_last.pth'}"), 1,
               ["--submission", "exist(s) already"], watch=[stem.parent], absent=[out])


def _o32(w, tmp):
    gallery = _copy(w.gallery, tmp / "gallery")
    text = (gallery / "manifest.json").read_text()
    (gallery / "manifest.json").write_text(text[:len(text) // 2])
    out = tmp / "search"
    return Run(_tool("search", w, out, "--gallery", str(gallery), "--queries", "a red square"), 1,
               ["manifest.json", "malformed JSON"], watch=[gallery], absent=[out])


def _o33(w, tmp):
    gallery = _copy(w.gallery, tmp / "gallery")
    next(gallery.glob("image_*.npy")).unlink()
    out = tmp / "search"
    return Run(_tool("search", w, out, "--gallery", str(gallery), "--queries", "a red square"), 1,
               ["shard file", "is missing"], watch=[gallery], absent=[out])


def _o34(w, tmp):
    out = tmp / "ens"
    ck = str(w.run / "checkpoint_last.pth")
    return Run(_tool("ensemble", w, out, "--checkpoints", ck, ck, "--weights", "1"), 1, ["--weights needs 2"],
               absent=[out])


def _o35(w, tmp):
    out = tmp / "ens"
    ck = str(w.run / "checkpoint_last.pth")
    return Run(_tool("ensemble", w, out, "--checkpoints", ck, ck, "--member_configs", str(w.cfg)), 1,
               ["--member_configs needs one config per checkpoint"], absent=[out])


def _o36(w, tmp):
    out = tmp / "ens"
    out.mkdir()
    (out / "ensemble.json").write_text("{}")
    ck = str(w.run / "checkpoint_last.pth")
    return Run(_tool("ensemble", w, out, "--checkpoints", ck), 1, ["ensemble.json", "--overwrite"], watch=[out])


def _o37(w, tmp):
    run = _prev_run(w, tmp)
    out = tmp / "sweep"
    return Run(_tool("sweep", w, out, "--checkpoints", str(run / "*")), 1, ["is not a checkpoint"],
               watch=[run], absent=[out])


def _o38(w, tmp):
    out = tmp / "sweep"
    out.mkdir()
    (out / "sweep.csv").write_text("checkpoint\n")
    return Run(_tool("sweep", w, out, "--checkpoints", str(w.run / "checkpoint_last.pth")), 1,
               ["sweep.csv", "--overwrite"], watch=[out])


def _o39(w, tmp):
    out = tmp / "sweep"
    lone = _copy(w.run / "checkpoint_last.pth", tmp / "lone" / "checkpoint_last.pth")
    return Run(_tool("sweep", w, out, "--checkpoints", str(lone), "--member_configs", "run"), 1,
               ["model config of", "not found"], absent=[out])


def _o43(w, tmp):
    src = w.data / "retrieval" / "annotation" / "synthetic_test.json"
    dest = _copy(src, tmp / "out" / "test_aug.json")
    return Run(["tools", "captions", "--input", str(src), "--output", str(dest), "--new_col", "caption_aug",
                "--template", "a photo of {caption}"], 1, ["--output", "exists already"], watch=[dest])


def _o44(w, tmp):
    ann = _copy(w.data / "retrieval" / "annotation", tmp / "ann")
    return Run(["tools", "filter", "--input", str(ann / "synthetic_test.json"), "--scores", str(w.scores),
                "--top_fraction", "0.5", "--out_dir", str(ann)], 1, ["--out_dir", "which is the input"], watch=[ann])


def _o45(w, tmp):
    out = tmp / "pairs"
    out.mkdir()
    (out / "pairs.json").write_text("[]")
    src = w.data / "retrieval" / "annotation" / "synthetic_train.json"
    return Run(["tools", "pairs", f"pairs:{src}", "--out", str(out)], 1, ["--out", "pairs.json", "exist(s) already"],
               watch=[out])


def _o48(w, tmp):
    bad = _bad_hf(w, tmp, "text_config", "num_hidden_layers", 4)
    return Run(["tools", "convert", "--to", "blip", "--input", str(bad), "--output", str(tmp / "back.pth")], 1,
               ["text_config.num_hidden_layers is 4", "does not describe these weights"], absent=[tmp / "back.pth"])


def _o49(w, tmp):
    (tmp / "outdir").mkdir()
    return Run(["tools", "convert", "--to", "blip", "--input", str(w.hf), "--output", str(tmp / "outdir")], 1,
               ["is a folder"], watch=[tmp / "outdir"])


def _o50(w, tmp):
    bad = _bad_hf(w, tmp, "text_config", "hidden_size", -64)
    out = tmp / "eval"
    return Run(["train_retrieval.py", "--config", str(w.fixture_cfg), "--output_dir", str(out), "--evaluate",
                "--no_progress", "--opts", f"pretrained={bad}"], 1,
               ["text_config.hidden_size is -64", "positive integer"], absent=[out])


CASES = [
    Case("R2", "tools ensemble, a member of another width", _r2),
    Case("R9", "tools search, gallery of another embedding size", _r9),
    Case("R10", "`pretrained` HF folder with a wrongly typed config.json field", _r10),
    Case("R11", "tools convert --to blip of that folder", _r11),
    Case("R12", "tools convert --to blip --output over an existing file", _r12),
    Case("R13", "tools convert --to hf --output_dir non-empty", _r13),
    Case("R15", "tools sweep, a bad second checkpoint", _r15),
    Case("O27", "tools embed into a gallery of another model config", _o27),
    Case("O28", "tools search over a previous results.json", _o28),
    Case("O29", "tools search --k 0",
         refused(lambda w, out: _tool("search", w, out, "--gallery", str(w.gallery), "--queries",
                                 "a red square", "--k", "0"),
                 1, ["--k 0"], "search")),
    Case("O30", "tools search, query embeddings of another size", _o30),
    Case("O31", "tools search --submission over existing files", _o31),
    Case("O32", "tools search, truncated gallery manifest.json", _o32),
    Case("O33", "tools search, a gallery shard missing", _o33),
    Case("O34", "tools ensemble --weights count mismatch", _o34),
    Case("O35", "tools ensemble --member_configs count mismatch", _o35),
    Case("O36", "tools ensemble over a previous ensemble.json", _o36),
    Case("O37", "tools sweep glob matching non-checkpoints", _o37),
    Case("O38", "tools sweep over a previous sweep.csv", _o38),
    Case("O39", "tools sweep --member_configs run without config.yaml", _o39),
    Case("O40", "tools caption min_length > max_length",
         refused(lambda w, out: _caption_tool(w, out, "--opts", "min_length=30"),
                 2, ["min_length", "above max_length 20"], "capt")),
    Case("O41", "tools caption --num_captions > num_beams",
         refused(lambda w, out: _caption_tool(w, out, "--num_captions", "5"),
                 1, ["--num_captions 5", "num_beams"], "capt")),
    Case("O42", "tools caption with a retrieval checkpoint",
         refused(lambda w, out: _caption_tool(w, out, "--opts", f"pretrained={OFFICIAL / 'checkpoint.pth'}"),
                 1, ["lacks", "text_decoder"], "capt")),
    Case("O43", "tools captions --output over an existing file", _o43),
    Case("O44", "tools filter --out_dir = the input's folder", _o44),
    Case("O45", "tools pairs --out over a previous pairs.json", _o45),
    Case("O46", "tools score with a checkpoint of another width",
         refused(lambda w, out: _tool("score", w, out, "--input", str(w.test_file()), "--opts",
                                 f"pretrained={w.wide}"),
                 1, ["pretrained", "does not fit", "vit (width"], "score")),
    Case("O47", "tools convert --to hf, checkpoint of another width",
         refused(lambda w, out: ["tools", "convert", "--to", "hf", "--config", str(w.cfg), "--output_dir",
                                 str(out), "--opts", f"pretrained={w.wide}"],
                 1, ["does not fit", "vit (width"], "hf")),
    Case("O48", "HF config.json that does not describe its weights", _o48),
    Case("O49", "tools convert --to blip --output a folder", _o49),
    Case("O50", "HF config.json with a negative dimension", _o50),
]
