"""The Python inference API (models/inference.py): one call loads an official or our own BLIP
captioning, retrieval or pretraining checkpoint, and its outputs are the original code's."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from data.collate import tokenize
from models.checkpoint_arch import vit_from_state_dict
from models.factory import build_model, load_weights
from models.inference import BLIP, CheckpointKindError, load_blip
from models.tokenizer import build_tokenizer
from tasks.retrieval import RetrievalConfig
from utils.errors import CheckpointError

FIXTURES = Path(__file__).resolve().parent / "fixtures"
RET = FIXTURES / "blip_official_tiny"      # retrieval checkpoint, official layout (tests/fixtures/README.md)
CAP = FIXTURES / "blip_caption_tiny"       # captioning checkpoint, official layout (its README.md)
TOL = 1e-5                                 # as tests/test_blip_fixture.py

# Attention heads leave no trace in the weights: BLIP's widths 768/1024 imply 12/16; the fixtures'
# width of 64 would give 1 head by the rule, so they say theirs.
TINY = dict(vit_heads=4, device="cpu")


def _text_side(fixture: Path) -> dict:
    return dict(med_config=str(fixture / "med_config.json"), tokenizer=str(fixture / "tokenizer"))


@pytest.fixture(scope="module")
def ret_ref():
    return torch.load(RET / "reference.pt", weights_only=True)


@pytest.fixture(scope="module")
def cap_ref():
    return torch.load(CAP / "reference.pt", weights_only=True)


@pytest.fixture(scope="module")
def ret_images():
    return [str(RET / e["image"]) for e in json.loads((RET / "test.json").read_text())]


@pytest.fixture(scope="module")
def cap_images():
    return [str(CAP / "images" / f"img{i}.png") for i in range(8)]


@pytest.fixture(scope="module")
def retrieval() -> BLIP:
    return load_blip(RET / "checkpoint.pth", **_text_side(RET), **TINY)


@pytest.fixture(scope="module")
def captioner() -> BLIP:
    return load_blip(str(CAP / "checkpoint.pth"), **_text_side(CAP), **TINY)


@pytest.fixture(scope="module")
def pretrain_file(tmp_path_factory) -> Path:
    """A pretraining-layout file (model_base.pth: encoder, decoder, momentum copies, queues with
    `queue_ptr`): the caption fixture's ViT and text decoder, the retrieval fixture's text encoder,
    projections, ITM head, momentum copies and queues. Both fixtures share the ViT shapes and the
    med config, so every shape agrees."""
    ret = torch.load(RET / "checkpoint.pth", weights_only=True)["model"]
    cap = torch.load(CAP / "checkpoint.pth", weights_only=True)["model"]
    for key, value in cap.items():
        if key.startswith("visual_encoder."):
            assert ret[key].shape == value.shape, key
    state = {k: v for k, v in ret.items() if not k.startswith("visual_encoder.") and k not in ("ptr_queue", "idx_queue")}
    state.update(cap)  # visual_encoder.* and text_decoder.*
    state["queue_ptr"] = ret["ptr_queue"]
    assert any(k.startswith("text_encoder.") for k in state) and any(k.startswith("text_decoder.") for k in state)
    path = tmp_path_factory.mktemp("pretrain") / "model_base_tiny.pth"
    torch.save({"model": state, "config": {"image_size": 64}}, path)
    return path


# ---------------------------------------------------------------------- retrieval checkpoint

def test_retrieval_checkpoint_resolves_its_architecture_from_the_weights(retrieval):
    assert retrieval.kind == "retrieval" and retrieval.captioner is None
    assert retrieval.model is retrieval.retrieval and not retrieval.model.training
    assert not retrieval.model.with_momentum  # the inference kind: no momentum encoders or queues
    cfg = retrieval.config
    assert cfg["vit"] == {"width": 64, "depth": 2, "heads": 4, "patch_size": 16, "mlp_ratio": 4.0}
    assert (cfg["image_size"], cfg["embed_dim"], cfg["format"]) == (64, 32, "blip")
    assert retrieval.load_reports["retrieval"].is_clean
    assert (retrieval.tokenizer.convert_tokens_to_ids("[DEC]"), retrieval.tokenizer.enc_token_id) == (48, 49)


def test_features_and_itm_equal_the_original(retrieval, ret_ref, ret_images):
    pixels = torch.stack([retrieval.transform(Image.open(p).convert("RGB")) for p in ret_images])
    assert (pixels - ret_ref["pixel_values"]).abs().max() < TOL
    image_feat = retrieval.image_features(ret_images, batch_size=4)  # two batches
    assert image_feat.shape == (6, 32) and image_feat.device.type == "cpu"
    assert (image_feat - ret_ref["image_feat"]).abs().max() < TOL
    assert torch.allclose(image_feat.norm(dim=-1), torch.ones(6), atol=1e-5)
    # A transformed tensor batch and PIL images give the same features.
    assert (retrieval.image_features(ret_ref["pixel_values"]) - ret_ref["image_feat"]).abs().max() < TOL
    pil = [Image.open(p) for p in ret_images[:2]]
    assert (retrieval.image_features(pil) - ret_ref["image_feat"][:2]).abs().max() < TOL

    text_feat = retrieval.text_features(ret_ref["texts"], batch_size=5)
    assert text_feat.shape == (12, 32)
    assert (text_feat - ret_ref["text_feat"]).abs().max() < TOL
    assert (image_feat @ text_feat.t() - ret_ref["itc_sim"]).abs().max() < TOL
    # BLIP's text cleaning (pre_caption) happens inside: punctuation and case do not matter.
    noisy = [t.upper() + "." for t in ret_ref["texts"][:3]]
    assert (retrieval.text_features(noisy) - ret_ref["text_feat"][:3]).abs().max() < TOL

    # ITM of all 72 pairs (image i with text j), as pairs (a transformed batch: decoded once).
    images = ret_ref["pixel_values"].repeat_interleave(12, dim=0)
    texts = list(ret_ref["texts"]) * 6
    logits = retrieval.itm(images, texts, batch_size=20, return_logits=True)
    assert logits.shape == (72, 2)
    assert (logits[:, 1].view(6, 12) - ret_ref["itm_logit"]).abs().max() < TOL
    prob = retrieval.itm(images, texts, batch_size=20)
    assert prob.shape == (72,)
    assert torch.allclose(prob, logits.softmax(-1)[:, 1], atol=1e-6)
    assert ((prob >= 0) & (prob <= 1)).all()
    # One image against several texts.
    one = retrieval.itm(ret_images[2], list(ret_ref["texts"]), return_logits=True)
    assert (one[:, 1] - ret_ref["itm_logit"][2]).abs().max() < TOL


def test_retrieval_checkpoint_refuses_to_caption(retrieval, ret_images):
    with pytest.raises(CheckpointKindError, match="retrieval checkpoint.*no text decoder.*captioning checkpoint"):
        retrieval.caption(ret_images[:1])
    with pytest.raises(ValueError, match="2 images and 3 texts"):
        retrieval.itm(ret_images[:2], ["a", "b", "c"])
    with pytest.raises(ValueError, match="32x32 but this model takes 64x64"):
        retrieval.image_features(torch.zeros(1, 3, 32, 32))


# ---------------------------------------------------------------------- caption checkpoint

def test_caption_checkpoint_gives_the_original_captions(captioner, cap_ref, cap_images):
    assert captioner.kind == "caption" and captioner.retrieval is None and captioner.model is captioner.captioner
    assert captioner.config["prompt"] == "a picture of " and captioner.config["image_size"] == 64
    assert captioner.load_reports["caption"].is_clean
    expected = list(cap_ref["beam3_max20_min5"])
    assert captioner.caption(cap_images, num_beams=3, max_length=20, min_length=5, batch_size=3) == expected
    assert captioner.caption(cap_ref["pixel_values"], num_beams=3, max_length=20, min_length=5) == expected
    assert captioner.caption(cap_images[:4], num_beams=1) == list(cap_ref["greedy_max20_min5"][:4])
    assert captioner.caption(cap_images[0]) == expected[:1]  # one path; defaults = BLIP's eval settings


def test_sampling_is_repeatable_with_a_seed(captioner, cap_images):
    a = captioner.caption(cap_images[:2], sample=True, top_p=0.9, num_return_sequences=3, seed=0)
    b = captioner.caption(cap_images[:2], sample=True, top_p=0.9, num_return_sequences=3, seed=0)
    assert len(a) == 6 and all(isinstance(c, str) and c for c in a)
    assert a == b


def test_caption_checkpoint_refuses_retrieval_methods(captioner, cap_images):
    message = "captioning checkpoint.*no ITM head; load a retrieval .*or pretraining checkpoint"
    with pytest.raises(CheckpointKindError, match=message):
        captioner.itm(cap_images[:1], ["a red square"])
    with pytest.raises(CheckpointKindError, match="captioning checkpoint"):
        captioner.image_features(cap_images[:1])
    with pytest.raises(CheckpointKindError, match="captioning checkpoint"):
        captioner.text_features(["a red square"])


# ---------------------------------------------------------------------- pretraining layout

def test_pretraining_checkpoint_serves_captions_and_retrieval(pretrain_file, cap_ref, ret_ref, cap_images):
    blip = load_blip(pretrain_file, **_text_side(RET), **TINY)
    assert blip.kind == "pretrain" and blip.model is blip.retrieval
    assert blip.load_reports["retrieval"].is_clean and blip.load_reports["caption"].is_clean
    # Its ViT and decoder are the caption fixture's: the original captions.
    assert blip.caption(cap_images, num_beams=3, max_length=20, min_length=5) == list(cap_ref["beam3_max20_min5"])
    # Its text encoder and projection are the retrieval fixture's: the original text features.
    assert (blip.text_features(ret_ref["texts"]) - ret_ref["text_feat"]).abs().max() < TOL
    # ITM and image features: as the factory-built retrieval model computes them from the same file.
    tok = build_tokenizer(str(RET / "tokenizer"))
    cfg = RetrievalConfig(vit={"width": 64, "depth": 2, "heads": 4, "patch_size": 16}, image_size=64,
                          med_config=str(RET / "med_config.json"), tokenizer=str(RET / "tokenizer"), embed_dim=32)
    model = build_model(cfg, "blip_inference", tok)
    load_weights(model, pretrain_file, strict=True)
    model.eval()
    texts = list(ret_ref["texts"][:8])
    ids, mask = tokenize(tok, texts, 35)
    with torch.no_grad():
        tokens, image_feat = model.encode_image(cap_ref["pixel_values"])
        expected = model.itm_logits(ids, mask, image_tokens=tokens).softmax(-1)[:, 1]
    assert (blip.image_features(cap_images) - image_feat).abs().max() < TOL
    got = blip.itm(cap_images, texts)
    assert got.shape == (8,) and (got - expected).abs().max() < TOL


# ---------------------------------------------------------------------- our own checkpoints, errors

def test_our_run_checkpoint_uses_its_stored_config(tmp_path, cap_ref, cap_images):
    """train_caption.py writes the format tag and the run's config: no keyword is needed."""
    state = torch.load(CAP / "checkpoint.pth", weights_only=True)["model"]
    config = {"vit": {"width": 64, "depth": 2, "heads": 4, "patch_size": 16, "mlp_ratio": 4.0}, "image_size": 64,
              "med_config": str(CAP / "med_config.json"), "tokenizer": str(CAP / "tokenizer"),
              "prompt": "a picture of ", "vit_grad_ckpt": True, "init_lr": 1e-5}
    path = tmp_path / "checkpoint_best.pth"
    torch.save({"model": state, "format": "blip-caption", "config": config, "epoch": 0}, path)
    blip = load_blip(path, device="cpu")
    assert blip.config["vit"]["heads"] == 4 and blip.config["tokenizer"] == str(CAP / "tokenizer")
    assert blip.caption(cap_images[:3]) == list(cap_ref["beam3_max20_min5"][:3])
    # A keyword still wins over the stored config.
    assert load_blip(path, device="cpu", prompt="a photo of ").config["prompt"] == "a photo of "


