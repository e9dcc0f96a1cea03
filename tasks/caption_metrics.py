"""COCO caption metrics as the captioning papers report them: pycocoevalcap's BLEU-1..4, METEOR,
ROUGE-L, CIDEr and (when its models can be had) SPICE, computed exactly as
``pycocoevalcap.eval.COCOEvalCap.evaluate`` does, without pycocotools' ``COCO`` objects.

- ``caption_scores(results, gts, spice="auto")``: the COCO results list
  ``[{"image_id": id, "caption": str}, ...]`` and the references ``{id: [str, ...]}`` -> ``{"Bleu_1":
  ..., "Bleu_4": ..., "METEOR": ..., "ROUGE_L": ..., "CIDEr": ..., ["SPICE": ...]}``, floats in 0..1
  (CIDEr up to 10) as pycocoevalcap gives them, not x100. Both sides go through the PTB tokenizer
  (lower case, punctuation dropped), then the same scorers as ``COCOEvalCap`` see the same inputs in
  the same order, so the numbers are the same to the last bit (one deliberate difference: line
  ends other than ``\\n`` inside a caption, such as ``\\r``, become spaces, where COCOEvalCap would
  pair every later caption with the wrong image).
- ``ground_truth(entries, id_of)``: references from BLIP-json annotation entries (``coco_karpathy_
  {val,test}.json``, Flickr30k, custom); ``image_id_for(entry, dataset)`` is the usual ``id_of``.
- ``read_gt_file(path)``: references from a COCO caption-annotation file (BLIP's
  ``coco_karpathy_{val,test}_gt.json``).
- ``write_results(path, results)``: the COCO results json, written atomically.

Ids are ints or strings and compare by type too (``7`` and ``"7"`` are two images). COCO and
Flickr30k use the number at the end of the image file's name, as BLIP's ``*_gt.json`` files do;
custom data uses the entry's ``image_id``, else its image path as written.

Java (8 or newer) runs the PTB tokenizer, METEOR and SPICE; ``require_java`` checks it first and
says how to install it when it is missing. SPICE also needs the Stanford CoreNLP 3.6.0 models
(``stanford-corenlp-3.6.0.jar`` and ``-models.jar`` in pycocoevalcap's ``spice/lib``, about 400 MB
to download once). ``spice="auto"`` fetches them when they are missing, once per process and with
bounded waits (offline it gives up at once); where that fails, or SPICE's own Java run does, SPICE
is skipped with one warning line per call. ``spice=True`` makes any of that an error;
``spice=False`` never tries.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any, Union

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from utils.errors import DataError, UserError, json_error

logger = logging.getLogger(__name__)

ImageId = Union[int, str]
METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")  # SPICE: when computed
DATASETS = ("coco", "flickr", "nocaps", "custom")

JAVA_CHECK_TIMEOUT_S = 30     # `java -version` (a cold JVM on a busy machine takes a few seconds)
SPICE_PROBE_TIMEOUT_S = 20    # can the CoreNLP download start at all? (offline: fails in well under 1 s)
SPICE_STALL_TIMEOUT_S = 60    # the download: the longest wait for any one network read
SPICE_FETCH_TIMEOUT_S = 1800  # the download: all of it (~400 MB)

JAVA_INSTALL = ("install a Java runtime: Debian/Ubuntu `sudo apt-get install -y default-jre-headless`, conda "
                "`conda install -c conda-forge openjdk`, macOS `brew install openjdk` (then put its `java` on "
                "PATH); check with `java -version`")

# The characters the PTB tokenizer (Java) takes as line ends, besides "\n" which pycocoevalcap already
# replaces: one of them in a caption would shift every later caption onto another image's line.
_LINE_BREAKS = re.compile("[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")

# Set once an automatic SPICE model fetch failed in this process: later calls skip SPICE at once.
_spice_fetch_failed: str | None = None


# ------------------------------------------------------------------------------------------ scores

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


def _tokenize(captions: dict) -> dict:
    """pycocoevalcap's PTB tokenization of ``{id: [{"caption": str}, ...]}`` -> ``{id: [str, ...]}``.

    Line-end characters other than ``"\\n"`` become spaces first (the tokenizer treats them as
    whitespace inside a line anyway): the Java tokenizer would otherwise split the caption in two and
    pycocoevalcap would pair every later line with the wrong image. The output is checked caption
    for caption, since a failing ``java`` just leaves it short."""
    clean = {i: [{"caption": _LINE_BREAKS.sub(" ", c["caption"])} for c in caps] for i, caps in captions.items()}
    tokenized = PTBTokenizer().tokenize(clean)
    if list(tokenized) != list(clean) or any(len(tokenized[i]) != len(caps) for i, caps in clean.items()):
        got = sum(len(v) for v in tokenized.values())
        want = sum(len(v) for v in clean.values())
        raise RuntimeError(f"the PTB tokenizer (java) returned {got} captions for {want}: see its error above")
    return tokenized


def _meteor(gts_tok: dict, res_tok: dict) -> float:
    """METEOR as COCOEvalCap computes it, with its long-running java process ended afterwards.

    pycocoevalcap 1.2's ``Meteor`` has no ``close()``: its ``__del__`` ends the process whenever the
    object is collected, and deadlocks if ``compute_score`` failed while holding the scorer's lock.
    So the process is ended here, and the lock replaced by a free one for ``__del__``."""
    meteor = Meteor()
    try:
        return meteor.compute_score(gts_tok, res_tok)[0]
    finally:
        proc = getattr(meteor, "meteor_p", None)
        if proc is not None:
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
            proc.kill()
            proc.wait()
        meteor.lock = threading.Lock()


def _ids(ids: Sequence, limit: int = 5) -> str:
    shown = ", ".join(repr(i) for i in list(ids)[:limit])
    return f"[{shown}{', ...' if len(ids) > limit else ''}]"


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# -------------------------------------------------------------------------------------------- Java

def require_java(timeout_s: float = JAVA_CHECK_TIMEOUT_S) -> str:
    """The first line of ``java -version`` (e.g. ``openjdk version "17.0.15" 2025-04-15``); a
    ``UserError`` saying how to install Java when ``java`` is not on PATH, does not run, or is
    older than 8."""
    need = "the COCO caption metrics (PTB tokenizer, METEOR, SPICE) need Java 8 or newer"
    java = shutil.which("java")
    if java is None:
        raise UserError(f"{need}, and there is no `java` on PATH; {JAVA_INSTALL}")
    try:
        proc = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise UserError(f"{need}, and `{java} -version` did not answer within {timeout_s:g} s; "
                        f"check that Java runs, or {JAVA_INSTALL}") from None
    except OSError as exc:
        raise UserError(f"{need}, and `{java}` does not run ({exc}); {JAVA_INSTALL}") from None
    text = (proc.stderr or proc.stdout).strip()
    first = text.splitlines()[0] if text else ""
    if proc.returncode != 0:
        raise UserError(f"{need}, and `{java} -version` failed (exit status {proc.returncode}: "
                        f"{first or 'no output'}); {JAVA_INSTALL}")
    match = re.search(r'version "(\d+)(?:\.(\d+))?', text)
    if match:
        major = int(match.group(1))
        major = int(match.group(2) or 0) if major == 1 else major  # "1.8.0_292" is Java 8
        if major < 8:
            raise UserError(f"{need}; `{java}` is Java {major} ({first}); {JAVA_INSTALL}")
    return first


# ------------------------------------------------------------------------------------------- SPICE

def _stanford() -> Any:
    """pycocoevalcap's ``spice/get_stanford_models.py`` module (where SPICE looks for CoreNLP)."""
    return importlib.import_module("pycocoevalcap.spice.get_stanford_models")


