"""Zero-shot text-video retrieval (MSRVTT 1k-A) with a BLIP retrieval checkpoint (BLIP's ``eval_retrieval_video.py``).

    python eval_retrieval_video.py --config configs/retrieval_msrvtt.yaml --output_dir outputs/msrvtt \\
        --opts video_root=data/msrvtt/videos ann_root=data/msrvtt/annotation
    torchrun --nproc_per_node 8 eval_retrieval_video.py --config configs/retrieval_msrvtt.yaml
    python eval_retrieval_video.py --config configs/retrieval_msrvtt.yaml --dry_run   # check: dry_run.json

Reads ``<ann_root>/msrvtt_test.jsonl`` (``{"clip_name", "caption"}`` per line; videos
``<video_root>/<clip_name>.mp4``), samples ``num_frm_test`` frames per video as BLIP does, and runs
the image retrieval protocol with a video's frames as its image (``tasks/video_retrieval.py``).
Appends BLIP's metrics (``txt_r1`` ... ``vid_mdR``, ``r_mean``; plus ``txt_mdR``, ``txt_mnR``,
``vid_mnR``) as one JSON line to ``output_dir/test_result.txt``. The script only evaluates. Every
video is opened and checked before the model is built.
"""
from __future__ import annotations

import utils  # noqa: F401  (first: one clear line on an unsupported Python)

import logging

from models.factory import create_model
from tasks.video_retrieval import VideoRetrievalConfig, build_dataset, dry_run_record, run_evaluation
from utils import dist as du
from utils.cli import NOT_TRAINING
from utils.config import parse_config
from utils.dry_run import add_dry_run_arg, write_dry_run
from utils.rundir import commit_run, run_entry, start_run

logger = logging.getLogger("eval_retrieval_video")


def _extra_args(parser) -> None:
    add_dry_run_arg(parser, "check the evaluation: pre-flight of every video, build, load, encode the first batch of "
                            "videos and captions; writes output_dir/dry_run.json and exits")
    parser.add_argument("--save_scores", action="store_true",
                        help="write scores_test.npz with score_v2t [n_video, n_text] and score_t2v [n_text, n_video]")
    parser.add_argument("--no_progress", action="store_true", help="disable progress bars")


def main(argv=None) -> dict:
    args, cfg, doc = parse_config(VideoRetrievalConfig, argv, description=__doc__.splitlines()[0],
                                  extra_args=_extra_args, unused_keys=lambda args: NOT_TRAINING)
    args.evaluate = True  # this script only evaluates (config_evaluate.yaml in a training run's folder)
    info, output_dir = start_run(cfg, doc, args, trains=False)
    try:
        dataset = build_dataset(cfg)
        model, tokenizer = create_model(cfg, "blip_inference", info.device, purpose="eval")
        if args.dry_run:
            return write_dry_run(output_dir, dry_run_record(model, dataset, tokenizer, cfg, info), logger)
        commit_run()  # checked and loaded: the run's files are written from here on
        return run_evaluation(model, dataset, tokenizer, cfg, output_dir, progress=not args.no_progress,
                              save_scores=args.save_scores)
    finally:
        du.cleanup()


if __name__ == "__main__":
    run_entry(main, logger)
