"""ViT-L BLIP: the large retrieval configs give BLIP's ViT-L recipe, the model they build has the
official ViT-L shapes, and a state dict in the official large layout loads into it key for key
through the loader users run (``models.factory.load_weights``), a 224 px checkpoint's position
embedding resized to 384 px on the way.

The ViT-L model with momentum encoders has ~890M parameters (3.6 GB in fp32), so it is built on the
meta device (shapes only, no memory, ~1 s); only the two position embeddings that the resize test
reads and the queue pointer (read back as a Python int after loading) hold real values.
"""
from __future__ import annotations

from pathlib import Path

import re

import pytest
import torch
import torch.nn.functional as F

from models.blip import build_blip_retrieval
from models.factory import load_weights
from tasks.retrieval import RetrievalConfig
from utils.checkpoint import load_checkpoint
from utils.config import config_to_dict, load_config
from utils.state_dict import extract_state_dict

URL = "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_large_retrieval_{}.pth"
REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "blip_official_tiny"
LARGE = {"coco": REPO / "configs" / "retrieval_coco_large.yaml",
         "flickr": REPO / "configs" / "retrieval_flickr_large.yaml"}
# BLIP's ViT-L settings (the commented-out `vit: 'large'` block of its retrieval_{coco,flickr}.yaml,
# docs/RETRIEVAL.md "Bring your own data", recommended settings); everything else is the ViT-B config's.
RECIPE = {"vit": "large", "batch_size_train": 16, "batch_size_test": 32, "vit_grad_ckpt": True, "init_lr": 5e-6,
          "image_size": 384, "max_epoch": 6, "weight_decay": 0.05, "min_lr": 0.0, "vit_drop_path_rate": 0.1,
          "med_config": "configs/med_config.json"}
CKPT_LAYER = {"coco": 12, "flickr": 10}


# ---------------------------------------------------------------------- (a) the configs

@pytest.mark.parametrize("dataset", ["coco", "flickr"])
def test_large_config_is_blips_vit_l_recipe(dataset):
    cfg, _ = load_config(LARGE[dataset], RetrievalConfig)
    for key, value in RECIPE.items():
        assert getattr(cfg, key) == value, key
    assert cfg.vit_ckpt_layer == CKPT_LAYER[dataset]
    assert cfg.pretrained == URL.format(dataset)
    assert (cfg.vit_arch.width, cfg.vit_arch.depth, cfg.vit_arch.heads, cfg.vit_arch.patch_size) == (1024, 24, 16, 16)
    assert cfg.queue_size % (8 * cfg.batch_size_train) == 0  # 8 GPUs x 16


@pytest.mark.parametrize("dataset", ["coco", "flickr"])
def test_large_config_differs_from_the_base_config_only_in_the_vit_l_keys(dataset):
    base = config_to_dict(load_config(REPO / "configs" / f"retrieval_{dataset}.yaml", RetrievalConfig)[0])
    large = config_to_dict(load_config(LARGE[dataset], RetrievalConfig)[0])
    changed = {k for k in base if base[k] != large[k]}
    assert changed == {"vit", "vit_ckpt_layer", "vit_drop_path_rate", "batch_size_train", "batch_size_test",
                       "init_lr", "pretrained", "output_dir"}


# ---------------------------------------------------------------------- the official large layout

def _template(key: str) -> str:
    return re.sub(r"\.(blocks|layer)\.\d+\.", r".\1.{}.", key)