def test_missing_file_and_foreign_kinds_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_blip(tmp_path / "nope.pth")
    path = tmp_path / "adapter.pth"
    torch.save({"model": {"adapter.weight": torch.zeros(2)}, "format": "contextblip-trainable"}, path)
    with pytest.raises(CheckpointKindError, match="'contextblip-trainable' checkpoint; load_blip loads BLIP "
                                                  "captioning, retrieval, pretraining and VQA"):
        load_blip(path)


def test_wrong_architecture_says_which_keyword_to_pass(tmp_path):
    med = json.loads((RET / "med_config.json").read_text())
    med.update(hidden_size=32, intermediate_size=128)  # not the text width the file was trained with
    (tmp_path / "med.json").write_text(json.dumps(med))
    with pytest.raises(CheckpointError, match="does not fit the retrieval model.*med_config="):
        load_blip(RET / "checkpoint.pth", med_config=str(tmp_path / "med.json"), tokenizer=str(RET / "tokenizer"),
                  **TINY)


def test_vit_rule_for_official_widths():
    def fake(width, depth, grid=24):
        state = {"visual_encoder.cls_token": torch.zeros(1, 1, width),
                 "visual_encoder.pos_embed": torch.zeros(1, 1 + grid * grid, width),
                 "visual_encoder.patch_embed.proj.weight": torch.zeros(width, 3, 16, 16),
                 "visual_encoder.blocks.0.mlp.fc1.weight": torch.zeros(4 * width, 1)}
        state.update({f"visual_encoder.blocks.{i}.norm1.weight": torch.zeros(1) for i in range(depth)})
        return state
    arch, size = vit_from_state_dict(fake(768, 12))
    assert (arch.width, arch.depth, arch.heads, arch.patch_size, size) == (768, 12, 12, 16, 384)
    arch, size = vit_from_state_dict(fake(1024, 24, grid=14))
    assert (arch.width, arch.depth, arch.heads, size) == (1024, 24, 16, 224)
    assert vit_from_state_dict(fake(64, 2, grid=4))[0].heads == 1
    assert vit_from_state_dict(fake(64, 2, grid=4), heads=4)[0].heads == 4
