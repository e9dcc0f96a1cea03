"""Model building blocks: the fast rerank path against the original algorithm, text-encoder modes,
gradient checkpointing, and the tokenizer's errors."""
from __future__ import annotations

from pathlib import Path

import json
import time

import pytest
import torch

from models.blip import build_blip_retrieval
from models.med import MedConfig, MedEncoder
from models.tokenizer import build_tokenizer
from models.vit import ViTSettings, build_vit
from tasks.retrieval import RetrievalConfig
from tasks.retrieval_eval import reference_rerank, rerank_itm, scores_from_itm, topk_pairs

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "blip_official_tiny"
REPO = Path(__file__).resolve().parents[1]


def tiny_model(tmp_path, width=32, depth=2):
    med = tmp_path / "med.json"
    med.write_text(json.dumps({"vocab_size": None, "hidden_size": width, "num_hidden_layers": depth,
                               "num_attention_heads": 4, "intermediate_size": 4 * width,
                               "max_position_embeddings": 40, "encoder_width": width}))
    tok = build_tokenizer(str(FIXTURE / "tokenizer"))
    cfg = RetrievalConfig(vit={"width": width, "depth": depth, "heads": 4, "patch_size": 8}, image_size=32,
                          med_config=str(med), embed_dim=16, queue_size=32)
    torch.manual_seed(0)
    return build_blip_retrieval(cfg, tok, itc=cfg).eval(), tok


def random_texts(n, vocab, generator):
    """Token ids ``[n, 35]`` of random lengths 4..20 with [CLS]/[SEP] and padding, like captions."""
    ids = torch.zeros(n, 35, dtype=torch.long)
    mask = torch.zeros(n, 35, dtype=torch.long)
    for i, length in enumerate(torch.randint(4, 21, (n,), generator=generator).tolist()):
        ids[i, 0], ids[i, length - 1] = 5, 6
        ids[i, 1:length - 1] = torch.randint(8, vocab, (length - 2,), generator=generator)
        mask[i, :length] = 1
    return ids, mask


def test_fast_rerank_equals_the_original_per_query_algorithm(tmp_path):
    model, tok = tiny_model(tmp_path)
    g = torch.Generator().manual_seed(1)
    ids, mask = random_texts(40, 48, g)
    with torch.no_grad():
        tokens, image_feat = model.encode_image(torch.randn(13, 3, 32, 32, generator=g))
        _, text_feat = model.encode_text(ids, mask)
    sims = image_feat @ text_feat.t()
    k = 5
    ref_i2t, ref_t2i = reference_rerank(model, tokens, ids, mask, sims, k)
    top_i2t, top_t2i = topk_pairs(sims, k)
    needed = torch.zeros_like(sims, dtype=torch.bool)
    needed.scatter_(1, top_i2t, True)
    needed.t().scatter_(1, top_t2i, True)
    # Small chunks and batches so chunk boundaries, mixed images per batch and trimming all occur.
    itm = rerank_itm(model, tokens, 0, needed, ids, mask, torch.device("cpu"), batch_size=7, image_chunk=4)
    fast_i2t, fast_t2i = scores_from_itm(sims, itm, top_i2t, top_t2i)
    assert (fast_i2t - ref_i2t).abs().max() < 1e-4
    assert (fast_t2i - ref_t2i).abs().max() < 1e-4
    assert (fast_i2t == -100).sum() == 13 * (40 - k)


