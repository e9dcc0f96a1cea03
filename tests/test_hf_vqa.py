"""BLIP VQA <-> transformers' BlipForQuestionAnswering (models/hf_vqa.py, tools/convert.py): a tiny
VQA model of ViT width == text hidden size (the only ones HF can hold) in the official layout,
converted to an HF folder, loads into BlipForQuestionAnswering with no missing or unexpected key and
gives our question states, first-token logits and beam-search answers; the way back is bit-identical;
an HF-made folder converts to the official layout and answers as the HF model does; a model of other
widths (the blip_vqa_tiny fixture: ViT 64, text 32) is refused in one line before anything is written."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.test_hf import _assert_identical, _official  # the same bit-identity checks

FIX = Path(__file__).resolve().parent / "fixtures" / "blip_vqa_tiny"
TINY_VIT = "{width: 32, depth: 2, heads: 2, patch_size: 16}"
ENC_ID, DEC_ID, SEP_ID = 70, 69, 6
BEAM = dict(num_beams=3, max_length=10, min_length=1)  # BLIP's VQA generate settings


def _convert(*args):
    from tools.convert import main
    return main([str(a) for a in args])


def _config(tmp: Path, pretrained, med_config, vit=TINY_VIT, **overrides) -> Path:
    cfg = {"pretrained": str(pretrained), "vit": vit, "image_size": 64, "med_config": str(med_config),
           "tokenizer": str(FIX / "tokenizer"), "strict_load": "true", "device": "cpu", "num_workers": 0}
    cfg.update(overrides)
    path = tmp / "vqa.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in cfg.items()))
    return path


@pytest.fixture(scope="module")
def ref():
    return torch.load(FIX / "reference.pt", weights_only=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A VQA model of ViT width 32 == text hidden 32 (2 layers, 2 heads, intermediate 64, the
    fixture's vocabulary), random weights (seed 2; the LM head's [SEP] bias +1 so that answers end
    at several lengths), saved as BLIP's release does: ``{'model': state_dict, 'epoch', 'config'}``."""
    from models.tokenizer import build_tokenizer
    from models.vqa import VQAArch, build_vqa
    tmp = tmp_path_factory.mktemp("vqa_tiny")
    med = json.loads((FIX / "med_config.json").read_text())
    med.update(hidden_size=32, encoder_width=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               vocab_size=None)
    (tmp / "med_config.json").write_text(json.dumps(med))
    tok = build_tokenizer(str(FIX / "tokenizer"))
    arch = VQAArch(vit={"width": 32, "depth": 2, "heads": 2, "patch_size": 16}, image_size=64,
                   med_config=str(tmp / "med_config.json"))
    torch.manual_seed(2)
    model = build_vqa(arch, tok).eval()
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[SEP_ID] += 1.0
    state = model.state_dict()
    # Our modules register in the release's order: the file is laid out key for key as an official one.
    assert list(state) == list(_official(FIX / "checkpoint.pth")["model"])
    torch.save({"model": state, "epoch": 3, "config": {"vit": "tiny", "k_test": 128}}, tmp / "checkpoint.pth")
    return {"dir": tmp, "model": model, "tokenizer": tok, "arch": arch, "ckpt": tmp / "checkpoint.pth",
            "med_config": tmp / "med_config.json"}


@pytest.fixture(scope="module")
def hf_vqa(tiny) -> Path:
    """The tiny model as a BlipForQuestionAnswering folder (tools convert --to hf, the task from the
    checkpoint's layout: the config validates as retrieval, caption and VQA config alike)."""
    tmp = tiny["dir"]
    return _convert("--to", "hf", "--config", _config(tmp, tiny["ckpt"], tiny["med_config"]), "--output_dir",
                    tmp / "hf")


def _strip(ids: torch.Tensor):
    """Each answer up to its first [SEP] (kept), without what pads it: ours pads with [PAD] (0),
    HF's beam search with [SEP] (it takes a pad id of 0 for none and fills with the eos id)."""
    rows = []
    for row in ids.tolist():
        row = row[:row.index(SEP_ID) + 1] if SEP_ID in row else row
        rows.append([t for t in row if t != 0])
    return rows


# ----------------------------------------------------------------------------- official -> HF

