"""CLI: `python -m data.synthetic --out DIR --seed S [--parts retrieval,imagecode,mmvp,vqa,nlvr,video] [--image_size 64] ...`."""

from __future__ import annotations

import argparse
import logging
import sys

from . import PARTS, generate


def _weights(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(w) for w in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m data.synthetic", description=__doc__)
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts (default: all, {','.join(PARTS)})")
    ap.add_argument("--image_size", type=int, default=64)
    ap.add_argument("--force", action="store_true", help="regenerate even when the stamp matches")
    ap.add_argument("-q", "--quiet", action="store_true", help="only warnings and the summary line")
    retrieval = ap.add_argument_group("retrieval part")
    retrieval.add_argument("--n_train", type=int, help="train images (default 2000)")
    retrieval.add_argument("--n_val", type=int, help="val images (default 100)")
    retrieval.add_argument("--n_test", type=int, help="test images (default 100)")
    retrieval.add_argument("--count_weights", type=_weights, help="weights of 1,2,3 shapes (0.6,0.3,0.1)")
    retrieval.add_argument("--train_captions", type=int, help="captions per train image (default 3)")
    retrieval.add_argument("--eval_captions", type=int, help="captions per val/test image (default 2)")
    retrieval.add_argument("--partial_frac", type=float, help="share of partial train captions (0.2)")
    mmvp = ap.add_argument_group("mmvp part")
    mmvp.add_argument("--pairs_per_pattern", type=int, help="pairs per pattern (default 15, as released)")
    imagecode = ap.add_argument_group("imagecode part")
    imagecode.add_argument("--n_train_sets", type=int, help="train sets of 10 images (default 1500)")
    imagecode.add_argument("--n_valid_sets", type=int, help="valid sets (default 150)")
    imagecode.add_argument("--n_test_sets", type=int, help="unlabelled test sets (default 80)")
    imagecode.add_argument("--static_frac", type=float, help="share of static (open-images) sets (0.3)")
    vqa = ap.add_argument_group("vqa part")
    vqa.add_argument("--n_train_images", type=int, help="train images (default 1200)")
    vqa.add_argument("--n_val_images", type=int, help="val images (default 100)")
    vqa.add_argument("--n_test_images", type=int, help="test images (default 150)")
    vqa.add_argument("--questions_per_image", type=int, help="questions per train image (default 4)")
    vqa.add_argument("--eval_questions_per_image", type=int, help="questions per val/test image (default 3)")
    vqa.add_argument("--annotator_accuracy", type=float, help="chance an annotator answers right (0.8)")
    vqa.add_argument("--scene_count_weights", type=_weights, help="weights of 1,2,3 shapes (1,1,1)")
    nlvr = ap.add_argument_group("nlvr part")
    nlvr.add_argument("--n_train_pairs", type=int, help="train image pairs, even (default 2000)")
    nlvr.add_argument("--n_dev_pairs", type=int, help="dev pairs, even (default 200)")
    nlvr.add_argument("--n_test_pairs", type=int, help="test pairs, even (default 200)")
    nlvr.add_argument("--hard_negative_frac", type=float, help="share of false pairs that are near misses (0.5)")
    nlvr.add_argument("--nlvr_count_weights", type=_weights, help="weights of 1,2,3 shapes per image (1,1,1)")
    video = ap.add_argument_group("video part")
    video.add_argument("--n_clips", type=int, help="test clips (default 60)")
    video.add_argument("--clip_frames", type=int, help="frames per clip (default 12)")
    video.add_argument("--clip_fps", type=int, help="frames per second (default 8)")
    video.add_argument("--clip_count_weights", type=_weights, help="weights of 1,2,3 shapes per clip (0.5,0.35,0.15)")
    video.add_argument("--motion_captions", action="store_true", default=None,
                       help="add the direction of motion to the captions")
    args = ap.parse_args(argv)

    level = logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # Unset part flags fall back to the part's own defaults (one place to change them).
    options = {a.dest: getattr(args, a.dest) for g in (retrieval, mmvp, imagecode, vqa, nlvr, video)
               for a in g._group_actions}
    options = {k: v for k, v in options.items() if v is not None}
    result = generate(
        args.out, seed=args.seed, parts=args.parts, image_size=args.image_size, force=args.force, **options
    )
    state = "up to date" if result["skipped"] else "written"
    parts = "+".join(result["parts"])
    print(f"synthetic {parts} {state} in {result['out_dir']} (vocab_size {result['vocab_size']})")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
