"""The bad-input campaign (issue 25): bad and odd inputs a real user gives every entry script and
tool, each run through the entry point as the user runs it, with what must come of it: the exit
status, the parts of the first message line, and what must not change (every file of the watched
folders byte for byte, and the folders a refused run must not create).

``tests/test_bad_inputs.py`` runs every case in-process. This file also prints the campaign's
table for any checkout of the project (the inputs are made with this checkout's code)::

    python -m tests.scripts.bad_inputs --tree /path/to/a/checkout [--out table.md] [--cases R1 O3]

Each case is ``Case(id, title, make)``: ``make(world, tmp)`` writes what the case needs under
``tmp`` and returns a :class:`Run`. ``R*`` are the inputs the issue reported, ``O*`` our own
(``V*``: train_vqa.py, ``N*``: train_nlvr.py).
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

from tests.scripts.tiny import TINY_MED, tiny_values, write_yaml

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
OFFICIAL = FIXTURES / "blip_official_tiny"
CAPTION = FIXTURES / "blip_caption_tiny"
DLIP = FIXTURES / "dlip_tiny"
VQA = FIXTURES / "blip_vqa_tiny"
NLVR = FIXTURES / "blip_nlvr_tiny"


# ----------------------------------------------------------------------------- runs

@dataclass
class Run:
    argv: List[str]                 # [script.py | "tools", args...]
    code: int                       # expected exit status
    message: List[str]              # parts of the first line of stderr (code != 0) or of the output
    watch: List[Path] = field(default_factory=list)    # folders/files whose every byte must stay
    absent: List[Path] = field(default_factory=list)   # paths that must not exist afterwards
    shows: List[Path] = field(default_factory=list)    # outputs the table reports (+name/) when created
    env: Dict[str, str] = field(default_factory=dict)


@dataclass
class Case:
    id: str
    title: str
    make: Callable[["World", Path], Run]


def snapshot(paths) -> dict:
    """Every file under ``paths`` with its bytes and modification time: equal means nothing was written."""
    out = {}
    for root in paths:
        root = Path(root)
        if not root.exists():
            continue
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = (p.read_bytes(), p.stat().st_mtime_ns)
    return out


def changes(before: dict, after: dict) -> List[str]:
    """What a run wrote: ``+new``, ``~changed``, ``-removed`` file names (relative to their parents)."""
    out = [f"+{Path(p).name}" for p in after if p not in before]
    out += [f"~{Path(p).name}" for p in after if p in before and after[p] != before[p]]
    out += [f"-{Path(p).name}" for p in before if p not in after]
    return out


def run_inprocess(monkeypatch, capsys, target: str, *argv) -> tuple:
    """Run ``target`` (an entry script, or ``tools``) as ``python target argv`` would, in this
    process: ``(exit status, stdout, stderr)``."""
    monkeypatch.setattr(sys, "argv", [target, *map(str, argv)])
    code = 0
    try:
        if target.endswith(".py"):
            runpy.run_path(str(REPO / target), run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (1 if exit_.code else 0)
        if isinstance(exit_.code, str):
            print(exit_.code, file=sys.stderr)
    out = capsys.readouterr()
    return code, out.out, out.err


def first_line(code: int, out: str, err: str) -> str:
    """The line a user reads: the error (the last line of a traceback); for a run that succeeded,
    its first warning, else its last line."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if code != 0 and lines:
        if any(ln.startswith("Traceback") for ln in lines):
            return lines[-1]
        errors = [ln for ln in lines if "error" in ln.lower()]
        return (errors or lines)[0]
    text = [ln for ln in (out + "\n" + err).splitlines() if ln.strip()]
    warned = [ln for ln in text if " WARNING " in ln]
    return (warned or text[-1:] or [""])[0]


# ----------------------------------------------------------------------------- the world

@dataclass
class World:
    root: Path
    data: Path
    med: Path
    cfg: Path                 # tiny retrieval training config (vit 32 wide, embed_dim 16)
    run: Path                 # a finished 1-epoch run of cfg
    wide: Path                # a retrieval checkpoint of vit width 48 (other dims)
    deep: Path                # a retrieval checkpoint of vit depth 2 (more blocks)
    gallery: Path             # `tools embed --what image` of the test split with cfg (embed_dim 16)
    hf: Path                  # the official fixture as an HF folder
    fixture_cfg: Path         # retrieval config of the official fixture (evaluate)
    caption_cfg: Path         # caption config of the caption fixture (evaluate, no metrics)
    caption_train: Path       # tiny caption training config on the synthetic data
    ic_cfg: Path              # ImageCoDe config (zero-shot, stage 1)
    ic_blip: Path             # a plain BLIP for ic_cfg
    mmvp_cfg: Path
    shards: Path              # webdataset shards: a small source, half of it unreadable
    stream_cfg: Path          # pretrain_blip.py config streaming `shards`
    scores: Path              # `tools score` of the test split (scores.jsonl)
    contextblip: Path         # a ContextBLIP pretraining checkpoint (adapter + TMIM decoder) over ic_blip

    def test_file(self) -> Path:
        return self.data / "retrieval" / "annotation" / "synthetic_test.json"


SETUP_TREE: Optional[Path] = None  # set-up commands run in this checkout (subprocesses) when set