def test_vqa_folder_loads_in_transformers_and_gives_our_states_logits_and_answers(tiny, hf_vqa, ref):
    from transformers import AutoProcessor, BlipForQuestionAnswering
    from data.vqa import tokenize_questions
    from models.generation import GenerationSettings
    hf, info = BlipForQuestionAnswering.from_pretrained(hf_vqa, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    c = hf.config
    assert c.architectures == ["BlipForQuestionAnswering"]
    assert (c.vision_config.hidden_size, c.vision_config.num_hidden_layers, c.vision_config.num_attention_heads,
            c.vision_config.intermediate_size, c.vision_config.image_size, c.vision_config.layer_norm_eps) == (
        32, 2, 2, 128, 64, 1e-6)
    t = c.text_config
    assert (t.vocab_size, t.hidden_size, t.encoder_hidden_size, t.num_hidden_layers, t.intermediate_size,
            t.bos_token_id, t.sep_token_id, t.pad_token_id, t.label_smoothing) == (71, 32, 32, 2, 64, DEC_ID, SEP_ID,
                                                                                   0, 0.1)
    hf.eval()
    ours, tok = tiny["model"], tiny["tokenizer"]

    # The folder's processor puts [ENC] first: the question input BLIP's encoder reads.
    processor = AutoProcessor.from_pretrained(hf_vqa)
    questions, pixels = ref["questions"], ref["pixel_values"]
    inputs = processor(text=questions, padding="longest", return_tensors="pt")
    ids, mask = tokenize_questions(tok, questions)
    assert (mask == 0).any()  # questions of several lengths: the batch is padded
    assert (inputs.input_ids[:, 0] == ENC_ID).all() and torch.equal(inputs.input_ids[:, 1:], ids[:, 1:])
    assert torch.equal(inputs.attention_mask, mask)
    assert processor.tokenizer.batch_decode(inputs.input_ids, skip_special_tokens=True) == questions
    assert set(processor.tokenizer.all_special_ids) == set(tok.all_special_ids) and len(processor.tokenizer) == 71
    assert processor.image_processor.size == {"height": 64, "width": 64}
    q_ids = inputs.input_ids

    with torch.no_grad():
        states = ours.encode_questions(pixels, ids, mask)
        image = hf.vision_model(pixel_values=pixels).last_hidden_state
        hf_states = hf.text_encoder(input_ids=q_ids, attention_mask=mask, encoder_hidden_states=image).last_hidden_state
        # (a) the answer decoder's first step from [DEC] over the question states.
        bos = torch.full((len(questions), 1), DEC_ID)

        def first(states_, question_mask):
            out = ours.text_decoder.bert(bos, None, mode="decoder", encoder_hidden_states=states_,
                                         encoder_attention_mask=question_mask)
            return ours.text_decoder.cls.predictions(out.last_hidden_state)[:, 0]

        ours_masked, ours_open = first(states, mask), first(states, None)
        hf_open = hf.text_decoder(input_ids=bos, encoder_hidden_states=hf_states,
                                  encoder_attention_mask=torch.ones_like(mask)).logits[:, 0]
        hf_masked = hf.text_decoder(input_ids=bos, encoder_hidden_states=hf_states,
                                    encoder_attention_mask=mask).logits[:, 0]
        full = mask.all(1)  # questions of the longest length: masked and unmasked coincide
        # (b) beam search, HF's generate from the processor's inputs vs ours (both variants).
        hf_ids = hf.generate(input_ids=q_ids, pixel_values=pixels, attention_mask=mask, **BEAM)
        settings = GenerationSettings(**BEAM)
        open_ids = ours.generate_ids(states, mask, settings, mask_question_padding=False)
        masked_ids = ours.generate_ids(states, mask, settings, mask_question_padding=True)
    state_diff = (states - hf_states).abs().max().item()
    open_diff = (ours_open - hf_open).abs().max().item()
    full_diff = (ours_masked[full] - hf_masked[full]).abs().max().item()
    # transformers 5.x drops the cross-attention mask (BlipTextAttention does not pass it on), so its
    # masked call is our unmasked one; were it honoured, it would be our masked one.
    honoured = (ours_masked - hf_masked).abs().max().item() <= 1e-4
    print(f"\nBlipForQuestionAnswering vs ours: question states max |diff| {state_diff:.3g}, first-token logits "
          f"(all-ones mask) {open_diff:.3g}, (question mask, unpadded rows) {full_diff:.3g}; HF honours the "
          f"decoder's question mask: {honoured}")
    assert state_diff <= 1e-5 and open_diff <= 1e-4 and full_diff <= 1e-4 and full.any()
    assert honoured or (ours_open - hf_masked).abs().max().item() <= 1e-4

    # HF's generate gives the decoder an all-ones question mask, as the release: our default variant.
    assert _strip(hf_ids) == _strip(open_ids)
    assert _strip(hf_ids) != _strip(masked_ids)  # on this padded batch the masked variant answers otherwise
    assert all(row[0] == DEC_ID for row in _strip(hf_ids))
    assert {len(r) for r in _strip(hf_ids)} != {BEAM["max_length"]}  # some answers end with [SEP]
    texts = processor.tokenizer.batch_decode(hf_ids, skip_special_tokens=True)
    assert [t.strip() for t in texts] == ours.decode(open_ids)
    # On questions of one length the two variants coincide, and HF agrees with both.
    same = [q for q, m in zip(questions, mask) if m.all()]
    assert len(same) >= 2
    idx = [questions.index(q) for q in same]
    one = processor.tokenizer(same, padding="longest", return_tensors="pt")
    assert one.attention_mask.all()
    with torch.no_grad():
        hf_one = hf.generate(input_ids=one.input_ids, pixel_values=pixels[idx], attention_mask=one.attention_mask,
                             **BEAM)
        st = ours.encode_questions(pixels[idx], one.input_ids, one.attention_mask)
        for masked in (False, True):
            assert _strip(ours.generate_ids(st, one.attention_mask, settings, mask_question_padding=masked)) == \
                _strip(hf_one)


# ----------------------------------------------------------------------------- HF -> official

def test_round_trip_official_hf_official_is_bit_identical(tiny, hf_vqa, tmp_path):
    from models.hf_extras import EXTRAS_FILE, read_extras
    original = _official(tiny["ckpt"])
    back = _convert("--to", "blip", "--input", hf_vqa, "--output", tmp_path / "back.pth")
    _assert_identical(original, _official(back))
    # Every tensor comes back from the HF weights alone (position_ids rebuilt, the LM head retied);
    # the extras file only keeps the key order and the top-level entries.
    extras, meta = read_extras(hf_vqa)
    assert extras == {} and meta["layout"] == "vqa" and meta["entries"]["epoch"] == 3
    bare = tmp_path / "bare"
    shutil.copytree(hf_vqa, bare, ignore=shutil.ignore_patterns(EXTRAS_FILE))
    _assert_identical({"model": original["model"]},
                      _official(_convert("--to", "blip", "--input", bare, "--output", tmp_path / "bare.pth")))


def test_pretrained_may_name_a_vqa_folder(tiny, hf_vqa, tmp_path):
    from models.factory import create_model, read_source
    from models.formats import checkpoint_format
    from tasks.vqa import VQAConfig
    from utils.config import load_config
    assert checkpoint_format(read_source(hf_vqa)) == "blip-vqa"
    cfg = load_config(_config(tmp_path, hf_vqa, tiny["med_config"]), VQAConfig)[0]
    model, _ = create_model(cfg, "vqa", purpose="eval")
    state, original = model.state_dict(), tiny["model"].state_dict()
    assert list(state) == list(original) and all(torch.equal(state[k], v) for k, v in original.items())
    # A config of other dimensions is told which field differs, before anything is built.
    from utils.errors import CheckpointError
    cfg = load_config(_config(tmp_path, hf_vqa, tiny["med_config"], vit="{width: 32, depth: 1, heads: 2, "
                              "patch_size: 16}"), VQAConfig)[0]
    with pytest.raises(CheckpointError, match=r"vision_config\.num_hidden_layers is 2.*vit \(depth\) gives 1"):
        create_model(cfg, "vqa", purpose="eval")


def _hf_made(folder: Path, vision_width: int = 32) -> Path:
    """A BlipForQuestionAnswering made by transformers (random, save_pretrained; no extras)."""
    from transformers import BlipConfig, BlipForQuestionAnswering
    config = BlipConfig(
        text_config=dict(vocab_size=71, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=DEC_ID, sep_token_id=SEP_ID,
                         eos_token_id=SEP_ID, pad_token_id=0),
        vision_config=dict(hidden_size=vision_width, intermediate_size=4 * vision_width, num_hidden_layers=2,
                           num_attention_heads=2, image_size=64, patch_size=16, layer_norm_eps=1e-6),
        architectures=["BlipForQuestionAnswering"])
    torch.manual_seed(1)
    model = BlipForQuestionAnswering(config)
    with torch.no_grad():  # HF initialises these at std 1e-10: give them some weight
        model.vision_model.embeddings.position_embedding.normal_(0, 0.5)
        model.vision_model.embeddings.class_embedding.normal_(0, 0.5)
    model.save_pretrained(folder)
    return folder


def test_an_hf_made_folder_converts_back_and_answers_as_the_hf_model(tiny, tmp_path, ref):
    from transformers import BlipForQuestionAnswering
    from data.vqa import tokenize_questions
    from models.factory import load_weights
    from models.generation import GenerationSettings
    from models.vqa import build_vqa
    folder = _hf_made(tmp_path / "hf-made")
    back = _official(_convert("--to", "blip", "--input", folder, "--output", tmp_path / "b.pth"))
    official = _official(tiny["ckpt"])["model"]
    assert list(back) == ["model"] and list(back["model"]) == list(official)  # the official layout, in order
    assert all(back["model"][k].shape == v.shape and back["model"][k].dtype == v.dtype for k, v in official.items())
    ours = build_vqa(tiny["arch"], tiny["tokenizer"]).eval()
    result = load_weights(ours, back, strict=True, purpose="eval")
    assert result.format == "blip-vqa" and result.blip.is_clean
    hf = BlipForQuestionAnswering.from_pretrained(folder).eval()
    ids, mask = tokenize_questions(tiny["tokenizer"], ref["questions"])
    enc = ids.clone()
    enc[:, 0] = ENC_ID
    with torch.no_grad():
        expected = hf.generate(input_ids=enc, pixel_values=ref["pixel_values"], attention_mask=mask, **BEAM)
        states = ours.encode_questions(ref["pixel_values"], ids, mask)
        got = ours.generate_ids(states, mask, GenerationSettings(**BEAM))
    assert _strip(got) == _strip(expected)


# ----------------------------------------------------------------------------- what HF cannot hold

def test_a_vqa_model_of_other_widths_is_refused_in_one_line_before_anything_is_written(tmp_path):
    from utils.errors import CheckpointError
    cfg = _config(tmp_path, FIX / "checkpoint.pth", FIX / "med_config.json",
                  vit="{width: 64, depth: 2, heads: 4, patch_size: 16}")
    out = tmp_path / "hf"
    with pytest.raises(CheckpointError) as err:
        _convert("--to", "hf", "--config", cfg, "--output_dir", out, "--task", "vqa")
    message = str(err.value)
    print("\n" + message)
    assert "\n" not in message
    assert "BlipForQuestionAnswering cannot represent this VQA model" in message
    assert "its ViT width is 64 but its text hidden size is 32" in message
    assert "text_config.encoder_hidden_size = the ViT width (64)" in message
    assert "question states (width 32)" in message
    assert not out.exists() and not list(tmp_path.glob(".hf.*"))
    # The same by the checkpoint's layout (no --task), and an HF folder of such widths on the way back.
    with pytest.raises(CheckpointError, match="ViT width is 64 but its text hidden size is 32"):
        _convert("--to", "hf", "--config", cfg, "--output_dir", out)
    folder = _hf_made(tmp_path / "wide", vision_width=64)
    with pytest.raises(CheckpointError, match="has no BLIP VQA form: its ViT width is 64 but its text hidden size "
                                              "is 32"):
        _convert("--to", "blip", "--input", folder, "--output", tmp_path / "w.pth")
    assert not (tmp_path / "w.pth").exists()


def test_a_vqa_checkpoint_with_a_retrieval_task_is_told_to_use_a_vqa_config(tiny, tmp_path):
    from utils.errors import CheckpointError
    cfg = _config(tmp_path, tiny["ckpt"], tiny["med_config"])
    with pytest.raises(CheckpointError, match=r"is a BLIP VQA checkpoint.*--task vqa"):
        _convert("--to", "hf", "--config", cfg, "--output_dir", tmp_path / "hf", "--task", "retrieval")
