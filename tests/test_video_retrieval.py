"""Zero-shot text-video retrieval (eval_retrieval_video.py): a video is the image evaluation with its
frames as its image. One-frame videos written losslessly from the retrieval fixture's images give
exactly image retrieval's metrics and scores; several frames give BLIP's frame indices, the mean
feature and the concatenated ITM input (checked against the release's one-query-at-a-time algorithm);
2 ranks = 1 process; bad videos are named before any model is built; --dry_run writes no result."""
from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval_retrieval_video
import train_retrieval
from data.collate import tokenize
from data.transforms import build_test_transform
from data.video import VideoRetrievalDataset, frame_count, frame_indices, read_video_annotations
from tasks.retrieval_eval import reference_rerank
from tests.scripts.campaign_runs import run_inprocess
from utils.errors import DataError
from utils.rundir import LOCK_NAME

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "blip_official_tiny"
ENTRIES = json.loads((FIXTURE / "test.json").read_text())
IMAGES = [np.asarray(Image.open(FIXTURE / e["image"]).convert("RGB")) for e in ENTRIES]
MULTI_FRAMES = 6


def _write_clip(path: Path, frames, codec: str, pix_fmt: str) -> Path:
    """A lossless clip (ffv1 in .mkv: no stored frame count; png in .avi: stored) of RGB arrays."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _jsonl(path: Path, lines) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _multi_frame(clip: int, f: int) -> np.ndarray:
    """Frame ``f`` of multi-frame clip ``clip``: image ``clip + f / 2`` at even frames (BLIP samples 0, 2,
    4 of 6: three consecutive images, a different set per clip), its negative at odd ones."""
    image = IMAGES[(clip + f // 2) % 6]
    return image if f % 2 == 0 else 255 - image


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """``single/video<i>.mkv``: image i as a one-frame video (ffv1); ``multi/clip<i>.avi``: 6 frames
    of ``_multi_frame`` (png); annotation files for both."""
    root = tmp_path_factory.mktemp("clips")
    for i, image in enumerate(IMAGES):
        _write_clip(root / "single" / f"video{i}.mkv", [image], "ffv1", "bgr0")
        _write_clip(root / "multi" / f"clip{i}.avi", [_multi_frame(i, f) for f in range(MULTI_FRAMES)], "png",
                    "rgb24")
    ann = root / "ann"
    ann.mkdir()
    _jsonl(ann / "single.jsonl", [{"clip_name": f"video{i}", "caption": e["caption"]} for i, e in enumerate(ENTRIES)])
    # One line per caption (BLIP's layout, here with two lines per clip): the same set.
    _jsonl(ann / "single_lines.jsonl", [{"clip_name": f"video{i}", "caption": c}
                                        for i, e in enumerate(ENTRIES) for c in e["caption"]])
    _jsonl(ann / "multi.jsonl", [{"clip_name": f"clip{i}", "caption": e["caption"][0]} for i, e in enumerate(ENTRIES)])
    return root


def _config(tmp_path: Path, clips: Path, name: str, **overrides) -> Path:
    """A video config over the fixture checkpoint (its architecture; BLIP's key ``batch_size``)."""
    single = name.startswith("single")
    values = {
        "video_root": str(clips / ("single" if single else "multi")), "ann_root": str(clips / "ann"),
        "test_file": f"{name}.jsonl", "video_fmt": ".mkv" if single else ".avi",
        "num_frm_test": 1 if single else 3,
        "pretrained": str(FIXTURE / "checkpoint.pth"), "strict_load": "true",
        "vit": "{width: 64, depth: 2, heads: 4, patch_size: 16}", "image_size": 64,
        "med_config": str(FIXTURE / "med_config.json"), "tokenizer": str(FIXTURE / "tokenizer"),
        "embed_dim": 32, "k_test": 3, "batch_size": 4, "rerank_batch_size": 5, "num_workers": 0, "device": "cpu",
        "deterministic": "true",
    }
    values.update(overrides)
    path = tmp_path / f"video_{name}.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in values.items()))
    return path


def _video_eval(tmp_path, config, out, *flags):
    record = eval_retrieval_video.main(["--config", str(config), "--output_dir", str(out), "--no_progress", *flags])
    assert json.loads((out / "test_result.txt").read_text().splitlines()[-1]) == record
    return record


# ----------------------------------------------------------------------------- the release's facts

def test_frame_indices_are_the_releases_integer_arange():
    assert frame_indices(300, 8) == [0, 37, 74, 111, 148, 185, 222, 259]  # not int(i * 37.5): 75, 112, ...
    assert frame_indices(300, 8) != [int(i * 300 / 8) for i in range(8)]
    assert frame_indices(15, 8) == list(range(8))  # step int(1.875) = 1: frames 8..14 never seen
    assert frame_indices(5, 8) == [0] * 8          # shorter than num_frm: frame 0, 8 times
    for vlen in range(1, 400):
        for n in (1, 2, 3, 4, 7, 8, 12, 16):
            release = np.arange(0, vlen, vlen / n, dtype=int)
            assert frame_indices(vlen, n) == release[:n].tolist(), (vlen, n)
            assert len(release) in (n, n + 1)
    # numpy's length comes from a float division: one frame more for some pairs (never for 8).
    assert len(np.arange(0, 17, 17 / 7, dtype=int)) == 8 and len(frame_indices(17, 7)) == 7


def test_frame_count_stored_or_counted_and_decoded_frames_equal_the_images(clips):
    mkv = clips / "multi_mkv.mkv"
    _write_clip(mkv, IMAGES, "ffv1", "bgr0")
    with av.open(str(mkv)) as c:
        assert c.streams.video[0].frames == 0  # Matroska stores no count: the frames are counted
    assert frame_count(str(mkv)) == 6
    avi = clips / "multi" / "clip2.avi"
    with av.open(str(avi)) as c:
        assert c.streams.video[0].frames == MULTI_FRAMES
    assert frame_count(str(avi)) == MULTI_FRAMES
    transform = build_test_transform(64)
    ds = VideoRetrievalDataset(clips / "ann" / "multi.jsonl", clips / "multi", transform, num_frm=3, video_fmt=".avi")
    frames, index = ds[2]
    assert index == 2 and frames.shape == (3, 3, 64, 64)
    assert ds.frame_indices(2) == [0, 2, 4]
    expected = torch.stack([transform(Image.fromarray(_multi_frame(2, f))) for f in (0, 2, 4)])
    assert torch.equal(frames, expected)  # lossless clip, the image transform: exactly the images


def test_annotation_reader_names_file_line_and_field(tmp_path):
    good = {"clip_name": "video0", "caption": "a cat"}

    def read(text, name="a.jsonl"):
        path = tmp_path / name
        path.write_text(text)
        return read_video_annotations(path), str(path)

    entries, path = read(json.dumps(good) + "\n\n" + json.dumps({"clip_name": "v1", "caption": ["x", "y"]}) + "\n")
    assert [(e.clip_name, e.captions, e.where) for e in entries] == [
        ("video0", ["a cat"], f"line 1 of {path}"), ("v1", ["x", "y"], f"line 3 of {path}")]
    entries, path = read(json.dumps([good, good]), "list.json")  # a json list
    assert [e.where for e in entries] == [f"entry 0 of {path}", f"entry 1 of {path}"]
    cases = [
        (json.dumps(good) + "\n{\"clip_name\": \"v\", \"caption\": }\n", "line 2 of", "malformed JSON"),
        (json.dumps(good) + "\n\n" + json.dumps({"caption": "x"}), "line 3 of", "missing field 'clip_name'"),
        (json.dumps({"clip_name": "", "caption": "x"}), "line 1 of", "invalid field 'clip_name'"),
        (json.dumps({"clip_name": "v", "caption": []}), "line 1 of", "field 'caption': the caption list is empty"),
        (json.dumps({"clip_name": "v", "caption": ["ok", 3]}), "line 1 of", "item 1 of the caption list is int"),
        (json.dumps({"clip_name": "v"}), "line 1 of", "missing field 'caption'"),
        ("\n \n", "", "no entries"),
    ]
    for text, where, message in cases:
        with pytest.raises(DataError) as err:
            read(text, "bad.jsonl")
        assert where in str(err.value) and "bad.jsonl" in str(err.value) and message in str(err.value), str(err.value)


def test_config_file_holds_blips_keys_and_values():
    from ruamel.yaml import YAML
    ours = YAML(typ="safe").load((REPO / "configs" / "retrieval_msrvtt.yaml").read_text())
    blip = YAML(typ="safe").load((REPO / "tests" / "fixtures" / "blip_configs" / "retrieval_msrvtt.yaml").read_text())
    assert ours == blip


# ----------------------------------------------------------------------------- equivalence

def test_one_frame_videos_give_exactly_image_retrievals_metrics_and_scores(tmp_path, clips, fixture_config):
    image_out = tmp_path / "image"
    image = train_retrieval.main(["--config", str(fixture_config(tmp_path, batch_size_test=4)), "--output_dir",
                                  str(image_out), "--evaluate", "--save_scores", "--no_progress"])
    video = _video_eval(tmp_path, _config(tmp_path, clips, "single"), tmp_path / "video", "--save_scores")
    assert list(video)[:10] == ["txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "vid_r1", "vid_r5", "vid_r10",
                                "vid_r_mean", "vid_mdR", "r_mean"]  # the release's keys, in its order
    for k in ("txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "r_mean"):
        assert video[k] == image[f"test_{k}"], k
    for k in ("r1", "r5", "r10", "r_mean"):
        assert video[f"vid_{k}"] == image[f"test_img_{k}"], k
    a, b = np.load(image_out / "scores_test.npz"), np.load(tmp_path / "video" / "scores_test.npz")
    assert np.array_equal(a["score_i2t"], b["score_v2t"]) and np.array_equal(a["score_t2i"], b["score_t2v"])
    # The ranks behind the median / mean ranks, from the image scores independently.
    ranks_t2v = [int(np.where(np.argsort(row)[::-1] == t // 2)[0][0]) + 1 for t, row in enumerate(a["score_t2i"])]
    assert video["vid_mdR"] == float(np.median(ranks_t2v)) and video["vid_mnR"] == float(np.mean(ranks_t2v))
    # One line per caption instead of caption lists: the same videos and texts, the same metrics.
    lines = _video_eval(tmp_path, _config(tmp_path, clips, "single_lines"), tmp_path / "lines")
    assert lines == video


def test_several_frames_mean_feature_concatenated_itm_and_the_releases_scores(tmp_path, clips, fixture_model):
    out = tmp_path / "multi"
    metrics = _video_eval(tmp_path, _config(tmp_path, clips, "multi"), out, "--save_scores")
    model, tok, _ = fixture_model()
    transform = build_test_transform(64)
    ds = VideoRetrievalDataset(clips / "ann" / "multi.jsonl", clips / "multi", transform, num_frm=3, video_fmt=".avi")
    assert [ds.frame_indices(i) for i in range(6)] == [[0, 2, 4]] * 6
    frames = torch.stack([ds[i][0] for i in range(6)])
    with torch.no_grad():
        tokens, feat = model.encode_video(frames)
        per_frame = [model.visual_encoder(frames[:, f]) for f in range(3)]  # each frame alone, as an image
        expected = F.normalize(torch.stack([model.vision_proj(t[:, 0]) for t in per_frame]).mean(0), dim=-1)
        assert (feat - expected).abs().max() <= 1e-6
        assert (tokens - torch.cat(per_frame, dim=1)).abs().max() <= 1e-6 and tokens.shape == (6, 3 * 17, 64)
        ids, mask = tokenize(tok, ds.text, 35)
        _, text_feat = model.encode_text(ids, mask)
        sims = feat @ text_feat.t()
        # The release's algorithm: one query at a time, the video's frame tokens as encoder states.
        ref_v2t, ref_t2v = reference_rerank(model, tokens, ids, mask, sims, k_test=3)
    scores = np.load(out / "scores_test.npz")
    assert np.abs(scores["score_v2t"] - ref_v2t.numpy()).max() < 1e-5
    assert np.abs(scores["score_t2v"] - ref_t2v.numpy()).max() < 1e-5
    assert (scores["score_v2t"] == -100).sum() == 6 * 3  # k_test of 6 texts re-scored per video
    assert 0 <= metrics["vid_r1"] <= metrics["vid_r5"] <= metrics["vid_r10"] == 100.0  # 6 videos: all in the top 10


@pytest.mark.dist
def test_two_ranks_equal_one_process(tmp_path, clips, run_torchrun):
    config = _config(tmp_path, clips, "multi", rerank_batch_size=2, batch_size=2)
    one, two = tmp_path / "one", tmp_path / "two"
    _video_eval(tmp_path, config, one, "--save_scores")
    run_torchrun("eval_retrieval_video.py", ["--config", config, "--output_dir", two, "--no_progress", "--save_scores"])
    assert (one / "test_result.txt").read_text() == (two / "test_result.txt").read_text()
    a, b = np.load(one / "scores_test.npz"), np.load(two / "scores_test.npz")
    for key in ("score_v2t", "score_t2v"):
        assert np.allclose(a[key], b[key], atol=1e-5), key


# ----------------------------------------------------------------------------- bad input, dry run

@pytest.mark.parametrize("bad", ["text_as_mp4", "missing"])
def test_a_bad_video_is_named_with_its_line_before_any_model_is_built(tmp_path, clips, bad, monkeypatch, capsys):
    videos = tmp_path / "videos"
    for i in range(3):
        _write_clip(videos / f"video{i}.mp4", [IMAGES[i]] * 2, "mpeg4", "yuv420p")
    if bad == "text_as_mp4":
        (videos / "video1.mp4").write_text("this is not a video\n")
    else:
        (videos / "video1.mp4").unlink()
    ann = _jsonl(tmp_path / "msrvtt_test.jsonl", [{"clip_name": f"video{i}", "caption": ENTRIES[i]["caption"][0]}
                                                  for i in range(3)])
    out = tmp_path / "out"
    # The checkpoint does not exist: an error about the video shows it was found before the model.
    config = _config(tmp_path, clips, "multi", video_root=videos, ann_root=tmp_path, test_file="msrvtt_test.jsonl",
                     video_fmt=".mp4", pretrained="/nonexistent.pth")
    code, _, err = run_inprocess(monkeypatch, capsys, "eval_retrieval_video.py", "--config", config,
                                 "--output_dir", out)
    line = err.strip().splitlines()[-1]
    assert code == 1
    assert line.startswith("error: line 2 of ") and str(ann) in line and "field 'clip_name'" in line, line
    assert str(videos / "video1.mp4") in line
    assert ("video file missing" if bad == "missing" else "unreadable video") in line, line
    assert "1 of the 3 videos" in line and "nonexistent" not in line
    assert not out.exists()


def test_dry_run_encodes_one_batch_and_writes_no_result(tmp_path, clips, monkeypatch, capsys):
    out = tmp_path / "dry"
    code, _, err = run_inprocess(monkeypatch, capsys, "eval_retrieval_video.py", "--config",
                                 _config(tmp_path, clips, "multi"), "--output_dir", out, "--dry_run")
    assert code == 0, err[-2000:]
    record = json.loads((out / "dry_run.json").read_text())
    # The run's own files (its lock, the config it ran, its log) and the record; no test_result.txt, no scores.
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "config.yaml", "dry_run.json", "run.log"]
    assert record["videos"] == 6 and record["texts"] == 6 and record["batch_size"] == 4
    assert record["frames"] == [4, 3, 3, 64, 64] and record["video_tokens"] == [4, 51, 64]
    assert record["frame_indices"] == [0, 2, 4] and record["sims_finite"]
    assert -1 <= record["sim_mean"] <= 1 and record["parameters"] > 0 and record["world_size"] == 1
