"""The loading policy: one judgement of a :class:`~utils.state_dict.LoadReport` (what a checkpoint
would give a model, before anything is loaded) for every place a checkpoint meets a model
(:func:`check_report`), and the config keys behind the dims a report found different
(:func:`config_keys_of`, from ``_DIM_KEYS`` / ``_DEPTH_KEYS``), named in its one-line error.
``models/factory.py`` ``load_weights`` builds the reports, judges each here, and only then loads.
"""
from __future__ import annotations

import logging
import re
from typing import Dict, Optional

from utils.errors import CheckpointMismatchError
from utils.state_dict import LoadReport, collapse_keys

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------- the loading policy
#
# One policy for every place a checkpoint meets a model: `pretrained`, `teacher`, a tool's member,
# resume (utils.resume checks its own files strictly with the same messages). `strict` is the
# config's `strict_load`:
#   None (the default): a shape mismatch, a file tensor the model has no place for, or a model
#       weight the file lacks is an error; parts the layout declares new (a fresh caption decoder,
#       ContextBLIP's adapter and TMIM decoder over a plain BLIP) are allowed when training starts
#       from the file (purpose 'train') and listed, and are errors when it is evaluated ('eval');
#   True: even those must come from the file;
#   False: the escape hatch: what fits is loaded and a warning says what was let through.

PURPOSES = ("train", "eval")

# Which config keys set the dimensions of a key's tensor: (pattern, {dim index or None: [key or
# "key:field"]}): the dims that differ pick their keys (None: any other dim).
_DIM_KEYS = (
    (r"visual_encoder(_m)?\.pos_embed$", {1: ["image_size", "vit:patch_size"], None: ["vit:width"]}),
    (r"visual_encoder(_m)?\.patch_embed\.", {0: ["vit:width"], None: ["vit:patch_size"]}),
    (r"visual_encoder(_m)?\.", {None: ["vit:width", "vit:mlp_ratio"]}),
    (r"\.word_embeddings\.weight$", {0: ["tokenizer", "med_config:vocab_size"], None: ["med_config:hidden_size"]}),
    (r"\.predictions\.(bias|decoder\.weight|decoder\.bias)$", {0: ["tokenizer", "med_config:vocab_size"],
                                                                None: ["med_config:hidden_size"]}),
    (r"\.position_embeddings\.weight$", {0: ["med_config:max_position_embeddings"],
                                         None: ["med_config:hidden_size"]}),
    (r"\.position_ids$", {None: ["med_config:max_position_embeddings"]}),
    (r"crossattention\.self\.(key|value)\.weight$", {1: ["vit:width"], None: ["med_config:hidden_size"]}),
    (r"(^|\.)vision_proj(_m)?\.weight$", {0: ["embed_dim"], None: ["vit:width"]}),
    (r"(^|\.)text_proj(_m)?\.weight$", {0: ["embed_dim"], None: ["med_config:hidden_size"]}),
    (r"(^|\.)(vision|text)_proj(_m)?\.bias$", {None: ["embed_dim"]}),
    (r"(^|\.)(image|text)_queue$", {0: ["embed_dim"], None: ["queue_size"]}),
    (r"(^|\.)idx_queue$", {None: ["queue_size"]}),
    (r"(^|\.)itm_head\.", {None: ["med_config:hidden_size"]}),
    (r"(^|\.)(text_encoder|text_decoder)(_m)?\.", {None: ["med_config:hidden_size", "med_config:intermediate_size"]}),
    (r"(^|\.)adapter\.", {None: ["vit:width", "adapter_taps", "adapter_reduction"]}),
    (r"(^|\.)decoder\.", {None: ["vit:width", "decoder_depth", "decoder_heads", "decoder_mlp_ratio",
                                   "text_adapter_reduction"]}),
    (r"(^|\.)prediction\.", {None: ["med_config:hidden_size"]}),
    (r"(^|\.)context\.|(^|\.)stage1\.", {None: ["context_layers", "context_heads", "context_mlp_ratio"]}),
)
# Layers a file has and the model has not (or the reverse): the depth keys.
_DEPTH_KEYS = ((r"visual_encoder(_m)?\.blocks\.\d+\.", "vit:depth"),
               (r"(text_encoder|text_decoder)(_m)?\.(bert\.)?encoder\.layer\.\d+\.", "med_config:num_hidden_layers"),
               (r"(^|\.)decoder\.blocks?\.\d+\.", "decoder_depth"))