def official_layout(W, H, I, V, P, E, Q, grid, vit_depth, text_depth):
    """Shapes of every key of BLIP_Retrieval's state dict (momentum encoders and queues included):
    ViT width ``W`` (MLP 4W, patch 16, ``grid`` x ``grid`` patches), text encoder hidden ``H``, FFN
    ``I``, vocab ``V``, ``P`` positions, ITC dim ``E``, queue ``Q``."""
    vit = {"cls_token": (1, 1, W), "pos_embed": (1, 1 + grid * grid, W), "patch_embed.proj.weight": (W, 3, 16, 16),
           "patch_embed.proj.bias": (W,), "norm.weight": (W,), "norm.bias": (W,)}
    block = {"norm1.weight": (W,), "norm1.bias": (W,), "attn.qkv.weight": (3 * W, W), "attn.qkv.bias": (3 * W,),
             "attn.proj.weight": (W, W), "attn.proj.bias": (W,), "norm2.weight": (W,), "norm2.bias": (W,),
             "mlp.fc1.weight": (4 * W, W), "mlp.fc1.bias": (4 * W,), "mlp.fc2.weight": (W, 4 * W),
             "mlp.fc2.bias": (W,)}
    text = {"embeddings.position_ids": (1, P), "embeddings.word_embeddings.weight": (V, H),
            "embeddings.position_embeddings.weight": (P, H), "embeddings.LayerNorm.weight": (H,),
            "embeddings.LayerNorm.bias": (H,)}
    layer = {}
    for att, kv_width in (("attention", H), ("crossattention", W)):  # cross-attention keys/values read the ViT
        for name, in_width in (("query", H), ("key", kv_width), ("value", kv_width)):
            layer[f"{att}.self.{name}.weight"], layer[f"{att}.self.{name}.bias"] = (H, in_width), (H,)
        layer.update({f"{att}.output.dense.weight": (H, H), f"{att}.output.dense.bias": (H,),
                      f"{att}.output.LayerNorm.weight": (H,), f"{att}.output.LayerNorm.bias": (H,)})
    layer.update({"intermediate.dense.weight": (I, H), "intermediate.dense.bias": (I,), "output.dense.weight": (H, I),
                  "output.dense.bias": (H,), "output.LayerNorm.weight": (H,), "output.LayerNorm.bias": (H,)})
    shapes = {"temp": (), "image_queue": (E, Q), "text_queue": (E, Q), "idx_queue": (1, Q), "ptr_queue": (1,)}
    for m in ("", "_m"):
        shapes.update({f"visual_encoder{m}.{k}": s for k, s in vit.items()})
        shapes.update({f"visual_encoder{m}.blocks.{i}.{k}": s for i in range(vit_depth) for k, s in block.items()})
        shapes.update({f"text_encoder{m}.{k}": s for k, s in text.items()})
        shapes.update({f"text_encoder{m}.encoder.layer.{i}.{k}": s for i in range(text_depth) for k, s in layer.items()})
        shapes.update({f"vision_proj{m}.weight": (E, W), f"vision_proj{m}.bias": (E,),
                       f"text_proj{m}.weight": (E, H), f"text_proj{m}.bias": (E,)})
    shapes.update({"itm_head.weight": (2, H), "itm_head.bias": (2,)})
    return shapes


LARGE_LAYOUT = dict(W=1024, H=768, I=3072, V=30524, P=512, E=256, Q=57600, grid=24, vit_depth=24, text_depth=12)
INT_KEYS = ("idx_queue", "ptr_queue", "position_ids")


def test_layout_table_is_the_official_one():
    """The table above, at the fixture's tiny sizes, gives exactly the keys and shapes of the
    checkpoint saved by the original BLIP code (tests/fixtures/blip_official_tiny); at ViT-L sizes it
    has the same keys per block/layer."""
    tiny = extract_state_dict(load_checkpoint(FIXTURE / "checkpoint.pth"))
    table = official_layout(W=64, H=64, I=256, V=50, P=64, E=32, Q=64, grid=4, vit_depth=2, text_depth=2)
    assert {k: tuple(v.shape) for k, v in tiny.items()} == table
    assert {_template(k) for k in official_layout(**LARGE_LAYOUT)} == {_template(k) for k in tiny}


class _BlipTokenizer:
    """BLIP's tokenizer as the model build sees it: bert-base-uncased + [DEC] + [ENC]."""
    enc_token_id = 30523

    def __len__(self) -> int:
        return 30524


@pytest.fixture(scope="module", params=["coco", "flickr"])
def large(request):
    """(config, ViT-L BLIP with momentum encoders and queues on the meta device)."""
    cfg, _ = load_config(LARGE[request.param], RetrievalConfig,
                         [f"med_config={REPO / 'configs' / 'med_config.json'}"])
    with torch.device("meta"):
        model = build_blip_retrieval(cfg, _BlipTokenizer(), itc=cfg)
    return cfg, model


