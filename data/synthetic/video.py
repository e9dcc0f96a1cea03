"""The video part: short clips of moving shapes as real .mp4 files, in MSRVTT's 1k-A test layout.

Layout under `<out>/video/` (BLIP's video retrieval: `video_root` = `videos`, `ann_root` = `annotation`):

    videos/<clip_name>.mp4          `clip_frames` frames of image_size x image_size px at `clip_fps`,
                                    MPEG-4 Part 2 (FFmpeg's `mpeg4` encoder, which every PyAV wheel
                                    has), yuv420p, near-lossless (quantiser 1-3)
    annotation/msrvtt_test.jsonl    one JSON object a line, one caption per clip:
                                    {"clip_name": "video<i>", "caption": "..."}
    clips_test.json                 per clip: its shapes (regions of the first layout), the direction
                                    of motion and each frame's offset (fractions of the side)
    meta.json                       counts, codec, vocab size, seed and arguments (written by `generate`)

A clip is a scene of `scenes.py` (1-3 shapes in distinct regions) whose shapes translate together
(a pan: they never overlap) left, right, up or down, at constant speed from one edge of the room the
frame leaves them to the other (at least a fifth of the side; a shape stays inside the frame).
Background tint and fill colours are the same in every frame of a clip. Captions use the retrieval
part's grammar with size, colour and shape and no position (positions change during the clip):
"two small red circles and a big blue square". No two clips share their (size, colour, shape)
contents, so each caption singles out one clip, as the retrieval part's val/test captions do. With
`motion_captions` the direction is added ("... moving to the left").
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .captions import caption_with, fits
from .retrieval import PartOutput, _write_json
from .scenes import PlacedShape, Scene, half_extent, region_centre, render_placed, sample_scene, scene_to_json

CODEC = "mpeg4"
PIX_FMT = "yuv420p"
# (dx, dy) unit vector of each direction; y grows downwards in the image.
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
MOTION_PHRASES = {"left": "moving to the left", "right": "moving to the right", "up": "moving up", "down": "moving down"}
MIN_TRAVEL = 0.2  # of the side, over the whole clip
EDGE_MARGIN = 0.02  # a shape's edge stays this far inside the frame
CENTRE_JITTER = 0.005  # per shape, fixed for the clip
MAX_CLIP_TRIES = 10_000
_OWN_CLIP = re.compile(r"^video\d+\.mp4$")


@dataclass
class VideoSpec:
    """Arguments of the video part (all are CLI flags of `python -m data.synthetic`)."""

    n_clips: int = 60  # test clips (MSRVTT 1k-A has 1,000)
    clip_frames: int = 12  # BLIP samples 8 per clip (num_frm_test)
    clip_fps: int = 8
    # Relative weights of 1, 2, 3 shapes per clip.
    clip_count_weights: tuple[float, ...] = (0.5, 0.35, 0.15)
    motion_captions: bool = False  # add the direction of motion to every caption

    def __post_init__(self) -> None:
        self.clip_count_weights = tuple(float(w) for w in self.clip_count_weights)
        if self.n_clips < 1:
            raise ValueError(f"n_clips must be >= 1, got {self.n_clips}")
        if not 2 <= self.clip_frames <= 256:
            raise ValueError(f"clip_frames must be in 2..256, got {self.clip_frames}")
        if not 1 <= self.clip_fps <= 120:
            raise ValueError(f"clip_fps must be in 1..120, got {self.clip_fps}")
        if not 1 <= len(self.clip_count_weights) <= 3:
            raise ValueError(f"clip_count_weights must have 1..3 entries, got {self.clip_count_weights}")
        self.motion_captions = bool(self.motion_captions)


def video_paths(out_dir: Path) -> dict[str, str]:
    """The files of the video part (fixed by the layout, so a skipped run can report them)."""
    root = out_dir / "video"
    paths = {"root": root, "video_root": root / "videos", "ann_root": root / "annotation",
             "test_file": root / "annotation" / "msrvtt_test.jsonl", "test_clips": root / "clips_test.json",
             "meta": root / "meta.json"}
    return {k: str(v) for k, v in paths.items()}


def _rng(seed: int, stream: str) -> random.Random:
    # One stream per purpose, seeded by a string (sha512-hashed: stable across processes).
    return random.Random(f"{seed}/video/test/{stream}")


def contents(scene: Scene) -> tuple:
    """What a caption names: the sorted (size, colour, shape) of every shape."""
    return tuple(sorted(s.kind for s in scene))


def _travel(scene: Scene, direction: str) -> tuple[float, float]:
    """(first, last) offset along the direction's axis that keeps every shape inside the frame,
    ordered in the direction of motion."""
    dx, dy = DIRECTIONS[direction]
    axis = 0 if dx else 1
    lo = min(region_centre(s.position)[axis] - half_extent(s.size) for s in scene) - CENTRE_JITTER
    hi = max(region_centre(s.position)[axis] + half_extent(s.size) for s in scene) + CENTRE_JITTER
    back, forth = EDGE_MARGIN - lo, 1.0 - EDGE_MARGIN - hi  # most negative / positive offset
    return (back, forth) if dx + dy > 0 else (forth, back)


def _offsets(first: float, last: float, direction: str, n: int) -> list[tuple[float, float]]:
    dx, dy = DIRECTIONS[direction]
    out = []
    for t in range(n):
        d = first + (last - first) * t / (n - 1)
        out.append((d if dx else 0.0, d if dy else 0.0))
    return out


def _encode(path: Path, frames: list[np.ndarray], fps: int) -> None:
    """Write RGB frames as an .mp4 (mpeg4, yuv420p), one thread: the bytes are reproducible."""
    try:
        import av
    except ImportError as e:  # a dependency of requirements.txt
        raise ImportError("the synthetic video part writes .mp4 files with PyAV: pip install av") from e
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream(CODEC, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, PIX_FMT
        ctx = stream.codec_context
        ctx.thread_count = 1
        ctx.bit_rate = 4_000_000  # far above what 64 px needs: the quantiser bounds decide
        ctx.qmin, ctx.qmax = 1, 3
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder
            container.mux(packet)


def _caption(scene: Scene, direction: str, spec: VideoSpec, rng: random.Random, max_tries: int = 200) -> str:
    suffix = " " + MOTION_PHRASES[direction] if spec.motion_captions else ""
    for _ in range(max_tries):
        text = caption_with(scene, rng, with_size=True, with_pos=False, suffix=suffix)
        if fits(text):
            return text
    raise RuntimeError(f"could not write a caption that fits the text length for {scene}")


def write_video(out_dir: Path, seed: int, image_size: int, spec: VideoSpec) -> PartOutput:
    """Draw, render and encode every clip, write the jsonl; return the paths, captions and counts."""
    if image_size % 2:
        raise ValueError(f"the video part needs an even image_size (yuv420p), got {image_size}")
    paths = video_paths(out_dir)
    video_root = Path(paths["video_root"])
    video_root.mkdir(parents=True, exist_ok=True)
    for old in video_root.iterdir():
        if _OWN_CLIP.match(old.name):
            old.unlink()
    scene_rng, caption_rng, render_rng = _rng(seed, "scenes"), _rng(seed, "captions"), _rng(seed, "render")
    seen: set[tuple] = set()
    lines, rows, captions = [], [], []
    directions: Counter = Counter()
    shapes: Counter = Counter()
    for i in range(spec.n_clips):
        for _ in range(MAX_CLIP_TRIES):
            scene = sample_scene(scene_rng, spec.clip_count_weights)
            if contents(scene) not in seen:
                break
        else:
            raise ValueError(f"could not draw {spec.n_clips} clips with distinct contents "
                             f"(clip_count_weights={spec.clip_count_weights}); lower n_clips or give more "
                             "weight to multi-shape clips")
        seen.add(contents(scene))
        feasible = [d for d in DIRECTIONS if abs(_travel(scene, d)[1] - _travel(scene, d)[0]) >= MIN_TRAVEL]
        direction = scene_rng.choice(feasible)  # never empty for <= 3 shapes in distinct regions
        offsets = _offsets(*_travel(scene, direction), direction, spec.clip_frames)
        clip_seed = render_rng.getrandbits(64)  # one tint, colour and jitter for every frame of the clip
        frames = []
        for dx, dy in offsets:
            placed = [PlacedShape(s.colour, s.shape, s.size, region_centre(s.position)[0] + dx,
                                  region_centre(s.position)[1] + dy) for s in scene]
            img = render_placed(placed, image_size, random.Random(clip_seed), centre_jitter=CENTRE_JITTER)
            frames.append(np.asarray(img, dtype=np.uint8))
        name = f"video{i}"
        _encode(video_root / f"{name}.mp4", frames, spec.clip_fps)
        text = _caption(scene, direction, spec, caption_rng)
        lines.append(json.dumps({"clip_name": name, "caption": text}))
        rows.append({"clip_name": name, "shapes": scene_to_json(scene), "direction": direction,
                     "offsets": [[round(dx, 6), round(dy, 6)] for dx, dy in offsets]})
        captions.append(text)
        directions[direction] += 1
        shapes[len(scene)] += 1
    test_file = Path(paths["test_file"])
    test_file.parent.mkdir(parents=True, exist_ok=True)
    test_file.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    _write_json(Path(paths["test_clips"]), rows)
    meta = {"splits": {"test": {"clips": spec.n_clips, "captions": len(captions),
                                "directions": {d: directions[d] for d in DIRECTIONS},
                                "shapes_per_clip": {str(k): shapes[k] for k in sorted(shapes)}}},
            "frames_per_clip": spec.clip_frames, "fps": spec.clip_fps, "frame_size": [image_size, image_size],
            "codec": CODEC, "pix_fmt": PIX_FMT, "motion_captions": spec.motion_captions}
    return PartOutput(paths=paths, captions=captions, meta=meta)
