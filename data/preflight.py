"""Pre-flight checks, run by every entry script and tool after parsing and before any model is built,
so that bad input stops a run before its first step, never after an epoch (docs/FORMATS.md, "Before
the first step").

- ``check_images(paths, where, what, skip)``: every image exists and PIL reads its header (no pixel
  decode), checked by a thread pool; above ``LAZY_CHECK_IMAGES`` images, every file's existence and
  the headers of a random sample of ``HEADER_SAMPLE`` (the other headers are read when the image is
  loaded). Under torchrun rank 0 checks and broadcasts, so every rank drops the same images.
  A bad image is an error naming the file entry (or CSV row and line) and the field; with ``skip``
  (``skip_bad_images``) it is returned, logged and counted instead.
- ``check_splits(datasets, skip)``: the same for every split of a run (datasets with
  ``image_checks()`` / ``drop_images()``), all splits checked before it refuses (one run lists every
  bad image), or with ``skip`` dropping bad entries up front with a count per split.
- ``log_unk_rate(tokenizer, texts, what)``: the share of caption words the tokenizer turns into
  ``[UNK]``, logged, with a warning above ``UNK_WARN_RATE`` (a tokenizer whose vocabulary does not
  fit the captions reads them as [UNK] silently otherwise).

Parsing itself (empty files, CSV field counts, UTF-8, empty captions) is the readers' job: they raise
when the datasets are built, which entry scripts also do before building a model.
"""
from __future__ import annotations

import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Optional

from utils.errors import DataError
from utils.logging import Heartbeat

from .utils import BadImageError, check_image

logger = logging.getLogger(__name__)


def _du():
    """``utils.dist``, imported when a check runs: it imports torch, which the data generator
    (``data.synthetic``, through ``data.mmvp``) and the other torch-free readers do not need."""
    from utils import dist
    return dist

# Above this many distinct images a split is checked lazily: opening millions of files (CC3M: 3M)
# before the first step can take very long on network storage, while a stat per file is cheap. The
# header sample still catches systematic problems (a folder of non-images, an unsupported format).
LAZY_CHECK_IMAGES = 200_000
HEADER_SAMPLE = 1_000
# Threads, not processes: the checks wait on the file system and PIL releases the GIL for I/O.
CHECK_THREADS = min(32, 4 * (os.cpu_count() or 1))
_CHUNK = 256            # paths per thread-pool task
MAX_LISTED = 20         # bad images listed one per line in the log

UNK_WARN_RATE = 0.05
UNK_SAMPLE = 100_000    # captions: the rate of a random sample of this size is exact enough


@dataclass(frozen=True)
class BadImage:
    path: str
    where: str      # "entry 3 of FILE, field 'image'" / "set 'S', candidate 4 of FILE" / ...
    error: str      # "image file missing: PATH" / "unreadable image: PATH: reason"
    missing: bool

    @property
    def message(self) -> str:
        return f"{self.where}: {self.error}"


def _problem(path: str, header: bool) -> Optional[tuple[bool, str]]:
    """(missing?, message) for a bad image, None for a good one."""
    try:
        if header:
            check_image(path)
        elif not os.path.isfile(path):
            return True, f"image file missing: {path}"
    except FileNotFoundError as exc:
        return True, str(exc)
    except BadImageError as exc:
        return False, str(exc)
    return None


def find_bad_images(paths: Sequence[str], where: Callable[[int], str], what: str) -> list[BadImage]:
    """The bad images among ``paths`` (distinct), in order; ``where(k)`` names path k's entry.
    Checks in parallel, lazily above ``LAZY_CHECK_IMAGES`` (see the module doc)."""
    n = len(paths)
    sample: Optional[set[int]] = None
    if n > LAZY_CHECK_IMAGES:
        sample = set(random.Random(0).sample(range(n), HEADER_SAMPLE))
        logger.info("%s: %d images, more than %d: checking that every file exists and reading the headers of a "
                    "random sample of %d; the other headers are read when the image is loaded (a failure then "
                    "stops the run, or with skip_bad_images is skipped and counted)", what, n, LAZY_CHECK_IMAGES,
                    HEADER_SAMPLE)

    def check(chunk: range) -> list[tuple[int, bool, str]]:
        out = []
        for k in chunk:
            problem = _problem(paths[k], sample is None or k in sample)
            if problem:
                out.append((k, *problem))
        return out

    t0 = time.monotonic()
    progress = Heartbeat(f"{what}: checking images", n, "images", logger)
    found: list[tuple[int, bool, str]] = []
    with ThreadPoolExecutor(CHECK_THREADS) as pool:
        chunks = {pool.submit(check, chunk): len(chunk)
                  for chunk in (range(s, min(n, s + _CHUNK)) for s in range(0, n, _CHUNK))}
        for future in as_completed(chunks):
            found.extend(future.result())
            progress.update(chunks[future])
    logger.info("%s: checked %d images in %.1f s, %d missing or unreadable", what, n, time.monotonic() - t0,
                len(found))
    return [BadImage(paths[k], where(k), error, missing) for k, missing, error in sorted(found)]


SKIP_HINT = "set skip_bad_images: true to drop them"


@dataclass(frozen=True)
class _Checked:
    what: str               # "split 'train'", "the inputs", ...
    n: int                  # images checked
    bad: list[BadImage]


