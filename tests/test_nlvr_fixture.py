"""BLIP's NLVR2 model against tests/fixtures/blip_nlvr_tiny (trained and saved by the release, with
what the release computes): the official file loads key for key, the [ENC] states, logits,
predictions and training loss are the release's, the tokenization is BLIP's, and the model
initialised from a pretraining-layout file equals the release's initialisation (twin copies of the
cross-attention, pos_embed interpolated, merge layers and head new)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

FIX = Path(__file__).resolve().parent / "fixtures" / "blip_nlvr_tiny"
VIT = {"width": 48, "depth": 2, "heads": 4, "patch_size": 16}


@pytest.fixture(scope="module")
def ref():
    return torch.load(FIX / "reference.pt", weights_only=True)


@pytest.fixture(scope="module")
def cfg():
    # The model's own groups (not tasks/nlvr.py's schema): what create_model reads.
    from models.nlvr import NLVRArch
    from utils.settings import RunSettings, TextSettings, WeightsSettings

    class Config(NLVRArch, WeightsSettings, TextSettings, RunSettings):
        pass
    return Config(vit=VIT, image_size=48, med_config=str(FIX / "med_config.json"), tokenizer=str(FIX / "tokenizer"),
                      pretrained=str(FIX / "checkpoint.pth"), device="cpu")


@pytest.fixture(scope="module")
def trained(cfg):
    from models.factory import create_model
    model, tok = create_model(cfg, "nlvr", "cpu", purpose="eval")
    return model.eval(), tok


def _logits(model, ref):
    with torch.no_grad():
        h = model.cls_states(ref["pixel_values0"], ref["pixel_values1"], ref["input_ids"], ref["attention_mask"])
        return h, model.cls_head(h)


def test_official_checkpoint_loads_key_for_key_and_gives_the_releases_logits_and_loss(trained, ref):
    from models.factory import load_weights
    model, _ = trained
    official = torch.load(FIX / "checkpoint.pth", weights_only=True)["model"]
    assert set(model.state_dict()) == set(official) and len(official) == 315
    result = load_weights(model, str(FIX / "checkpoint.pth"), strict=True, purpose="eval")
    assert result.format == "blip-nlvr" and result.blip.num_loaded == 315 and result.blip.is_clean
    h, logits = _logits(model, ref)
    assert (h - ref["cls_hidden"]).abs().max().item() <= 1e-5
    assert (logits - ref["logits"]).abs().max().item() <= 1e-5
    assert torch.equal(logits.argmax(1), ref["predictions"])
    loss = F.cross_entropy(logits, ref["labels"])
    assert abs(loss.item() - ref["train_loss"].item()) <= 1e-5
    # The forward the task calls gives the same logits.
    with torch.no_grad():
        again = model(ref["pixel_values0"], ref["pixel_values1"], ref["input_ids"], ref["attention_mask"])
    assert torch.equal(again, logits)


def test_sentences_tokenize_as_the_release(trained, ref):
    from models.nlvr import tokenize_sentences
    _, tok = trained
    ids, mask = tokenize_sentences(tok, ref["sentences"])
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
    assert (ids[:, 0] == int(ref["enc_token_id"])).all()


def test_initialisation_from_the_pretraining_file_is_the_releases(cfg, ref):
    from models.factory import create_model
    model, _ = create_model(cfg, "nlvr", "cpu", pretrained=str(FIX / "pretrain_checkpoint.pth"), purpose="train")
    model.eval()
    state = model.state_dict()
    missing = set(ref["init_missing_keys"])
    for key, value in ref["init_tensors"].items():
        if key not in missing:  # twin copies, the interpolated pos_embed, a LayerNorm as loaded
            assert torch.equal(state[key], value) or (state[key] - value).abs().max().item() <= 1e-6, key
    assert state["visual_encoder.pos_embed"].shape == (1, 10, 48)
    # Every twin equals the file's single cross-attention of that layer.
    pre = torch.load(FIX / "pretrain_checkpoint.pth", weights_only=True)["model"]
    for key, value in pre.items():
        if key.startswith("text_encoder.") and ".crossattention.self." in key:
            for twin in ("self0", "self1"):
                assert torch.equal(state[key.replace(".self.", f".{twin}.")], value), key
        if key.startswith("text_encoder.") and ".crossattention.output.dense." in key:
            for twin in ("dense0", "dense1"):
                assert torch.equal(state[key.replace(".dense.", f".{twin}.")], value), key
    with torch.no_grad():
        for key in missing:
            state[key].copy_(ref["init_tensors"][key])
        logits = model(ref["pixel_values0"], ref["pixel_values1"], ref["input_ids"], ref["attention_mask"])
    assert (logits - ref["init_logits"]).abs().max().item() <= 1e-5
    assert torch.equal(logits.argmax(1), ref["init_predictions"])


def test_the_load_report_lists_the_merge_layers_and_head_as_new_and_evaluation_refuses_them(cfg, ref):
    from models.factory import build_model, load_weights
    from models.tokenizer import build_tokenizer
    from utils.errors import CheckpointError
    model = build_model(cfg, "nlvr", build_tokenizer(cfg.tokenizer))
    result = load_weights(model, str(FIX / "pretrain_checkpoint.pth"), purpose="train", apply=False)
    assert result.format == "blip" and sorted(result.blip.new) == sorted(ref["init_missing_keys"])
    assert not result.blip.missing and not result.blip.mismatched
    with pytest.raises(CheckpointError, match="merge_layer|cls_head"):
        load_weights(model, str(FIX / "pretrain_checkpoint.pth"), purpose="eval", apply=False)


def test_a_retrieval_layout_file_initialises_the_twins_the_same_way(cfg, ref, tmp_path):
    from models.factory import build_model, load_weights
    from models.tokenizer import build_tokenizer
    pre = torch.load(FIX / "pretrain_checkpoint.pth", weights_only=True)["model"]
    # model_base_retrieval_*.pth's layout: no decoder, the retrieval queue bookkeeping.
    ret = {k: v for k, v in pre.items() if not k.startswith("text_decoder.") and k != "queue_ptr"}
    ret["ptr_queue"], ret["idx_queue"] = torch.zeros(1, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long)
    torch.save({"model": ret}, tmp_path / "retrieval.pth")
    model = build_model(cfg, "nlvr", build_tokenizer(cfg.tokenizer))
    result = load_weights(model, str(tmp_path / "retrieval.pth"), purpose="train")
    assert sorted(result.blip.new) == sorted(ref["init_missing_keys"]) and not result.blip.missing
    state = model.state_dict()
    for key, value in ret.items():
        if key.startswith("text_encoder.") and ".crossattention.self." in key:
            assert torch.equal(state[key.replace(".self.", ".self1.")], value), key


def test_our_checkpoint_round_trips_and_other_layouts_are_named(trained, ref, tmp_path):
    from models.factory import load_weights
    from models.formats import checkpoint_format
    from utils.errors import CheckpointError
    model, _ = trained
    path = tmp_path / "ours.pth"
    torch.save({"model": model.state_dict(), "format": model.checkpoint_format}, path)
    assert checkpoint_format(torch.load(path, weights_only=True)) == "blip-nlvr"
    result = load_weights(model, str(path), strict=True, purpose="eval")
    assert result.blip.num_loaded == 315
    with pytest.raises(CheckpointError, match="NLVR2"):
        load_weights(model, str(FIX.parent / "blip_vqa_tiny" / "checkpoint.pth"), purpose="train", apply=False)
