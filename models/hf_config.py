"""A BLIP folder's ``config.json`` (a transformers ``BlipConfig``), both ways: made from our
architecture (:func:`hf_config`: ViT dims and BLIP's 1e-6 LayerNorm, the med config's text dims, the
tokenizer's special ids), and, on the way in, validated field by field (:func:`read_config`,
:func:`validate_config`: types and positive dimensions), checked against the folder's weights
(:func:`check_weights_fit`) and against our config (:func:`expected_dims` -> :func:`check_dims`:
a differing field is one line naming it and the config key behind ours), before anything is built.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from torch import Tensor

from models.hf_keys import CAPTION, HF_CLASS, RETRIEVAL, VQA, layout_of
from utils.errors import CheckpointError
from utils.errors import json_error

logger = logging.getLogger(__name__)

VIT_LAYER_NORM_EPS = 1e-6            # BLIP's ViT (HF's BlipVisionConfig defaults to 1e-5)


# ---------------------------------------------------------------------- made from our architecture (--to hf)

def hf_config(layout: str, vit_arch, image_size: int, med, tokenizer, embed_dim: Optional[int]):
    """The ``BlipConfig`` of our architecture: ViT dims and BLIP's 1e-6 LayerNorm, the text dims
    of the med config, [DEC] as bos, [SEP] as eos/sep (HF's generate stops on sep), BLIP's label
    smoothing 0.1 for the captioner's and the answer decoder's LM loss."""
    from transformers import BlipConfig
    sep = tokenizer.sep_token_id
    text = dict(vocab_size=med.vocab_size, hidden_size=med.hidden_size, encoder_hidden_size=vit_arch.width,
                intermediate_size=med.intermediate_size, num_hidden_layers=med.num_hidden_layers,
                num_attention_heads=med.num_attention_heads, max_position_embeddings=med.max_position_embeddings,
                hidden_act=med.hidden_act, layer_norm_eps=med.layer_norm_eps,
                hidden_dropout_prob=med.hidden_dropout_prob,
                attention_probs_dropout_prob=med.attention_probs_dropout_prob,
                initializer_range=med.initializer_range, bos_token_id=tokenizer.bos_token_id, eos_token_id=sep,
                sep_token_id=sep, pad_token_id=med.pad_token_id,
                label_smoothing=0.0 if layout == RETRIEVAL else 0.1)
    vision = dict(hidden_size=vit_arch.width, intermediate_size=int(vit_arch.width * vit_arch.mlp_ratio),
                  num_hidden_layers=vit_arch.depth, num_attention_heads=vit_arch.heads, image_size=image_size,
                  patch_size=vit_arch.patch_size, hidden_act="gelu", layer_norm_eps=VIT_LAYER_NORM_EPS)
    extra = {"image_text_hidden_size": embed_dim} if embed_dim else {}
    return BlipConfig(text_config=text, vision_config=vision, architectures=[HF_CLASS[layout]], **extra)


# ---------------------------------------------------------------------- read and validated (a folder read)

def read_config(folder: Path, name: str) -> dict:
    """The folder's ``config.json``, validated (:func:`validate_config`): every problem is one line
    naming the file and the field."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{name}: no config.json in {folder}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: {json_error(err)}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(config).__name__}, not an object of config fields")
    if config.get("model_type") != "blip":
        raise CheckpointError(f"{path}: model_type {config.get('model_type')!r}; only BLIP folders "
                              "(model_type 'blip') convert")
    validate_config(config, path)
    return config


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
               dict: "an object"}
# Dimensions: positive integers (a 0 or a negative one builds no model).
_DIM_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
               "max_position_embeddings", "image_size", "patch_size", "encoder_hidden_size", "image_text_hidden_size",
               "projection_dim")