def spice_model_files() -> list[str]:
    """The two CoreNLP jars SPICE needs, where pycocoevalcap looks for them (``spice/lib``)."""
    mod = _stanford()
    base = os.path.join(mod.SPICEDIR, mod.SPICELIB, mod.JAR)
    return [base + ".jar", base + "-models.jar"]


def spice_models_present() -> bool:
    return all(os.path.isfile(f) for f in spice_model_files())


def _spice_models_ready(required: bool) -> bool:
    """Whether SPICE can run: its models are present or were just fetched. Otherwise ``required``
    raises a ``UserError``, else one warning line says why SPICE is skipped and how to get it."""
    global _spice_fetch_failed
    if spice_models_present():
        return True
    reason = None if required else _spice_fetch_failed
    if reason is None:
        reason = _fetch_spice_models()
        if reason is None:
            return True
        if not required:
            _spice_fetch_failed = reason
    lib = os.path.dirname(spice_model_files()[0])
    message = (f"its Stanford CoreNLP models ({' and '.join(os.path.basename(f) for f in spice_model_files())} "
               f"in {lib}) are missing and could not be fetched: {reason}. To get SPICE, run `{sys.executable} "
               f"-m pycocoevalcap.spice.get_stanford_models` with network access, or copy the two jars from "
               f"{_spice_url()} into that folder")
    if required:
        raise UserError(f"SPICE cannot be computed: {message}")
    logger.warning("SPICE skipped (the other caption metrics are computed; spice=False silences this): %s", message)
    return False


