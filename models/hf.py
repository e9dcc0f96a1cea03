"""HuggingFace interop: BLIP's own checkpoint layout <-> transformers' ``Blip*`` folders.

    folder = export_hf(model, kind, cfg, tokenizer, ckpt, out_dir)   # tools/convert.py --to hf
    ckpt = load_official(folder_or_hub_id)                           # HF folder -> {'model': BLIP layout, ...}

An HF folder holds ``config.json`` (a ``BlipConfig``), ``model.safetensors`` (or
``pytorch_model.bin``), the tokenizer and the image processor. Two architectures map onto ours:

| HF class | our layout | our model kind |
|---|---|---|
| ``BlipForImageTextRetrieval`` | retrieval: ``visual_encoder``, ``text_encoder``, projections, ``itm_head`` | ``blip`` |
| ``BlipForConditionalGeneration`` | caption: ``visual_encoder``, ``text_decoder`` | ``caption`` |
| ``BlipForQuestionAnswering`` | VQA: ``visual_encoder``, ``text_encoder``, ``text_decoder`` | ``vqa`` (``models/hf_vqa.py``) |

Key mapping (ours -> HF): the ViT is renamed (``visual_encoder.cls_token`` ->
``vision_model.embeddings.class_embedding``, ``pos_embed`` -> ``embeddings.position_embedding``,
``patch_embed.proj`` -> ``embeddings.patch_embedding``, ``blocks.N.{norm1, norm2, attn.qkv,
attn.proj, mlp.fc1, mlp.fc2}`` -> ``encoder.layers.N.{layer_norm1, layer_norm2, self_attn.qkv,
self_attn.projection, mlp.fc1, mlp.fc2}``, ``norm`` -> ``post_layernorm``); the text side,
``vision_proj``, ``text_proj`` and ``itm_head`` keep their names. HF has no place for the
``position_ids`` buffers (non-persistent there), the LM head's ``decoder.weight``/``decoder.bias``
(tied to the word embeddings and ``predictions.bias``), ``temp``, the momentum encoders and the queues.

What HF does not take goes into ``blip_extras.safetensors`` next to the weights (transformers ignores
the file): every tensor of the original file that the folder alone does not give back bit for bit,
and a metadata block (JSON) with the original key order and dtypes, the top-level entries
(``epoch``, ``config``, ``format`` ...) and the queue size. With it, official -> HF -> official is
bit-identical. Without it (a folder from the hub), :func:`official_from_hf` synthesises what BLIP's
``__init__`` would: momentum copies of the online weights, queues of normalised random features
(seed 0; ``idx_queue`` -100, never a positive; ``ptr_queue`` 0), ``temp`` 0.07 and ``position_ids``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from utils.atomic import atomic_write
from utils.checkpoint import load_checkpoint, load_safetensors_checkpoint, safetensors_tensors
from utils.errors import CheckpointError, json_error
from utils.state_dict import extract_state_dict

logger = logging.getLogger(__name__)

RETRIEVAL, CAPTION, VQA = "retrieval", "caption", "vqa"
HF_CLASS = {RETRIEVAL: "BlipForImageTextRetrieval", CAPTION: "BlipForConditionalGeneration",
            VQA: "BlipForQuestionAnswering"}
EXTRAS_FILE = "blip_extras.safetensors"
EXTRAS_META = "blip_extras"          # the metadata field holding the JSON block
EXTRAS_VERSION = 1
DEFAULT_QUEUE_SIZE = 57600           # BLIP's retrieval configs (COCO and Flickr30k)
QUEUE_SEED = 0
DEFAULT_TEMP = 0.07
VIT_LAYER_NORM_EPS = 1e-6            # BLIP's ViT (HF's BlipVisionConfig defaults to 1e-5)
MOMENTUM_PAIRS = (("visual_encoder.", "visual_encoder_m."), ("vision_proj.", "vision_proj_m."),
                  ("text_encoder.", "text_encoder_m."), ("text_proj.", "text_proj_m."))
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_CKPT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".tar", ".pkl", ".zip", ".json", ".yaml")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

# ---------------------------------------------------------------------- key mapping

_VIT_TOP = (("cls_token", "embeddings.class_embedding"), ("pos_embed", "embeddings.position_embedding"),
            ("patch_embed.proj.", "embeddings.patch_embedding."), ("norm.", "post_layernorm."))
_VIT_BLOCK = (("norm1.", "layer_norm1."), ("norm2.", "layer_norm2."), ("attn.qkv.", "self_attn.qkv."),
              ("attn.proj.", "self_attn.projection."), ("mlp.fc1.", "mlp.fc1."), ("mlp.fc2.", "mlp.fc2."))
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
# The LM head's tied weights (HF ties and does not save them): key -> the key it is tied to.
TIED = {"text_decoder.cls.predictions.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight",
        "text_decoder.cls.predictions.decoder.bias": "text_decoder.cls.predictions.bias"}


def _swap(name: str, pairs, to_hf: bool) -> Optional[str]:
    for ours, hf in pairs:
        src, dst = (ours, hf) if to_hf else (hf, ours)
        if name == src or (src.endswith(".") and name.startswith(src)):
            return dst + name[len(src):]
    return None


def _vit_key(suffix: str, to_hf: bool) -> Optional[str]:
    m = (_BLOCK if to_hf else _LAYER).match(suffix)
    if m:
        rest = _swap(m.group(2), _VIT_BLOCK, to_hf)
        return None if rest is None else f"{'encoder.layers' if to_hf else 'blocks'}.{m.group(1)}.{rest}"
    return _swap(suffix, _VIT_TOP, to_hf)


def vit_to_hf(suffix: str) -> Optional[str]:
    """A ``visual_encoder.`` key suffix -> its ``vision_model.`` suffix (None: not a BLIP ViT key)."""
    return _vit_key(suffix, True)


def vit_from_hf(suffix: str) -> Optional[str]:
    """A ``vision_model.`` key suffix -> its ``visual_encoder.`` suffix (None: not an HF ViT key)."""
    return _vit_key(suffix, False)


def _hf_parts(layout: str) -> Tuple[str, ...]:
    return {RETRIEVAL: ("text_encoder.", "vision_proj.", "text_proj.", "itm_head."), CAPTION: ("text_decoder.",),
            VQA: ("text_encoder.", "text_decoder.")}[layout]


# The text towers of each layout (their ``embeddings.position_ids`` are rebuilt on the way back).
_TEXT_TOWERS = {RETRIEVAL: ("text_encoder.",), CAPTION: ("text_decoder.bert.",),
                VQA: ("text_encoder.", "text_decoder.bert.")}


def key_to_hf(key: str, layout: str) -> Optional[str]:
    """Our/official key -> the HF key of ``layout``'s class; None where HF has no place for it."""
    if key.startswith("visual_encoder."):
        suffix = vit_to_hf(key[len("visual_encoder."):])
        return None if suffix is None else "vision_model." + suffix
    if key.endswith("embeddings.position_ids") or key in TIED:
        return None
    return key if key.startswith(_hf_parts(layout)) else None


