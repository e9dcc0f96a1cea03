"""HuggingFace interop (models/hf.py, tools/convert.py, ``pretrained:`` folders and hub ids): the
official-layout fixtures converted to HF folders load into transformers' own BLIP classes with no
missing or unexpected key and reproduce the original code's numbers; the way back is bit-identical;
a folder in HF's own layout (no extras) loads into our model and scores as the HF model does."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"
RETRIEVAL = FIXTURES / "blip_official_tiny"
CAPTION = FIXTURES / "blip_caption_tiny"
REF = torch.load(RETRIEVAL / "reference.pt", weights_only=True)
CAP_REF = torch.load(CAPTION / "reference.pt", weights_only=True)
ENC_ID, DEC_ID, SEP_ID = 49, 48, 6


def _convert(*args):
    from tools.convert import main
    return main([str(a) for a in args])


def _caption_config(tmp: Path, **overrides) -> Path:
    cfg = {"image_root": str(CAPTION), "pretrained": str(CAPTION / "checkpoint.pth"), "strict_load": "true",
           "vit": "{width: 64, depth: 2, heads: 4, patch_size: 16}", "image_size": 64,
           "med_config": str(CAPTION / "med_config.json"), "tokenizer": str(CAPTION / "tokenizer"),
           "prompt": "'a picture of '", "num_workers": 0, "device": "cpu"}
    cfg.update(overrides)
    path = tmp / "caption.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in cfg.items()))
    return path


@pytest.fixture(scope="module")
def hf_retrieval(tmp_path_factory, fixture_config) -> Path:
    """blip_official_tiny as a BlipForImageTextRetrieval folder (tools convert --to hf)."""
    tmp = tmp_path_factory.mktemp("hf_retrieval")
    return _convert("--to", "hf", "--config", fixture_config(tmp), "--output_dir", tmp / "hf")


@pytest.fixture(scope="module")
def hf_caption(tmp_path_factory) -> Path:
    """blip_caption_tiny as a BlipForConditionalGeneration folder."""
    tmp = tmp_path_factory.mktemp("hf_caption")
    return _convert("--to", "hf", "--config", _caption_config(tmp), "--output_dir", tmp / "hf")


@pytest.fixture(scope="module")
def hf_native(tmp_path_factory) -> Path:
    """A folder in HF's own layout and nothing else (as on the hub): BlipForImageTextRetrieval of the
    fixture's dimensions, random weights, save_pretrained; no blip_extras.safetensors."""
    from transformers import BlipConfig, BlipForImageTextRetrieval
    config = BlipConfig(
        text_config=dict(vocab_size=50, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, bos_token_id=DEC_ID,
                         sep_token_id=SEP_ID, eos_token_id=SEP_ID, pad_token_id=0),
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           image_size=64, patch_size=16, layer_norm_eps=1e-6),
        image_text_hidden_size=32, architectures=["BlipForImageTextRetrieval"])
    torch.manual_seed(0)
    model = BlipForImageTextRetrieval(config)
    with torch.no_grad():  # HF initialises these at std 1e-10: give them some weight
        model.vision_model.embeddings.position_embedding.normal_(0, 0.5)
        model.vision_model.embeddings.class_embedding.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("hf_native") / "blip-tiny"
    model.save_pretrained(out)
    return out


