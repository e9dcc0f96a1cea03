"""MSRVTT-style text-video retrieval data, as BLIP's ``eval_retrieval_video.py`` reads it
(docs/FORMATS.md, "MSRVTT (video retrieval)").

- ``read_video_annotations(path)``: BLIP's ``msrvtt_test.jsonl`` (one JSON object a line,
  ``{"clip_name", "caption"}``) or a json list of the same objects; ``caption`` a string or a
  non-empty list of strings. Every problem is one line naming the file, the line (a json list: the
  entry) and the field.
- ``frame_indices(vlen, num_frm)``: BLIP's "uniform" frame sampling, exactly as its code computes it
  (numpy's integer ``arange``: frame ``i * int(vlen / num_frm)``, see the function).
- ``frame_count`` / ``read_frames`` / ``load_video``: decoding with PyAV (FFmpeg); frames as PIL RGB
  images through the image test transform, so one frame is exactly one image of the image pipeline.
- ``VideoRetrievalDataset``: one item per video -> ``(frames [num_frm, 3, H, W], index)``, the
  cleaned captions flattened in ``text`` and the ``img2txt`` / ``txt2img`` maps the image retrieval
  evaluation (``tasks/retrieval_eval.py``) reads (``video2txt`` / ``txt2video``: BLIP's names).
- ``check_videos(dataset)``: the pre-flight, before any model is built: every video exists, opens,
  has a video stream and decodes a first frame; a bad one is named with its annotation line.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

from utils import dist as du
from torch.utils.data import Dataset

from utils.errors import DataError, json_error
from utils.logging import Heartbeat

from .entries import _captions, _require_dict, _require_field
from .utils import pre_caption, read_text, short_repr

logger = logging.getLogger(__name__)

DEFAULT_TEST_FILE = "msrvtt_test.jsonl"   # BLIP's 1k-A test file (under ann_root)
DEFAULT_VIDEO_FMT = ".mp4"                 # BLIP's VideoDataset: <video_root>/<clip_name><video_fmt>
CHECK_THREADS = min(16, 4 * (os.cpu_count() or 1))
MAX_LISTED = 20                            # bad videos listed one per line in the log

Where = Callable[[int], str]


class BadVideoError(DataError):
    """A video file exists but cannot be read: not a container FFmpeg knows, no video stream, no
    frame, or a decoding error."""


# ----------------------------------------------------------------------------- annotations

@dataclass(frozen=True)
class VideoEntry:
    clip_name: str
    captions: list          # raw, as written
    where: str              # "line 3 of FILE" / "entry 2 of FILE"


def _entry(obj: Any, where: str) -> VideoEntry:
    _require_dict(obj, where)
    clip = _require_field(obj, "clip_name", where)
    if not isinstance(clip, str) or not clip.strip():
        raise DataError(f"{where}: invalid field 'clip_name': expected a non-empty string (the video's file "
                        f"name without {DEFAULT_VIDEO_FMT}), got {short_repr(clip)}")
    return VideoEntry(clip, list(_captions(obj, where)), where)


def read_video_annotations(path: str | os.PathLike) -> list[VideoEntry]:
    """The entries of a video annotation file: JSON lines (BLIP's ``msrvtt_test.jsonl``; blank lines
    are skipped, messages name ``line L of FILE``, 1-based) or, when the text starts with ``[``, a
    json list (``entry K of FILE``). A file without entries is an error naming it."""
    path = str(path)
    text = read_text(path)
    entries: list[VideoEntry] = []
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: {json_error(exc)}") from None
        entries = [_entry(obj, f"entry {k} of {path}") for k, obj in enumerate(items)]
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"line {number} of {path}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: malformed JSON: {exc.msg[:1].lower() + exc.msg[1:]} at column {exc.colno} "
                                "(one JSON object a line)") from None
            entries.append(_entry(obj, where))
    if not entries:
        raise DataError(f"{path}: no entries (an empty file or json list); a video retrieval file needs at least one "
                        '{"clip_name", "caption"} object')
    return entries


# ----------------------------------------------------------------------------- frames

def frame_indices(vlen: int, num_frm: int) -> list[int]:
    """The frames BLIP's "uniform" strategy reads from a video of ``vlen`` frames.

    The release computes ``np.arange(0, vlen, vlen / num_frm, dtype=int)``. With an integer dtype
    numpy does not truncate ``i * step``: it steps by ``int(start + step) - int(start)``, here
    ``int(vlen / num_frm)``. So frame ``i`` is ``i * int(vlen / num_frm)``, not ``int(i * vlen /
    num_frm)``: ``vlen`` 300, 8 frames gives 0, 37, 74, ..., 259 (not 0, 37, 75, ..., 262); the tail
    of the clip past ``num_frm * int(vlen / num_frm)`` is never seen (15 frames, 8 sampled: frames
    0..7); a video shorter than ``num_frm`` frames gives frame 0, ``num_frm`` times (its other
    frames unused: the release's behaviour, kept). numpy takes the array's length from
    ``ceil(vlen / (vlen / num_frm))``, which float rounding makes ``num_frm + 1`` for some pairs
    (``vlen`` 17, 7 frames; none with 1, 2, 3, 4, 8 or 16 frames for ``vlen`` up to 20,000): the
    release then samples one frame more (and its batch collate fails unless every video of the batch
    does); we take the first ``num_frm``, the same frames."""
    if vlen < 1 or num_frm < 1:
        raise ValueError(f"frame_indices: vlen and num_frm must be >= 1, got {vlen}, {num_frm}")
    step = int(vlen / num_frm)
    return [i * step for i in range(num_frm)]


def _open(path: str, context: str):
    """The opened container (PyAV) and its first video stream; errors name ``context`` and the path."""
    import av
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{context}: video file missing: {path}")
    try:
        container = av.open(path)
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise BadVideoError(f"{context}: unreadable video: {path}: {exc}") from None
    if not container.streams.video:
        container.close()
        raise BadVideoError(f"{context}: unreadable video: {path}: no video stream (streams: "
                            f"{[s.type for s in container.streams] or 'none'})")
    return container, container.streams.video[0]


def _decode(path: str, context: str, wanted: Optional[set] = None, opened=None) -> tuple:
    """Decode the first video stream in presentation order: ``({index: PIL RGB image} of the
    ``wanted`` indices, frames decoded)``, stopping after the last wanted frame (no ``wanted``: every
    frame, counted). ``opened``: the ``(container, stream)`` of ``_open``, closed here."""
    import av
    container, stream = opened or _open(path, context)
    wanted = wanted or set()
    last = max(wanted) if wanted else None
    got, n = {}, 0
    try:
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if n in wanted:
                got[n] = frame.to_image()  # RGB (any pixel format converted to rgb24)
            n += 1
            if last is not None and n > last:
                break
    except (av.FFmpegError, ValueError) as exc:
        raise BadVideoError(f"{context}: unreadable video: {path}: decoding frame {n} failed: {exc}") from None
    finally:
        container.close()
    return got, n


def frame_count(path: str, context: str = "") -> int:
    """The number of frames of a video: the container's own count (``nb_frames``) when it stores
    one, else the frames decoded (e.g. Matroska / WebM files store none)."""
    container, stream = _open(path, context or path)
    stored = int(stream.frames or 0)
    if stored > 0:
        container.close()
        return stored
    return _decode(path, context or path, opened=(container, stream))[1]


def read_frames(path: str, num_frm: int, context: str = "") -> tuple[list, list[int]]:
    """BLIP's uniformly sampled frames of a video (``frame_indices``): ``(PIL RGB images, indices)``.
    A stored frame count larger than the frames that decode is corrected (warned) and the frames
    sampled again from the real count."""
    context = context or path
    vlen = frame_count(path, context)
    indices = frame_indices(vlen, num_frm)
    got, n = _decode(path, context, set(indices))
    if len(got) < len(set(indices)):
        if n == 0:
            raise BadVideoError(f"{context}: unreadable video: {path}: no frame decodes")
        logger.warning("%s: %s stores %d frames but %d decode; sampling from %d", context, path, vlen, n, n)
        indices = frame_indices(n, num_frm)
        got, _ = _decode(path, context, set(indices))
    return [got[i] for i in indices], indices


def load_video(path: str, num_frm: int, transform: Callable, context: str = ""):
    """``[num_frm, 3, H, W]``: the sampled frames, each through ``transform`` (the image test
    transform: the frame is exactly an image of the image pipeline)."""
    import torch
    frames, _ = read_frames(path, num_frm, context)
    return torch.stack([transform(f) for f in frames])


def check_video(path: str, context: str) -> int:
    """The pre-flight of one video: it exists, opens, has a video stream and decodes a first
    frame. Returns the container's stored frame count (0: none stored)."""
    container, stream = _open(path, context)
    stored = int(stream.frames or 0)
    _, n = _decode(path, context, {0}, opened=(container, stream))
    if n == 0:
        raise BadVideoError(f"{context}: unreadable video: {path}: no frame decodes")
    return stored


# ----------------------------------------------------------------------------- dataset

class VideoRetrievalDataset(Dataset):
    """One item per video: ``(frames [num_frm, 3, H, W], index)``.

    Lines with the same ``clip_name`` are one video with all their captions (in file order), so a
    file with one line per (video, caption) and one with a caption list per video are the same set.
    Captions are cleaned with ``pre_caption(caption, max_words)`` (BLIP: 40 words).

    Attributes: ``clip_name`` (per video), ``text`` (cleaned captions, grouped by video in order of
    first appearance), ``img2txt`` {video: [its text indices]}, ``txt2img`` {text: its video}
    (the names the image retrieval evaluation reads; ``video2txt`` / ``txt2video`` alias them).
    """

    def __init__(self, ann_file: str | os.PathLike, video_root: str | os.PathLike, transform: Optional[Callable],
                 num_frm: int, video_fmt: str = DEFAULT_VIDEO_FMT, max_words: int = 40) -> None:
        self.ann_file = str(ann_file)
        self.video_root = str(video_root)
        self.transform = transform
        self.num_frm = num_frm
        self.video_fmt = video_fmt
        entries = read_video_annotations(self.ann_file)
        order: dict[str, int] = {}
        self.clip_name: list[str] = []
        self._where: list[str] = []
        self._captions: list[list[str]] = []
        for e in entries:
            if e.clip_name not in order:
                order[e.clip_name] = len(self.clip_name)
                self.clip_name.append(e.clip_name)
                self._where.append(e.where)
                self._captions.append([])
            self._captions[order[e.clip_name]].extend(pre_caption(c, max_words) for c in e.captions)
        if len(entries) != len(self.clip_name):
            logger.info("%s: %d lines of %d videos (lines of one clip_name are one video with all their captions)",
                        self.ann_file, len(entries), len(self.clip_name))
        self.text: list[str] = []
        self.img2txt: dict[int, list[int]] = {}
        self.txt2img: dict[int, int] = {}
        for v, captions in enumerate(self._captions):
            self.img2txt[v] = list(range(len(self.text), len(self.text) + len(captions)))
            self.txt2img.update({t: v for t in self.img2txt[v]})
            self.text.extend(captions)

    @property
    def video2txt(self) -> dict[int, list[int]]:
        return self.img2txt

    @property
    def txt2video(self) -> dict[int, int]:
        return self.txt2img

    def __len__(self) -> int:
        return len(self.clip_name)

    def video_path(self, index: int) -> str:
        # os.path.join keeps an absolute clip path as it is.
        return os.path.join(self.video_root, self.clip_name[index] + self.video_fmt)

    def source(self, index: int) -> str:
        """``line L of FILE`` (``entry K of FILE`` for a json list) of video ``index``'s first line."""
        return self._where[index]

    def context(self, index: int) -> str:
        return f"{self.source(index)}, field 'clip_name'"

    def video_checks(self) -> tuple[list[str], Where]:
        """The video paths and how to name the k-th in a message; for :func:`check_videos`."""
        return [self.video_path(i) for i in range(len(self))], self.context

    def frame_indices(self, index: int) -> list[int]:
        """The frames sampled from video ``index`` (decodes it)."""
        return read_frames(self.video_path(index), self.num_frm, self.context(index))[1]

    def __getitem__(self, index: int):
        path = self.video_path(index)
        transform = self.transform if self.transform is not None else (lambda image: image)
        return load_video(path, self.num_frm, transform, self.context(index)), index


# ----------------------------------------------------------------------------- pre-flight

@dataclass(frozen=True)
class _Checked:
    bad: list                  # [(k, missing?, message)]
    stored: list               # per video: its stored frame count (0: none stored)


def _check_all(paths: Sequence[str], where: Where, what: str) -> _Checked:
    def one(k: int):
        try:
            return k, None, check_video(paths[k], where(k))
        except FileNotFoundError as exc:
            return k, (True, str(exc)), 0
        except BadVideoError as exc:
            return k, (False, str(exc)), 0

    t0 = time.monotonic()
    beat = Heartbeat(f"{what}: checking videos", len(paths), "videos", logger)
    results = []
    with ThreadPoolExecutor(CHECK_THREADS) as pool:
        for result in pool.map(one, range(len(paths))):
            results.append(result)
            beat.update(1)
    bad = [(k, *problem) for k, problem, _ in results if problem is not None]
    logger.info("%s: checked %d videos in %.1f s, %d missing or unreadable", what, len(paths), time.monotonic() - t0,
                len(bad))
    return _Checked(bad, [stored for _, _, stored in results])


def check_videos(dataset: VideoRetrievalDataset, what: str = "split 'test'") -> list[int]:
    """Check every video of ``dataset`` (rank 0 checks, every rank gets the verdict: a collective
    under torchrun). A missing video raises ``FileNotFoundError``, an unreadable one
    ``BadVideoError``, naming the first bad video's annotation line, with the count (every bad one is
    listed in the log). Logs how many videos are shorter than ``num_frm`` (by their stored frame
    counts: frame 0 stands for them, see ``frame_indices``). Returns the stored frame counts."""
    paths, where = dataset.video_checks()
    checked = _check_all(paths, where, what) if du.is_main_process() else None
    checked = du.broadcast_object(checked)
    if checked.bad:
        if du.is_main_process():
            for _, _, message in checked.bad[:MAX_LISTED]:
                logger.error("%s", message)
            if len(checked.bad) > MAX_LISTED:
                logger.error("%s: %d more missing or unreadable videos", what, len(checked.bad) - MAX_LISTED)
        _, missing, message = checked.bad[0]
        text = (f"{message}; missing or unreadable: {len(checked.bad)} of the {len(paths)} videos of {what} "
                "(listed in the log above); fix or remove those lines")
        raise (FileNotFoundError if missing else BadVideoError)(text)
    short = [k for k, n in enumerate(checked.stored) if 0 < n < dataset.num_frm]
    if short and du.is_main_process():
        logger.warning("%s: %d videos have fewer than num_frm_test=%d frames (first: %s, %d frames): as in BLIP, "
                       "their frame 0 is sampled %d times", what, len(short), dataset.num_frm, where(short[0]),
                       checked.stored[short[0]], dataset.num_frm)
    return checked.stored
