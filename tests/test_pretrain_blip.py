"""pretrain_blip.py as a user runs it: 2 epochs from scratch on the synthetic pairs, exact resume
after SIGKILL, and its checkpoint evaluated by train_retrieval.py and train_caption.py (strict)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _config(make, tmp_path: Path, data: Path, **overrides) -> Path:
    train = data / "retrieval" / "annotation" / "synthetic_train.json"
    settings = dict(dataset=None, ann_root=None, val_file=None, test_file=None, k_test=None,
                    train_file=f"[{train}]", ckpt_every_steps=4, alpha=0.4, batch_size_test=None)
    settings.update(overrides)
    return make(tmp_path, data, **settings)


def _records(out: Path):
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


@pytest.mark.slow
def test_pretrain_blip_resumes_exactly_and_feeds_retrieval_and_captioning(tmp_path, synthetic_small, run_script,
                                                                        tiny_train_config, kill_at_step):
    cfg = _config(tiny_train_config, tmp_path, synthetic_small)
    straight = tmp_path / "straight"
    run_script("pretrain_blip.py", ["--config", cfg, "--output_dir", straight, "--no_progress"])
    records = _records(straight)
    assert len(records) == 2
    assert {"train_loss_ita", "train_loss_itm", "train_loss_lm"} <= set(records[0])
    assert records[1]["train_loss_lm"] < records[0]["train_loss_lm"]  # the decoder learns
    ckpt = torch.load(straight / "checkpoint_last.pth", weights_only=True)
    assert ckpt["format"] == "blip" and "queue_ptr" in ckpt["model"] and "idx_queue" not in ckpt["model"]

    killed = tmp_path / "killed"
    kill_at_step([sys.executable, REPO / "pretrain_blip.py", "--config", cfg, "--output_dir", killed,
                  "--no_progress"], killed / "checkpoint_last.pth", 8)  # inside epoch 0 (18 steps)
    run_script("pretrain_blip.py", ["--config", cfg, "--output_dir", killed, "--no_progress", "--resume", "auto"])
    assert [{k: v for k, v in r.items() if k.startswith("train_")} for r in _records(killed)] == \
        [{k: v for k, v in r.items() if k.startswith("train_")} for r in records]
    a = torch.load(killed / "checkpoint_last.pth", weights_only=True)["model"]
    assert a.keys() == ckpt["model"].keys() and all(torch.equal(a[k], ckpt["model"][k]) for k in a)

    # The checkpoint is a model_base.pth: retrieval and captioning evaluate it, loading strictly.
    data = synthetic_small
    common = [f"image_root={data / 'retrieval' / 'images'}", f"ann_root={data / 'retrieval' / 'annotation'}",
              "dataset=custom", "test_file=synthetic_test.json", f"tokenizer={data / 'tokenizer'}",
              f"med_config={tmp_path / 'med_tiny.json'}", "vit={width: 32, depth: 1, heads: 2, patch_size: 16}",
              "image_size=32", f"pretrained={straight / 'checkpoint_last.pth'}", "strict_load=true",
              "num_workers=0", "device=cpu"]
    run_script("train_retrieval.py", ["--config", REPO / "configs" / "retrieval_coco.yaml", "--evaluate",
                                      "--output_dir", tmp_path / "ret", "--opts", *common, "embed_dim=16",
                                      "k_test=4", "batch_size_test=16"])
    assert "test_r_mean" in json.loads((tmp_path / "ret" / "evaluate.txt").read_text())
    run_script("train_caption.py", ["--config", REPO / "configs" / "caption_coco.yaml", "--evaluate",
                                    "--output_dir", tmp_path / "cap", "--opts", *common, "eval_metrics=false",
                                    "batch_size=16", "max_length=10", "min_length=3"])
    captions = json.loads((tmp_path / "cap" / "captions_test.json").read_text())
    assert len(captions) == 16 and all(isinstance(c["caption"], str) for c in captions)