def _spice_url() -> str:
    mod = _stanford()
    return f"http://nlp.stanford.edu/software/{mod.CORENLP}.zip"  # as get_stanford_models() builds it


def _fetch_spice_models() -> str | None:
    """Fetch the CoreNLP models with pycocoevalcap's own ``get_stanford_models()``; ``None`` on
    success, else why not (one line).

    Its ``urlretrieve`` has no timeout, and name resolution ignores socket timeouts, so both steps
    run in a child process the parent can stop: first a probe that the server answers at all (at
    most ``SPICE_PROBE_TIMEOUT_S``; offline it fails at once), then the download, with socket
    reads bounded by ``SPICE_STALL_TIMEOUT_S`` and the whole by ``SPICE_FETCH_TIMEOUT_S``. The
    download's temporary zip goes to a folder removed afterwards, finished or not."""
    url = _spice_url()
    probe = ("import sys, urllib.request\n"
             f"urllib.request.urlopen(sys.argv[1], timeout={SPICE_PROBE_TIMEOUT_S / 2:g}).close()\n")
    error = _run_child(probe, [url], SPICE_PROBE_TIMEOUT_S, f"reaching {url}")
    if error is not None:
        return error
    files = spice_model_files()
    try:
        if os.path.exists(files[0]):
            os.remove(files[0])  # a partial earlier fetch: get_stanford_models() only looks for this one
    except OSError as exc:
        return f"cannot replace the partial {files[0]} ({exc})"
    logger.info("SPICE: downloading the Stanford CoreNLP models (%s, about 400 MB, once) into %s",
                url, os.path.dirname(files[0]))
    fetch = ("import socket\n"
             f"socket.setdefaulttimeout({SPICE_STALL_TIMEOUT_S})\n"
             "from pycocoevalcap.spice.get_stanford_models import get_stanford_models\n"
             "get_stanford_models()\n")
    error = _run_child(fetch, [], SPICE_FETCH_TIMEOUT_S, f"downloading {url}")
    if error is None and not spice_models_present():
        error = f"downloading {url} ended without {' and '.join(files)}"
    return error


def _run_child(code: str, args: list[str], timeout_s: float, what: str) -> str | None:
    """Run ``code`` in a fresh Python with a private temp folder; ``None`` on success, else why not."""
    with tempfile.TemporaryDirectory(prefix="caption-metrics-") as tmp:
        env = dict(os.environ, TMPDIR=tmp, TEMP=tmp, TMP=tmp)
        try:
            proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                                  text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return f"{what} took longer than {timeout_s:g} s"
    if proc.returncode == 0:
        return None
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return f"{what} failed ({lines[-1].strip() if lines else f'exit status {proc.returncode}'})"


def _spice(gts_tok: dict, res_tok: dict, required: bool) -> float | None:
    """SPICE as COCOEvalCap computes it; ``None`` (after one warning line) if its java run fails
    and SPICE is not ``required``, else a ``UserError``.

    pycocoevalcap's SPICE sorts the ids and writes them into json for Java: here they are
    replaced by their ranks in that order (ints), so string and mixed ids work and the scores are
    averaged in the same order as with the ids themselves."""
    from pycocoevalcap.spice.spice import Spice  # imported here: it pulls numpy and is often skipped

    ids = list(gts_tok)
    try:
        ids = sorted(ids)
    except TypeError:
        pass  # mixed ints and strings: no order of their own; keep the references' order
    rank = {image_id: k for k, image_id in enumerate(ids)}
    try:
        score, _ = Spice().compute_score({rank[i]: gts_tok[i] for i in ids}, {rank[i]: res_tok[i] for i in ids})
        return float(score)
    except (subprocess.CalledProcessError, OSError, ValueError, KeyError) as exc:
        why = (f"its java run exited with status {exc.returncode} (it asks for an 8 GB heap, -Xmx8G)"
               if isinstance(exc, subprocess.CalledProcessError) else f"{type(exc).__name__}: {exc}")
        if required:
            raise UserError(f"SPICE failed: {why}") from exc
        logger.warning("SPICE skipped (the other caption metrics are computed): %s", why)
        return None


