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


@pytest.mark.slow
def test_laion_path_adds_one_file_per_epoch_in_turn_and_resumes_exactly(tmp_path, synthetic_small, run_script,
                                                                         tiny_train_config, kill_at_step):
    """BLIP's laion_path: epoch e trains on train_file + the folder's file e mod n (sorted by name);
    a run killed in epoch 1 resumes on epoch 1's file with the straight run's losses."""
    pairs = json.loads((synthetic_small / "retrieval" / "annotation" / "synthetic_train.json").read_text())
    root = synthetic_small / "retrieval" / "images"
    for entry in pairs:
        entry["image"] = str(root / entry["image"])
    base, a, b = pairs[:24], pairs[24:56], pairs[56:120]
    (tmp_path / "base.json").write_text(json.dumps(base))
    laion = tmp_path / "laion"
    laion.mkdir()
    (laion / "part_b.json").write_text(json.dumps(b))  # written first, used second: sorted by name
    (laion / "part_a.json").write_text(json.dumps(a))
    cfg = _config(tiny_train_config, tmp_path, synthetic_small, train_file=f"[{tmp_path / 'base.json'}]",
                  image_root=None, laion_path=str(laion), log_sample_keys=True, ckpt_every_steps=1)
    straight = tmp_path / "straight"
    run_script("pretrain_blip.py", ["--config", cfg, "--output_dir", straight, "--no_progress"])
    seen = {0: set(), 1: set()}
    for line in (straight / "samples_rank0.txt").read_text().splitlines():
        epoch, _, key = line.split(" ", 2)
        seen[int(epoch)].add(key)
    images = lambda entries: {e["image"] for e in entries}  # noqa: E731
    assert seen[0] <= images(base) | images(a) and seen[0] & images(a) and not seen[0] & (images(b) - images(a + base))
    assert seen[1] <= images(base) | images(b) and seen[1] & (images(b) - images(a + base))
    records = _records(straight)
    assert len(records) == 2

    killed = tmp_path / "killed"
    steps0 = (len(base) + len(a)) // 16  # tiny config: batch 16, the last partial batch dropped
    kill_at_step([sys.executable, REPO / "pretrain_blip.py", "--config", cfg, "--output_dir", killed,
                  "--no_progress"], killed / "checkpoint_last.pth", steps0 + 2)  # inside epoch 1
    run_script("pretrain_blip.py", ["--config", cfg, "--output_dir", killed, "--no_progress", "--resume", "auto"])
    assert [{k: v for k, v in r.items() if k.startswith("train_")} for r in _records(killed)] == \
        [{k: v for k, v in r.items() if k.startswith("train_")} for r in records]
    x = torch.load(killed / "checkpoint_last.pth", weights_only=True)["model"]
    y = torch.load(straight / "checkpoint_last.pth", weights_only=True)["model"]
    assert all(torch.equal(x[k], y[k]) for k in y)


def test_blip_pretrain_yaml_keys_batch_size_and_laion_path(tmp_path):
    from tasks.blip_pretrain import BlipPretrainConfig
    from utils.config import load_config
    cfg, _ = load_config(None, BlipPretrainConfig, ["train_file=[a.json]", "batch_size=12", "laion_path=/x"])
    assert cfg.batch_size_train == 12 and cfg.laion_path == "/x"
    cfg, _ = load_config(None, BlipPretrainConfig, ["train_file=[a.json]", "batch_size=12", "batch_size_train=5"])
    assert cfg.batch_size_train == 5  # the explicit key wins


def test_laion_path_errors_name_the_folder(tmp_path):
    from data.pretrain import laion_files
    from utils.errors import DataError
    with pytest.raises(DataError, match="is not a folder"):
        laion_files(str(tmp_path / "none"))
    with pytest.raises(DataError, match=r"no \*\.json file in"):
        laion_files(str(tmp_path))
    (tmp_path / "2.json").write_text("[]")
    (tmp_path / "10.json").write_text("[]")
    assert [Path(f).name for f in laion_files(str(tmp_path))] == ["10.json", "2.json"]