def _check(paths: Sequence[str], where: Callable[[int], str], what: str, skip: bool, collective: bool) -> _Checked:
    """Rank 0 checks and broadcasts (``collective``: every rank must call), or this process alone;
    the bad images are logged once, as warnings (``skip``) or errors."""
    main = _du().is_main_process() or not collective
    bad = find_bad_images(paths, where, what) if main else None
    if collective:
        bad = _du().broadcast_object(bad)
    if main:
        for b in bad[:MAX_LISTED]:
            logger.log(logging.WARNING if skip else logging.ERROR, "%s", b.message)
        if len(bad) > MAX_LISTED:
            logger.log(logging.WARNING if skip else logging.ERROR, "%s: %d more missing or unreadable images",
                       what, len(bad) - MAX_LISTED)
    return _Checked(what, len(paths), bad)


def _refusal(checked: Sequence[_Checked], hint: str) -> Exception:
    """The error for bad images: the first one's message, the count per group, what to do."""
    first = next(b for c in checked for b in c.bad)
    counts = ", ".join(f"{len(c.bad)} of the {c.n} images of {c.what}" for c in checked if c.bad)
    text = (f"{first.message}; missing or unreadable: {counts} (listed in the log above); fix or remove those "
            "entries" + (f", or {hint}" if hint else ""))
    return (FileNotFoundError if first.missing else BadImageError)(text)


def check_images(paths: Sequence[str], where: Callable[[int], str], what: str, skip: bool,
                 hint: str = SKIP_HINT, collective: bool = True) -> dict[str, BadImage]:
    """Check ``paths`` (``where(k)`` names path k's entry and field, ``what`` the group): rank 0
    checks and broadcasts to every rank (``collective``: all ranks must call; otherwise this process
    checks alone). Without ``skip`` a bad image raises ``FileNotFoundError`` (missing) or
    ``BadImageError`` (unreadable) naming the first one and the count, ``hint`` closing the message;
    with ``skip`` they are returned, {path: BadImage}. Either way they are logged."""
    checked = _check(paths, where, what, skip, collective)
    if checked.bad and not skip:
        raise _refusal([checked], hint)
    return {b.path: b for b in checked.bad}


def check_splits(datasets: Mapping[str, Any], skip: bool, hint: str = SKIP_HINT) -> dict[str, int]:
    """Check the images of every split (``{split: dataset}``, each with ``image_checks()`` and
    ``drop_images()``), all of them before refusing, so one run lists every bad image; with ``skip``
    drop their entries up front and log the count per split. A collective. Returns the number of
    bad images per split; a split left without entries is an error."""
    checked = {split: _check(*dataset.image_checks(), f"split '{split}'", skip, collective=True)
               for split, dataset in datasets.items()}
    if any(c.bad for c in checked.values()) and not skip:
        raise _refusal(list(checked.values()), hint)
    for split, c in checked.items():
        if not c.bad:
            continue
        dataset = datasets[split]
        dataset.drop_images({b.path for b in c.bad})
        if len(dataset) == 0:
            raise DataError(f"{c.what}: all {c.n} images are missing or unreadable (first: {c.bad[0].message}); "
                             "nothing is left to run on")
        if _du().is_main_process():
            logger.warning("%s: dropped %d of its %d images (skip_bad_images; listed above), %d items left", c.what,
                           len(c.bad), c.n, len(dataset))
    return {split: len(c.bad) for split, c in checked.items()}


def caption_texts(dataset: Any) -> list[str]:
    """Every caption of a train dataset (``captions``: a str or a tuple of str per item; a streamed
    dataset gives a sample), flat, for :func:`log_unk_rate`."""
    return [c for x in dataset.captions for c in ((x,) if isinstance(x, str) else x)]


def unk_rate(tokenizer, texts: Sequence[str]) -> tuple[float, int, list[str]]:
    """(share of the words of ``texts`` that contain an ``[UNK]`` piece, words counted, the unknown
    words, most frequent first). Words are whitespace-separated; each distinct word is tokenized
    once."""
    counts = Counter(w for t in texts for w in t.split())
    words = list(counts)
    ids = tokenizer(words, add_special_tokens=False)["input_ids"] if words else []
    unknown = sorted((w for w, pieces in zip(words, ids) if tokenizer.unk_token_id in pieces),
                     key=lambda w: -counts[w])
    total = sum(counts.values())
    return (sum(counts[w] for w in unknown) / total if total else 0.0), total, unknown


def log_unk_rate(tokenizer, texts: Sequence[str], what: str,
                 clean: Optional[Callable[[str], str]] = None) -> Optional[float]:
    """Log the ``[UNK]`` rate of ``texts`` (the captions, prompts or queries as the model reads
    them: ``clean`` is applied first, to the sample only); warn above ``UNK_WARN_RATE``. Rank 0
    only (returns None elsewhere); returns the rate."""
    if not _du().is_main_process():
        return None
    sampled = f" (a random sample of {UNK_SAMPLE} of {len(texts)})" if len(texts) > UNK_SAMPLE else ""
    if sampled:
        texts = random.Random(0).sample(list(texts), UNK_SAMPLE)
    rate, total, unknown = unk_rate(tokenizer, [clean(t) for t in texts] if clean else texts)
    name = getattr(tokenizer, "name_or_path", "") or "?"
    examples = ", ".join(repr(w) for w in unknown[:8])
    if rate > UNK_WARN_RATE:
        logger.warning("%.1f%% of the words of %s%s become [UNK] with the tokenizer %r (e.g. %s): the model "
                       "cannot read them. Check the config key 'tokenizer': BLIP weights need BERT's "
                       "'bert-base-uncased' (docs/RETRIEVAL.md, 'Bring your own data')", 100 * rate, what, sampled, name, examples)
    else:
        logger.info("[UNK] rate of %s%s: %.2f%% of %d words (tokenizer %r)%s", what, sampled, 100 * rate, total,
                    name, f"; unknown: {examples}" if unknown else "")
    return rate
