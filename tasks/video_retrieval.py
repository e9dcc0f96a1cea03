"""BLIP's zero-shot text-video retrieval (``eval_retrieval_video.py``, BLIP's ``configs/retrieval_msrvtt.yaml``):
its config, its data, the evaluation and the dry run.

A video is evaluated as an image (docs/BLIP.md, "Zero-shot text-video retrieval"): the image
retrieval protocol of ``tasks/retrieval_eval.py`` (``evaluate_retrieval``: ITC top ``k_test``, ITM
rerank, -100 elsewhere, sharded over the ranks) with ``model.encode_video`` as the encoder: the
``num_frm_test`` frames sampled as BLIP samples them (``data/video.py``) go through the ViT as
images; the video's ITC feature is ``normalize(mean_f vision_proj(CLS_f))``, its cross-attention
sequence the frames' tokens concatenated (``[F * (1 + N), Dv]``). Metrics under BLIP's names
(``txt_r1`` ... ``vid_mdR``, ``r_mean``) plus ours (``txt_mdR``, ``txt_mnR``, ``vid_mnR``), one JSON
line appended to ``test_result.txt`` as the release does.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
from pydantic import field_validator, model_validator
from torch.utils.data import DataLoader, Subset

from data.collate import tokenize
from data.preflight import log_unk_rate
from data.transforms import build_test_transform
from data.video import DEFAULT_TEST_FILE, DEFAULT_VIDEO_FMT, VideoRetrievalDataset, check_videos
from models.blip import BlipArch
from tasks.retrieval_eval import EvalOutput, embed_texts, evaluate_retrieval, retrieval_metrics, retrieval_ranks
from utils import dist as du
from utils.config import Config, PosInt
from utils.logging import append_json_line
from utils.precision import autocast
from utils.settings import (EvalSettings, LoopSettings, RunSettings, TextSettings, WeightsSettings,
                            batch_size_alias)

logger = logging.getLogger(__name__)

RESULT_FILE = "test_result.txt"   # the release's name; one JSON line appended per evaluation
# Cross K/V of this many frames are projected together in the ITM rerank (an image-retrieval chunk
# of 16 images holds as many tokens as 2 videos of 8 frames).
RERANK_FRAMES = 16


class VideoData(Config):
    video_root: str = ''                        # folder of the videos: <video_root>/<clip_name><video_fmt>
    ann_root: str = ''                          # folder of test_file
    test_file: str = DEFAULT_TEST_FILE          # BLIP's fixed name; jsonl {"clip_name", "caption"} (or a json list)
    video_fmt: str = DEFAULT_VIDEO_FMT          # file name suffix of every video (BLIP's VideoDataset: '.mp4')
    num_frm_test: PosInt = 8                    # frames per video, BLIP's "uniform" sampling (data/video.py)

    @field_validator('video_fmt')
    @classmethod
    def _suffix(cls, value: str) -> str:
        if value and not value.startswith('.'):
            raise ValueError(f"video_fmt: a file name suffix starting with '.' (BLIP: '.mp4'), got {value!r}")
        return value


class VideoRetrievalConfig(BlipArch, TextSettings, WeightsSettings, VideoData, LoopSettings, EvalSettings,
                           RunSettings):
    """Zero-shot text-video retrieval with a retrieval checkpoint (eval_retrieval_video.py); BLIP's key names."""
    k_test: PosInt = 128                        # candidates re-ranked with ITM (BLIP's msrvtt config: 128)
    rerank_batch_size: PosInt = 128             # (query, candidate) pairs per ITM forward
    batch_size: Optional[PosInt] = None         # BLIP's key: videos per batch per process (= batch_size_test)
    max_words: PosInt = 40                      # BLIP's VideoDataset: pre_caption(caption, 40)

    @model_validator(mode='before')
    @classmethod
    def _batch_size_alias(cls, data):
        return batch_size_alias(data, ('batch_size_test',))


def ann_file(cfg: VideoData) -> str:
    """``test_file`` under ``ann_root`` (an absolute path is kept)."""
    return os.path.join(cfg.ann_root, cfg.test_file) if cfg.ann_root else cfg.test_file


def build_dataset(cfg: VideoRetrievalConfig) -> VideoRetrievalDataset:
    """The test videos, parsed and every video checked (``data/video.py`` ``check_videos``): call before
    building a model, so bad input stops the run before it starts. A collective under torchrun."""
    dataset = VideoRetrievalDataset(ann_file(cfg), cfg.video_root, build_test_transform(cfg.image_size),
                                    cfg.num_frm_test, video_fmt=cfg.video_fmt, max_words=cfg.max_words)
    check_videos(dataset)
    logger.info("test: %d videos, %d captions, %d frames each (%s)", len(dataset), len(dataset.text),
                cfg.num_frm_test, dataset.ann_file)
    return dataset


@dataclass
class VideoEvalOutput:
    metrics: Dict[str, float]
    score_v2t: np.ndarray   # [n_video, n_text]
    score_t2v: np.ndarray   # [n_text, n_video]


