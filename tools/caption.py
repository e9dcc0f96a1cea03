"""Caption images with a BLIP captioner; with --filter, keep the captions a BLIP ITM model matches (CapFilt).

    python -m tools caption --config configs/caption_coco.yaml --images my_photos/ --output_dir outputs/captions
    torchrun --nproc_per_node 8 -m tools caption --config configs/caption_coco.yaml \\
        --opts pretrained=model_large_caption.pth sample=true top_p=0.9 repetition_penalty=1.1 \\
        --num_captions 5 --img2dataset data/cc3m_download --filter --filter_config configs/retrieval_coco.yaml \\
        --filter_pretrained model_large_retrieval_coco.pth --output_dir outputs/cc3m_capfilt

Inputs (one kind per run; each distinct image is captioned once, in first-seen order):

- ``--input FILE ...``: pair files (BLIP-json, pretraining json, CSV/TSV; ``--image_col`` ...), as for
  ``tools score``; their captions are the images' *original* captions;
- ``--images PATH ...``: folders (every image file below them, recursively, sorted by path; hidden
  files and folders skipped) and lists of images: a CSV/TSV (``--image_col``, ``--image_dir_col``),
  a ``.txt`` (one path a line) or a json list (of paths, or of objects with ``image``); no original
  captions;
- ``--img2dataset DIR ...``: img2dataset output folders (``00000/000000001.jpg`` with its caption
  in ``000000001.txt``; the ``.json``/``.parquet`` files are not read): the ``.txt`` is the image's
  original caption (an image without one, or with an empty one, has none).

Paths in list and pair files are joined to the config's ``image_root`` (as everywhere); folder
paths are used as given (relative to the working directory, or absolute). Outputs keep every path
as its input wrote it: a file's paths as written, a folder's images as ``DIR/relative/path``.

Generation: the config's keys (``tasks.caption.CaptionConfig``): beam search (``num_beams``,
``max_length``, ``min_length``, ``repetition_penalty``; ``--num_captions N``: the N best beams) or
nucleus sampling (``sample: true``, ``top_p``, ``top_k``, ``repetition_penalty``; BLIP's CapFilt:
``sample=true top_p=0.9 repetition_penalty=1.1``; ``--num_captions N``: N samples). Sampling is
seeded per image: image ``i`` (its first-seen index) draws from its own ``torch.Generator`` seeded
from ``(seed, i)``, so its captions do not depend on the batch it is in, the shard size, the number
of ranks or a restart (up to floating-point effects of the batch size on the logits, which change a
draw only when it lies within rounding of a boundary); they are the captions the model's own
``generate_ids`` draws for that image alone with that generator.

``--filter``: a BLIP retrieval model (``--filter_config`` a retrieval yaml, ``--filter_opts``,
``--filter_pretrained``) scores every (image, original caption) and (image, generated caption) pair
with ITM (softmax match probability, ``tools score``'s ``score_batch``). A caption is kept when its
``itm > --threshold`` (default 0.5: BLIP's filter keeps a text when the ITM head predicts "match").
The threshold is applied when the outputs are merged: re-running a finished run with another
``--threshold`` computes nothing again.

Outputs (``output_dir``):

- ``captions.jsonl``: one record per image, in image order: ``row`` (the image's index), ``image``,
  ``source`` (its first pair's file label, the ``--source_key`` value, or the list / folder name),
  ``captions`` (generated); with ``--filter`` also ``itm`` and ``kept`` (per generated caption) and
  ``originals`` (``caption``, ``image`` as its file wrote it, ``source``, ``itm``, ``kept``, per original
  pair of the image, in input order); ``error``
  for an image that could not be read (no captions; with ``--opts skip_bad_images=true``);
- ``pairs.json``: BLIP's pretraining json ``[{"image", "caption"}, ...]``, one entry per caption:
  without ``--filter`` every non-empty generated caption; with it, per image, its kept original
  pairs (each with its own path as written) and then its kept generated captions;
- ``caption_report.json`` (and the log): images, errors, generated captions, and with ``--filter``
  kept / dropped / not scored overall, for original and generated captions and per source.

Sharding and resume as ``tools score``: ``--shard_size`` images per shard in ``parts/``, dealt to
the ranks; a restart skips finished shards and, in an unfinished one, the images already written
(the batches are re-formed as in the first run, so a restart computes what the first run would
have). A changed input, model, generation or filter setting is refused (``plan.json``) unless
``--overwrite``, which deletes this tool's previous outputs first. Every image is checked before a
model is built: a missing or unreadable one stops the command naming its row, unless ``--opts
skip_bad_images=true``. Progress is logged at least every 30 s.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from data.transforms import build_test_transform
from models.caption import check_prompt
from models.generation import GenerationSettings
from models.tokenizer import build_tokenizer
from tasks.caption import CaptionConfig
from tasks.retrieval import RetrievalConfig
from tools.caption_generate import build_models, caption_shard
from tools.caption_inputs import check_input_images, read_inputs
from tools.caption_outputs import _log_report, write_outputs
from tools.common import JsonlShard, ShardPlan, add_pair_args, check_run_plan, model_signature, split_pending, start
from utils import dist as du
from utils.config import ConfigError, config_text, load_config
from utils.cli import NOT_TRAINING
from utils.rundir import add_run_file, commit_run, delete_at_commit
from utils.logging import Heartbeat

logger = logging.getLogger("tools.caption")

# The captioner's config keys that decide what it computes (a restart must not mix two models).
CAPTION_MODEL_KEYS = ("vit", "image_size", "med_config", "tokenizer", "pretrained", "prompt", "precision")
OUTPUTS = ("captions.jsonl", "pairs.json", "caption_report.json", "plan.json")


def _extra_args(parser) -> None:
    add_pair_args(parser, required=False)
    g = parser.add_argument_group("images")
    g.add_argument("--images", nargs="+", metavar="PATH",
                   help="image folders (recursive) and image lists (CSV/TSV with --image_col, .txt one path "
                        "a line, json list of paths or of {'image': ...}); no original captions")
    g.add_argument("--img2dataset", nargs="+", metavar="DIR",
                   help="img2dataset output folders (NNNNN/KEY.jpg + KEY.txt caption)")
    g = parser.add_argument_group("captions")
    g.add_argument("--num_captions", type=int, default=1,
                   help="captions per image: the N best beams (beam search) or N samples (sample=true)")
    g.add_argument("--shard_size", type=int, default=10000, help="images per shard (unit of resume)")
    g = parser.add_argument_group("filter")
    g.add_argument("--filter", action="store_true",
                   help="score original and generated captions with ITM and keep those above --threshold")
    g.add_argument("--filter_config", metavar="YAML", help="retrieval config of the filter model")
    g.add_argument("--filter_opts", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="overrides of the filter config")
    g.add_argument("--filter_pretrained", metavar="PATH", help="the filter's checkpoint (overrides its pretrained)")
    g.add_argument("--threshold", type=float, default=0.5,
                   help="keep a caption when its ITM match probability is above this (BLIP: 0.5)")


# ----------------------------------------------------------------------------- settings

def generation_settings(cfg: CaptionConfig, num_captions: int) -> GenerationSettings:
    settings = cfg.generation_settings(num_return_sequences=num_captions)
    try:
        settings.check()
    except ValueError as err:
        hint = " (--num_captions N needs num_beams >= N, or sample=true)" if not cfg.sample else ""
        raise SystemExit(f"error: --num_captions {num_captions}: {err}{hint}") from None
    return settings


def generation_plan(settings: GenerationSettings, seed: int) -> dict:
    """The settings that decide the captions (and nothing else), for ``plan.json``."""
    keys = ["max_length", "min_length", "repetition_penalty", "num_return_sequences"]
    keys += ["top_p", "top_k"] if settings.sample else ["num_beams", "length_penalty"]
    plan = {"mode": "sample" if settings.sample else ("beam" if settings.num_beams > 1 else "greedy")}
    plan.update({k: getattr(settings, k) for k in keys})
    if settings.sample:
        plan["seed"] = seed
    return plan


def load_filter_config(args, output_dir: Path, main: bool) -> Optional[RetrievalConfig]:
    """The filter model's retrieval config (``--filter_config`` + ``--filter_opts``, with
    ``--filter_pretrained``), saved as ``filter_config.yaml``; None without ``--filter``."""
    if not args.filter:
        if args.filter_config or args.filter_opts or args.filter_pretrained:
            raise SystemExit("error: --filter_config / --filter_opts / --filter_pretrained need --filter")
        return None
    if not args.filter_config:
        raise SystemExit("error: --filter needs --filter_config (a retrieval config naming the filter model)")
    if not 0.0 <= args.threshold < 1.0:
        raise SystemExit(f"error: --threshold {args.threshold}: an ITM probability threshold is in [0, 1)")
    try:
        fcfg, doc = load_config(args.filter_config, RetrievalConfig, list(args.filter_opts), unused_keys=NOT_TRAINING)
    except ConfigError as err:
        raise SystemExit(f"error: --filter_config: {err}") from None
    if args.filter_pretrained:
        fcfg = fcfg.model_copy(update={"pretrained": args.filter_pretrained})
        doc["pretrained"] = args.filter_pretrained
    if main:  # written with the run's config at the commit
        add_run_file("filter_config.yaml", config_text(doc).encode("utf-8"))
    return fcfg


def main(argv=None, prog: str = "python -m tools caption") -> dict:
    run = start(argv, prog, __doc__.splitlines()[0], _extra_args, schema=CaptionConfig)
    args, cfg, info = run.args, run.cfg, run.info
    try:
        if args.num_captions < 1:
            raise SystemExit(f"error: --num_captions {args.num_captions}: must be >= 1")
        settings = generation_settings(cfg, args.num_captions)
        fcfg = load_filter_config(args, run.output_dir, info.is_main)
        inputs = read_inputs(args, cfg)
        bad_images = check_input_images(inputs, cfg)
        check_prompt(build_tokenizer(cfg.tokenizer), cfg.prompt, cfg.max_length, where=str(args.config))
        plan = ShardPlan(len(inputs), args.shard_size)
        parts = run.output_dir / "parts"
        check_run_plan(run.output_dir, {
            "inputs": inputs.table.files, "kind": inputs.kind, "images": len(inputs),
            "fingerprint": inputs.fingerprint(), "shard_size": args.shard_size,
            "image_root": cfg.image_root if inputs.kind != "img2dataset" else None,
            "generation": generation_plan(settings, cfg.seed),
            "model": {k: str(getattr(cfg, k)) for k in CAPTION_MODEL_KEYS},
            "filter": model_signature(fcfg) if fcfg is not None else None}, info.is_main, fresh=args.overwrite)
        logger.info("%d images (%d pairs) from %d inputs in shards of %d; %s, %d caption(s) per image%s", len(inputs),
                    len(inputs.table), len(inputs.table.files), args.shard_size,
                    generation_plan(settings, cfg.seed)["mode"], args.num_captions,
                    f"; filter: itm > {args.threshold:g}" if fcfg is not None else "")
        todo = split_pending(list(range(plan.n_shards)), lambda s: not args.overwrite and JsonlShard(parts, s).complete,
                             info)
        if todo:
            m = build_models(cfg, settings, fcfg, inputs, info.device)
            transforms = {"caption": build_test_transform(cfg.image_size)}
            if fcfg is not None and fcfg.image_size != cfg.image_size:  # else the filter reads the same tensors
                transforms["filter"] = build_test_transform(fcfg.image_size)
            progress = Heartbeat("caption (this rank)", sum(len(plan.rows(s)) for s in todo), "images", logger)
        if args.overwrite:
            delete_at_commit(list(OUTPUTS) + ["parts"])  # the previous run's outputs, once this one has loaded
        commit_run()  # inputs, plan and models checked: files are written from here on
        du.barrier()
        if todo:
            for s in todo:
                caption_shard(JsonlShard(parts, s), plan.rows(s), inputs, m, transforms, bad_images, info.device,
                              progress)
        du.barrier()
        report = {}
        if info.is_main:
            report = write_outputs(run.output_dir, parts, plan, inputs, args.threshold if fcfg is not None else None)
            (run.output_dir / "caption_report.json").write_text(json.dumps(report, indent=1))
            _log_report(report, run.output_dir)
        return report
    finally:
        du.cleanup()


if __name__ == "__main__":
    main()
