"""The world the bad-input cases run in (``tests/scripts/bad_inputs.py``): the fixture folders, the
inputs every case reads (:class:`World`, made once by :func:`build_world`: a finished tiny run,
checkpoints of other architectures, a gallery, an HF folder, shards, configs...), and the command
helpers the case modules share (``_train``, ``_tool``, ``_dlip``, ``_caption_train``, ``_caption_tool``...).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from tests.scripts.campaign_runs import REPO, Run, run_subprocess
from tests.scripts.forked import run_main
from tests.scripts.tiny import TINY_MED, tiny_values, write_yaml

FIXTURES = REPO / "tests" / "fixtures"
OFFICIAL = FIXTURES / "blip_official_tiny"
CAPTION = FIXTURES / "blip_caption_tiny"
DLIP = FIXTURES / "dlip_tiny"
VQA = FIXTURES / "blip_vqa_tiny"
NLVR = FIXTURES / "blip_nlvr_tiny"


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
    code = run_main(target, argv)
    if code != 0:
        raise RuntimeError(f"set-up step {target} {' '.join(map(str, argv))} failed: exit status {code}")


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


def _caption_tool(w: World, out: Path, *extra) -> List[str]:
    return ["tools", "caption", "--config", str(w.caption_cfg), "--output_dir", str(out), "--images",
            str(CAPTION / "images"), *extra]
