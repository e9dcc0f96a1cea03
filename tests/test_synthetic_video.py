"""The synthetic benchmark's video part: real .mp4 clips of moving shapes in MSRVTT's 1k-A layout."""

from __future__ import annotations

import json
import os
from pathlib import Path

import av
import numpy as np
import pytest

from data.synthetic import generate
from data.synthetic.captions import POSITION_PHRASES, clean
from data.synthetic.scenes import BACKGROUND, COLOURS
from data.synthetic.video import MIN_TRAVEL, VideoSpec
from data.synthetic.vocab import basic_tokenize

SMALL = dict(n_clips=8, clip_frames=10)


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> dict:
    return generate(tmp_path_factory.mktemp("video") / "out", seed=0, parts="video", **SMALL)


def _load(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _jsonl(path) -> list[dict]:
    """As BLIP's video_dataset.load_jsonl reads it."""
    with open(path, "r") as f:
        return [json.loads(line.strip("\n")) for line in f.readlines()]


def _decode(path: Path) -> tuple[list[np.ndarray], dict]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        info = {"codec": stream.codec_context.name, "pix_fmt": stream.codec_context.pix_fmt,
                "rate": stream.average_rate}
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return frames, info


def _centroid(frame: np.ndarray) -> np.ndarray:
    """Mean (x, y) of the pixels that are not background grey (the tint is within +-10)."""
    mask = np.abs(frame.astype(int) - np.array(BACKGROUND)).max(axis=2) > 40
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def test_layout_and_jsonl(video):
    p = video["video"]
    root = Path(video["out_dir"]) / "video"
    assert Path(p["video_root"]) == root / "videos" and Path(p["test_file"]) == root / "annotation" / "msrvtt_test.jsonl"
    assert all(Path(v).exists() for v in p.values())
    lines = Path(p["test_file"]).read_text(encoding="utf-8").splitlines()
    assert len(lines) == 8
    ann = _jsonl(p["test_file"])
    assert all(set(a) == {"clip_name", "caption"} for a in ann)
    assert [a["clip_name"] for a in ann] == [f"video{i}" for i in range(8)]
    assert sorted(f.name for f in Path(p["video_root"]).iterdir()) == sorted(f"video{i}.mp4" for i in range(8))
    for a in ann:  # BLIP: os.path.join(video_root, clip_name + '.mp4')
        assert os.path.isfile(os.path.join(p["video_root"], a["clip_name"] + ".mp4"))
    meta = _load(p["meta"])
    assert meta["splits"]["test"]["clips"] == 8 and meta["frames_per_clip"] == 10 and meta["codec"] == "mpeg4"
    assert "video/" in (Path(video["out_dir"]) / "README.md").read_text()


def test_clips_decode_to_the_written_frames(video):
    clips = _load(video["video"]["test_clips"])
    for clip in clips:
        frames, info = _decode(Path(video["video"]["video_root"]) / f"{clip['clip_name']}.mp4")
        assert len(frames) == 10 == len(clip["offsets"])
        assert all(f.shape == (64, 64, 3) and f.dtype == np.uint8 for f in frames)
        assert info["codec"] == "mpeg4" and info["pix_fmt"] == "yuv420p" and info["rate"] == 8
        # every shape's colour survives the encoding: some pixel of the first frame is close to it
        for shape in clip["shapes"]:
            dist = np.abs(frames[0].astype(int) - np.array(COLOURS[shape["colour"]])).max(axis=2)
            assert dist.min() <= 30, (clip["clip_name"], shape)


def test_frames_show_motion_in_the_recorded_direction(video):
    for clip in _load(video["video"]["test_clips"]):
        frames, _ = _decode(Path(video["video"]["video_root"]) / f"{clip['clip_name']}.mp4")
        centres = np.stack([_centroid(f) for f in frames])
        axis, sign = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}[clip["direction"]]
        steps = sign * np.diff(centres[:, axis])
        assert (steps > 0).all(), (clip["clip_name"], centres[:, axis])  # monotone, every frame
        travel = sign * (centres[-1, axis] - centres[0, axis])
        assert travel >= 0.9 * MIN_TRAVEL * 64, (clip["clip_name"], travel)
        assert np.ptp(centres[:, 1 - axis]) < 2.5  # no motion across the direction (codec noise: ~1 px)
        assert np.abs(frames[0].astype(int) - frames[-1]).max() > 100


def test_captions_name_the_shapes_without_positions(video):
    clips = _load(video["video"]["test_clips"])
    ann = _jsonl(video["video"]["test_file"])
    vocab = set((Path(video["tokenizer"]) / "vocab.txt").read_text(encoding="utf-8").splitlines())
    position_words = {w for phrases in POSITION_PHRASES.values() for p in phrases for w in p.split()}
    position_words -= {"a", "the", "of", "on", "in", "image", "picture"}
    contents = set()
    for a, clip in zip(ann, clips):
        words = set(clean(a["caption"]).replace(",", " ").split())
        for s in clip["shapes"]:
            assert {s["size"], s["colour"]} <= words and {s["shape"], s["shape"] + "s"} & words, a
        assert not words & position_words, a
        assert set(basic_tokenize(a["caption"])) <= vocab
        contents.add(tuple(sorted((s["size"], s["colour"], s["shape"]) for s in clip["shapes"])))
    assert len(contents) == len(clips)  # each caption singles out one clip


def test_deterministic(video, tmp_path):
    def files(result):
        root = Path(result["out_dir"]) / "video"
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    a, b = files(video), files(generate(tmp_path / "b", seed=0, parts="video", **SMALL))
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    c = files(generate(tmp_path / "c", seed=1, parts="video", **SMALL))
    assert c["annotation/msrvtt_test.jsonl"] != a["annotation/msrvtt_test.jsonl"]
    assert c["videos/video0.mp4"] != a["videos/video0.mp4"]


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="even image_size"):
        generate(tmp_path, parts="video", image_size=33, n_clips=1)
    with pytest.raises(ValueError, match="clip_frames"):
        VideoSpec(clip_frames=1)
    with pytest.raises(ValueError, match="distinct contents"):
        generate(tmp_path / "x", parts="video", n_clips=49, clip_count_weights=(1.0,))  # 48 one-shape kinds