def video_metrics(score_v2t: np.ndarray, score_t2v: np.ndarray, txt2video) -> Dict[str, float]:
    """BLIP's ``itm_eval`` of the video script, in its key order: ``txt_r1/5/10``, ``txt_r_mean``
    (video->text), ``vid_r1/5/10``, ``vid_r_mean`` (text->video), ``vid_mdR`` (median 1-based
    text->video rank), ``r_mean``; then ours: ``txt_mdR`` and the mean 1-based ranks ``txt_mnR``,
    ``vid_mnR``. A video's rank is its best caption's (several captions per video)."""
    m = retrieval_metrics(score_v2t, score_t2v, txt2video)
    ranks_v2t, ranks_t2v = retrieval_ranks(score_v2t, score_t2v, txt2video)
    out = {k: m[k] for k in ("txt_r1", "txt_r5", "txt_r10", "txt_r_mean")}
    out.update({f"vid_{k}": m[f"img_{k}"] for k in ("r1", "r5", "r10", "r_mean")})
    out["vid_mdR"] = float(np.median(ranks_t2v + 1))
    out["r_mean"] = m["r_mean"]
    out["txt_mdR"] = float(np.median(ranks_v2t + 1))
    out["txt_mnR"] = float(np.mean(ranks_v2t + 1))
    out["vid_mnR"] = float(np.mean(ranks_t2v + 1))
    return out


def rerank_chunk(cfg: VideoData) -> int:
    """Videos whose cross K/V are projected together (``RERANK_FRAMES`` frames' worth)."""
    return max(1, RERANK_FRAMES // cfg.num_frm_test)


def evaluate(model, dataset: VideoRetrievalDataset, tokenizer, cfg: VideoRetrievalConfig,
             progress: bool = True) -> VideoEvalOutput:
    """The image retrieval protocol over videos (every rank calls; every rank gets the result)."""
    out: EvalOutput = evaluate_retrieval(model, dataset, tokenizer, k_test=cfg.k_test, max_tokens=cfg.max_tokens,
                                         batch_size=cfg.batch_size_test, rerank_batch_size=cfg.rerank_batch_size,
                                         num_workers=cfg.num_workers, precision=cfg.precision, progress=progress,
                                         encode=model.encode_video, image_chunk=rerank_chunk(cfg))
    return VideoEvalOutput(video_metrics(out.score_i2t, out.score_t2i, dataset.txt2video), out.score_i2t,
                           out.score_t2i)


def run_evaluation(model, dataset: VideoRetrievalDataset, tokenizer, cfg: VideoRetrievalConfig, output_dir: Path,
                   progress: bool = True, save_scores: bool = False) -> Dict[str, float]:
    """Evaluate and write (rank 0): one JSON line of the metrics appended to ``test_result.txt``
    (the release's file and format) and, with ``save_scores``, ``scores_test.npz`` (``score_v2t``
    [n_video, n_text], ``score_t2v`` [n_text, n_video]). The run must be committed."""
    log_unk_rate(tokenizer, dataset.text, "the test captions")
    out = evaluate(model, dataset, tokenizer, cfg, progress)
    if du.is_main_process():
        append_json_line(Path(output_dir) / RESULT_FILE, out.metrics)
        if save_scores:
            np.savez(Path(output_dir) / "scores_test.npz", score_v2t=out.score_v2t, score_t2v=out.score_t2v)
    logger.info("test: %s", {k: round(v, 2) for k, v in out.metrics.items()})
    return out.metrics


@torch.no_grad()
def dry_run_record(model, dataset: VideoRetrievalDataset, tokenizer, cfg: VideoRetrievalConfig,
                   info: du.DistInfo) -> dict:
    """``--dry_run``: the first batch of videos (``batch_size_test``, file order) and their first
    captions encoded as the evaluation encodes them (no rerank). Like ``Trainer.dry_run``'s record:
    what ran (shapes, similarities), the batch size, world size, precision, parameters, seconds."""
    model.eval()
    device = info.device
    t0 = time.perf_counter()
    first = list(range(min(cfg.batch_size_test, len(dataset))))
    frames, _ = next(iter(DataLoader(Subset(dataset, first), batch_size=len(first), num_workers=0)))
    with autocast(device, cfg.precision):
        tokens, video_feat = model.encode_video(frames.to(device))
    captions = [dataset.text[dataset.video2txt[i][0]] for i in first]
    ids, mask = tokenize(tokenizer, captions, cfg.max_tokens)
    text_feat = embed_texts(model, ids, mask, len(captions), device, cfg.precision)
    sims = video_feat.float() @ text_feat.t()
    matched = sims.diagonal()
    return {
        "split": "test", "videos": len(dataset), "texts": len(dataset.text), "batch_size": len(first),
        "frames": list(frames.shape), "video_tokens": list(tokens.shape),
        "frame_indices": dataset.frame_indices(0), "sim_matched": float(matched.mean()),
        "sim_mean": float(sims.mean()), "sims_finite": bool(torch.isfinite(sims).all()),
        "world_size": info.world_size, "precision": cfg.precision,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "seconds": round(time.perf_counter() - t0, 3),
    }