def _dims_keys(key: str, file_shape: tuple, model_shape: tuple) -> list:
    for pattern, by_dim in _DIM_KEYS:
        if re.search(pattern, key):
            differs = [i for i in range(min(len(file_shape), len(model_shape))) if file_shape[i] != model_shape[i]]
            named = [t for i in differs if i in by_dim for t in by_dim[i]]
            return named or by_dim[None]
    return []


def config_keys_of(report: LoadReport, role: str = "pretrained") -> str:
    """The config keys that set the dims a report found different (for its error message), e.g.
    ``vit (width, mlp_ratio), embed_dim``; a teacher's are ``teacher_vit`` / ``teacher_med_config``."""
    tokens = [t for k, a, b in report.mismatched for t in _dims_keys(k, a, b)]
    tokens += [name for k in report.unexpected + report.missing for pattern, name in _DEPTH_KEYS if re.search(pattern, k)]
    fields: Dict[str, list] = {}
    for token in tokens:
        key, _, part = token.partition(":")
        if role.startswith("teacher") and key in ("vit", "med_config"):
            key = f"teacher_{key}"
        parts = fields.setdefault(key, [])
        if part and part not in parts:
            parts.append(part)
    return ", ".join(f"{k} ({', '.join(v)})" if v else k for k, v in fields.items()) or \
        "the model's architecture keys (vit, image_size, med_config, embed_dim)"


def _shapes(items) -> str:
    return "; ".join(f"{k} {tuple(a)} in the file, {tuple(b)} in the model" for k, a, b in items)


def check_report(report: LoadReport, name: str, role: str = "pretrained", purpose: str = "eval",
                 strict: Optional[bool] = None, model_name: str = "model") -> None:
    """The loading policy (above) on one report: a one-line CheckpointMismatchError naming the role,
    the file, the first keys (with both shapes) and the config keys behind them; else the new
    parts listed and, with ``strict=False``, what was let through warned about."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose {purpose!r}: one of {PURPOSES}")
    who = f"{role} {name}" if not str(name).startswith(role) else str(name)
    if strict is False:
        let = [f"{len(v)} {what}" for what, v in (("shape-mismatched", report.mismatched),
                                                   ("missing", report.missing), ("unexpected", report.unexpected),
                                                   ("new", report.new)) if v]
        if let:
            logger.warning("strict_load: false: %s loaded with %s tensor(s) let through (%s); those weights are "
                           "not the file's", who, ", ".join(let),
                           collapse_keys([k for k, _, _ in report.mismatched] + report.missing + report.new
                                         + report.unexpected))
        return
    new_is_missing = purpose == "eval" or strict is True
    missing = report.missing + (report.new if new_is_missing else [])
    problems = []
    if report.mismatched:
        more = len(report.mismatched) - 2
        problems.append(f"{len(report.mismatched)} tensor(s) have other shapes: {_shapes(report.mismatched[:2])}"
                        + (f" (and {more} more)" if more > 0 else ""))
    if report.unexpected:
        problems.append(f"{len(report.unexpected)} tensor(s) of the file have no place in the model: "
                        f"{collapse_keys(report.unexpected)}")
    if missing:
        why = (" (evaluation needs every weight from the file)" if report.new and purpose == "eval" else
               " (strict_load: true)" if report.new and strict else "")
        problems.append(f"the file lacks {len(missing)} weight(s) the model needs{why}: {collapse_keys(missing)}")
    if problems:
        if report.mismatched or report.unexpected or report.missing:
            todo = (f"Those shapes come from the config keys {config_keys_of(report, role)}: set them as the "
                    "checkpoint was trained (its config.yaml), or strict_load: false to load only what fits")
        elif strict is True:
            todo = "Drop strict_load: true to start them afresh, or give a checkpoint that holds them"
        else:
            todo = ("Evaluate a checkpoint trained for this model (it holds them), or strict_load: false to run "
                    "with them at their random initialisation")
        raise CheckpointMismatchError(f"{who} does not fit the {model_name}: {'; '.join(problems)}. {todo}")
    if report.new:
        logger.info("%s: %d weight(s) new, initialised here (not in the file): %s", who, len(report.new),
                    collapse_keys(report.new))
