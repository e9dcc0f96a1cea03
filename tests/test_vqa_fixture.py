"""BLIP VQA: the official VQA fixture (a model trained and saved by the release's BLIP_VQA, with what
that code computes) reproduced: question states, per-answer and total training loss, rank at both k,
generate (batched, padding unmasked as the release; one by one), through our data reader and
collate, and through train_vqa.py --evaluate as a user runs it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from data.transforms import build_test_transform
from data.vqa import VQACollator, VQADataset, answer_weights, pre_question, tokenize_questions

FIX = Path(__file__).resolve().parent / "fixtures" / "blip_vqa_tiny"
TINY_VIT = "{width: 64, depth: 2, heads: 4, patch_size: 16}"


@pytest.fixture(scope="module")
def ref():
    return torch.load(FIX / "reference.pt", weights_only=True)


@pytest.fixture(scope="module")
def vqa():
    from models.factory import load_weights
    from models.tokenizer import build_tokenizer
    from models.vqa import VQAArch, build_vqa
    tok = build_tokenizer(str(FIX / "tokenizer"))
    arch = VQAArch(vit={"width": 64, "depth": 2, "heads": 4, "patch_size": 16}, image_size=64,
                   med_config=str(FIX / "med_config.json"))
    model = build_vqa(arch, tok).eval()
    result = load_weights(model, str(FIX / "checkpoint.pth"), strict=True)
    assert result.format == "blip-vqa" and result.blip.is_clean and result.blip.num_loaded == 151
    return model


@pytest.fixture(scope="module")
def states(vqa, ref):
    ids, mask = tokenize_questions(vqa.tokenizer, ref["questions"])
    with torch.no_grad():
        return vqa.encode_questions(ref["pixel_values"], ids, mask), mask


def test_questions_tokens_and_states_match(vqa, ref, states):
    entries = json.loads((FIX / "vqa_test.json").read_text())
    assert [pre_question(e["question"]) for e in entries] == ref["questions"]
    transform = build_test_transform(64)
    pixels = torch.stack([transform(Image.open(FIX / e["image"]).convert("RGB")) for e in entries])
    assert (pixels - ref["pixel_values"]).abs().max() < 1e-5
    ids, mask = tokenize_questions(vqa.tokenizer, ref["questions"])
    assert torch.equal(mask, ref["attention_mask"]) and torch.equal(ids[:, 1:], ref["input_ids"][:, 1:])
    assert (vqa.enc_token_id, vqa.bos_token_id, vqa.eos_token_id) == (70, 69, 6) == (
        ref["enc_token_id"], ref["bos_token_id"], ref["sep_token_id"])
    assert (states[0] - ref["question_states"]).abs().max().item() <= 1e-5


def test_training_path_through_our_reader_matches(vqa, ref):
    """vqa_train.json -> our dataset and collate -> the same answers, weights, ids and losses."""
    ds = VQADataset([FIX / "vqa_train.json"], {"vqa": str(FIX), "vg": None}, build_test_transform(64), train=True)
    batch = VQACollator(vqa.tokenizer)([ds[i] for i in ref["train_indices"]])
    assert [ds.entries[i].question for i in ref["train_indices"]] == ref["train_questions"]
    assert (batch["pixel_values"] - ref["train_pixel_values"]).abs().max() < 1e-5
    assert batch["n"].tolist() == ref["train_n"]
    assert torch.equal(batch["weights"], ref["train_weights"])
    assert torch.equal(batch["attention_mask"], ref["train_attention_mask"])
    assert torch.equal(batch["answer_attention_mask"], ref["train_answer_attention_mask"])
    assert torch.equal(batch["answer_input_ids"][:, 1:], ref["train_answer_input_ids"][:, 1:])
    with torch.no_grad():
        st = vqa.encode_questions(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        index = torch.arange(8).repeat_interleave(batch["n"])
        losses = vqa.answer_losses(st, batch["attention_mask"], batch["answer_input_ids"],
                                   batch["answer_attention_mask"], index)
        loss = vqa(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["answer_input_ids"],
                   batch["answer_attention_mask"], batch["n"], batch["weights"])["loss_vqa"]
    assert (losses - ref["train_answer_losses"]).abs().max().item() <= 1e-5
    assert abs(loss.item() - ref["train_loss"].item()) <= 1e-5


def test_answer_weights_are_blips():
    answers, weights = answer_weights(["two", "2", "two", "two", "two"])
    assert answers == ["two", "2"] and weights == [1 / 5 + 1 / 5 + 1 / 5 + 1 / 5, 1 / 5]


@pytest.mark.parametrize("k", [4, 35])
def test_rank_matches_at_both_k(vqa, ref, states, k):
    from models.vqa import tokenize_candidates
    ids, mask = tokenize_candidates(vqa.tokenizer, ref["answer_list"])
    assert torch.equal(ids, ref["answer_input_ids"]) and torch.equal(mask, ref["answer_attention_mask"])
    with torch.no_grad():
        st, qmask = states
        first = vqa._decode(ids[:1, :1].expand(8, 1), None, vqa.text_decoder.bert.project_cross_kv(st), None, qmask)
        out = vqa.rank(st, qmask, ids, mask, k)
    assert (first[:, 0] - ref["first_token_logits"]).abs().max().item() <= 1e-4
    assert torch.equal(out.answer_ids, ref[f"rank_k{k}_max_ids"])
    assert torch.equal(out.topk_ids, ref[f"rank_k{k}_topk_ids"])
    assert (out.scores - ref[f"rank_k{k}_scores"]).abs().max().item() <= 1e-4
    assert [ref["answer_list"][i] for i in out.answer_ids] == ref[f"rank_k{k}_answers"]


def test_generate_matches_batched_and_one_by_one(vqa, ref, states):
    from models.vqa import VQASettings
    settings = VQASettings().answer_generation()
    st, mask = states
    with torch.no_grad():
        for use_cache in (True, False):
            ids = vqa.generate_ids(st, mask, settings, use_cache=use_cache)
            assert torch.equal(ids, ref["generate_ids"]), use_cache
        assert vqa.decode(ids) == ref["generate_answers"]
        single = []
        for i, q in enumerate(ref["questions"]):
            qi, qm = tokenize_questions(vqa.tokenizer, [q])
            s = vqa.encode_questions(ref["pixel_values"][i:i + 1], qi, qm)
            single.append(vqa.generate_ids(s, qm, settings)[0].tolist())
        assert single == ref["generate_single_ids"]
        # The masked variant (an option): the batch's padding no longer matters, so the batched
        # answers are the one-by-one answers (here question 3 differs from the release's batch).
        masked = vqa.decode(vqa.generate_ids(st, mask, settings, mask_question_padding=True))
    assert masked == ref["generate_single_answers"] != ref["generate_answers"]


def _evaluate(tmp_path, *opts):
    import train_vqa
    out = tmp_path / "out"
    train_vqa.main(["--config", "configs/vqa.yaml", "--evaluate", "--output_dir", str(out), "--no_progress",
                    "--opts", f"ann_root={FIX}", f"vqa_root={FIX}", f"pretrained={FIX / 'checkpoint.pth'}",
                    f"vit={TINY_VIT}", "image_size=64", f"med_config={FIX / 'med_config.json'}",
                    f"tokenizer={FIX / 'tokenizer'}", "num_workers=0", "device=cpu", *opts])
    return json.loads((out / "vqa_result.json").read_text())


@pytest.mark.parametrize("inference,k,key", [("rank", 4, "rank_k4_answers"), ("rank", 35, "rank_k35_answers"),
                                             ("generate", 4, "generate_answers")])
def test_train_vqa_evaluate_as_a_user_runs_it(tmp_path, monkeypatch, ref, inference, k, key):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    results = _evaluate(tmp_path, f"inference={inference}", f"k_test={k}")
    assert [r["question_id"] for r in results] == ref["question_ids"]
    assert [r["answer"] for r in results] == ref[key]


def test_load_blip_answers_as_the_release(ref):
    from models.inference import CheckpointKindError, load_blip
    blip = load_blip(FIX / "checkpoint.pth", device="cpu", vit={"width": 64, "depth": 2, "heads": 4, "patch_size": 16},
                     med_config=str(FIX / "med_config.json"), tokenizer=str(FIX / "tokenizer"))
    assert blip.kind == "vqa" and blip.image_size == 64
    entries = json.loads((FIX / "vqa_test.json").read_text())
    images = [FIX / e["image"] for e in entries]
    questions = [e["question"] for e in entries]  # raw: load_blip applies pre_question
    assert blip.answer(images, questions, batch_size=8) == ref["generate_answers"]
    assert blip.answer(images, questions, batch_size=1) == ref["generate_single_answers"]
    assert blip.answer(images, questions, inference="rank", answer_list=ref["answer_list"], k_test=4) == \
        ref["rank_k4_answers"]
    assert blip.answer(ref["pixel_values"][:1], questions[:2], inference="rank", answer_list=ref["answer_list"]) \
        == ["three", blip.answer(ref["pixel_values"][:1], questions[1:2], inference="rank",
                                 answer_list=ref["answer_list"])[0]]
    with pytest.raises(CheckpointKindError, match="VQA checkpoint"):
        blip.caption(images[:1])
    with pytest.raises(ValueError, match="answer_list"):
        blip.answer(images[:1], questions[:1], inference="rank")
