"""Java for the COCO caption metrics: whether it runs, and the two Java tools every score needs, the
PTB tokenizer and METEOR (its long-running process ended after each use). SPICE, the third Java
tool, with its own models: ``tasks/caption_spice.py``.

Java (8 or newer) runs the PTB tokenizer, METEOR and SPICE; ``require_java`` checks it first and
says how to install it when it is missing.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import threading

from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from utils.errors import UserError

JAVA_CHECK_TIMEOUT_S = 30     # `java -version` (a cold JVM on a busy machine takes a few seconds)

JAVA_INSTALL = ("install a Java runtime: Debian/Ubuntu `sudo apt-get install -y default-jre-headless`, conda "
                "`conda install -c conda-forge openjdk`, macOS `brew install openjdk` (then put its `java` on "
                "PATH); check with `java -version`")

# The characters the PTB tokenizer (Java) takes as line ends, besides "\n" which pycocoevalcap already
# replaces: one of them in a caption would shift every later caption onto another image's line.
_LINE_BREAKS = re.compile("[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


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