def to_hf_state(state: Mapping[str, Tensor], layout: str) -> "OrderedDict[str, Tensor]":
    """The HF-named tensors of ``state`` (ours/official names) for ``layout``'s class."""
    out = OrderedDict()
    for k, v in state.items():
        hf = key_to_hf(k, layout)
        if hf is not None:
            out[hf] = v
    return out


# The official files' order: a module's own parameters, then its buffers, then its children in the
# order they were registered. Ranks only need to order siblings.
_RANK = {name: i for i, name in enumerate((
    "temp", "image_queue", "text_queue", "idx_queue", "ptr_queue", "visual_encoder", "text_encoder",
    "text_decoder", "vision_proj", "text_proj", "itm_head", "visual_encoder_m", "vision_proj_m",
    "text_encoder_m", "text_proj_m"))}
_RANK.update({"cls_token": 0, "pos_embed": 1, "patch_embed": 2, "blocks": 3, "norm": 4,          # ViT
              "norm1": 0, "attn": 1, "norm2": 2, "mlp": 3, "qkv": 0, "proj": 1, "fc1": 0, "fc2": 1,
              "embeddings": 0, "encoder": 1, "layer": 0, "position_ids": 0, "word_embeddings": 1,  # BERT
              "position_embeddings": 2, "attention": 0, "crossattention": 1, "intermediate": 2,
              "output": 3, "self": 0, "query": 0, "key": 1, "value": 2, "dense": 5, "LayerNorm": 9,
              "bert": 0, "cls": 1, "predictions": 0, "transform": 2, "decoder": 3,                  # LM head
              "weight": 0, "bias": 1})