# ------------------------------------------------------------------------------------ ground truth

def image_id_for(entry: Mapping[str, Any], dataset: str) -> ImageId:
    """The image id of an annotation entry ``{"image": path, ...}``, as the results and the
    references of ``dataset`` use it.

    ``coco`` / ``flickr``: the number at the end of the image file's stem
    (``val2014/COCO_val2014_000000391895.jpg`` -> ``391895``, ``flickr30k-images/1007129816.jpg``
    -> ``1007129816``), the ids of BLIP's ``*_gt.json`` files. ``custom``: the entry's ``image_id``
    (int or string) when present, else its ``image`` path exactly as written. ``nocaps``: the
    entry's ``img_id`` (BLIP's NoCaps files; the evaluation server's ids). A ``DataError``
    names the entry and the field when there is no such id."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r} (expected one of {', '.join(DATASETS)})")
    if not isinstance(entry, Mapping):
        raise DataError(f"annotation entry {_short(entry)}: expected an object with an 'image' field")
    if dataset == "nocaps":  # BLIP's nocaps_{val,test}.json: {"image", "img_id"}; the server's ids
        image_id = entry.get("img_id")
        if isinstance(image_id, str) and image_id.strip().isdigit():
            image_id = int(image_id)
        if isinstance(image_id, bool) or not isinstance(image_id, int):
            raise DataError(f"annotation entry {_short(entry)} field 'img_id': expected the NoCaps image id (an "
                            f"int), got {_short(image_id)}")
        return image_id
    if dataset == "custom" and "image_id" in entry:
        image_id = entry["image_id"]
        if isinstance(image_id, bool) or not isinstance(image_id, (int, str)) or image_id == "":
            raise DataError(f"annotation entry {_short(entry)} field 'image_id': expected an int or a "
                            f"non-empty string, got {_short(image_id)}")
        return image_id
    image = entry.get("image")
    if not isinstance(image, str) or not image:
        raise DataError(f"annotation entry {_short(entry)} field 'image': expected the image path (a "
                        f"non-empty string), got {_short(image)}")
    if dataset == "custom":
        return image
    stem = (PureWindowsPath if "\\" in image else PurePosixPath)(image).stem
    match = re.search(r"(\d+)$", stem)
    if match is None:
        example = "COCO_val2014_000000391895.jpg" if dataset == "coco" else "1007129816.jpg"
        raise DataError(f"annotation entry {_short(entry)} field 'image': no image id at the end of the file "
                        f"name {os.path.basename(image)!r}; {dataset} ids are the number that ends the "
                        f"file's name (e.g. {example}); use dataset 'custom' for other names")
    return int(match.group(1))


def ground_truth(annotation_entries: Iterable[Mapping[str, Any]], id_of: Callable[[Mapping[str, Any]], ImageId],
                 source: str | os.PathLike | None = None) -> dict[ImageId, list[str]]:
    """``{id: [reference, ...]}`` from BLIP-json entries ``{"image": path, "caption": [str, ...] |
    str}`` (``coco_karpathy_{val,test}.json``, Flickr30k, custom), the id of each by ``id_of``
    (e.g. ``lambda e: image_id_for(e, "coco")``), in first-seen order. Entries with the same id
    pool their captions (custom files may give one caption per entry). An entry without captions,
    an empty or non-string caption is a ``DataError`` naming the entry (of ``source``, the file,
    when given) and the field."""
    where = f" of {source}" if source is not None else ""
    gts: dict[ImageId, list[str]] = {}
    for k, entry in enumerate(annotation_entries):
        if not isinstance(entry, Mapping):
            raise DataError(f"entry {k}{where}: expected an object with 'image' and 'caption', got {_short(entry)}")
        try:
            image_id = id_of(entry)
        except DataError as exc:
            raise DataError(f"entry {k}{where}: {exc}") from None
        if "caption" not in entry:
            raise DataError(f"entry {k}{where} (image {entry.get('image')!r}): no field 'caption'")
        captions = entry["caption"]
        captions = [captions] if isinstance(captions, str) else captions
        if not isinstance(captions, list) or not captions:
            raise DataError(f"entry {k}{where} (image {entry.get('image')!r}) field 'caption': expected a "
                            f"caption or a non-empty list of captions, got {_short(entry['caption'])}")
        for j, caption in enumerate(captions):
            if not isinstance(caption, str) or not caption.strip():
                at = "" if isinstance(entry["caption"], str) else f"[{j}]"
                raise DataError(f"entry {k}{where} (image {entry.get('image')!r}) field 'caption'{at}: "
                                f"expected a non-empty string, got {_short(caption)}")
        gts.setdefault(image_id, []).extend(captions)
    if not gts:
        raise DataError(f"no annotation entries{where}: nothing to evaluate captions against")
    return gts


def read_gt_file(path: str | os.PathLike) -> dict[ImageId, list[str]]:
    """``{image_id: [reference, ...]}`` from a COCO caption-annotation file (BLIP's
    ``coco_karpathy_{val,test}_gt.json``): ``{"annotations": [{"image_id": ..., "caption": str,
    ...}], "images": [{"id": ...}, ...]}``. The order is that of ``images`` (as COCOEvalCap scores
    them), else of first appearance in ``annotations``; captions keep their file order. With
    ``images``, every annotation's image must be listed and every listed image needs a caption.
    Errors are ``DataError``s naming the file and the field."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: no such ground-truth file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read it as json: {json_error(exc)}") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        got = f"keys {sorted(data)[:8]}" if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{path}: expected a COCO caption-annotation object with an 'annotations' list "
                        f"({{'annotations': [{{'image_id': ..., 'caption': ...}}], 'images': [...]}}), got {got}")
    images = data.get("images")
    gts: dict[ImageId, list[str]] = {}
    if images is not None:
        if not isinstance(images, list):
            raise DataError(f"{path} field 'images': expected a list, got {type(images).__name__}")
        for k, image in enumerate(images):
            image_id = image.get("id") if isinstance(image, dict) else None
            if not _is_id(image_id):
                raise DataError(f"{path} images[{k}] field 'id': expected an int or a string, got "
                                f"{_short(image.get('id') if isinstance(image, dict) else image)}")
            if image_id in gts:
                raise DataError(f"{path} images[{k}] field 'id': image {image_id!r} is listed twice")
            gts[image_id] = []
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise DataError(f"{path} annotations[{k}]: expected an object, got {_short(ann)}")
        image_id, caption = ann.get("image_id"), ann.get("caption")
        if not _is_id(image_id):
            raise DataError(f"{path} annotations[{k}] field 'image_id': expected an int or a string, "
                            f"got {_short(image_id)}")
        if not isinstance(caption, str) or not caption.strip():
            raise DataError(f"{path} annotations[{k}] field 'caption': expected a non-empty string, "
                            f"got {_short(caption)}")
        if images is not None and image_id not in gts:
            raise DataError(f"{path} annotations[{k}] field 'image_id': image {image_id!r} is not in 'images'")
        gts.setdefault(image_id, []).append(caption)
    empty = [i for i, refs in gts.items() if not refs]
    if empty:
        raise DataError(f"{path} field 'images': {len(empty)} image(s) without any caption in "
                        f"'annotations': {_ids(empty)}")
    if not gts:
        raise DataError(f"{path} field 'annotations': no captions")
    return gts


def _is_id(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool) and value != ""


# ----------------------------------------------------------------------------------------- results

def write_results(path: str | os.PathLike, results: Sequence[Mapping[str, Any]]) -> None:
    """Write the COCO results list ``[{"image_id": ..., "caption": ...}]`` to ``path`` as json,
    atomically (a temp file next to it, fsynced, then ``os.replace``): a reader never sees half a
    file, and a failure leaves any previous file as it was. The parent folder is created if needed;
    numpy / torch integer ids are written as ints."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        os.makedirs(folder, exist_ok=True)
        # os.open with 0o666 (not mkstemp's 0o600): the file gets the usual umask permissions.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(list(results), f, ensure_ascii=False, default=_json_int)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt included: never leave the temp file behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _json_int(value: Any) -> int:
    """Integer-like ids json cannot write itself (numpy / torch integers)."""
    if hasattr(value, "__index__"):
        return value.__index__()
    raise TypeError(f"{type(value).__name__} {value!r} is not JSON serializable")
