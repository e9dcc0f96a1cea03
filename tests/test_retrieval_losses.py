"""BLIP's retrieval losses: the fixture's reference training step, and robustness of ITM sampling."""
from __future__ import annotations

from pathlib import Path

import torch

from data.collate import tokenize
from models.losses import itm_loss, sample_hard_negatives

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "blip_official_tiny"

REF = torch.load(FIXTURE / "reference_train.pt", weights_only=True)


def test_itc_momentum_update_and_enqueue_match_the_original(fixture_model):
    model, tok, _ = fixture_model()
    ids, mask = tokenize(tok, REF["captions"], 35)
    with torch.no_grad():
        losses = model(REF["pixel_values"], ids, mask, REF["idx"], alpha=REF["alpha"],
                       generator=torch.Generator().manual_seed(0))
    assert abs(losses["loss_ita"].item() - float(REF["loss_ita"])) < 1e-5
    assert (model.vision_proj_m.weight - REF["vision_proj_m_weight"]).abs().max() < 1e-6
    assert (model.text_proj_m.weight - REF["text_proj_m_weight"]).abs().max() < 1e-6
    assert (model.image_queue[:, :8] - REF["image_queue_head"]).abs().max() < 1e-6
    assert (model.text_queue[:, :8] - REF["text_queue_head"]).abs().max() < 1e-6
    assert torch.equal(model.idx_queue[:, :8], REF["idx_queue_head"])
    assert int(model.ptr_queue) == int(REF["ptr_queue"]) == 8
    assert torch.isfinite(losses["loss_itm"])


def test_hard_negative_sampling_never_crashes_on_degenerate_batches():
    g = torch.Generator().manual_seed(0)
    temp = torch.tensor(0.07)
    # A batch of one, and a batch where every sample shares one image id: no true negative exists.
    for B, idx in ((1, torch.tensor([3])), (4, torch.tensor([5, 5, 5, 5]))):
        feat = torch.nn.functional.normalize(torch.randn(B, 8), dim=-1)
        neg_i, neg_t, ok_i, ok_t = sample_hard_negatives(feat, feat, feat, feat, idx, idx, temp, g)
        assert neg_i.shape == (B,) and not ok_i.any() and not ok_t.any()
        logits = torch.randn(3 * B, 2)
        loss = itm_loss(logits, torch.cat([ok_i, ok_t]))
        # Only the positives count when no negative is valid.
        expected = torch.nn.functional.cross_entropy(logits[:B], torch.ones(B, dtype=torch.long))
        assert torch.allclose(loss, expected)
    # Tiny weights: features of ~0 give uniform, finite sampling.
    idx = torch.arange(6)
    feat = torch.full((6, 8), 1e-30)
    neg_i, _, ok_i, _ = sample_hard_negatives(feat, feat, feat, feat, idx, idx, temp, g)
    assert ok_i.all() and (neg_i != idx).all()


def test_negatives_never_share_the_query_image_id():
    g = torch.Generator().manual_seed(1)
    idx = torch.tensor([0, 0, 1, 1, 2, 3, 4, 5])
    feat = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    for _ in range(20):
        neg_i, neg_t, ok_i, ok_t = sample_hard_negatives(feat, feat, feat, feat, idx, idx, torch.tensor(0.07), g)
        assert ok_i.all() and ok_t.all()
        assert (idx[neg_i] != idx).all() and (idx[neg_t] != idx).all()


def test_queue_size_must_be_a_multiple_of_the_global_batch(fixture_model):
    model, _, _ = fixture_model()
    model.check_queue(32)
    try:
        model.check_queue(24)
    except ValueError as e:
        assert "queue_size 64 must be a multiple of the global batch 24" in str(e)
    else:
        raise AssertionError("expected a ValueError")


def test_dynamic_padding_gives_the_same_losses_as_full_padding(fixture_model):
    model, tok, _ = fixture_model()
    full = tokenize(tok, REF["captions"], 35)
    short = tokenize(tok, REF["captions"], 35, dynamic=True)
    assert short[0].shape[1] < 35
    results = []
    for ids, mask in (full, short):
        m, _, _ = fixture_model()
        with torch.no_grad():
            results.append(m(REF["pixel_values"], ids, mask, REF["idx"], alpha=0.4,
                             generator=torch.Generator().manual_seed(0)))
    for k in ("loss_ita", "loss_itm"):
        assert abs(results[0][k].item() - results[1][k].item()) < 1e-5, k
