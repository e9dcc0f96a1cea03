"""``deterministic: true`` makes a run bitwise repeatable on the same machine and software."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_demo_retrieval_runs_end_with_identical_weights(tmp_path, run_script):
    """The demo retrieval config (deterministic: true) at demo size, 30 steps, twice from scratch. Without ``deterministic`` the weights of two such runs differ by up to ~1e-4
    (the ITM loss's advanced-indexing backward accumulates with float atomics on several threads).
    Evaluation is left out: it changes no weight."""
    from data.synthetic import generate

    data = tmp_path / "data"
    generate(data, seed=0, parts=("retrieval",))  # the demo's retrieval data (its vocabulary alone)
    # The demo's model, batch and kernels; its first 960 captions (30 steps) keep the suite short.
    ann = data / "retrieval" / "annotation"
    (ann / "train_head.json").write_text(json.dumps(json.loads((ann / "synthetic_train.json").read_text())[:960]))
    weights = []
    for name in ("a", "b"):
        out = tmp_path / name
        run_script("train_retrieval.py", [
            "--config", REPO / "configs" / "demo" / "retrieval.yaml", "--output_dir", out, "--no_progress",
            "--opts", f"image_root={data / 'retrieval' / 'images'}", f"ann_root={data / 'retrieval' / 'annotation'}",
            f"tokenizer={data / 'tokenizer'}", "max_epoch=1", "val_file=null", "test_file=null", "device=cpu",
            "train_file=train_head.json"])
        ckpt = torch.load(out / "checkpoint_last.pth", weights_only=True)
        assert ckpt["config"]["deterministic"] is True and ckpt["step"] == 30
        weights.append(ckpt["model"])
    a, b = weights
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