def _order(key: str) -> tuple:
    return tuple((0, int(p)) if p.isdigit() else (1, _RANK.get(p, 1000)) for p in key.split("."))


# ---------------------------------------------------------------------- HF -> official

def layout_of(hf_state: Mapping[str, Tensor], config: Mapping, name: str) -> str:
    arch = list(config.get("architectures") or [])
    for layout, cls in HF_CLASS.items():
        if cls in arch:
            return layout
    enc = any(k.startswith("text_encoder.") for k in hf_state)
    dec = any(k.startswith("text_decoder.") for k in hf_state)
    if enc and not dec and "itm_head.weight" in hf_state:
        return RETRIEVAL
    if dec and not enc:
        return CAPTION
    if enc and dec and not any(k.startswith(("itm_head.", "vision_proj.", "text_proj.")) for k in hf_state):
        return VQA
    raise CheckpointError(f"{name}: architectures {arch or '(none)'} with "
                          f"{'a text encoder' if enc else 'no text encoder'} and {'a' if dec else 'no'} "
                          f"text decoder: only {', '.join(HF_CLASS.values())} folders convert")


def official_from_hf(hf_state: Mapping[str, Tensor], layout: str, queue_size: Optional[int] = None,
                     copy: bool = True, name: str = "the HF weights") -> Tuple["OrderedDict[str, Tensor]", List[str]]:
    """The official BLIP state dict of an HF ``layout`` state, in the official key order, and the
    list of what was synthesised (not in the HF weights). ``copy``: momentum copies and tied
    weights are clones (for a file); else they share the online tensors (for loading)."""
    if layout == VQA:
        from models import hf_vqa
        hf_vqa.check_widths(hf_state, name, hf_names=True)
    state: Dict[str, Tensor] = {}
    synth: List[str] = []
    unknown, dropped = [], []
    for k, v in hf_state.items():
        if k.startswith("vision_model."):
            suffix = vit_from_hf(k[len("vision_model."):])
            if suffix is None:
                unknown.append(k)
            else:
                state["visual_encoder." + suffix] = v
        elif ".pooler." in k:
            dropped.append(k)   # BLIP's text encoders have no pooler; HF folders may carry one
        elif k.startswith(_hf_parts(layout)):
            state[k] = v
        else:
            unknown.append(k)
    if unknown:
        raise CheckpointError(f"{name}: {len(unknown)} keys have no place in BLIP's {layout} layout: "
                              f"{sorted(unknown)[:5]}")
    if dropped:
        logger.info("%s: dropped %d pooler weights (BLIP's text encoder has no pooler)", name, len(dropped))
    clone = (lambda t: t.clone()) if copy else (lambda t: t)
    towers = _TEXT_TOWERS[layout]
    needed = [t + "embeddings.position_embeddings.weight" for t in towers] + ["visual_encoder.cls_token"] + (
        ["vision_proj.weight"] if layout == RETRIEVAL else [])
    absent = [k for k in needed if k not in state]
    if absent:
        raise CheckpointError(f"{name}: no {', '.join(absent)} (not a complete BLIP {layout} model)")
    for text in towers:
        pid = text + "embeddings.position_ids"
        if pid not in state:
            state[pid] = torch.arange(state[text + "embeddings.position_embeddings.weight"].shape[0],
                                      dtype=torch.long).unsqueeze(0)
            synth.append(pid)
    if layout in (CAPTION, VQA):
        for key, src in TIED.items():
            if key not in state and src in state:
                state[key] = clone(state[src])
    else:
        state["temp"] = torch.tensor(DEFAULT_TEMP)
        synth.append("temp")
        for online, momentum in MOMENTUM_PAIRS:
            for k in [k for k in state if k.startswith(online)]:
                state[momentum + k[len(online):]] = clone(state[k])
        synth.append("momentum copies " + ", ".join(m.rstrip(".") for _, m in MOMENTUM_PAIRS))
        size = queue_size or DEFAULT_QUEUE_SIZE
        dim = state["vision_proj.weight"].shape[0]
        gen = torch.Generator().manual_seed(QUEUE_SEED)
        state["image_queue"] = F.normalize(torch.randn(dim, size, generator=gen), dim=0)
        state["text_queue"] = F.normalize(torch.randn(dim, size, generator=gen), dim=0)
        state["idx_queue"] = torch.full((1, size), -100, dtype=torch.long)
        state["ptr_queue"] = torch.zeros(1, dtype=torch.long)
        synth.append(f"queues of {size} (normalised random, seed {QUEUE_SEED}; idx_queue -100; ptr_queue 0)")
    ordered = OrderedDict((k, state[k]) for k in sorted(state, key=_order))
    return ordered, synth