def test_text_encoder_modes():
    cfg = MedConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=32, max_position_embeddings=12, encoder_width=8)
    enc = MedEncoder(cfg).eval()
    ids = torch.randint(1, 30, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    image = torch.randn(3, 5, 8)
    with torch.no_grad():
        full = enc(ids, mask, mode="multimodal", encoder_hidden_states=image).last_hidden_state
        first = enc(ids, mask, mode="multimodal", encoder_hidden_states=image, first_token_only=True).last_hidden_state
        text = enc(ids, mask, mode="text").last_hidden_state
        changed = ids.clone()
        changed[:, 7:] = (changed[:, 7:] % 29) + 1
        dec_a = enc(ids, mask, mode="decoder", encoder_hidden_states=image).last_hidden_state
        dec_b = enc(changed, mask, mode="decoder", encoder_hidden_states=image).last_hidden_state
        out = enc(ids, mask, mode="multimodal", encoder_hidden_states=image, output_cross_attentions=True)
    assert first.shape == (3, 1, 16) and torch.allclose(first[:, 0], full[:, 0], atol=1e-6)
    assert not torch.allclose(text, full)  # cross-attention matters in multimodal mode
    assert torch.allclose(dec_a[:, :7], dec_b[:, :7], atol=1e-6)  # causal: later tokens cannot leak back
    assert not torch.allclose(dec_a[:, 7:], dec_b[:, 7:])
    assert len(out.cross_attentions) == 2 and out.cross_attentions[0].shape == (3, 2, 10, 5)
    assert torch.allclose(out.cross_attentions[0].sum(-1), torch.ones(3, 2, 10), atol=1e-5)
    with pytest.raises(ValueError, match="needs encoder_hidden_states"):
        enc(ids, mask, mode="multimodal")


def test_vit_gradient_checkpointing_changes_nothing_but_memory():
    torch.manual_seed(0)
    vit = {"width": 32, "depth": 3, "heads": 4, "patch_size": 8}
    plain = build_vit(ViTSettings(vit=vit, image_size=32))
    ckpt = build_vit(ViTSettings(vit=vit, image_size=32, vit_grad_ckpt=True, vit_ckpt_layer=2))
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    plain.train(), ckpt.train()
    plain(x).square().sum().backward()
    ckpt(x).square().sum().backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), n
    with pytest.raises(ValueError, match=r"vit_ckpt_layer: must be in \[0, 12\]"):
        ViTSettings(vit="base", image_size=224, vit_grad_ckpt=True, vit_ckpt_layer=13)
    # Unused (evaluation: no gradient checkpointing), the same value is no error.
    assert ViTSettings.model_validate({"vit": "base", "image_size": 224, "vit_grad_ckpt": True, "vit_ckpt_layer": 13},
                                      context={"unused": {"vit_grad_ckpt"}}).vit_ckpt_layer == 13


def test_visible_patch_encoding_equals_vit_on_kept_tokens():
    torch.manual_seed(0)
    vit = build_vit(ViTSettings(vit={"width": 32, "depth": 2, "heads": 4, "patch_size": 8}, image_size=32)).eval()
    x = torch.randn(2, 3, 32, 32)
    keep = torch.tensor([[0, 3, 5, 9], [15, 2, 7, 8]])
    with torch.no_grad():
        tokens = vit.embed(x)  # [B, 17, D] with CLS first
        kept = torch.cat([tokens[:, :1], torch.gather(tokens[:, 1:], 1, keep[..., None].expand(-1, -1, 32))], 1)
        expected = vit.run_blocks(kept)[0]
        got = vit(x, keep_idx=keep)
    assert got.shape == (2, 5, 32) and torch.allclose(got, expected, atol=1e-6)


@pytest.mark.timing  # asserts a wall-time bound: run alone, not beside another worker
def test_tokenizer_errors_are_clear_and_fast(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        build_tokenizer(str(tmp_path / "missing" / "tok"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        build_tokenizer(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    start = time.time()
    with pytest.raises(OSError, match="huggingface-cli download bert-base-uncased"):
        build_tokenizer("bert-base-uncased")
    assert time.time() - start < 30


@pytest.mark.timing  # asserts a wall-time bound: run alone, not beside another worker
def test_tokenizer_unreachable_hub_fails_fast_with_a_clear_message(tmp_path, free_port):
    """No cache and a hub that refuses connections: a clear OSError within seconds, not a hang."""
    import subprocess
    import sys
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
           "PATH": "/usr/bin:/bin", "HF_HUB_DISABLE_TELEMETRY": "1"}
    code = ("from models.tokenizer import build_tokenizer\n"
            "try:\n    build_tokenizer('bert-base-uncased')\nexcept OSError as e:\n    print('ERR', e)\n")
    start = time.time()
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert "ERR could not load tokenizer 'bert-base-uncased'" in out.stdout, out.stderr[-2000:]
    assert "set the config key 'tokenizer'" in out.stdout
    assert time.time() - start < 60


def test_shared_image_cross_kv_equals_per_row_image_tokens(tmp_path):
    """One image's projected K/V (batch 1) attended by many texts at once (the folded attention)
    equals giving every row its own copy of the image tokens, in every text-encoder layer."""
    model, tok = tiny_model(tmp_path)
    g = torch.Generator().manual_seed(1)
    ids, mask = random_texts(7, len(tok), g)
    image_tokens = torch.randn(1, 17, 32, generator=g)
    with torch.no_grad():
        kv = model.text_encoder.project_cross_kv(image_tokens)
        folded = model.text_encoder(ids, mask, mode="multimodal", cross_kv=kv).last_hidden_state
        copied = model.text_encoder(ids, mask, mode="multimodal",
                                    encoder_hidden_states=image_tokens.expand(7, -1, -1)).last_hidden_state
        assert torch.allclose(folded, copied, atol=1e-5)
        itm_folded = model.itm_logits(ids, mask, cross_kv=kv)
        itm_copied = model.itm_logits(ids, mask, image_tokens=image_tokens.expand(7, -1, -1).contiguous())
    assert torch.allclose(itm_folded, itm_copied, atol=1e-5)
