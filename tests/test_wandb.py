"""``report_to: [tensorboard, wandb]``: Weights & Biases next to TensorBoard, offline (no network),
rank 0 only; the offline run file read back as ``wandb sync`` would replay it carries the same
per-epoch scalars as log.txt and the TensorBoard events, the per-step losses, and the config."""
from __future__ import annotations

import json

import pytest


def test_report_to_tensorboard_and_wandb_offline(tmp_path, synthetic_small, tiny_train_config, run_script):
    from tests.scripts.tensorboard_events import read_tensorboard
    from tests.scripts.wandb_records import read_run
    cfg = tiny_train_config(tmp_path, synthetic_small, max_epoch=1, log_every=4,
                            report_to="[tensorboard, wandb]", wandb_project="blip-test")
    out = tmp_path / "run"
    run_script("train_retrieval.py", ["--config", cfg, "--output_dir", out, "--no_progress"],
               env={"WANDB_SILENT": "true"})
    runs = sorted(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    record = read_run(runs[0])
    assert record["config"]["init_lr"] == pytest.approx(1e-3) and record["config"]["report_to"] == ["tensorboard",
                                                                                                     "wandb"]
    history = record["history"]
    epoch = [h for h in history if "epoch/train_loss_ita" in h]
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert len(epoch) == len(log) == 1
    for key in ("train_loss_ita", "train_loss_itm", "val_r_mean", "test_r_mean"):
        assert epoch[0][f"epoch/{key}"] == pytest.approx(log[0][key], rel=1e-6), key
    steps = {h["_step"] for h in history if "train/loss_itm" in h}
    assert {4, 8, 12, 16} <= steps
    scalars, _ = read_tensorboard(out / "tensorboard")  # TensorBoard still gets the same epoch scalars
    assert [v for _, v in scalars["epoch/train_loss_ita"]] == pytest.approx([log[0]["train_loss_ita"]], rel=1e-6)
