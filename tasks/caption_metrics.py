"""COCO caption metrics as the captioning papers report them: pycocoevalcap's BLEU-1..4, METEOR,
ROUGE-L, CIDEr and (when its models can be had) SPICE, computed exactly as
``pycocoevalcap.eval.COCOEvalCap.evaluate`` does, without pycocotools' ``COCO`` objects: the scoring.

- ``caption_scores(results, gts, spice="auto")``: the COCO results list
  ``[{"image_id": id, "caption": str}, ...]`` and the references ``{id: [str, ...]}`` -> ``{"Bleu_1":
  ..., "Bleu_4": ..., "METEOR": ..., "ROUGE_L": ..., "CIDEr": ..., ["SPICE": ...]}``, floats in 0..1
  (CIDEr up to 10) as pycocoevalcap gives them, not x100. Both sides go through the PTB tokenizer
  (lower case, punctuation dropped), then the same scorers as ``COCOEvalCap`` see the same inputs in
  the same order, so the numbers are the same to the last bit (one deliberate difference: line
  ends other than ``\\n`` inside a caption, such as ``\\r``, become spaces, where COCOEvalCap would
  pair every later caption with the wrong image).
- ``best_constant_caption(gts, candidates)``: the baseline a captioner must beat.

The rest of the caption metrics, one concern each: the image ids, the references and the results
file in ``tasks/caption_files.py`` (``image_id_for``, ``ground_truth``, ``read_gt_file``,
``write_results``); Java, the PTB tokenizer and METEOR's Java process in ``tasks/caption_java.py``
(``require_java``); SPICE and its Stanford CoreNLP models in ``tasks/caption_spice.py``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from tasks.caption_files import ImageId, _ids, _short
from tasks.caption_java import _meteor, _tokenize, require_java
from tasks.caption_spice import _spice, _spice_models_ready
from utils.errors import DataError

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")  # SPICE: when computed


def caption_scores(results: Sequence[Mapping[str, Any]], gts: Mapping[ImageId, Sequence[str]],
                   spice: bool | str = "auto") -> dict[str, float]:
    """COCO caption metrics of ``results`` against the references ``gts``.

    ``results``: ``[{"image_id": id, "caption": str}, ...]``, exactly one per id of ``gts``;
    ``gts``: ``{id: [reference, ...]}``, raw captions (both are PTB-tokenized here, as COCOEvalCap
    does). Returns ``METRICS`` (and ``"SPICE"`` when computed) as floats, pycocoevalcap's values.
    ``spice``: ``"auto"`` (computed when its models are present or can be fetched, else skipped
    with one warning line), ``True`` (an error if it cannot be computed) or ``False``.

    A result id missing from ``gts``, an id of ``gts`` without a result or with several is a
    ``DataError`` (a ``ValueError``) naming the ids; missing Java is a ``UserError`` saying how to
    install it. The scorers see the images in the order of ``gts``, as COCOEvalCap sees them in the
    order of the gt file's ``images``.
    """
    if not (spice == "auto" or spice is True or spice is False):
        raise ValueError(f"spice must be 'auto', True or False, got {spice!r}")
    candidates = _match_results(results, gts)
    require_java()
    spice_ok = spice is not False and _spice_models_ready(required=spice is True)

    # COCOEvalCap: {id: [{"caption": str}, ...]} per side, tokenized separately, ids in gt order.
    gts_tok = _tokenize({i: [{"caption": c} for c in refs] for i, refs in gts.items()})
    res_tok = _tokenize({i: [{"caption": candidates[i]}] for i in gts})

    scores: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts_tok, res_tok, verbose=0)  # verbose only prints
    scores.update({f"Bleu_{n}": float(b) for n, b in enumerate(bleu, start=1)})
    scores["METEOR"] = float(_meteor(gts_tok, res_tok))
    scores["ROUGE_L"] = float(Rouge().compute_score(gts_tok, res_tok)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts_tok, res_tok)[0])
    if spice_ok:
        value = _spice(gts_tok, res_tok, required=spice is True)
        if value is not None:
            scores["SPICE"] = value
    return scores


def best_constant_caption(gts: Mapping[ImageId, Sequence[str]], candidates: Sequence[str]) -> dict:
    """The baseline a captioner must beat: the one caption of ``candidates`` that, given for every
    image, scores the highest CIDEr against ``gts``. Returns ``{"caption", "CIDEr", "Bleu_4",
    "candidates"}`` (pycocoevalcap's values, the same PTB tokenization as :func:`caption_scores`;
    METEOR is left out: one Java run per candidate)."""
    if not candidates:
        raise ValueError("best_constant_caption: no candidate captions")
    require_java()
    ids = list(gts)
    gts_tok = _tokenize({i: [{"caption": c} for c in refs] for i, refs in gts.items()})
    cand_tok = _tokenize({k: [{"caption": c}] for k, c in enumerate(candidates)})
    best = None
    for k, caption in enumerate(candidates):
        res_tok = {i: cand_tok[k] for i in ids}
        cider = float(Cider().compute_score(gts_tok, res_tok)[0])
        if best is None or cider > best["CIDEr"]:
            best = {"caption": caption, "CIDEr": cider, "k": k}
    k = best.pop("k")
    res_tok = {i: cand_tok[k] for i in ids}
    best["Bleu_4"] = float(Bleu(4).compute_score(gts_tok, res_tok, verbose=0)[0][3])
    best["candidates"] = len(candidates)
    return best


def _match_results(results: Sequence[Mapping[str, Any]], gts: Mapping[ImageId, Sequence[str]]) -> dict:
    """``{id: candidate caption}``, after checking that results and references pair one to one."""
    if not gts:
        raise DataError("no reference captions to score against (the ground truth is empty)")
    for image_id, refs in gts.items():
        if isinstance(refs, str) or not isinstance(refs, Sequence) or not refs:
            raise DataError(f"references of image {image_id!r}: expected a non-empty list of captions, "
                            f"got {_short(refs)}")
        for k, ref in enumerate(refs):
            if not isinstance(ref, str):
                raise DataError(f"references of image {image_id!r}, caption {k}: expected a string, "
                                f"got {_short(ref)}")
    candidates: dict = {}
    duplicates, unknown = [], []
    for k, item in enumerate(results):
        if not isinstance(item, Mapping) or "image_id" not in item or "caption" not in item:
            raise DataError(f"results[{k}]: expected {{'image_id': ..., 'caption': str}}, got {_short(item)}")
        image_id, caption = item["image_id"], item["caption"]
        if not isinstance(caption, str):
            raise DataError(f"results[{k}] (image {image_id!r}) field 'caption': expected a string, "
                            f"got {_short(caption)}")
        if image_id not in gts:
            unknown.append(image_id)
        elif image_id in candidates:
            duplicates.append(image_id)
        candidates[image_id] = caption
    missing = [i for i in gts if i not in candidates]
    if unknown or missing or duplicates:
        parts = []
        if unknown:
            parts.append(f"{len(unknown)} result id(s) not in the references: {_ids(unknown)}")
        if missing:
            parts.append(f"{len(missing)} reference id(s) without a result: {_ids(missing)}")
        if duplicates:
            parts.append(f"{len(set(duplicates))} id(s) with several results: {_ids(sorted(set(duplicates), key=repr))}")
        hint = ""
        if unknown and {str(i) for i in unknown} & {str(i) for i in gts}:
            hint = " (ids compare by type too: 7 and '7' are two images)"
        raise DataError("caption results and references do not pair one to one: " + "; ".join(parts) + hint)
    return candidates
