"""BLIP's pretraining model: the decoder tied to the encoder (one parameter, both views updated by a
step), the model_base.pth layout, and its output loading into retrieval and captioning models."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "blip_official_tiny"
VIT = {"width": 64, "depth": 2, "heads": 4, "patch_size": 16}


@pytest.fixture(scope="module")
def parts():
    from models.blip import BlipArch, ITCSettings
    from models.tokenizer import build_tokenizer
    tok = build_tokenizer(str(FIX / "tokenizer"))
    arch = BlipArch(vit=VIT, image_size=64, med_config=str(FIX / "med_config.json"), embed_dim=32)
    return tok, arch, ITCSettings(queue_size=16)


@pytest.fixture()
def model(parts):
    from models.blip_pretrain import build_blip_pretrain
    tok, arch, itc = parts
    torch.manual_seed(0)
    return build_blip_pretrain(arch, tok, itc)


def _batch(tok, n=4):
    from data.collate import tokenize
    g = torch.Generator().manual_seed(1)
    texts = ["a red circle on the left", "a blue square", "two green triangles at the top", "a big yellow star"][:n]
    ids, mask = tokenize(tok, texts, 30)
    return torch.randn(n, 3, 64, 64, generator=g), ids, mask, torch.arange(n)


def test_decoder_shares_all_but_self_attention_and_a_step_updates_both_views(model, parts):
    enc, dec = model.text_encoder, model.text_decoder.bert
    assert dec.embeddings.word_embeddings.weight is enc.embeddings.word_embeddings.weight
    for le, ld in zip(enc.layers, dec.layers):
        assert ld.crossattention.self.query.weight is le.crossattention.self.query.weight
        assert ld.intermediate.dense.weight is le.intermediate.dense.weight
        assert ld.output.dense.weight is le.output.dense.weight
        assert ld.attention.self.query.weight is not le.attention.self.query.weight  # its own causal self-attention
    assert model.text_decoder.cls.predictions.decoder.weight is enc.embeddings.word_embeddings.weight
    tok = parts[0]
    pixels, ids, mask, idx = _batch(tok)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = model(pixels, ids, mask, idx, alpha=0.4, generator=torch.Generator().manual_seed(0))
    assert set(losses) == {"loss_ita", "loss_itm", "loss_lm"} and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    opt.step()
    after = model.state_dict()
    for name in ("embeddings.word_embeddings.weight", "encoder.layer.0.intermediate.dense.weight",
                 "encoder.layer.1.crossattention.self.key.weight"):
        a, b = after["text_encoder." + name], after["text_decoder.bert." + name]
        assert not torch.equal(a, before["text_encoder." + name]), name  # it learned
        assert torch.equal(a, b), name  # and both names show the one parameter
    # The decoder's self-attention is its own, and it learned from the LM loss.
    key = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(after["text_decoder.bert." + key], after["text_encoder." + key])


def test_state_dict_has_the_model_base_layout_and_feeds_retrieval_and_captioning(model, parts, tmp_path):
    from models.blip import build_blip_retrieval
    from models.caption import CaptionArch, build_captioner
    from models.factory import load_weights
    from models.formats import checkpoint_format
    tok, arch, itc = parts
    state = model.state_dict()
    assert "queue_ptr" in state and "idx_queue" not in state and "ptr_queue" not in state
    official = torch.load(FIX / "checkpoint.pth", weights_only=True)["model"]
    retrieval_keys = set(official) - {"idx_queue", "ptr_queue"}
    assert retrieval_keys <= set(state)
    assert {k for k in state if k.startswith("text_decoder.cls.")} == {
        f"text_decoder.cls.predictions.{n}" for n in ("bias", "transform.dense.weight", "transform.dense.bias",
                                                      "transform.LayerNorm.weight", "transform.LayerNorm.bias",
                                                      "decoder.weight", "decoder.bias")}
    ckpt = {"model": state}
    assert checkpoint_format(ckpt) == "blip"
    retrieval = build_blip_retrieval(arch, tok, itc)
    report = load_weights(retrieval, ckpt).blip
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert all(k.startswith("text_decoder.") or k == "queue_ptr" for k in report.expected_extra)
    captioner = build_captioner(CaptionArch(vit=VIT, image_size=64, med_config=str(FIX / "med_config.json")), tok)
    report = load_weights(captioner, ckpt, strict=True).blip
    assert report.missing == [] and report.unexpected == []
    assert torch.equal(captioner.state_dict()["text_decoder.bert.embeddings.word_embeddings.weight"],
                       state["text_encoder.embeddings.word_embeddings.weight"])
    # And back: a pretraining model loads its own state dict strictly (a resume), ties intact.
    from models.blip_pretrain import build_blip_pretrain
    again = build_blip_pretrain(arch, tok, itc)
    load_weights(again, ckpt, strict=True)
    assert again.text_decoder.bert.embeddings is again.text_encoder.embeddings
    assert again._ptr == int(state["queue_ptr"])


def test_queued_features_are_never_positives(model, parts):
    tok = parts[0]
    pixels, ids, mask, idx = _batch(tok)
    with torch.no_grad():
        model(pixels, ids, mask, idx, alpha=0.0, generator=torch.Generator().manual_seed(0))
    assert model._ptr == 4 and int(model.queue_ptr) == 4
    assert (model.queue_ids() == -1).all() and model.queue_ids().shape == (16,)
