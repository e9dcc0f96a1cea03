"""pretrain.py through its entry points, as a user runs it: training with the mask pictures, exact
resume, the merged export, pictures on demand, torchrun, `run.sh sweep-mask` and --dry_run."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, synthetic_small):
    """A random tiny BLIP in the official layout (momentum encoders, queues) and a config over it."""
    from models.blip import build_blip_retrieval
    from models.tokenizer import build_tokenizer
    from utils.checkpoint import save_checkpoint_atomic
    from tasks.retrieval import RetrievalConfig
    from utils.config import load_config

    tmp = tmp_path_factory.mktemp("pretrain")
    med = tmp / "med.json"
    med.write_text('{"vocab_size": null, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,'
                   ' "intermediate_size": 64, "max_position_embeddings": 40, "encoder_width": 32}')
    vit = "{width: 32, depth: 2, heads: 2, patch_size: 8}"
    blip_cfg = load_config(None, RetrievalConfig, [f"vit={vit}", "image_size=32", f"med_config={med}",
                                                   "embed_dim=16", "queue_size=32"])[0]
    torch.manual_seed(0)
    blip = build_blip_retrieval(blip_cfg, build_tokenizer(str(synthetic_small / "tokenizer")), itc=blip_cfg)
    base = save_checkpoint_atomic({"model": blip.state_dict(), "epoch": 0}, tmp / "blip_base.pth")
    data = synthetic_small / "retrieval"
    cfg = {
        "train_file": f"[{data / 'annotation' / 'synthetic_train.json'}]", "image_root": str(data / "images"),
        "tokenizer": str(synthetic_small / "tokenizer"), "med_config": str(med), "pretrained": str(base),
        "vit": vit, "image_size": 32, "embed_dim": 16, "adapter_taps": "[1, 2]",
        "decoder_depth": 1, "decoder_heads": 2, "mask_rate": 0.25, "batch_size_train": 32, "init_lr": 1e-3,
        "warmup_steps": 4, "warmup_lr": 1e-5, "max_epoch": 2, "num_workers": 0, "device": "cpu", "seed": 5,
        "log_every": 1000, "train_resize_only": "true", "visualize_samples": 3, "max_tokens": 30,
    }
    path = tmp / "pretrain.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in cfg.items()))
    return tmp, path


@pytest.fixture(scope="module")
def pretrain_cli(run_script):
    """``pretrain_cli(cfg, out, *extra)``: ``python pretrain.py`` as a user runs it."""
    def run(cfg, out, *extra):
        return run_script("pretrain.py", ["--config", cfg, "--output_dir", out, "--no_progress", *extra],
                          env={"OMP_NUM_THREADS": "1"})
    return run


def _log(out: Path):
    return [json.loads(l) for l in (out / "log.txt").read_text().splitlines()]


@pytest.mark.slow
def test_pretrain_pictures_resume_export_and_visualize(setup, tmp_path, run_script, pretrain_cli):
    from models.contextblip import build_contextblip
    from models.factory import load_weights
    from models.tokenizer import build_tokenizer
    from tasks.contextblip_pretrain import PretrainConfig
    from tests.scripts.tensorboard_events import read_tensorboard
    from utils.checkpoint import load_checkpoint
    from utils.config import load_config

    _, cfg = setup
    straight, split = tmp_path / "straight", tmp_path / "split"
    pretrain_cli(cfg, straight)
    log = _log(straight)
    assert [r["epoch"] for r in log] == [0, 1]
    assert all(r["train_loss_itm"] > 0 and r["train_loss_tmim"] > 0 for r in log)
    for epoch in (0, 1):
        assert (straight / "masks" / f"epoch_{epoch:02d}.png").read_bytes().startswith(PNG)
    ckpt = torch.load(straight / "checkpoint_last.pth", weights_only=True)
    assert ckpt["model"] and all(k.startswith(("adapter.", "decoder.")) for k in ckpt["model"])
    assert ckpt["config"]["pretrained"] and ckpt["epoch"] == 2

    # Exact resume: one epoch, then --resume auto for the second, equals the straight run. The split
    # run saves safetensors (the adapter + decoder, with a state file) and reports to TensorBoard.
    opts = ["save_format=safetensors", "report_to=tensorboard"]
    pretrain_cli(cfg, split, "--opts", "max_epoch=1", *opts)
    pretrain_cli(cfg, split, "--resume", "auto", "--opts", *opts)
    assert [{k: v for k, v in r.items()} for r in _log(split)] == log
    resumed = load_checkpoint(split / "checkpoint_last.safetensors")
    assert resumed["format"] == "contextblip-trainable" and resumed["config"]["pretrained"] == ckpt["config"]["pretrained"]
    assert resumed["model"].keys() == ckpt["model"].keys()
    assert all(torch.equal(resumed["model"][k], v) for k, v in ckpt["model"].items())
    # The mask pictures as TensorBoard images, one per epoch (the second after the resume).
    scalars, images = read_tensorboard(split / "tensorboard")
    steps = [s for s, _ in scalars["epoch/train_loss_tmim"]]
    assert len(steps) == 2 and [s for s, _, _ in images["masks"]] == steps
    png = Image.open(split / "masks" / "epoch_01.png")
    assert images["masks"][1][1:] == png.size

    # The merged export holds every weight and rebuilds the same model with no base BLIP at hand.
    run_script("pretrain.py", ["--export", straight / "checkpoint_last.pth", "--export_to", tmp_path / "merged.pth"])
    merged = torch.load(tmp_path / "merged.pth", weights_only=True)
    assert any(k.startswith("blip.visual_encoder.") for k in merged["model"]) and merged["config"]
    c = load_config(None, PretrainConfig, defaults_from=merged["config"])[0]
    tok = build_tokenizer(c.tokenizer)
    a, b = build_contextblip(c, tok).eval(), build_contextblip(c, tok).eval()
    assert load_weights(a, tmp_path / "merged.pth", strict=True).format == "contextblip-merged"
    assert load_weights(b, straight / "checkpoint_last.pth").format == "contextblip-trainable"
    px = torch.randn(2, 3, 32, 32)
    ids, mask = torch.tensor([[101, 5, 6, 102], [101, 7, 102, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with torch.no_grad():
        assert torch.equal(a.itm_logits(ids, mask, a.image_embeds(px)), b.itm_logits(ids, mask, b.image_embeds(px)))

    pretrain_cli(cfg, straight, "--visualize")
    assert (straight / "masks" / "ondemand.png").read_bytes().startswith(PNG)


def test_dry_run_writes_itm_and_tmim_of_the_first_batch_deterministically_and_no_checkpoint(setup, tmp_path,
                                                                                           run_script):
    """``--dry_run`` (as a user runs it, then again in-process): ``dry_run.json`` holds the finite
    weighted ``loss_itm`` and ``loss_tmim`` of the first batch, the same both times (eval mode,
    file order; the guide tokens, mask noise and negatives from the seeded generator), although
    only the first run had augmentation on (a dry run uses the test transform); no checkpoint,
    log.txt or mask picture; ``--visualize`` / ``--export`` with it are refused."""
    import pretrain
    from utils.errors import UserError

    _, cfg = setup
    opts = ["--opts", "train_resize_only=false", "train_randaug=true", "train_hflip=true"]
    first_dir, again_dir = tmp_path / "dry", tmp_path / "again"
    run_script("pretrain.py", ["--config", cfg, "--output_dir", first_dir, "--no_progress", "--dry_run", *opts])
    first = json.loads((first_dir / "dry_run.json").read_text())
    assert set(first["losses"]) == {"loss_itm", "loss_tmim"} and first["batch_size"] == 32
    assert all(math.isfinite(v) and v > 0 and first[k] == v for k, v in first["losses"].items())
    assert first["mask_rate"] == 0.25 and first["trainable_parameters"] < first["parameters"]
    record = pretrain.main(["--config", str(cfg), "--output_dir", str(again_dir), "--no_progress", "--dry_run"])
    assert record["losses"] == first["losses"]
    for out in (first_dir, again_dir):
        assert not list(out.glob("checkpoint_*")) and not (out / "log.txt").exists() and not (out / "masks").exists()
    for flag in (["--visualize"], ["--export", str(tmp_path / "none.pth")]):
        with pytest.raises(UserError, match=f"--dry_run .* cannot be combined with {flag[0]}"):
            pretrain.main(["--config", str(cfg), "--output_dir", str(tmp_path / "x"), "--dry_run", *flag])


@pytest.mark.slow
@pytest.mark.dist
def test_pretrain_under_torchrun_two_processes(setup, tmp_path, run_torchrun):
    _, cfg = setup
    out = tmp_path / "dist"
    run_torchrun("pretrain.py", ["--config", cfg, "--output_dir", out, "--no_progress", "--opts", "max_epoch=1"])
    (record,) = _log(out)
    assert record["epoch"] == 0 and record["train_loss_tmim"] > 0
    assert torch.load(out / "checkpoint_last.pth", weights_only=True)["step"] == 96 * 3 // (32 * 2)


@pytest.mark.slow
def test_sweep_mask_runs_each_rate_reports_a_failed_run_and_writes_the_table(setup, tmp_path):
    _, cfg = setup
    sweep = tmp_path / "sweep"
    env = {**os.environ, "SWEEP_DIR": str(sweep), "NPROC": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    # 0.01 masks int(0.01 * 16) = 0 patches: that run fails at config validation; the others go on.
    proc = subprocess.run(["bash", "run.sh", "sweep-mask", "0.25 0.01", str(cfg), "--no_progress",
                           "--opts", "max_epoch=1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [r["run"] for r in rows] == ["text_0.25", "text_0.01", "random"]
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    for r in (rows[0], rows[2]):
        assert float(r["train_loss_itm"]) > 0 and float(r["train_loss_tmim"]) > 0 and r["epochs"] == "1"
    cfg_used = (sweep / "text_0.25" / "config.yaml").read_text()
    assert "mask_rate: 0.25" in cfg_used and "max_epoch: 1" in cfg_used
    assert "mask_strategy: random" in (sweep / "random" / "config.yaml").read_text()
    md = (sweep / "summary.md").read_text()
    assert md.count("\n| ") == 4 and "failed" in md and "FAILED: text_0.01" in proc.stdout


@pytest.mark.slow
def test_pretrain_streams_tar_shards_mixed_with_a_json_list(setup, pretrain_cli, tmp_path, write_shards, synthetic_small):
    """ContextBLIP pretraining on webdataset shards plus a json list (one train_file), the mask
    picture drawn from the stream's first records."""
    _, cfg = setup
    write_shards(tmp_path / "s", 2, 12)
    train = synthetic_small / "retrieval" / "annotation" / "synthetic_train.json"
    out = tmp_path / "out"
    pretrain_cli(cfg, out, "--opts", f"train_file=['{tmp_path / 's'}', '{train}']", "max_epoch=1",
                 "batch_size_train=8")
    record = json.loads((out / "log.txt").read_text())
    n_list = len(json.loads(train.read_text()))
    assert record["data_samples"] == (24 + n_list) // 8 * 8 and record["data_skipped"] == 0
    assert (out / "masks" / "epoch_00.png").is_file()
