"""ContextBLIP parts at a tiny size: shapes, the text-guided mask, frozen BLIP, visible-subset
encoding, the TMIM loss, and the three checkpoint kinds the model factory loads into a ContextBLIP."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch


from models.adapter import MultiScaleAdapter, TextAdapter
from models.contextblip import build_contextblip
from models.factory import load_weights
from models.formats import checkpoint_format
from models.tmim import (TMIMDecoder, choose_guide_tokens, embed_visible_per_patch, mean_cross_attention, patchify,
                         random_mask, text_guided_mask, tmim_loss, unpatchify, word_positions)
from tasks.contextblip_pretrain import PretrainConfig
from utils.checkpoint import save_checkpoint_atomic
from utils.config import ConfigError, config_to_dict, load_config

REPO = Path(__file__).resolve().parents[1]

# 32 px with 8 px patches: 16 patches, so mask rates have room; text 32 x 2 with cross-attention.
TINY = ["vit={width: 32, depth: 3, heads: 2, patch_size: 8}", "image_size=32", "embed_dim=16",
        "decoder_depth=2", "decoder_heads=2", "adapter_taps=[1, 3]", "max_tokens=12", "train_file=x.json"]


class _Tok:
    """Just what the model builder needs from a tokenizer."""
    enc_token_id = 99

    def __len__(self):
        return 100


def _med(tmp_path: Path) -> Path:
    med = tmp_path / "med.json"
    med.write_text('{"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,'
                   ' "intermediate_size": 64, "max_position_embeddings": 40, "hidden_dropout_prob": 0.1,'
                   ' "attention_probs_dropout_prob": 0.1}')
    return med


def _cfg(tmp_path, *opts):
    return load_config(None, PretrainConfig, TINY + [f"med_config={_med(tmp_path)}", *opts])[0]


def _model(tmp_path, *opts, with_decoder=True):
    torch.manual_seed(0)
    cfg = _cfg(tmp_path, *opts)
    return build_contextblip(cfg, _Tok(), tmim=cfg if with_decoder else None, settings=cfg)


def _batch(B=4, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 90, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    lengths = [T, T - 2, T - 4, 4][:B]
    for b, n in enumerate(lengths):
        ids[b, 0] = 1           # [CLS]
        ids[b, n - 1] = 2       # [SEP]
        ids[b, n:] = 0
        mask[b, n:] = 0
    return torch.randn(B, 3, 32, 32, generator=g), ids, mask, torch.arange(B)


# --------------------------------------------------------------------------- shapes

def test_every_part_has_the_documented_shapes(tmp_path):
    model = _model(tmp_path)
    px, ids, mask, idx = _batch()
    adapter = MultiScaleAdapter(32, 2, reduction=2)
    assert adapter(torch.zeros(4, 17, 32), [torch.zeros(4, 17, 32)] * 2).shape == (4, 17, 32)
    assert sum(p.numel() for p in MultiScaleAdapter(768, 4, 2).parameters()) == 2_359_296  # the paper's 2.36M
    assert TextAdapter(32, 2)(torch.zeros(4, 9, 32)).shape == (4, 9, 32)
    emb = model.image_embeds(px)
    assert emb.shape == (4, 17, 32)
    assert model.itm_logits(ids, mask, emb).shape == (4, 2)
    assert model.multimodal_cls(ids, mask, emb).shape == (4, 32)
    assert model.match_prob(ids, mask, emb).shape == (4,)
    m = model.compute_mask(px, ids, mask)
    assert m.mask.shape == (4, 16) and m.keep_idx.shape == (4, 12) and m.mask_idx.shape == (4, 4)
    visible = model.image_embeds(px, m.keep_idx)
    assert visible.shape == (4, 13, 32)
    pred = model.decoder(visible, m.keep_idx, torch.zeros(4, 9, 32), mask)
    assert pred.shape == (4, 16, 8 * 8 * 3)
    assert patchify(px, 8).shape == (4, 16, 192) and torch.equal(unpatchify(patchify(px, 8), 8), px)
    losses = model(px, ids, mask, idx)
    assert set(losses) == {"loss_itm", "loss_tmim"} and all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())


def test_decoder_puts_visible_tokens_and_mask_tokens_in_spatial_order():
    dec = TMIMDecoder(width=8, num_patches=6, patch_size=2, text_width=8, depth=1, heads=2)
    visible = torch.arange(4 * 8, dtype=torch.float).view(1, 4, 8)  # CLS + 3 visible
    keep = torch.tensor([[1, 3, 4]])
    seq = dec.assemble(visible, keep)
    assert torch.equal(seq[0, 0], visible[0, 0])
    for j, n in enumerate([1, 3, 4]):
        assert torch.equal(seq[0, 1 + n], visible[0, 1 + j])
    for n in (0, 2, 5):
        assert torch.equal(seq[0, 1 + n], dec.mask_token[0, 0])


# --------------------------------------------------------------------------- the mask

def test_text_guided_mask_picks_exactly_the_most_attended_patches_of_the_guide_token(tmp_path):
    model = _model(tmp_path, "mask_noise=0.0", "mask_rate=0.3")
    px, ids, mask, _ = _batch()
    with torch.no_grad():
        emb = model.image_embeds(px)
        out = model.multimodal(ids, mask, emb, output_cross_attentions=True)
    assert len(out.cross_attentions) == 2 and out.cross_attentions[0].shape == (4, 2, 9, 17)
    g = torch.Generator().manual_seed(3)
    m = text_guided_mask(out.cross_attentions, mask, 0.3, "words", noise=0.0, generator=g)
    # Recompute by hand: mean over layers and heads, drop CLS, the guide's row, top int(0.3 * 16) = 4.
    attn = torch.stack(out.cross_attentions).mean(dim=(0, 2))[:, :, 1:]
    for b in range(4):
        row = attn[b, m.guide[b]]
        expected = set(row.topk(4).indices.tolist())
        assert m.mask[b].sum() == 4 and set(m.mask_idx[b].tolist()) == expected
        assert set(m.keep_idx[b].tolist()) == set(range(16)) - expected
        assert m.keep_idx[b].tolist() == sorted(m.keep_idx[b].tolist())
        # Every masked patch is attended at least as much as every visible one.
        assert row[m.mask[b]].min() >= row[~m.mask[b]].max()


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.5, 0.75, 0.95])
def test_mask_counts_are_int_of_rate_times_patches(rate):
    attn = [torch.rand(3, 2, 7, 1 + 196).softmax(-1)]
    m = text_guided_mask(attn, torch.ones(3, 7, dtype=torch.long), rate, noise=0.02)
    assert (m.mask.sum(1) == int(rate * 196)).all()
    r = random_mask(3, 196, rate, "cpu")
    assert (r.mask.sum(1) == int(rate * 196)).all() and (r.guide == -1).all()
    with pytest.raises(ValueError, match="mask at least one"):
        random_mask(1, 16, 0.05, "cpu")


def test_noise_only_breaks_ties_and_the_mask_is_detached():
    probs = torch.zeros(1, 1, 3, 17)
    probs[..., 1:5] = 1.0   # patches 0-3 tie at the top
    probs[..., 9] = 0.5
    probs.requires_grad_(True)
    for seed in range(5):
        m = text_guided_mask([probs], torch.tensor([[1, 1, 1]]), 4 / 16, noise=0.02,
                             generator=torch.Generator().manual_seed(seed))
        assert m.mask_idx[0].tolist() == [0, 1, 2, 3]
    assert not mean_cross_attention([probs]).requires_grad


def test_guide_token_is_a_real_word_by_default_and_anything_in_released_mode():
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    assert word_positions(mask).tolist() == [[False, True, True, False, False, False], [False] * 6,
                                             [False, True, True, True, True, False]]
    g = torch.Generator().manual_seed(0)
    words = torch.stack([choose_guide_tokens(mask, "words", g) for _ in range(200)])
    assert set(words[:, 0].tolist()) == {1, 2}
    assert set(words[:, 1].tolist()) == {0}  # no word at all: falls back to the first position
    assert set(words[:, 2].tolist()) == {1, 2, 3, 4}
    anyp = torch.stack([choose_guide_tokens(mask, "any", g) for _ in range(400)])
    assert set(anyp[:, 0].tolist()) == set(range(6))  # [ENC], [SEP] and padding included


# --------------------------------------------------------------------------- frozen BLIP, visible subset, loss

def test_blip_gets_no_gradient_and_does_not_change_while_the_adapter_learns(tmp_path):
    model = _model(tmp_path).train()
    assert not model.blip.training and model.adapter.training  # frozen BLIP: no dropout
    before = {k: v.clone() for k, v in model.blip.state_dict().items()}
    parts_before = {k: v.clone() for k, v in model.checkpoint_state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.05)
    for step in range(3):
        px, ids, mask, idx = _batch(seed=step)
        losses = model(px, ids, mask, idx, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        sum(losses.values()).backward()
        assert all(p.grad is None for p in model.blip.parameters())
        assert model.adapter.up.weight.grad.abs().sum() > 0 and model.decoder.head.weight.grad.abs().sum() > 0
        opt.step()
    assert all(torch.equal(v, before[k]) for k, v in model.blip.state_dict().items())
    assert set(parts_before) == {k for k in model.state_dict() if not k.startswith("blip.")}
    assert any(not torch.equal(v, parts_before[k]) for k, v in model.checkpoint_state_dict().items())


def test_visible_subset_encoding_equals_the_vit_on_the_kept_tokens(tmp_path):
    model = _model(tmp_path).eval()
    vit = model.vit
    px = _batch()[0]
    keep = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(b))[:10].sort().values
                        for b in range(4)])
    with torch.no_grad():
        ours = vit.run_blocks(vit.embed_visible(px, keep))[0]
        full = vit.embed(px)  # [B, 17, D]: CLS + every patch with its position embedding
        gathered = torch.cat([full[:, :1], torch.gather(full[:, 1:], 1, keep[..., None].expand(-1, -1, 32))], 1)
        reference = vit.run_blocks(gathered)[0]
        per_patch = vit.run_blocks(embed_visible_per_patch(vit, px, keep))[0]
    assert torch.allclose(ours, reference, atol=1e-5)
    assert torch.allclose(ours, per_patch, atol=1e-5)
    # ... and the adapter is then applied to that pass's own taps.
    plain, adapted = model.vision_tokens(px, keep)
    assert torch.allclose(plain, ours, atol=1e-5) and adapted.shape == ours.shape


def test_tmim_loss_counts_masked_patches_only():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 16, 12, generator=g), torch.randn(2, 16, 12, generator=g)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [1, 5]] = True
    mask[1, [0, 2, 9]] = True
    loss = tmim_loss(pred, target, mask)
    assert torch.allclose(loss, ((pred - target) ** 2).mean(-1)[mask].mean())
    changed = pred.clone()
    changed[~mask] += 100.0  # visible patches: no effect
    assert torch.equal(tmim_loss(changed, target, mask), loss)
    changed[0, 1] += 1.0     # a masked patch: an effect
    assert tmim_loss(changed, target, mask) > loss
    pred.requires_grad_(True)
    tmim_loss(pred, target, mask).backward()
    assert (pred.grad[~mask] == 0).all() and (pred.grad[mask] != 0).any()


def test_options_run(tmp_path):
    px, ids, mask, idx = _batch()
    for opts in (("tmim_condition=unmasked",), ("tmim_norm_pix=true", "mask_strategy=random"), ("guide_token=any",)):
        losses = _model(tmp_path, *opts)(px, ids, mask, idx)
        assert all(torch.isfinite(v) for v in losses.values()), opts


@pytest.mark.parametrize("condition, leaks", [("masked", False), ("unmasked", True)])
def test_only_the_released_text_condition_sees_the_masked_patches(tmp_path, condition, leaks):
    model = _model(tmp_path, f"tmim_condition={condition}", "mask_strategy=random").eval()
    seen = []
    model.decoder.register_forward_hook(lambda mod, inp, out: seen.append((inp[1].clone(), out.detach())))
    px, ids, mask, idx = _batch()
    model(px, ids, mask, idx, generator=torch.Generator().manual_seed(0))
    keep, pred = seen[-1]
    hidden = torch.ones(4, 16, dtype=torch.bool).scatter_(1, keep, False)  # the masked patches
    changed = px.clone()
    for b in range(4):
        for n in hidden[b].nonzero().flatten().tolist():
            r, c = divmod(n, 4)
            changed[b, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8] += 3.0
    model(changed, ids, mask, idx, generator=torch.Generator().manual_seed(0))
    keep2, pred2 = seen[-1]
    assert torch.equal(keep, keep2)
    assert torch.allclose(pred, pred2, atol=1e-5) != leaks


# --------------------------------------------------------------------------- checkpoints

def _blip_only(model):
    return {k[len("blip."):]: v for k, v in model.state_dict().items() if k.startswith("blip.")}


def test_load_weights_reads_pretrain_merged_and_plain_blip_checkpoints(tmp_path):
    trained = _model(tmp_path)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))
    cfg = _cfg(tmp_path)
    base = save_checkpoint_atomic({"model": _blip_only(trained)}, tmp_path / "blip.pth")
    cfg.pretrained = str(base)
    pre = save_checkpoint_atomic({"model": trained.checkpoint_state_dict(), "config": config_to_dict(cfg)},
                                 tmp_path / "pre.pth")
    merged = save_checkpoint_atomic({"model": trained.state_dict()}, tmp_path / "merged.pth")
    assert all(not k.startswith("blip.") for k in torch.load(pre, weights_only=True)["model"])
    px, ids, mask, _ = _batch()
    want = trained.eval().itm_logits(ids, mask, trained.image_embeds(px))
    tagged = save_checkpoint_atomic({"model": trained.state_dict(), "format": "contextblip-merged"},
                                    tmp_path / "tagged.pth")
    # Untagged files (older ones) are recognised by their layout; tagged ones by the tag.
    for path, kind in ((pre, "contextblip-trainable"), (merged, "contextblip-merged"), (tagged, "contextblip-merged")):
        fresh = _model(tmp_path).eval()
        res = load_weights(fresh, path, strict=True)
        assert res.format == kind and res.blip.is_clean and res.parts.is_clean
        assert torch.allclose(fresh.itm_logits(ids, mask, fresh.image_embeds(px)), want, atol=1e-6)
    # A stage without the TMIM decoder reads the merged export; the decoder is an expected extra.
    no_dec = _model(tmp_path, with_decoder=False)
    res = load_weights(no_dec, merged)
    assert res.parts.is_clean and any(k.startswith("decoder.") for k in res.parts.expected_extra)
    # Plain BLIP: with use_adapter false, image_embeds are exactly BLIP's ViT tokens.
    plain = _model(tmp_path, "use_adapter=false").eval()
    res = load_weights(plain, base)
    assert res.format == "blip" and res.parts is None
    with torch.no_grad():
        assert torch.equal(plain.image_embeds(px), trained.blip.visual_encoder(px))
        assert torch.allclose(plain.itm_logits(ids, mask, plain.image_embeds(px)),
                              trained.blip.itm_logits(ids, mask, trained.blip.visual_encoder(px)), atol=1e-6)
    assert checkpoint_format({"adapter.up.weight": torch.zeros(1)}) == "contextblip-trainable"
    with pytest.raises(Exception, match="unknown checkpoint format 'mystery'"):
        checkpoint_format({"model": {"x": torch.zeros(1)}, "format": "mystery"})


def test_pretrain_checkpoint_without_a_base_is_a_clear_error(tmp_path):
    model = _model(tmp_path)
    path = save_checkpoint_atomic({"model": model.checkpoint_state_dict(), "config": {"pretrained": ""}},
                                  tmp_path / "p.pth")
    with pytest.raises(Exception, match="names no 'pretrained' BLIP"):
        load_weights(model, path)
    assert load_weights(model, path, base=None).parts.is_clean


def test_pretrain_config_validation_names_the_key(tmp_path):
    for opt, key in (("mask_rate=0.02", "mask_rate"), ("adapter_taps=[0, 2]", "adapter_taps"),
                     ("itm_neg_temp=0", "itm_neg_temp"), ("mask_strategy=grid", "mask_strategy")):
        with pytest.raises(ConfigError, match=key):
            _cfg(tmp_path, opt)
    # Checked against the ViT when the model is built (a run that scores plain BLIP never uses the taps).
    for opt, key in (("decoder_heads=5", "decoder_heads"), ("adapter_taps=[2, 4]", "adapter_taps")):
        with pytest.raises(ConfigError, match=rf"invalid value for config key '{key}': must"):
            _model(tmp_path, opt)
    _model(tmp_path, "adapter_taps=[2, 4]", "use_adapter=false", with_decoder=False)
    assert load_config(None, PretrainConfig, ["train_file=a.json"])[0].adapter_taps == [3, 6, 9, 12]