def _official(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_identical(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        if key == "model":
            assert list(a[key]) == list(b[key])
            for k, v in a[key].items():
                assert v.dtype == b[key][k].dtype and torch.equal(v, b[key][k]), k
        else:
            assert a[key] == b[key], key


# ----------------------------------------------------------------------------- official -> HF

def test_retrieval_folder_loads_in_transformers_and_gives_the_original_itc_and_itm(hf_retrieval):
    from transformers import AutoProcessor, BlipForImageTextRetrieval
    model, info = BlipForImageTextRetrieval.from_pretrained(hf_retrieval, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    c = model.config
    assert c.architectures == ["BlipForImageTextRetrieval"] and c.image_text_hidden_size == 32
    assert (c.vision_config.hidden_size, c.vision_config.num_hidden_layers, c.vision_config.num_attention_heads,
            c.vision_config.intermediate_size, c.vision_config.image_size, c.vision_config.patch_size,
            c.vision_config.layer_norm_eps) == (64, 2, 4, 256, 64, 16, 1e-6)
    t = c.text_config
    assert (t.vocab_size, t.hidden_size, t.num_hidden_layers, t.intermediate_size, t.max_position_embeddings,
            t.bos_token_id, t.sep_token_id, t.pad_token_id) == (50, 64, 2, 256, 64, DEC_ID, SEP_ID, 0)
    model.eval()
    pixels, ids, mask = REF["pixel_values"], REF["input_ids"], REF["attention_mask"]
    with torch.no_grad():
        itc = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=False).itm_score
        n_img, n_txt = pixels.shape[0], ids.shape[0]
        enc = ids.clone()
        enc[:, 0] = ENC_ID  # BLIP's ITM reads [ENC] first; HF leaves that to the caller
        itm = model(input_ids=enc.repeat(n_img, 1), pixel_values=pixels.repeat_interleave(n_txt, 0),
                    attention_mask=mask.repeat(n_img, 1), use_itm_head=True).itm_score[:, 1].view(n_img, n_txt)
    itc_diff = (itc - REF["itc_sim"]).abs().max().item()
    itm_diff = (itm - REF["itm_logit"]).abs().max().item()
    print(f"\nHF BlipForImageTextRetrieval vs the original code: itc_sim max |diff| {itc_diff:.3g}, "
          f"itm_logit max |diff| {itm_diff:.3g}")
    assert itc_diff <= 1e-5 and itm_diff <= 1e-4
    # The saved processor tokenizes as BLIP does, with [DEC] and [ENC] in place.
    processor = AutoProcessor.from_pretrained(hf_retrieval)
    tok = processor.tokenizer
    assert tok.bos_token_id == DEC_ID and tok.convert_tokens_to_ids("[ENC]") == ENC_ID
    again = tok(REF["texts"], padding="max_length", max_length=ids.shape[1], return_tensors="pt")
    assert torch.equal(again.input_ids, ids) and torch.equal(again.attention_mask, mask)
    assert processor.image_processor.size == {"height": 64, "width": 64}


def test_caption_folder_loads_in_transformers_and_gives_the_original_logits(hf_caption):
    from transformers import BlipForConditionalGeneration
    model, info = BlipForConditionalGeneration.from_pretrained(hf_caption, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.architectures == ["BlipForConditionalGeneration"]
    assert model.config.text_config.bos_token_id == DEC_ID and model.config.text_config.sep_token_id == SEP_ID
    model.eval()
    with torch.no_grad():
        logits = model(pixel_values=CAP_REF["pixel_values"][:2], input_ids=CAP_REF["input_ids"][:2],
                       attention_mask=CAP_REF["attention_mask"][:2]).logits
    diff = (logits - CAP_REF["logits_first2"]).abs().max().item()
    print(f"\nHF BlipForConditionalGeneration vs the original code: logits_first2 max |diff| {diff:.3g}")
    assert diff <= 1e-4
    # HF's generate with the saved tokenizer ([DEC] bos, [SEP] eos) gives the release's captions.
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(hf_caption)
    prompt = processor.tokenizer(["a picture of "] * 8, return_tensors="pt")
    with torch.no_grad():
        greedy = model.generate(pixel_values=CAP_REF["pixel_values"], input_ids=prompt.input_ids.clone(),
                                attention_mask=prompt.attention_mask, max_length=20, min_length=5, num_beams=1)
        beam = model.generate(pixel_values=CAP_REF["pixel_values"], input_ids=prompt.input_ids.clone(),
                              attention_mask=prompt.attention_mask, max_length=20, min_length=5, num_beams=3)
    assert torch.equal(greedy, CAP_REF["greedy_max20_min5_ids"])
    texts = processor.tokenizer.batch_decode(beam, skip_special_tokens=True)
    assert [t[len("a picture of "):] for t in texts] == list(CAP_REF["beam3_max20_min5"])


def test_the_exported_folder_has_the_usual_file_modes_and_replaces_only_with_overwrite(hf_retrieval, tmp_path,
                                                                                     fixture_config):
    import os
    import stat
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in hf_retrieval.iterdir() if p.is_file()}
    assert set(modes.values()) == {0o666 & ~umask}, modes  # model.safetensors too (transformers writes it 0600)
    # --overwrite replaces the folder whole (a stray file of the old one does not survive).
    out = tmp_path / "hf"
    shutil.copytree(hf_retrieval, out)
    (out / "stray.txt").write_text("old")
    _convert("--to", "hf", "--config", fixture_config(tmp_path), "--output_dir", out, "--overwrite")
    assert not (out / "stray.txt").exists() and (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".hf.*"))  # no temp or old folder left beside it
    back = _convert("--to", "blip", "--input", out, "--output", tmp_path / "a.pth")
    again = _convert("--to", "blip", "--input", out, "--output", back, "--overwrite")
    _assert_identical(_official(back), _official(again))


# ----------------------------------------------------------------------------- HF -> official

def test_round_trip_official_hf_official_is_bit_identical(hf_retrieval, hf_caption, tmp_path):
    for folder, original in ((hf_retrieval, RETRIEVAL), (hf_caption, CAPTION)):
        back = _convert("--to", "blip", "--input", folder, "--output", tmp_path / f"{original.name}.pth")
        _assert_identical(_official(original / "checkpoint.pth"), _official(back))
    # A captioner needs no extras: the HF folder alone gives back its weights, key for key, in order.
    from models.hf_extras import EXTRAS_FILE, read_extras
    assert read_extras(hf_caption)[0] == {}
    bare = tmp_path / "bare"
    shutil.copytree(hf_caption, bare, ignore=shutil.ignore_patterns(EXTRAS_FILE))
    back = _official(_convert("--to", "blip", "--input", bare, "--output", tmp_path / "bare.pth"))
    _assert_identical({"model": _official(CAPTION / "checkpoint.pth")["model"]}, back)


def test_a_hub_style_folder_converts_back_and_scores_as_the_hf_model(hf_native, tmp_path, fixture_model):
    from transformers import BlipForImageTextRetrieval
    from models.factory import load_weights
    back = _official(_convert("--to", "blip", "--input", hf_native, "--output", tmp_path / "b.pth",
                              "--queue_size", 64))
    state, official = back["model"], _official(RETRIEVAL / "checkpoint.pth")["model"]
    assert list(back) == ["model"] and list(state) == list(official)  # the official layout, key for key
    assert all(state[k].shape == official[k].shape and state[k].dtype == official[k].dtype for k in state)
    # Synthesised as BLIP's __init__ does: momentum copies, normalised queues never positive, temp 0.07.
    for k in [k for k in state if k.startswith(("visual_encoder_m.", "text_encoder_m.", "vision_proj_m."))]:
        assert torch.equal(state[k], state[k.replace("_m.", ".", 1)]), k
    assert torch.allclose(state["image_queue"].norm(dim=0), torch.ones(64))
    assert (state["idx_queue"] == -100).all() and state["ptr_queue"].item() == 0
    assert state["temp"].item() == pytest.approx(0.07)
    # The same folder with pytorch_model.bin (older hub uploads) gives the same file.
    from safetensors.torch import load_file
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(hf_native / "config.json", legacy / "config.json")
    torch.save(load_file(hf_native / "model.safetensors"), legacy / "pytorch_model.bin")
    _assert_identical(back, _official(_convert("--to", "blip", "--input", legacy, "--output", tmp_path / "l.pth",
                                               "--queue_size", 64)))

    ours, _, _ = fixture_model()
    report = load_weights(ours, back, strict=True).blip
    assert report.is_clean
    hf = BlipForImageTextRetrieval.from_pretrained(hf_native).eval()
    pixels, ids, mask = REF["pixel_values"], REF["input_ids"], REF["attention_mask"]
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=False).itm_score
        sim = ours.encode_image(pixels)[1] @ ours.encode_text(ids, mask)[1].t()
        itm_hf = hf(input_ids=ours.itm_input_ids(ids[:4]), pixel_values=pixels[:4], attention_mask=mask[:4]).itm_score
        itm = ours.itm_logits(ids[:4], mask[:4], image_tokens=ours.encode_image(pixels[:4])[0])
    assert (sim - expected).abs().max() < 1e-5
    assert (itm - itm_hf).abs().max() < 1e-4