# ---------------------------------------------------------------------- folders and hub ids

def hub_cache_dir() -> Path:
    """The HF hub cache as huggingface_hub resolves it, read now (tests set it per test)."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    home = os.environ.get("HF_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "huggingface") / "hub"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def is_hf_source(source: Any) -> bool:
    """A local folder with ``config.json``, or a hub id (``owner/name`` that is not a local path
    and does not look like a checkpoint file name)."""
    if isinstance(source, Mapping) or source is None:
        return False
    text = str(source)
    if not text or "://" in text:
        return False
    path = Path(text).expanduser()
    if path.is_dir():
        return (path / "config.json").is_file()
    if path.exists():
        return False
    return bool(_HUB_ID.match(text)) and not text.lower().endswith(_CKPT_SUFFIXES)


def _has_weights(folder: Path) -> bool:
    return any((folder / f).is_file() for f in WEIGHT_FILES)


def resolve_hf_folder(source) -> Path:
    """The local folder of ``source``: itself, or the hub id's snapshot in the local HF cache
    (downloaded only when not cached and ``HF_HUB_OFFLINE`` is unset, with bounded waits)."""
    path = Path(str(source)).expanduser()
    if path.is_dir():
        return path
    repo_id, cache = str(source), hub_cache_dir()
    from huggingface_hub import snapshot_download
    try:
        folder = Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
        if (folder / "config.json").is_file() and _has_weights(folder):
            return folder
    except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError and kin): maybe download
        pass
    where = (f"no local file or folder of that name, and the hub id is not in the local Hugging Face cache "
             f"{cache} (HF_HUB_CACHE / HF_HOME)")
    if _offline():
        raise CheckpointError(f"{repo_id!r}: {where}; HF_HUB_OFFLINE is set, so it is not downloaded. Run "
                              f"`huggingface-cli download {repo_id}` where there is internet and copy the cache, "
                              "or give a local folder")
    logger.info("downloading %s into %s", repo_id, cache)
    try:
        first = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors",
                 EXTRAS_FILE, "*.txt", "tokenizer*", "special_tokens_map.json", "preprocessor_config.json",
                 "processor_config.json"]
        folder = Path(snapshot_download(repo_id, cache_dir=cache, allow_patterns=first, etag_timeout=10))
        if not _has_weights(folder):
            folder = Path(snapshot_download(repo_id, cache_dir=cache, etag_timeout=10,
                                            allow_patterns=["pytorch_model.bin", "pytorch_model*.bin",
                                                            "pytorch_model.bin.index.json"]))
    except Exception as err:  # noqa: BLE001 - network failures come in many types
        line = str(err).splitlines()[0] if str(err) else ""
        raise CheckpointError(f"{repo_id!r}: {where}, and the download failed "
                              f"({type(err).__name__}: {line}); check the id and the network, or give a local "
                              "folder") from None
    return folder


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


def _load_safetensors(path: Path) -> Dict[str, Tensor]:
    return load_safetensors_checkpoint(path)["model"]


def read_weights(folder: Path, name: str) -> Dict[str, Tensor]:
    """The HF weights of ``folder`` (safetensors, sharded or not; else ``pytorch_model.bin``,
    loaded weights-only)."""
    for index, load in (("model.safetensors.index.json", _load_safetensors),
                        ("pytorch_model.bin.index.json", lambda p: extract_state_dict(load_checkpoint(p)))):
        single = folder / index.replace(".index.json", "")
        if single.is_file():
            return dict(load(single))
        if (folder / index).is_file():
            shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            state: Dict[str, Tensor] = {}
            for shard in shards:
                state.update(load(folder / shard))
            return state
    raise CheckpointError(f"{name}: no model.safetensors or pytorch_model.bin in {folder}")


def read_extras(folder: Path) -> Tuple[Dict[str, Tensor], Optional[dict]]:
    path = folder / EXTRAS_FILE
    if not path.is_file():
        return {}, None
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})[EXTRAS_META])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"cannot read {path}: {type(err).__name__}: {err}") from None
    if meta.get("version") != EXTRAS_VERSION:
        raise CheckpointError(f"{path}: extras version {meta.get('version')!r}; this code reads {EXTRAS_VERSION}")
    return tensors, meta


# ---------------------------------------------------------------------- top-level entries as JSON

class _NotJSON(Exception):
    pass


def _encode(value):
    """Plain Python values as JSON that decodes back to equal values (tuples and non-str keys tagged)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v) for k, v in value.items()}
        return {"__items__": [[_encode(k), _encode(v)] for k, v in value.items()]}
    raise _NotJSON(type(value).__name__)


