"""The tiny retrieval run every end-to-end test starts from (seconds per epoch on the synthetic
data): its med config and its config values, shared by ``tests/conftest.py`` and the bad-input
campaign (``tests/scripts/bad_inputs.py``)."""
from __future__ import annotations

from pathlib import Path

TINY_MED = ('{"vocab_size": null, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,'
            ' "intermediate_size": 64, "max_position_embeddings": 40, "encoder_width": 32}')


def tiny_values(data: Path, med: Path, **overrides) -> dict:
    """The config values of a very small from-scratch retrieval run on synthetic ``data`` (an
    override of None drops that key: e.g. the retrieval-only ones for another task)."""
    values = {
        "dataset": "custom", "image_root": str(data / "retrieval" / "images"),
        "ann_root": str(data / "retrieval" / "annotation"), "train_file": "synthetic_train.json",
        "val_file": "synthetic_val.json", "test_file": "synthetic_test.json",
        "tokenizer": str(data / "tokenizer"), "med_config": str(med), "pretrained": "''",
        "vit": "{width: 32, depth: 1, heads: 2, patch_size: 16}", "image_size": 32, "embed_dim": 16,
        "queue_size": 64, "k_test": 4, "batch_size_train": 16, "batch_size_test": 16, "init_lr": 1e-3,
        "min_lr": 1e-4, "max_epoch": 2, "num_workers": 0, "device": "cpu", "seed": 3, "log_every": 1000,
        "train_resize_only": True, "deterministic": "true",
    }
    values.update(overrides)
    return {k: v for k, v in values.items() if v is not None}


def write_yaml(path: Path, values: dict) -> Path:
    path.write_text("".join(f"{k}: {v}\n" for k, v in values.items()))
    return path
