"""SPICE for the COCO caption metrics: its Stanford CoreNLP models (where pycocoevalcap looks for
them, fetched once with bounded waits) and its Java run, with ids SPICE's json can take.

SPICE also needs the Stanford CoreNLP 3.6.0 models (``stanford-corenlp-3.6.0.jar`` and
``-models.jar`` in pycocoevalcap's ``spice/lib``, about 400 MB to download once). ``spice="auto"``
fetches them when they are missing, once per process and with bounded waits (offline it gives up
at once); where that fails, or SPICE's own Java run does, SPICE is skipped with one warning line
per call. ``spice=True`` makes any of that an error; ``spice=False`` never tries.
"""
from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
import tempfile
from typing import Any

from utils.errors import UserError

logger = logging.getLogger(__name__)

SPICE_PROBE_TIMEOUT_S = 20    # can the CoreNLP download start at all? (offline: fails in well under 1 s)
SPICE_STALL_TIMEOUT_S = 60    # the download: the longest wait for any one network read
SPICE_FETCH_TIMEOUT_S = 1800  # the download: all of it (~400 MB)

# Set once an automatic SPICE model fetch failed in this process: later calls skip SPICE at once.
_spice_fetch_failed: str | None = None


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