def _decode(value):
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_decode(v) for v in value["__tuple__"])
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        if set(value) == {"__items__"}:
            return {_decode(k): _decode(v) for k, v in value["__items__"]}
        return {k: _decode(v) for k, v in value.items()}
    return value


def _container(ckpt: Mapping) -> Optional[str]:
    for key in ("model", "state_dict"):
        if isinstance(ckpt.get(key), Mapping):
            return key
    return None


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"unknown dtype {name!r} in {EXTRAS_FILE}")
    return dtype


# ---------------------------------------------------------------------- HF folder -> official checkpoint

def load_official(source, queue_size: Optional[int] = None, copy: bool = False,
                  expect: Optional[Mapping[str, Tuple[Any, str]]] = None) -> dict:
    """An HF folder or hub id as a BLIP checkpoint in the official layout (``{'model': ..., ...}``).

    With ``blip_extras.safetensors`` the original file comes back exactly (key order, dtypes,
    every tensor, top-level entries); without it the missing parts are synthesised (logged).
    ``expect`` (:func:`expected_dims`): config.json fields checked against our config first.
    ``queue_size``: of synthesised queues (default: the extras', else 57600)."""
    name = str(source)
    folder = resolve_hf_folder(source)
    config = read_config(folder, name)
    if expect:
        check_dims(config, expect, name)
    hf_state = read_weights(folder, name)
    check_weights_fit(config, hf_state, folder / "config.json")
    layout = layout_of(hf_state, config, name)
    extras, meta = read_extras(folder)
    if meta is not None:
        if meta.get("layout") != layout:
            raise CheckpointError(f"{folder / EXTRAS_FILE}: written for a {meta.get('layout')} folder, "
                                  f"this one is {layout}")
        queue_size = meta.get("queue_size") or queue_size
    state, synth = official_from_hf(hf_state, layout, queue_size=queue_size, copy=copy, name=name)
    if meta is None:
        if synth:
            logger.info("%s: no %s, synthesised as BLIP's __init__ would: %s", name, EXTRAS_FILE, ", ".join(synth))
        return {"model": state}
    return _apply_extras(state, extras, meta, folder / EXTRAS_FILE)