# ----------------------------------------------------------------------------- pretrained: folder / hub id

def _retrieval_cfg(config_path: Path):
    from tasks.retrieval import RetrievalConfig
    from utils.config import load_config
    return load_config(config_path, RetrievalConfig)[0]


def test_pretrained_may_name_an_hf_folder(hf_retrieval, tmp_path, fixture_config):
    from models.factory import create_model
    cfg = _retrieval_cfg(fixture_config(tmp_path, pretrained=str(hf_retrieval)))
    model, _ = create_model(cfg, "blip")
    official = _official(RETRIEVAL / "checkpoint.pth")["model"]
    state = model.state_dict()
    assert set(state) == set(official)
    assert all(torch.equal(state[k], v) for k, v in official.items())  # extras: momentum and queues too


def _fake_cache(root: Path, repo_id: str, folder: Path) -> Path:
    """The HF hub cache layout: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return root


def test_pretrained_may_name_a_hub_id_in_the_local_cache(hf_native, tmp_path, fixture_config, monkeypatch):
    from transformers import BlipForImageTextRetrieval
    from models.factory import create_model
    cache = _fake_cache(tmp_path / "hub", "acme/blip-tiny", hf_native)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _retrieval_cfg(fixture_config(tmp_path, pretrained="acme/blip-tiny"))
    model, _ = create_model(cfg, "blip")
    hf = BlipForImageTextRetrieval.from_pretrained(hf_native).state_dict()
    state = model.state_dict()
    assert torch.equal(state["visual_encoder.blocks.1.attn.qkv.weight"],
                       hf["vision_model.encoder.layers.1.self_attn.qkv.weight"])
    assert torch.equal(state["text_encoder_m.encoder.layer.0.crossattention.self.key.weight"],
                       hf["text_encoder.encoder.layer.0.crossattention.self.key.weight"])
    assert state["image_queue"].shape == (32, 64)  # the config's queue_size


@pytest.mark.timing  # asserts a wall-time bound: run alone, not beside another worker
def test_a_missing_hub_id_or_other_dimensions_fail_at_once_naming_why(hf_retrieval, tmp_path, fixture_config,
                                                                      monkeypatch):
    from models.factory import create_model
    from utils.errors import CheckpointError
    cache = tmp_path / "empty_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _retrieval_cfg(fixture_config(tmp_path, pretrained="acme/no-such-blip"))
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="'acme/no-such-blip'.*" + str(cache).replace(".", r"\.")):
        create_model(cfg, "blip")
    assert time.monotonic() - start < 10
    cfg = _retrieval_cfg(fixture_config(tmp_path, pretrained=str(hf_retrieval),
                                        vit="{width: 64, depth: 1, heads: 4, patch_size: 16}"))
    with pytest.raises(CheckpointError, match=r"vision_config\.num_hidden_layers is 2.*vit \(depth\) gives 1"):
        create_model(cfg, "blip")