def _json_type(value) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def validate_config(config: Mapping, path) -> None:
    """Each field of a BLIP ``config.json`` that transformers' ``BlipConfig`` knows must have the
    type of its default (a number for a float, an integer or a list for token ids, null where the
    default is null), dimensions must be positive integers, and ``text_config`` / ``vision_config``
    objects: else a CheckpointError naming the file and the field, before anything is built."""
    from transformers import BlipConfig
    defaults = BlipConfig().to_dict()
    for section in ("", "text_config", "vision_config"):
        values = config.get(section, {}) if section else config
        if section and values is None:
            continue
        if not isinstance(values, Mapping):
            raise CheckpointError(f"{path}: {section} is {_json_type(values)} ({values!r}); a BLIP config.json gives "
                                  "an object there")
        known = defaults.get(section, {}) if section else defaults
        for key, value in values.items():
            if key in ("text_config", "vision_config") and not section:
                continue
            if key not in known or known[key] is None:
                continue
            field = f"{section}.{key}" if section else key
            want = type(known[key])
            if key.endswith("_token_id"):
                ok = value is None or (isinstance(value, int) and not isinstance(value, bool)) or (
                    isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
            elif want is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            elif want is int:
                ok = isinstance(value, int) and not isinstance(value, bool)
            else:
                ok = isinstance(value, want)
            if not ok:
                raise CheckpointError(f"{path}: {field} is {_json_type(value)} ({value!r}); a BLIP config.json gives "
                                      f"{_TYPE_NAMES.get(want, want.__name__)} there")
            if key in _DIM_FIELDS and value < 1:
                raise CheckpointError(f"{path}: {field} is {value}; a dimension must be a positive integer")


def check_weights_fit(config: Mapping, hf_state: Mapping[str, Tensor], path) -> None:
    """config.json's widths and depths against the weights of the folder: a config that does not
    describe its weights is an error naming both (transformers would fail on it, or load another
    model)."""
    from transformers import BlipConfig
    full = BlipConfig.from_dict(dict(config)).to_dict()
    vision, text = full.get("vision_config") or {}, full.get("text_config") or {}
    checks = []
    cls = hf_state.get("vision_model.embeddings.class_embedding")
    if cls is not None:
        checks.append(("vision_config.hidden_size", vision.get("hidden_size"), int(cls.shape[-1])))
    vit_layers = {int(k.split(".")[3]) for k in hf_state if k.startswith("vision_model.encoder.layers.")}
    if vit_layers:
        checks.append(("vision_config.num_hidden_layers", vision.get("num_hidden_layers"), max(vit_layers) + 1))
    emb = next((v for k, v in hf_state.items() if k.endswith("embeddings.word_embeddings.weight")), None)
    if emb is not None:
        checks.append(("text_config.hidden_size", text.get("hidden_size"), int(emb.shape[1])))
        checks.append(("text_config.vocab_size", text.get("vocab_size"), int(emb.shape[0])))
    layers = {int(k.split("encoder.layer.")[1].split(".")[0]) for k in hf_state if ".encoder.layer." in k}
    if layers:
        checks.append(("text_config.num_hidden_layers", text.get("num_hidden_layers"), max(layers) + 1))
    for field, said, found in checks:
        if said is not None and said != found:
            raise CheckpointError(f"{path}: {field} is {said}, but the folder's weights have {found}: config.json "
                                  "does not describe these weights (a config from another model?)")


# ---------------------------------------------------------------------- against our config

def expected_dims(arch, tokenizer=None, embed_dim: Optional[int] = None) -> Dict[str, Tuple[Any, str]]:
    """config.json field -> (the value our config implies, the config key it comes from)."""
    from models.med import MedConfig
    vit = arch.vit_arch
    med = MedConfig.from_json(arch.med_config)
    out: Dict[str, Tuple[Any, str]] = {
        "vision_config.hidden_size": (vit.width, "vit (width)"),
        "vision_config.num_hidden_layers": (vit.depth, "vit (depth)"),
        "vision_config.num_attention_heads": (vit.heads, "vit (heads)"),
        "vision_config.intermediate_size": (int(vit.width * vit.mlp_ratio), "vit (width x mlp_ratio)"),
        "vision_config.patch_size": (vit.patch_size, "vit (patch_size)"),
        "text_config.hidden_size": (med.hidden_size, "med_config (hidden_size)"),
        "text_config.num_hidden_layers": (med.num_hidden_layers, "med_config (num_hidden_layers)"),
        "text_config.num_attention_heads": (med.num_attention_heads, "med_config (num_attention_heads)"),
        "text_config.intermediate_size": (med.intermediate_size, "med_config (intermediate_size)"),
        "text_config.max_position_embeddings": (med.max_position_embeddings, "med_config (max_position_embeddings)"),
    }
    vocab = med.vocab_size if med.vocab_size is not None else (len(tokenizer) if tokenizer is not None else None)
    if vocab is not None:
        out["text_config.vocab_size"] = (vocab, "med_config vocab_size / the tokenizer")
    if embed_dim is not None:
        out["image_text_hidden_size"] = (embed_dim, "embed_dim")
    return out


def check_dims(config: Mapping, expect: Mapping[str, Tuple[Any, str]], name: str) -> None:
    """Each ``expect`` field of config.json (HF's defaults where absent) against our value: a
    mismatch is an error naming both; LayerNorm eps differences are only warned about."""
    from transformers import BlipConfig
    hf = BlipConfig.from_dict(dict(config)).to_dict()
    layout = layout_of({}, config, name) if config.get("architectures") else None
    for field, (ours, key) in expect.items():
        if field == "image_text_hidden_size" and layout in (CAPTION, VQA):
            continue
        node = hf
        for part in field.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is not None and node != ours:
            raise CheckpointError(f"{name}: config.json {field} is {node}, our config's {key} gives {ours}")
    eps = (hf.get("vision_config") or {}).get("layer_norm_eps")
    if eps is not None and eps != VIT_LAYER_NORM_EPS:
        logger.warning("%s: vision layer_norm_eps %g; BLIP's ViT (ours) uses %g: features differ slightly "
                       "from the HF model's", name, eps, VIT_LAYER_NORM_EPS)