def run_command(target: str, *argv) -> None:
    """A set-up step: ``python target argv`` (an entry script or ``tools``), which must succeed:
    in this process, or with :data:`SETUP_TREE` set, as a subprocess of that checkout (so that a
    table of an older checkout reads files its own code wrote)."""
    if SETUP_TREE is not None:
        code, out, err = run_subprocess(Run([target, *map(str, argv)], 0, []), SETUP_TREE)
        if code != 0:
            raise RuntimeError(f"set-up step {target} failed in {SETUP_TREE}:\n{err[-3000:]}")
        return
    saved = sys.argv
    sys.argv = [target, *map(str, argv)]
    try:
        if target.endswith(".py"):
            runpy.run_path(str(REPO / target), run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise RuntimeError(f"set-up step {target} {' '.join(map(str, argv))} failed: {exit_.code}") from None
    finally:
        sys.argv = saved


def random_checkpoint(config: Path, path: Path, seed: int = 1, **arch) -> Path:
    """A BLIP retrieval checkpoint of random weights (seeded) for a retrieval config file with
    ``arch`` keys changed: a stand-in for a user's checkpoint of that architecture."""
    import torch
    from models.factory import build_model
    from models.tokenizer import build_tokenizer
    from tasks.retrieval import RetrievalConfig
    from utils.config import load_config
    cfg = load_config(config, RetrievalConfig, [f"{k}={json.dumps(v)}" for k, v in arch.items()] + ["pretrained="])[0]
    torch.manual_seed(seed)
    model = build_model(cfg, "blip", build_tokenizer(cfg.tokenizer))
    torch.save({"model": model.state_dict(), "format": "blip"}, path)
    return path


def build_world(root: Path) -> World:
    """Everything the cases read: made once, never changed by a case (cases copy what they alter)."""
    from data.synthetic import generate
    root.mkdir(parents=True, exist_ok=True)
    data = root / "data"
    ic = generate(data, seed=0, parts="retrieval,imagecode,mmvp", n_train=48, n_val=8, n_test=8, image_size=32,
                  n_train_sets=4, n_valid_sets=3, n_test_sets=2, pairs_per_pattern=1)
    med = root / "med_tiny.json"
    med.write_text(TINY_MED)
    # The run keeps epoch copies and writes TensorBoard events: a refused run must leave those too.
    values = tiny_values(data, med, max_epoch=1, report_to="tensorboard", save_every=1)
    cfg = write_yaml(root / "train.yaml", values)

    run = root / "run"
    run_command("train_retrieval.py", "--config", cfg, "--output_dir", run, "--no_progress")
    wide = random_checkpoint(cfg, root / "wide.pth", vit={"width": 48, "depth": 1, "heads": 2, "patch_size": 16})
    deep = random_checkpoint(cfg, root / "deep.pth", vit={"width": 32, "depth": 2, "heads": 2, "patch_size": 16})

    gallery = root / "gallery"
    run_command("tools", "embed", "--config", cfg, "--output_dir", gallery, "--input",
                data / "retrieval" / "annotation" / "synthetic_test.json", "--what", "image", "--opts",
                f"pretrained={run / 'checkpoint_last.pth'}")

    fixture_cfg = write_yaml(root / "fixture.yaml", {
        "dataset": "custom", "image_root": str(OFFICIAL), "ann_root": str(OFFICIAL), "test_file": "test.json",
        "pretrained": str(OFFICIAL / "checkpoint.pth"), "vit": "{width: 64, depth: 2, heads: 4, patch_size: 16}",
        "image_size": 64, "med_config": str(OFFICIAL / "med_config.json"), "tokenizer": str(OFFICIAL / "tokenizer"),
        "embed_dim": 32, "queue_size": 64, "k_test": 3, "batch_size_test": 4, "num_workers": 0, "device": "cpu"})
    hf = root / "hf"
    run_command("tools", "convert", "--to", "hf", "--config", fixture_cfg, "--output_dir", hf)

    caption_cfg = write_yaml(root / "caption.yaml", {
        "dataset": "custom", "image_root": str(CAPTION), "ann_root": str(CAPTION), "test_file": "test.json",
        "pretrained": str(CAPTION / "checkpoint.pth"), "vit": "{width: 64, depth: 2, heads: 4, patch_size: 16}",
        "image_size": 64, "med_config": str(CAPTION / "med_config.json"), "tokenizer": str(CAPTION / "tokenizer"),
        "num_beams": 3, "max_length": 20, "min_length": 5, "batch_size_test": 4, "num_workers": 0,
        "device": "cpu", "eval_metrics": "false"})
    caption_train = write_yaml(root / "caption_train.yaml", {
        **tiny_values(data, med, queue_size=None, k_test=None, embed_dim=None, val_file=None, max_epoch=1),
        "eval_metrics": "false", "max_length": 12, "min_length": 2})

    ic_values = {"image_root": ic["imagecode"]["image_root"], "ann_root": ic["imagecode"]["ann_root"],
                 "tokenizer": ic["tokenizer"], "med_config": str(med), "pretrained": "''",
                 "vit": "{width: 32, depth: 2, heads: 2, patch_size: 16}", "image_size": 32, "embed_dim": 16,
                 "max_tokens": 32, "context_heads": 2, "batch_size_train": 4, "batch_size_test": 3,
                 "max_epoch": 1, "num_workers": 0, "device": "cpu", "seed": 5, "log_every": 1000,
                 "train_resize_only": True}
    ic_cfg = write_yaml(root / "ic.yaml", ic_values)
    ic_blip = random_checkpoint(cfg, root / "ic_blip.pth",
                                    vit={"width": 32, "depth": 2, "heads": 2, "patch_size": 16})
    mmvp_cfg = write_yaml(root / "mmvp.yaml", {
        "data_root": ic["mmvp"]["data_root"], "tokenizer": ic["tokenizer"], "med_config": str(med),
        "pretrained": str(ic_blip), "vit": "{width: 32, depth: 2, heads: 2, patch_size: 16}", "image_size": 32,
        "embed_dim": 16, "batch_size": 4, "device": "cpu", "pairs_per_pattern": 1})

    shards = root / "shards"
    write_small_shards(shards)
    stream_cfg = write_yaml(root / "stream.yaml", {
        "train_file": f"['{shards}/{{00000..00001}}.tar']", "image_root": "''", "tokenizer": str(data / "tokenizer"),
        "med_config": str(med), "pretrained": "''", "vit": "{width: 32, depth: 1, heads: 2, patch_size: 16}",
        "image_size": 32, "embed_dim": 16, "queue_size": 8, "batch_size_train": 4, "max_epoch": 1,
        "num_workers": 0, "device": "cpu", "seed": 0, "log_every": 1000, "train_resize_only": True,
        "max_bad_fraction": 0.2})
    scores = root / "scores"
    run_command("tools", "score", "--config", cfg, "--output_dir", scores, "--input",
                data / "retrieval" / "annotation" / "synthetic_test.json", "--opts",
                f"pretrained={run / 'checkpoint_last.pth'}")
    contextblip = contextblip_checkpoint(root, data, med, ic_blip)
    return World(root, data, med, cfg, run, wide, deep, gallery, hf, fixture_cfg, caption_cfg, caption_train,
                 ic_cfg, ic_blip, mmvp_cfg, shards, stream_cfg, scores / "scores.jsonl", contextblip)


def contextblip_checkpoint(root: Path, data: Path, med: Path, blip: Path) -> Path:
    """What pretrain.py writes (adapter + TMIM decoder, the config naming its base BLIP), of
    random weights: the input of ``pretrain.py --export``."""
    import torch
    from models.factory import create_model
    from tasks.contextblip_pretrain import PretrainConfig
    from utils.config import config_to_dict, load_config
    cfg_path = write_yaml(root / "contextblip.yaml", {
        "train_file": f"[{data / 'retrieval' / 'annotation' / 'synthetic_train.json'}]",
        "image_root": str(data / "retrieval" / "images"), "tokenizer": str(data / "tokenizer"),
        "med_config": str(med), "pretrained": str(blip), "vit": "{width: 32, depth: 2, heads: 2, patch_size: 16}",
        "image_size": 32, "embed_dim": 16, "adapter_taps": "[1, 2]", "decoder_depth": 1, "decoder_heads": 2,
        "max_epoch": 1, "device": "cpu", "strict_load": "false"})  # a value older checkouts read too
    cfg = load_config(cfg_path, PretrainConfig)[0]
    torch.manual_seed(2)
    model, _ = create_model(cfg, "contextblip_pretrain")
    path = root / "contextblip_pretrain.pth"
    torch.save({"model": model.checkpoint_state_dict(), "format": model.checkpoint_format,
                "config": config_to_dict(cfg), "epoch": 1}, path)
    return path


def write_small_shards(folder: Path, per_shard: int = 6, bad_shard: int = 1) -> None:
    """Two webdataset shards of one source: shard 0 fine, shard ``bad_shard`` truncated mid-way
    (the first records readable, then a damaged tar): half the source is unreadable."""
    import io
    import numpy as np
    import webdataset as wds
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in range(2):
        tar = folder / f"{s:05d}.tar"
        with wds.TarWriter(str(tar)) as writer:
            for i in range(per_shard):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
                writer.write({"__key__": f"{s:05d}{i:04d}", "jpg": buf.getvalue(), "txt": f"a red square {s} {i}"})
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
        if s == bad_shard:
            data = tar.read_bytes()
            tar.write_bytes(data[:1536] + b"\x00garbage" * 64)  # one record, then a broken header


# ----------------------------------------------------------------------------- helpers for cases

def _copy(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    return dst


def _train(w: World, out: Path, *extra) -> List[str]:
    return ["train_retrieval.py", "--config", str(w.cfg), "--output_dir", str(out), "--no_progress", *extra]


def _tool(name: str, w: World, out: Path, *extra, cfg: Optional[Path] = None) -> List[str]:
    return ["tools", name, "--config", str(cfg or w.cfg), "--output_dir", str(out), *extra]


def _bad_hf(w: World, tmp: Path, section: str, key: str, value) -> Path:
    folder = _copy(w.hf, tmp / "hf_bad")
    config = json.loads((folder / "config.json").read_text())
    if section:
        config[section][key] = value
    else:
        config[key] = value
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def _prev_run(w: World, tmp: Path) -> Path:
    return _copy(w.run, tmp / "run")


# ----------------------------------------------------------------------------- the cases

def refused(cmd: Callable[["World", Path], List[str]], code: int, message: List[str], out: str = "out"):
    """A case whose command (``cmd(world, its output path)`` -> argv) must fail with ``code`` and
    ``message`` and create nothing at that output path."""
    def make(w: "World", tmp: Path) -> Run:
        return Run(cmd(w, tmp / out), code, message, absent=[tmp / out])
    return make


def _r1(w, tmp):
    out = tmp / "eval"
    return Run(_train(w, out, "--evaluate", "--opts", f"pretrained={w.wide}"), 1,
               ["pretrained", str(w.wide), "does not fit the BLIP retrieval model", "other shapes",
                "vit (width"], absent=[out])


def _r2(w, tmp):
    out = tmp / "ens"
    good = w.run / "checkpoint_last.pth"
    return Run(_tool("ensemble", w, out, "--checkpoints", str(good), str(w.wide)), 1,
               ["member 2 of --checkpoints", str(w.wide), "does not fit", "vit (width"], absent=[out])


def _r3(w, tmp):
    run = _prev_run(w, tmp)
    return Run(_train(w, run, "--resume", "auto", "--opts", "max_epoch=2",
                      "vit={width: 48, depth: 1, heads: 2, patch_size: 16}"), 1,
               ["--resume", "does not fit this run's model", "other shapes", "vit.width 32 -> 48"], watch=[run])


def _r4(w, tmp):
    run = _prev_run(w, tmp)
    out = tmp / "eval"
    return Run(["train_retrieval.py", "--config", str(run / "config.yaml"), "--output_dir", str(out), "--evaluate",
                "--no_progress", "--opts", f"pretrained={run / 'checkpoint_last.pth'}",
                "vit={width: 48, depth: 1, heads: 2, patch_size: 16}"], 1,
               ["pretrained", "does not fit the BLIP retrieval model", "vit (width"], watch=[run], absent=[out])


def _r5(w, tmp):
    import torch
    from utils.checkpoint import save_safetensors_checkpoint
    run = _prev_run(w, tmp)
    ckpt = torch.load(run / "checkpoint_last.pth", weights_only=True)
    weights = save_safetensors_checkpoint(ckpt, tmp / "weights" / "checkpoint_last.safetensors")
    for state in weights.parent.glob("*.state.pth"):
        state.unlink()
    return Run(_train(w, run, "--resume", str(weights), "--opts", "max_epoch=2"), 1,
               ["holds weights only", "state file", "not resumed"], watch=[run, weights.parent])


def _dlip_opts(**extra) -> List[str]:
    F = DLIP
    opts = {"pretrained": F / "student.pth", "teacher": F / "teacher.pth", "train_file": f"[{F / 'batch.json'}]",
            "image_root": F, "image_size": 224, "batch_size_train": 8,
            "vit": "{width: 64, depth: 2, heads: 4, patch_size: 16}", "med_config": F / "med_config_student.json",
            "teacher_vit": "{width: 96, depth: 2, heads: 4, patch_size: 16}",
            "teacher_med_config": F / "med_config_teacher.json", "tokenizer": F / "tokenizer", "embed_dim": 32,
            "queue_size": 16, "num_workers": 0, "max_epoch": 1, "device": "cpu"}
    opts.update(extra)
    return [f"{k}={v}" for k, v in opts.items()]


def _dlip(out: Path, **extra) -> List[str]:
    return ["pretrain_blip.py", "--config", str(REPO / "configs" / "dlip_pretrain.yaml"), "--output_dir", str(out),
            "--no_progress", "--opts", *_dlip_opts(**extra)]


def _caption_train(w: World, out: Path, *opts) -> List[str]:
    return ["train_caption.py", "--config", str(w.caption_train), "--output_dir", str(out), "--no_progress",
            "--opts", *opts]


def _vqa(out: Path, *opts, evaluate: bool = True) -> List[str]:
    """train_vqa.py with BLIP's configs/vqa.yaml over the VQA fixture, as the fixture test runs it."""
    return ["train_vqa.py", "--config", str(REPO / "configs" / "vqa.yaml"), "--output_dir", str(out),
            "--no_progress", *(["--evaluate"] if evaluate else []), "--opts", f"ann_root={VQA}", f"vqa_root={VQA}",
            f"pretrained={VQA / 'checkpoint.pth'}", "vit={width: 64, depth: 2, heads: 4, patch_size: 16}",
            "image_size=64", f"med_config={VQA / 'med_config.json'}", f"tokenizer={VQA / 'tokenizer'}",
            "num_workers=0", "device=cpu", "k_test=4", *opts]


def _vqa_files(tmp: Path, train=None, answer_list=None) -> Path:
    """A copy of the fixture's annotation files (images stay in the fixture), some replaced."""
    ann = tmp / "ann"
    ann.mkdir(parents=True, exist_ok=True)
    for name in ("vqa_train.json", "vqa_test.json", "answer_list.json"):
        shutil.copy(VQA / name, ann / name)
    if train is not None:
        (ann / "vqa_train.json").write_text(json.dumps(train))
    if answer_list is not None:
        (ann / "answer_list.json").write_text(json.dumps(answer_list))
    return ann


def _v1(w, tmp):
    entries = json.loads((VQA / "vqa_train.json").read_text())[:4]
    del entries[3]["answer"]
    out = tmp / "vqa"
    return Run(_vqa(out, f"ann_root={_vqa_files(tmp, train=entries)}", "pretrained=/nonexistent.pth",
                    evaluate=False), 1, ["entry 3 of", "vqa_train.json", "missing field 'answer'"], absent=[out])


def _v2(w, tmp):
    out = tmp / "vqa"
    return Run(_vqa(out, f"ann_root={_vqa_files(tmp, answer_list=['yes', 'no', 'yes'])}"), 1,
               ["answer_list.json, entry 2", "'yes' is also entry 0", "distinct"], absent=[out])


def _v3(w, tmp):
    import torch
    state = {k: v for k, v in torch.load(VQA / "checkpoint.pth", weights_only=True)["model"].items()
             if not k.startswith("text_decoder.")}
    path = tmp / "no_decoder.pth"
    torch.save({"model": state}, path)
    out = tmp / "vqa"
    return Run(_vqa(out, f"pretrained={path}"), 1,
               ["pretrained", "does not fit the VQA model", "evaluation needs every weight", "text_decoder"],
               absent=[out])


def _nlvr(out: Path, ann: Path, *opts, evaluate: bool = True, flags=()) -> List[str]:
    """train_nlvr.py with BLIP's configs/nlvr.yaml over the NLVR fixture (its images and checkpoint)."""
    return ["train_nlvr.py", "--config", str(REPO / "configs" / "nlvr.yaml"), "--output_dir", str(out),
            "--no_progress", *(["--evaluate"] if evaluate else []), *flags, "--opts", f"image_root={NLVR}",
            f"ann_root={ann}", f"pretrained={NLVR / 'checkpoint.pth'}",
            "vit={width: 48, depth: 2, heads: 4, patch_size: 16}", "image_size=48",
            f"med_config={NLVR / 'med_config.json'}", f"tokenizer={NLVR / 'tokenizer'}", "num_workers=0",
            "device=cpu", *opts]


def _nlvr_files(tmp: Path, split: Optional[str] = None, index: int = 0, change=None) -> Path:
    """BLIP's three NLVR split files (16 training and 8 dev pairs of the fixture's training pairs, its
    8 test pairs; images stay in the fixture), entry ``index`` of ``split`` changed by ``change``."""
    pairs = json.loads((NLVR / "nlvr_train.json").read_text())
    files = {"train": pairs[:16], "dev": pairs[16:24], "test": json.loads((NLVR / "nlvr_test.json").read_text())}
    if split is not None:
        change(files[split][index])
    ann = tmp / "ann"
    ann.mkdir(parents=True, exist_ok=True)
    for name, entries in files.items():
        (ann / f"nlvr_{name}.json").write_text(json.dumps(entries))
    return ann


def _n1(w, tmp):
    run = _prev_run(w, tmp)
    ann = _nlvr_files(tmp, "train", 3, lambda e: e["images"].__setitem__(1, "images/missing.png"))
    return Run(_nlvr(run, ann, "pretrained=/nonexistent.pth", evaluate=False, flags=["--overwrite"]), 1,
               ["entry 3 of", "nlvr_train.json", "field 'images[1]'", "image file missing"], watch=[run])


def _n2(w, tmp):
    out = tmp / "nlvr"
    ann = _nlvr_files(tmp, "dev", 2, lambda e: e.__setitem__("label", "yes"))
    return Run(_nlvr(out, ann), 1, ["entry 2 of", "nlvr_dev.json", "field 'label'", "got 'yes'"], absent=[out])


def _n3(w, tmp):
    out = tmp / "nlvr"
    ann = _nlvr_files(tmp, "test", 7, lambda e: e["images"].pop())
    return Run(_nlvr(out, ann), 1, ["entry 7 of", "nlvr_test.json", "field 'images'", "exactly 2 image paths", "got 1"],
               absent=[out])


def _n4(w, tmp):
    out = tmp / "nlvr"
    ann = _nlvr_files(tmp, "train", 0, lambda e: e.__setitem__("label", "true"))
    return Run(_nlvr(out, ann, "pretrained=/nonexistent.pth", evaluate=False), 1,
               ["entry 0 of", "nlvr_train.json", "field 'label'", "got 'true'"], absent=[out])


def _n5(w, tmp):
    out = tmp / "nlvr"
    return Run(_nlvr(out, _nlvr_files(tmp), "test_file=nlvr_test_p"), 1, ["json file not found", "nlvr_test_p.json"],
               absent=[out])


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


def _r16(w, tmp):
    out = tmp / "stream"
    return Run(["pretrain_blip.py", "--config", str(w.stream_cfg), "--output_dir", str(out), "--no_progress"], 1,
               ["train_file entry", "were bad", "max_bad_fraction 0.2"], shows=[out])


def _r18(w, tmp):
    ann = _copy(w.data / "retrieval" / "annotation", tmp / "ann")
    text = (ann / "synthetic_train.json").read_text()
    (ann / "synthetic_train.json").write_text(text[:text.index('"caption"') + 14])
    out = tmp / "run"
    return Run(_train(w, out, "--opts", f"ann_root={ann}"), 1,
               ["synthetic_train.json", "malformed JSON: unterminated string starting at line"], absent=[out])


def _o5(w, tmp):
    run = _prev_run(w, tmp)
    return Run(_train(w, run, "--overwrite", "--opts", f"pretrained={w.wide}"), 1, ["does not fit"], watch=[run])


def _o6(w, tmp):
    run = _prev_run(w, tmp)
    return Run(_train(w, run, "--resume", "auto", "--opts", "max_epoch=2", "queue_size=48"), 1,
               ["does not fit this run's model", "queue_size 64 -> 48"], watch=[run])


def _o7(w, tmp):
    run = _prev_run(w, tmp)
    data = (run / "checkpoint_last.pth").read_bytes()
    (run / "checkpoint_last.pth").write_bytes(data[:len(data) // 2])
    return Run(_train(w, run, "--resume", "auto", "--opts", "max_epoch=2"), 1, ["truncated or damaged"], watch=[run])


def _o8(w, tmp):
    run = _prev_run(w, tmp)
    return Run(_train(w, run, "--resume", str(tmp / "nope.pth"), "--opts", "max_epoch=2"), 1,
               ["no checkpoint file", "nope.pth"], watch=[run])


def _o9(w, tmp):
    run = _prev_run(w, tmp)
    images = _copy(w.data / "retrieval" / "images", tmp / "images")
    next(p for p in sorted((images / "train").rglob("*")) if p.is_file()).unlink()
    return Run(_train(w, run, "--dry_run", "--opts", f"image_root={images}"), 1,
               ["entry 0 of", "field 'image': image file missing"], watch=[run])


def _o13(w, tmp):
    out = tmp / "ft"
    return Run(_train(w, out, "--opts", f"med_config={tmp / 'no_med.json'}"), 1, ["med_config", "no_med.json"],
               absent=[out])


def _o14(w, tmp):
    bad = tmp / "med.json"
    bad.write_text('{"vocab_size": null, "hidden_size": 32, ')
    out = tmp / "ft"
    return Run(_train(w, out, "--opts", f"med_config={bad}"), 1, ["med_config", "malformed JSON", "line 1"],
               absent=[out])


def _o15(w, tmp):
    page = tmp / "model_base.pth"
    page.write_text("<!DOCTYPE html><html>Access denied</html>")
    run = _prev_run(w, tmp)
    return Run(_train(w, run, "--overwrite", "--opts", f"pretrained={page}"), 1, ["is not a checkpoint", "text file"],
               watch=[run])


def _o16(w, tmp):
    out = tmp / "eval"
    return Run(_train(w, out, "--evaluate", "--opts", f"pretrained={w.wide}", "strict_load=false"), 0,
               ["strict_load: false", "let through"])


def _o18(w, tmp):
    out = tmp / "cap"
    return Run(_caption_train(w, out, f"pretrained={w.run / 'checkpoint_last.pth'}", "--dry_run"), 0,
               ["new, initialised here", "text_decoder"])


def _o23(w, tmp):
    out = tmp / "dlip"
    return Run(_dlip(out, teacher=tmp / "teacher_missing.pth"), 1, ["checkpoint not found", "teacher_missing.pth"],
               absent=[out])


def _o25(w, tmp):
    out = tmp / "dlip"
    return Run(_dlip(out, train_file=f"['{tmp}/none/{{00000..00003}}.tar']"), 1,
               ["train_file entry", "4 of its 4 shards do not exist"],
               absent=[out])


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


def _caption_tool(w: World, out: Path, *extra) -> List[str]:
    return ["tools", "caption", "--config", str(w.caption_cfg), "--output_dir", str(out), "--images",
            str(CAPTION / "images"), *extra]


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


def _o51(w, tmp):
    target = tmp / "merged.pth"
    target.write_bytes(b"a previous export")
    return Run(["pretrain.py", "--config", str(REPO / "configs" / "demo" / "pretrain.yaml"), "--export",
                str(w.contextblip), "--export_to", str(target)], 1,
               ["--export_to", "exist(s) already"], watch=[target])


def _o56(w, tmp):
    folder = tmp / "not_a_checkpoint"
    folder.mkdir()
    out = tmp / "eval"
    return Run(_train(w, out, "--evaluate", "--opts", f"pretrained={folder}"), 1, ["is a directory"], absent=[out])


def _o57(w, tmp):
    run = _prev_run(w, tmp)
    return Run(_train(w, run, "--resume", "auto", "--opts", "max_epoch=2",
                      f"med_config={REPO / 'configs' / 'demo' / 'med_config_tiny.json'}"), 1,
               ["does not fit this run's model", "med_config"], watch=[run])


def _o58(w, tmp):
    run = _prev_run(w, tmp)
    return Run(_train(w, run, "--resume", "auto", "--opts", "max_epoch=2", "init_lr=0.002", "log_every=1"), 0,
               ["resuming", "with changed config keys", "init_lr 0.001 -> 0.002"])


def _o59(w, tmp):
    run = _prev_run(w, tmp)
    kept = [run / n for n in ("config.yaml", "checkpoint_last.pth", "checkpoint_best.pth", "log.txt")]
    return Run(_train(w, run, "--dry_run"), 0, ["dry run:", "dry_run.json"], watch=kept)


def _o60(w, tmp):
    run = _prev_run(w, tmp)
    kept = [run / n for n in ("config.yaml", "checkpoint_last.pth", "checkpoint_best.pth", "log.txt")]
    return Run(_train(w, run, "--evaluate", "--opts", f"pretrained={run / 'checkpoint_best.pth'}"), 0,
               ["config_evaluate.yaml"], watch=kept)


def _o61(w, tmp):
    out = tmp / "ft"
    return Run(_train(w, out, "--dry_run", "--opts", f"pretrained={w.run / 'checkpoint_last.pth'}", "queue_size=32"),
               0, ["queue_size 32", "queues hold 64", "start afresh"])


def _o62(w, tmp):
    out = tmp / "pre"
    cfg = write_yaml(tmp / "pre.yaml", tiny_values(
        w.data, w.med, dataset=None, ann_root=None, val_file=None, test_file=None, k_test=None, batch_size_test=None,
        train_file=f"[{w.data / 'retrieval' / 'annotation' / 'synthetic_train.json'}]",
        pretrained=w.run / "checkpoint_last.pth"))
    return Run(["pretrain_blip.py", "--config", str(cfg), "--output_dir", str(out), "--no_progress", "--dry_run"],
               0, ["new, initialised here", "text_decoder"])


CASES = [
    Case("R1", "train_retrieval.py --evaluate, `pretrained` of another width", _r1),
    Case("R2", "tools ensemble, a member of another width", _r2),
    Case("R3", "--resume auto with another architecture", _r3),
    Case("R4", "--evaluate with the run's config.yaml and another architecture", _r4),
    Case("R5", "--resume a .safetensors without its state file", _r5),
    Case("R6", "DLIP teacher whose dims disagree with teacher_vit",
         refused(lambda w, out: _dlip(out, teacher_vit="{width: 64, depth: 2, heads: 4, patch_size: 16}"),
                 1, ["teacher", "teacher.pth", "does not fit", "teacher_vit (width"], "dlip")),
    Case("R7", "caption min_length > max_length",
         refused(lambda w, out: _caption_train(w, out, "min_length=15", "max_length=10"),
                 2, ["min_length", "15 is above max_length 10"], "cap")),
    Case("R8", "caption prompt longer than max_length",
         refused(lambda w, out: _caption_train(w, out, "prompt='a picture of a red square with a blue circle'",
                                 "max_length=8", "min_length=1"),
                 1, ["prompt", "tokens", "max_length is 8", "no caption token could be generated"], "cap")),
    Case("R9", "tools search, gallery of another embedding size", _r9),
    Case("R10", "`pretrained` HF folder with a wrongly typed config.json field", _r10),
    Case("R11", "tools convert --to blip of that folder", _r11),
    Case("R12", "tools convert --to blip --output over an existing file", _r12),
    Case("R13", "tools convert --to hf --output_dir non-empty", _r13),
    Case("R14", "max_epoch: 0",
         refused(lambda w, out: _train(w, out, "--opts", "max_epoch=0"),
                 2, ["max_epoch", "0 trains nothing"], "run0")),
    Case("R15", "tools sweep, a bad second checkpoint", _r15),
    Case("R16", "streamed source half unreadable (small source)", _r16),
    Case("R18", "malformed JSON annotation (message ends cleanly)", _r18),
    Case("O1", "--evaluate with `pretrained: ''` (a random model)",
         refused(lambda w, out: _train(w, out, "--evaluate"),
                 1, ["`pretrained` is empty", "no checkpoint to evaluate"], "eval")),
    Case("O2", "--evaluate, checkpoint with more ViT blocks",
         refused(lambda w, out: _train(w, out, "--evaluate", "--opts", f"pretrained={w.deep}"),
                 1, ["have no place in the model", "visual_encoder.blocks.1", "vit (depth)"], "eval")),
    Case("O3", "fine-tune from a checkpoint of another width",
         refused(lambda w, out: _train(w, out, "--opts", f"pretrained={w.wide}"),
                 1, ["does not fit", "vit (width"], "ft")),
    Case("O4", "retrieval from a caption checkpoint",
         refused(lambda w, out: _train(w, out, "--opts", f"pretrained={CAPTION / 'checkpoint.pth'}"),
                 1, ["BLIP captioning checkpoint", "no text encoder"], "ft")),
    Case("O5", "--overwrite with a bad `pretrained` (previous run kept)", _o5),
    Case("O6", "--resume auto with another queue_size", _o6),
    Case("O7", "--resume auto of a truncated checkpoint_last.pth", _o7),
    Case("O8", "--resume of a missing file", _o8),
    Case("O9", "--dry_run in a run's folder, an image missing", _o9),
    Case("O10", "queue_size not a multiple of the batch",
         refused(lambda w, out: _train(w, out, "--opts", "queue_size=24"), 1, ["queue"], "ft")),
    Case("O11", "--eval_splits val without a val_file",
         refused(lambda w, out: _train(w, out, "--evaluate", "--eval_splits", "val", "--opts", "val_file=null",
                                 f"pretrained={w.run / 'checkpoint_last.pth'}"),
                 1, ["--eval_splits", "no val split"], "eval")),
    Case("O12", "image_size not a multiple of patch_size",
         refused(lambda w, out: _train(w, out, "--opts", "image_size=40"),
                 2, ["image_size", "multiple of patch_size 16"], "ft")),
    Case("O13", "med_config file missing", _o13),
    Case("O14", "med_config malformed JSON", _o14),
    Case("O15", "`pretrained` an HTML error page, with --overwrite", _o15),
    Case("O16", "strict_load: false over another width (escape hatch, warned)", _o16),
    Case("O17", "caption --evaluate of a retrieval checkpoint (no decoder)",
         refused(lambda w, out: ["train_caption.py", "--config", str(w.caption_cfg), "--output_dir", str(out),
                                 "--evaluate", "--no_progress", "--opts",
                                 f"pretrained={OFFICIAL / 'checkpoint.pth'}"],
                 1, ["lacks", "text_decoder", "evaluation needs every weight"], "cap")),
    Case("O18", "caption training from a retrieval checkpoint (fresh decoder listed)", _o18),
    Case("O19", "num_beams: 0",
         refused(lambda w, out: _caption_train(w, out, "num_beams=0"),
                 2, ["num_beams", "greater than or equal to 1"], "cap")),
    Case("O20", "sample with top_p 0",
         refused(lambda w, out: _caption_train(w, out, "sample=true", "top_p=0"),
                 2, ["top_p", "greater than 0"], "cap")),
    Case("O21", "prompt as long as max_tokens (training)",
         refused(lambda w, out: _caption_train(w, out, "prompt='a picture of a red square and'",
                                 "max_tokens=6", "max_length=20"),
                 1, ["prompt", "max_tokens is 6", "no caption token would be left"], "cap")),
    Case("O22", "DLIP teacher without a text encoder",
         refused(lambda w, out: _dlip(out, teacher=CAPTION / "checkpoint.pth"),
                 1, ["teacher", "needs a text encoder"], "dlip")),
    Case("O23", "DLIP teacher file missing", _o23),
    Case("O24", "DLIP teacher_med_config of another width",
         refused(lambda w, out: _dlip(out, teacher_med_config=DLIP / "med_config_student.json"),
                 1, ["teacher", "does not fit", "teacher_med_config"], "dlip")),
    Case("O25", "train_file shard pattern matching no file", _o25),
    Case("O26", "pretrain_blip.py max_epoch 0",
         refused(lambda w, out: _dlip(out, max_epoch=0), 2, ["max_epoch", "trains nothing"], "dlip")),
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
    Case("O51", "pretrain.py --export over an existing file", _o51),
    Case("O52", "zero_shot.py with a checkpoint of another width",
         refused(lambda w, out: ["zero_shot.py", "--config", str(w.ic_cfg), "--output_dir", str(out),
                                 "--no_progress", "--opts", f"pretrained={w.wide}"],
                 1, ["pretrained", "does not fit", "vit (width"], "zs")),
    Case("O53", "eval_mmvp.py with a checkpoint of another width",
         refused(lambda w, out: ["eval_mmvp.py", "--config", str(w.mmvp_cfg), "--output_dir", str(out),
                                 "--opts", f"pretrained={w.wide}"],
                 1, ["pretrained", "does not fit", "vit (width"], "mmvp")),
    Case("O54", "finetune_imagecode.py stage 1 from a checkpoint with fewer blocks",
         refused(lambda w, out: ["finetune_imagecode.py", "--config", str(w.ic_cfg), "--output_dir", str(out),
                                 "--no_progress", "--opts", f"pretrained={w.run / 'checkpoint_last.pth'}"],
                 1, ["pretrained", "does not fit", "lacks", "vit (depth)"], "ic")),
    Case("O55", "finetune_imagecode.py --evaluate without a checkpoint",
         refused(lambda w, out: ["finetune_imagecode.py", "--config", str(w.ic_cfg), "--output_dir", str(out),
                                 "--evaluate", "--no_progress"],
                 1, ["checkpoint not found", "checkpoint_best.pth"], "ic")),
    Case("O56", "`pretrained` a folder that is no HF folder", _o56),
    Case("O57", "--resume auto with another med_config", _o57),
    Case("O58", "--resume auto with a changed init_lr (odd but valid: logged)", _o58),
    Case("O59", "--dry_run in a finished run's folder (its config.yaml kept)", _o59),
    Case("O60", "--evaluate into the run's own folder (its config.yaml kept)", _o60),
    Case("O61", "fine-tune with another queue_size (odd but valid: queues start afresh)", _o61),
    Case("O62", "BLIP pretraining from a retrieval checkpoint (odd but valid: a fresh decoder, listed)", _o62),
    Case("V1", "train_vqa.py, a training question without answers", _v1),
    Case("V2", "train_vqa.py --evaluate, answer_list.json with a repeated answer", _v2),
    Case("V3", "train_vqa.py --evaluate with a checkpoint without answer decoder", _v3),
    Case("V4", "train_vqa.py --evaluate with a checkpoint of another width",
         refused(lambda w, out: _vqa(out, f"pretrained={OFFICIAL / 'checkpoint.pth'}"),
                 1, ["pretrained", "does not fit the VQA model", "other shapes", "med_config (vocab_size, hidden_size"], "vqa")),
    Case("V5", "train_vqa.py, answer_min_length above answer_max_length",
         refused(lambda w, out: _vqa(out, "inference=generate", "answer_min_length=12"),
                 2, ["answer_min_length", "12 is above answer_max_length 10"], "vqa")),
    Case("V6", "train_vqa.py, inference: beam",
         refused(lambda w, out: _vqa(out, "inference=beam"), 2, ["inference", "rank", "generate"], "vqa")),
    Case("V7", "train_vqa.py, a val_file without answers",
         refused(lambda w, out: _vqa(out, "val_file=vqa_test", "train_files=[vqa_train]", evaluate=False),
                 1, ["val_file vqa_test", "needs its annotators' answers"], "vqa")),
    Case("N1", "train_nlvr.py --overwrite of a previous run, a pair's second image missing", _n1),
    Case("N2", "train_nlvr.py --evaluate, a dev label 'yes'", _n2),
    Case("N3", "train_nlvr.py --evaluate, a test pair with one image", _n3),
    Case("N4", "train_nlvr.py, a train label 'true' (BLIP would read it as False)", _n4),
    Case("N5", "train_nlvr.py --evaluate, test_file naming no file", _n5),
    Case("N6", "train_nlvr.py --evaluate of a pretraining checkpoint (no merge layers, no head)",
         refused(lambda w, out: _nlvr(out, _nlvr_files(out.parent), f"pretrained={NLVR / 'pretrain_checkpoint.pth'}"),
                 1, ["pretrained", "evaluation needs every weight", "cls_head"], "nlvr")),
    Case("N7", "train_nlvr.py --evaluate of a VQA checkpoint",
         refused(lambda w, out: _nlvr(out, _nlvr_files(out.parent), f"pretrained={VQA / 'checkpoint.pth'}"),
                 1, ["pretrained", "'blip-vqa' checkpoint"], "nlvr")),
]


# ----------------------------------------------------------------------------- the table

def run_subprocess(run: Run, tree: Path, timeout: float = 600) -> tuple:
    script = run.argv[0]
    cmd = [sys.executable, str(tree / script), *run.argv[1:]] if script.endswith(".py") else \
        [sys.executable, "-m", script, *run.argv[1:]]
    env = {**os.environ, "PYTHONPATH": str(tree), "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", **run.env}
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "", "timed out"
    return proc.returncode, proc.stdout, proc.stderr


def _cell(text: str, limit: int = 150) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def table(world: World, tree: Path, ids=None) -> List[str]:
    rows = ["| case | input | exit | first message line | files written or changed |", "|---|---|---:|---|---|"]
    for case in CASES:
        if ids and case.id not in ids:
            continue
        tmp = world.root / "cases" / case.id
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        run = case.make(world, tmp)
        watched = run.watch + [world.root / n for n in ("run", "gallery", "hf")]
        before = snapshot(watched)
        t0 = time.time()
        code, out, err = run_subprocess(run, tree)
        written = changes(before, snapshot(watched))
        written += [f"+{p.name}/" for p in run.absent + run.shows if p.exists()]
        line = first_line(code, out, err)
        rows.append(f"| {case.id} | {_cell(case.title, 70)} | {code} | {_cell(line)} | "
                    f"{_cell(', '.join(sorted(set(written))) or 'nothing', 80)} |")
        print(f"{case.id} ({time.time() - t0:.0f}s): {code} {line[:120]}", file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", type=Path, default=REPO, help="the checkout whose entry points run the cases")
    p.add_argument("--work", type=Path, default=None, help="folder for the inputs (default: a temp folder)")
    p.add_argument("--out", type=Path, default=None, help="write the markdown table here too")
    p.add_argument("--cases", nargs="*", default=None, help="only these case ids")
    args = p.parse_args(argv)
    import tempfile
    global SETUP_TREE
    work = args.work or Path(tempfile.mkdtemp(prefix="bad_inputs_"))
    SETUP_TREE = args.tree.resolve() if args.tree.resolve() != REPO else None
    world = build_world(work / "world")
    rows = table(world, args.tree.resolve(), set(args.cases) if args.cases else None)
    text = "\n".join(rows) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