def _apply_extras(state: Mapping[str, Tensor], extras: Mapping[str, Tensor], meta: Mapping, path: Path) -> dict:
    keys: Mapping[str, str] = meta["keys"]
    missing = [k for k in keys if k not in extras and k not in state]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} keys of the original file are neither in the HF "
                              f"weights nor in the extras: {missing[:5]}")
    prefix = meta.get("prefix", "")
    sd = OrderedDict()
    for k, dtype in keys.items():
        t = extras[k] if k in extras else state[k]
        sd[prefix + k] = t if str(t.dtype) == dtype else t.to(_dtype(dtype))
    container = meta.get("container")
    if container is None:
        return sd
    entries = {k: _decode(v) for k, v in meta.get("entries", {}).items()}
    out = {}
    for k in meta.get("top_order", [container, *entries]):
        if k == container:
            out[k] = sd
        elif k in entries:
            out[k] = entries[k]
    return out


# ---------------------------------------------------------------------- official -> HF folder

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


def image_processor(image_size: int):
    """BLIP's test transform as an HF processor: resize to image_size (bicubic), BLIP's mean/std."""
    from PIL import Image
    from transformers import BlipImageProcessor
    from data.transforms import IMAGE_MEAN, IMAGE_STD
    return BlipImageProcessor(size={"height": image_size, "width": image_size}, resample=Image.BICUBIC,
                              image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD))


def make_extras(ckpt: Mapping, hf_state: Mapping[str, Tensor], layout: str,
                name: str) -> Tuple[Dict[str, Tensor], dict]:
    """What the HF weights alone do not give back of ``ckpt``: every tensor that differs from (or
    is absent in) :func:`official_from_hf` of ``hf_state``, and the metadata block."""
    container = _container(ckpt)
    raw = ckpt[container] if container else ckpt
    orig = extract_state_dict(ckpt)
    prefix = "module." if raw and len(orig) == len(raw) and all(k.startswith("module.") for k in raw) else ""
    queue = orig.get("image_queue", orig.get("idx_queue"))
    queue_size = int(queue.shape[-1]) if queue is not None else None
    recon, _ = official_from_hf(hf_state, layout, queue_size=queue_size, copy=False, name=name)
    extras: Dict[str, Tensor] = {}
    for k, v in orig.items():
        r = recon.get(k)
        if r is None or r.shape != v.shape or not torch.equal(r.to(v.dtype), v):
            extras[k] = v
    entries, dropped = {}, []
    for k, v in ckpt.items():
        if k == container:
            continue
        try:
            entries[str(k)] = _encode(v)
        except _NotJSON:
            dropped.append(str(k))
    if dropped:
        logger.warning("%s: top-level entries %s hold tensors or objects and are not carried into the HF "
                       "folder (training state, not weights)", name, dropped)
    meta = {"version": EXTRAS_VERSION, "layout": layout, "container": container, "prefix": prefix,
            "queue_size": queue_size, "source": name,
            "top_order": [str(k) for k in ckpt if str(k) not in dropped] if container else [],
            "entries": entries if container else {}, "keys": {k: str(v.dtype) for k, v in orig.items()},
            "dropped_entries": dropped}
    return extras, meta


def _save_extras(path: Path, extras: Mapping[str, Tensor], meta: dict) -> None:
    from safetensors.torch import save
    # Tensors sharing memory (a pretraining file's tied decoder weights) are stored once per key.
    tensors = safetensors_tensors(extras)
    atomic_write(path, lambda f: f.write(save(tensors, metadata={EXTRAS_META: json.dumps(meta)})))


