"""HuggingFace interop: BLIP's own checkpoint layout <-> transformers' ``Blip*`` folders.

    folder = export_hf(model, kind, cfg, tokenizer, ckpt, out_dir)   # tools/convert.py --to hf
    ckpt = load_official(folder_or_hub_id)                           # HF folder -> {'model': BLIP layout, ...}

An HF folder holds ``config.json`` (a ``BlipConfig``), ``model.safetensors`` (or
``pytorch_model.bin``), the tokenizer and the image processor. Three architectures map onto ours:

| HF class | our layout | our model kind |
|---|---|---|
| ``BlipForImageTextRetrieval`` | retrieval: ``visual_encoder``, ``text_encoder``, projections, ``itm_head`` | ``blip`` |
| ``BlipForConditionalGeneration`` | caption: ``visual_encoder``, ``text_decoder`` | ``caption`` |
| ``BlipForQuestionAnswering`` | VQA: ``visual_encoder``, ``text_encoder``, ``text_decoder`` | ``vqa`` (``models/hf_vqa.py``) |

The family, one concern a module: ``models/hf_keys.py`` (the key mapping, a folder's layout, an HF
state dict as the official one), ``models/hf_source.py`` (a folder or hub id located, offline
rules, its weights read), ``models/hf_config.py`` (``config.json`` made, validated and checked
against our config and the weights), ``models/hf_extras.py`` (``blip_extras.safetensors``: what
HF has no place for, which makes official -> HF -> official bit-identical), ``models/hf_vqa.py``
(VQA's particulars). This module holds the two doors over them, :func:`load_official` and
:func:`export_hf`, the folder's image processor and :func:`same_checkpoint` (the round-trip check).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

from models.hf_config import check_dims, check_weights_fit, hf_config, read_config
from models.hf_extras import EXTRAS_FILE, _apply_extras, _save_extras, make_extras, read_extras
from models.hf_keys import CAPTION, HF_CLASS, TIED, VQA, layout_of, official_from_hf, to_hf_state
from models.hf_source import read_weights, resolve_hf_folder
from utils.errors import CheckpointError
from utils.state_dict import extract_state_dict

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------- HF folder -> official checkpoint

def load_official(source, queue_size: Optional[int] = None, copy: bool = False,
                  expect: Optional[Mapping[str, Tuple[Any, str]]] = None) -> dict:
    """An HF folder or hub id as a BLIP checkpoint in the official layout (``{'model': ..., ...}``).

    With ``blip_extras.safetensors`` the original file comes back exactly (key order, dtypes,
    every tensor, top-level entries); without it the missing parts are synthesised (logged).
    ``expect`` (``models.hf_config.expected_dims``): config.json fields checked against our config first.
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


# ---------------------------------------------------------------------- official -> HF folder

def image_processor(image_size: int):
    """BLIP's test transform as an HF processor: resize to image_size (bicubic), BLIP's mean/std."""
    from PIL import Image
    from transformers import BlipImageProcessor
    from data.transforms import IMAGE_MEAN, IMAGE_STD
    return BlipImageProcessor(size={"height": image_size, "width": image_size}, resample=Image.BICUBIC,
                              image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD))


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
