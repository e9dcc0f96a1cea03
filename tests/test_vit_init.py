"""The ViT-S student preset and starting a ViT from timm / DeiT ImageNet weights (``vit_init``)."""
from __future__ import annotations

import pytest
import timm
import torch

from models.vit import VIT_PRESETS, ViTSettings, build_vit
from utils.errors import CheckpointError


@pytest.fixture(scope="module")
def timm_small(tmp_path_factory):
    torch.manual_seed(0)
    ref = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=1000)
    path = tmp_path_factory.mktemp("timm") / "vit_small.pth"
    torch.save(ref.state_dict(), path)
    return ref, path


def test_small_preset_has_deit_small_shapes():
    arch = VIT_PRESETS["small"]
    assert (arch.width, arch.depth, arch.heads, arch.patch_size) == (384, 12, 6, 16)


def test_timm_vit_small_loads_key_for_key_and_computes_the_same_features(timm_small, tmp_path):
    ref, path = timm_small
    vit = build_vit(ViTSettings(vit="small", image_size=224, vit_init=str(path))).eval()
    own = vit.state_dict()
    for k, v in ref.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(own[k], v), k
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(vit(x), ref.eval().forward_features(x), atol=1e-5)
    # DeiT's release layout ({'model': state dict}) and another resolution (pos_embed resized).
    deit = tmp_path / "deit_small.pth"
    torch.save({"model": ref.state_dict()}, deit)
    vit384 = build_vit(ViTSettings(vit="small", image_size=384, vit_init=str(deit)))
    assert vit384.pos_embed.shape == (1, 1 + 24 * 24, 384)
    assert torch.equal(vit384.state_dict()["blocks.11.mlp.fc2.weight"], ref.state_dict()["blocks.11.mlp.fc2.weight"])


def test_a_mismatched_or_distilled_checkpoint_is_refused(timm_small, tmp_path):
    ref, path = timm_small
    with pytest.raises(CheckpointError, match="does not fit"):
        build_vit(ViTSettings(vit="base", image_size=224, vit_init=str(path)))
    distilled = dict(ref.state_dict())
    distilled["dist_token"] = torch.zeros(1, 1, 384)
    bad = tmp_path / "deit_distilled.pth"
    torch.save({"model": distilled}, bad)
    with pytest.raises(CheckpointError, match="distilled DeiT"):
        build_vit(ViTSettings(vit="small", image_size=224, vit_init=str(bad)))
    with pytest.raises(FileNotFoundError):
        build_vit(ViTSettings(vit="small", image_size=224, vit_init=str(tmp_path / "missing.pth")))
