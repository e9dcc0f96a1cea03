"""Mapping a loaded state dict onto a model (utils/state_dict.py): finding the state dict in a
checkpoint, pos-embed resizing, load reports."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from utils.errors import CheckpointError, CheckpointMismatchError
from utils.state_dict import extract_state_dict, interpolate_pos_embed, load_state_dict_with_report


def _tiny_sd() -> dict[str, torch.Tensor]:
    return {"fc.weight": torch.randn(3, 2), "fc.bias": torch.randn(3)}


# --------------------------------------------------------------------------- finding the state dict

def test_ddp_module_prefix_is_stripped():
    sd = {f"module.{k}": v for k, v in _tiny_sd().items()}
    assert sorted(extract_state_dict({"model": sd})) == ["fc.bias", "fc.weight"]
    # Only a prefix on every key is DDP's; a submodule named `module` keeps its name.
    mixed = {"module.w": torch.zeros(1), "head.w": torch.zeros(1)}
    assert sorted(extract_state_dict(mixed)) == ["head.w", "module.w"]


def test_unrecognised_layout_lists_top_level_keys():
    with pytest.raises(CheckpointError, match=r"top-level keys: \['epoch', 'weights'\]"):
        extract_state_dict({"weights": [1, 2], "epoch": 1})


# --------------------------------------------------------------------------- position embeddings

def test_interpolate_pos_embed_identity_and_resize(caplog):
    dim = 8
    pos = torch.randn(1, 1 + 16, dim)
    assert interpolate_pos_embed(pos, num_patches=16) is pos

    with caplog.at_level(logging.INFO, logger="utils.state_dict"):
        out = interpolate_pos_embed(pos, num_patches=36)
    assert out.shape == (1, 1 + 36, dim)
    assert torch.equal(out[:, 0], pos[:, 0])
    assert "from 16 to 36" in caplog.text

    # Independent route: rows -> [D, 4, 4] by transposing, resize, then back to rows.
    grid = pos[0, 1:].t().reshape(dim, 4, 4).unsqueeze(0)
    resized = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    expected = resized[0].reshape(dim, 36).t()
    torch.testing.assert_close(out[0, 1:], expected)


def _blip_interpolate_pos_embed(pos_embed, new_size):
    """BLIP's own formula (models/vit.py interpolate_pos_embed in salesforce/BLIP)."""
    extra_tokens, pos_tokens = pos_embed[:, :1], pos_embed[:, 1:]
    orig_size = int(pos_tokens.shape[1] ** 0.5)
    pos_tokens = pos_tokens.reshape(-1, orig_size, orig_size, pos_embed.shape[-1]).permute(0, 3, 1, 2)
    pos_tokens = F.interpolate(pos_tokens, size=(new_size, new_size), mode="bicubic", align_corners=False)
    return torch.cat((extra_tokens, pos_tokens.permute(0, 2, 3, 1).flatten(1, 2)), dim=1)


@pytest.mark.parametrize("old,new", [(24, 32), (14, 24), (24, 14)])
def test_interpolate_pos_embed_matches_blip_reference(old, new):
    # We resize through timm's resample_abs_pos_embed; it must stay BLIP's bicubic on ViT-B shapes.
    pos = torch.randn(1, 1 + old * old, 768, generator=torch.Generator().manual_seed(old))
    out = interpolate_pos_embed(pos, num_patches=new * new)
    torch.testing.assert_close(out, _blip_interpolate_pos_embed(pos, new), rtol=0, atol=1e-5)
    assert interpolate_pos_embed(pos.half(), num_patches=new * new).dtype == torch.float16


def test_interpolate_pos_embed_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        interpolate_pos_embed(torch.randn(1, 1 + 12, 4), num_patches=16)
    with pytest.raises(ValueError, match="square"):
        interpolate_pos_embed(torch.randn(1, 1 + 16, 4), num_patches=20)


# --------------------------------------------------------------------------- load reports

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.proj = nn.Linear(4, 2)
        self.new_head = nn.Linear(2, 2)
        self.register_buffer("ptr_queue", torch.zeros(1, dtype=torch.long))
        self.register_buffer("scratch", torch.zeros(3), persistent=False)


def _report_checkpoint():
    return {
        "encoder.weight": torch.full((4, 4), 2.0),
        "encoder.bias": torch.full((4,), 2.0),
        "proj.weight": torch.ones(3, 4),            # model has [2, 4]: mismatched
        "ptr_queue": torch.tensor([5]),
        "text_decoder.bert.w": torch.ones(1),      # known extra of pretraining checkpoints
        "text_decoder.cls.b": torch.ones(1),
        "stray.weight": torch.ones(1),              # unexpected
    }                                               # proj.bias missing; new_head.* ignored


def test_load_report_categories_and_partial_load(caplog):
    model = Tiny()
    proj_before = model.proj.weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="utils.state_dict"):
        report = load_state_dict_with_report(
            model, _report_checkpoint(), expected_extra_prefixes=("text_decoder.",),
            ignore_missing_prefixes=("new_head.",))
    assert report.missing == ["proj.bias"]
    assert report.unexpected == ["stray.weight"]
    assert report.mismatched == [("proj.weight", (3, 4), (2, 4))]
    assert sorted(report.expected_extra) == ["text_decoder.bert.w", "text_decoder.cls.b"]
    assert report.num_loaded == 3 and not report.is_clean
    assert torch.equal(model.encoder.weight, torch.full((4, 4), 2.0))
    assert model.ptr_queue.item() == 5
    assert torch.equal(model.proj.weight, proj_before)  # mismatched: reported, not loaded
    assert "proj.weight: (3, 4) vs (2, 4)" in caplog.text and "stray.weight" in caplog.text
    assert str(report) == report.summary()


def test_strict_raises_with_summary_and_leaves_model_untouched():
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as info:
        load_state_dict_with_report(model, _report_checkpoint(), strict=True,
                                    expected_extra_prefixes=("text_decoder.",))
    msg = str(info.value)
    assert "proj.weight" in msg and "stray.weight" in msg and "proj.bias" in msg
    assert "new_head.weight" in msg  # not ignored this time
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_strict_accepts_expected_extras_only():
    model = Tiny()
    sd = dict(model.state_dict())
    sd["text_decoder.bert.w"] = torch.ones(1)
    sd["idx_queue"] = torch.ones(1, 4)
    report = load_state_dict_with_report(model, sd, strict=True, expected_extra_keys=("idx_queue",),
                                         expected_extra_prefixes=("text_decoder.",))
    assert report.is_clean and report.expected_extra == ["text_decoder.bert.w", "idx_queue"]


def test_summary_collapses_long_lists_by_prefix():
    model = nn.Linear(1, 1)
    sd = {f"text_decoder.bert.encoder.layer.{i}.w": torch.ones(1) for i in range(50)}
    summary = load_state_dict_with_report(model, sd).summary(max_items=5)
    assert "50 unexpected" in summary
    assert "text_decoder.bert.encoder.* (50 keys)" in summary
    assert len(summary.splitlines()) < 12
