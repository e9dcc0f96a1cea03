"""Compatibility with official BLIP checkpoints: the fixture saved by the original code must load
key for key and reproduce the original numbers through our entry point."""
from __future__ import annotations

from pathlib import Path

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from data.collate import tokenize
from data.transforms import build_test_transform
import train_retrieval

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "blip_official_tiny"

REF = torch.load(FIXTURE / "reference.pt", weights_only=True)


def test_fixture_loads_strictly_with_nothing_missing_or_unexpected(fixture_model):
    model, tok, report = fixture_model()
    assert report.is_clean
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert report.num_loaded == len(model.state_dict()) == 189
    assert (tok.convert_tokens_to_ids("[DEC]"), tok.enc_token_id) == (48, 49)


def test_preprocessing_and_forward_match_the_original(fixture_model):
    model, tok, _ = fixture_model()
    transform = build_test_transform(64)
    entries = json.loads((FIXTURE / "test.json").read_text())
    pixels = torch.stack([transform(Image.open(FIXTURE / e["image"]).convert("RGB")) for e in entries])
    assert (pixels - REF["pixel_values"]).abs().max() < 1e-5
    ids, mask = tokenize(tok, REF["texts"], 35)
    assert torch.equal(ids, REF["input_ids"]) and torch.equal(mask, REF["attention_mask"])
    with torch.no_grad():
        tokens, image_feat = model.encode_image(REF["pixel_values"])
        _, text_feat = model.encode_text(ids, mask)
        n_img, n_txt = len(image_feat), len(text_feat)
        img = torch.arange(n_img).repeat_interleave(n_txt)
        txt = torch.arange(n_txt).repeat(n_img)
        itm = model.itm_logits(ids[txt], mask[txt], image_tokens=tokens[img])[:, 1].view(n_img, n_txt)
        # The same logits through per-image cross K/V projected once and reused for every text.
        kv = model.text_encoder.project_cross_kv(tokens)
        itm_kv = model.itm_logits(ids[txt], mask[txt], cross_kv=kv, cross_index=img)[:, 1].view(n_img, n_txt)
    assert (image_feat - REF["image_feat"]).abs().max() < 1e-5
    assert (text_feat - REF["text_feat"]).abs().max() < 1e-5
    assert (image_feat @ text_feat.t() - REF["itc_sim"]).abs().max() < 1e-5
    assert (itm - REF["itm_logit"]).abs().max() < 1e-5
    assert (itm_kv - REF["itm_logit"]).abs().max() < 1e-5


def test_evaluate_entry_point_reproduces_reference_scores(tmp_path, fixture_config):
    out = tmp_path / "eval"
    # BLIP's fine-tuning recipe checkpoints the last 4 ViT blocks; the fixture's ViT has 2. Under
    # --evaluate that setting is unused, so it is not an error (in training it would be).
    cfg = fixture_config(tmp_path, vit_grad_ckpt="true", vit_ckpt_layer=4)
    record = train_retrieval.main(["--config", str(cfg), "--output_dir", str(out),
                                   "--evaluate", "--save_scores", "--no_progress"])
    scores = np.load(out / "scores_test.npz")
    assert scores["score_i2t"].shape == (6, 12) and scores["score_t2i"].shape == (12, 6)
    assert np.abs(scores["score_i2t"] - REF["score_i2t"].numpy()).max() < 1e-4
    assert np.abs(scores["score_t2i"] - REF["score_t2i"].numpy()).max() < 1e-4
    logged = json.loads((out / "evaluate.txt").read_text().splitlines()[-1])
    assert logged == record
    assert set(logged) == {f"test_{k}" for k in REF["metrics"]}
    assert logged["test_txt_r1"] == REF["metrics"]["txt_r1"]
    assert logged["test_img_r1"] == REF["metrics"]["img_r1"]
    assert (out / "config.yaml").is_file()
    with pytest.raises(SystemExit):  # training would use it: a value error, before anything runs
        train_retrieval.main(["--config", str(cfg), "--output_dir", str(tmp_path / "train"), "--no_progress"])
    assert not (tmp_path / "train").exists()


def _independent_resize(pos_embed: torch.Tensor, new_grid: int) -> torch.Tensor:
    cls, grid = pos_embed[:, :1], pos_embed[0, 1:]
    old = int(grid.shape[0] ** 0.5)
    img = grid.reshape(old, old, -1).permute(2, 0, 1).unsqueeze(0)
    img = F.interpolate(img, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, img[0].permute(1, 2, 0).reshape(1, new_grid * new_grid, -1)], dim=1)


def test_loading_at_another_image_size_interpolates_pos_embed(fixture_model):
    state = torch.load(FIXTURE / "checkpoint.pth", weights_only=True)["model"]
    model, _, report = fixture_model(image_size=96)  # 6x6 patches instead of 4x4
    assert report.is_clean
    for name in ("visual_encoder", "visual_encoder_m"):
        got = getattr(model, name).pos_embed.detach()
        assert got.shape == (1, 37, 64)
        assert torch.allclose(got, _independent_resize(state[f"{name}.pos_embed"], 6), atol=1e-6)
    with torch.no_grad():
        tokens, _ = model.encode_image(torch.randn(2, 3, 96, 96))
    assert tokens.shape == (2, 37, 64)


@pytest.mark.dist
def test_torchrun_two_process_evaluation_equals_one_process(tmp_path, fixture_config, run_torchrun):
    cfg = fixture_config(tmp_path, rerank_batch_size=2)
    single, double = tmp_path / "one", tmp_path / "two"
    train_retrieval.main(["--config", str(cfg), "--output_dir", str(single), "--evaluate", "--save_scores", "--no_progress"])
    run_torchrun("train_retrieval.py", ["--config", cfg, "--output_dir", double, "--evaluate", "--save_scores",
                                        "--no_progress"])
    a, b = np.load(single / "scores_test.npz"), np.load(double / "scores_test.npz")
    for key in ("score_i2t", "score_t2i"):
        assert np.allclose(a[key], b[key], atol=1e-5), key
    one = json.loads((single / "evaluate.txt").read_text())
    two = json.loads((double / "evaluate.txt").read_text())
    assert one == two