def test_vit_l_model_has_the_official_shapes(large):
    cfg, model = large
    sd = model.state_dict()
    assert model.with_momentum and len(model.visual_encoder.blocks) == 24
    expected = {
        "visual_encoder.pos_embed": (1, 577, 1024),
        "visual_encoder.cls_token": (1, 1, 1024),
        "visual_encoder.patch_embed.proj.weight": (1024, 3, 16, 16),
        "visual_encoder.blocks.23.attn.qkv.weight": (3072, 1024),
        "visual_encoder.blocks.23.mlp.fc1.weight": (4096, 1024),
        "visual_encoder_m.pos_embed": (1, 577, 1024),
        "text_encoder.embeddings.word_embeddings.weight": (30524, 768),
        "text_encoder.encoder.layer.11.crossattention.self.key.weight": (768, 1024),
        "text_encoder.encoder.layer.11.crossattention.self.value.weight": (768, 1024),
        "text_encoder_m.encoder.layer.0.crossattention.self.key.weight": (768, 1024),
        "vision_proj.weight": (256, 1024),
        "vision_proj_m.weight": (256, 1024),
        "text_proj.weight": (256, 768),
        "itm_head.weight": (2, 768),
        "image_queue": (256, 57600),
    }
    assert {k: tuple(sd[k].shape) for k in expected} == expected
    assert not any(k.startswith("visual_encoder.blocks.24.") for k in sd)
    # BLIP's ViT-L training settings reach the model: checkpointed blocks, stochastic depth 0.1.
    assert model.visual_encoder.ckpt_layer == cfg.vit_ckpt_layer
    assert model.visual_encoder.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)


def _official_state(**real) -> dict:
    """An official-layout ViT-L state dict of meta tensors (``real``: keys given real values)."""
    state = {k: torch.empty(s, dtype=torch.long if k.endswith(INT_KEYS) else torch.float32, device="meta")
             for k, s in official_layout(**LARGE_LAYOUT).items()}
    state["ptr_queue"] = torch.zeros(1, dtype=torch.long)  # the loader reads it back as a Python int
    state.update(real)
    return state


def _make_real(model, *names):
    for name in names:
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        old = getattr(module, attr)
        new = torch.zeros(old.shape, dtype=old.dtype)
        if isinstance(old, torch.nn.Parameter):
            new = torch.nn.Parameter(new, requires_grad=old.requires_grad)
        setattr(module, attr, new)


def test_official_large_state_dict_loads_key_for_key(large):
    _, model = large
    _make_real(model, "ptr_queue")
    state = _official_state()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}
    result = load_weights(model, {"model": state}, strict=True)
    report = result.blip
    assert result.format == "blip"
    assert report.missing == [] and report.unexpected == [] and report.mismatched == [] and report.expected_extra == []
    assert report.num_loaded == len(state) == len(model.state_dict())


def test_224px_large_checkpoint_position_embedding_is_resized_to_384px(large):
    _, model = large
    keys = ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed")
    _make_real(model, "ptr_queue", *keys)
    g = torch.Generator().manual_seed(0)
    pos224 = torch.randn(1, 1 + 14 * 14, 1024, generator=g)  # ViT-L/16 at 224 px: 14 x 14 patches
    result = load_weights(model, {"model": _official_state(**{k: pos224.clone() for k in keys})}, strict=True)
    assert result.blip.is_clean and result.blip.num_loaded == len(model.state_dict())
    # BLIP's interpolate_pos_embed: CLS row kept, the 14 x 14 grid resized bicubically to 24 x 24.
    grid = pos224[:, 1:].reshape(1, 14, 14, 1024).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(24, 24), mode="bicubic", align_corners=False)
    expected = torch.cat([pos224[:, :1], resized.permute(0, 2, 3, 1).reshape(1, 576, 1024)], dim=1)
    for key in keys:
        loaded = model.get_parameter(key)
        assert loaded.shape == (1, 577, 1024)
        assert torch.allclose(loaded, expected, atol=1e-5)