def export_hf(model, layout: str, arch, med, tokenizer, ckpt: Mapping, out_dir, name: str,
              embed_dim: Optional[int] = None) -> Path:
    """Write the HF folder of ``model`` (ours, weights loaded from ``ckpt``) to ``out_dir``:
    config.json, model.safetensors (through transformers' own ``save_pretrained``), the tokenizer,
    the image processor, and ``blip_extras.safetensors``. Returns the folder."""
    import transformers
    if layout == VQA:  # refused before anything is written; the processor puts [ENC] first
        from models import hf_vqa
        hf_vqa.check_widths(model.state_dict(), name, hf_names=False)
        tokenizer = hf_vqa.question_tokenizer(tokenizer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config(layout, arch.vit_arch, arch.image_size, med, tokenizer, embed_dim)
    hf_state = to_hf_state(model.state_dict(), layout)
    if layout in (CAPTION, VQA):
        tok_emb = hf_state["text_decoder.bert.embeddings.word_embeddings.weight"]
        orig = extract_state_dict(ckpt)
        head = orig.get("text_decoder.cls.predictions.decoder.weight")
        if head is not None and (head.shape != tok_emb.shape or not torch.equal(head.to(tok_emb.dtype), tok_emb)):
            logger.warning("%s: the LM head is not tied to the word embeddings; HF ties them (the head "
                           "is kept in %s only)", name, EXTRAS_FILE)
    hf_model = getattr(transformers, HF_CLASS[layout])(config)
    result = hf_model.load_state_dict(hf_state, strict=False)
    missing = [k for k in result.missing_keys if k not in TIED]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{name}: the weights do not fill {HF_CLASS[layout]}: missing {missing[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]}")
    hf_model.save_pretrained(out)
    del hf_model
    processor = transformers.BlipProcessor(image_processor=image_processor(arch.image_size), tokenizer=tokenizer)
    processor.save_pretrained(out)
    # vocab.txt too (the base WordPiece vocabulary, by id): our build_tokenizer reads it, so the
    # folder also serves as the config key `tokenizer`.
    vocab = tokenizer.convert_ids_to_tokens(list(range(tokenizer.vocab_size)))
    (out / "vocab.txt").write_text("".join(f"{t}\n" for t in vocab), encoding="utf-8")
    extras, meta = make_extras(ckpt, hf_state, layout, name)
    _save_extras(out / EXTRAS_FILE, extras, meta)
    logger.info("wrote %s (%s, %d tensors; %d more in %s: %s)", out, HF_CLASS[layout], len(hf_state),
                len(extras), EXTRAS_FILE, _summary(extras))
    return out


def _summary(keys) -> str:
    groups: Dict[str, int] = {}
    for k in keys:
        head = k.split(".")[0]
        groups[head] = groups.get(head, 0) + 1
    return ", ".join(f"{g} ({n})" if n > 1 else g for g, n in groups.items()) or "nothing"


def _is_state(x) -> bool:
    return isinstance(x, Mapping) and bool(x) and all(isinstance(v, Tensor) for v in x.values())


def same_checkpoint(a: Mapping, b: Mapping) -> List[str]:
    """Where two loaded checkpoints differ (empty: the same keys in the same order, equal dtypes,
    shapes and tensors, equal other entries)."""
    if _is_state(a) or _is_state(b):
        a, b = {"": a}, {"": b}
    diffs = []
    if list(a) != list(b):
        diffs.append(f"top-level keys {list(a)} vs {list(b)}")
    for k in a:
        if k not in b:
            continue
        x, y = a[k], b[k]
        if _is_state(x) and _is_state(y):
            if list(x) != list(y):
                diffs.append(f"{k}: key order or set differs")
            diffs += [f"{k}.{n}" for n in x if n in y and (x[n].dtype != y[n].dtype or x[n].shape != y[n].shape
                                                           or not torch.equal(x[n], y[n]))]
        elif _is_state(x) or _is_state(y) or x != y:
            diffs.append(f"entry {k}")
    return diffs


# ---------------------------------------------------------------------- config checks

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
