"""Score every (image, caption) pair of annotation files with ITC cosine and/or ITM match probability.

    python -m tools score --config outputs/coco_ft/config.yaml --input data/cc3m.json data/sbu.json \\
        --output_dir outputs/score_cc3m
    torchrun --nproc_per_node 8 -m tools score --config ... --input pairs.csv --caption_col text

Each rank scores its shards (``--shard_size`` consecutive pairs each) into ``parts/``; rank 0 then
merges them, in input order, into ``scores.jsonl`` (or ``scores.csv``) with one record per pair:
``row, source, image, caption, itc, itm`` and ``error`` for a pair whose image could not be read
(its scores are null; the rest of the shard is scored). Before the model is built every image is
checked: a missing or unreadable one stops the command naming its row, unless ``--opts
skip_bad_images=true``, which reports its pairs with ``error`` instead. A restarted run skips
finished shards and the pairs already written to an unfinished one. Progress is logged at least
every 30 s. The score distribution goes to ``score_report.json`` (quantiles, per-source counts) and
``score_hist.png``.

``itc`` is the cosine of the normalised ITC features (BLIP's retrieval similarity, in [-1, 1]);
``itm`` is softmax(ITM logits)[match], the probability that the caption describes the image.
"""
from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from data.collate import tokenize
from data.pairs import PairBatches, PairTable
from data.preflight import log_unk_rate
from data.transforms import build_test_transform
from data.utils import pre_caption
from tools.common import (JsonlShard, ShardPlan, add_pair_args, batches_of, check_pair_images, check_run_plan,
                          inference_model, model_signature, read_jsonl, read_pair_args, split_pending, start,
                          write_lines_atomic)
from utils import dist as du
from utils.rundir import commit_run, delete_at_commit
from utils.precision import autocast
from utils.logging import Heartbeat

logger = logging.getLogger("tools.score")

KINDS = {"itc": ("itc",), "itm": ("itm",), "both": ("itc", "itm")}
QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
CSV_COLUMNS = ("row", "source", "image", "caption", "itc", "itm", "error")


def _extra_args(parser) -> None:
    add_pair_args(parser)
    parser.add_argument("--scores", default="both", choices=sorted(KINDS), help="which scores to compute")
    parser.add_argument("--shard_size", type=int, default=10000, help="pairs per shard (unit of resume)")
    parser.add_argument("--out_format", default="jsonl", choices=("jsonl", "csv"), help="merged file format")
    parser.add_argument("--bins", type=int, default=50, help="histogram bins")


@torch.no_grad()
def score_batch(model, tokenizer, batch: dict, kinds: Sequence[str], cfg, device) -> Dict[str, List]:
    """Scores of one ``PairBatches`` item: ``{kind: [float | None per row]}`` (None: no image).

    Each distinct image is encoded once and its cross-attention keys/values projected once; every
    caption attends to its own image through ``cross_index``.
    """
    index = batch["image_index"]
    out: Dict[str, List] = {k: [None] * len(index) for k in kinds}
    ok = (index >= 0).nonzero().squeeze(1)
    if ok.numel() == 0:
        return out
    ids, mask = tokenize(tokenizer, [batch["captions"][i] for i in ok.tolist()], cfg.max_tokens, dynamic=True)
    ids, mask, image_of = ids.to(device), mask.to(device), index[ok].to(device)
    with autocast(device, cfg.precision):
        tokens, image_feat = model.encode_image(batch["pixel_values"].to(device))
        values = {}
        if "itc" in kinds:
            _, text_feat = model.encode_text(ids, mask)
            values["itc"] = (image_feat[image_of].float() * text_feat.float()).sum(-1)
        if "itm" in kinds:
            cross_kv = model.text_encoder.project_cross_kv(tokens)
            logits = model.itm_logits(ids, mask, cross_kv=cross_kv, cross_index=image_of)
            values["itm"] = logits.float().softmax(-1)[:, 1]
    for kind, v in values.items():
        for i, x in zip(ok.tolist(), v.cpu().tolist()):
            out[kind][i] = x
    return out


def score_shard(shard: JsonlShard, rows: range, table: PairTable, model, tokenizer, transform, kinds, cfg,
                device, bad_images: dict, progress: Heartbeat) -> None:
    done = shard.done_rows()
    pending = [r for r in rows if r not in done]
    if done:
        logger.info("%s: resuming, %d of %d pairs already scored", shard.partial.name, len(done), len(rows))
    progress.update(len(done))
    dataset = PairBatches(table, batches_of(pending, cfg.batch_size_test), cfg.image_root or None, transform,
                          cfg.max_words, bad_images)
    loader = DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers)
    with shard.open_append() as f:
        for batch in loader:
            scores = score_batch(model, tokenizer, batch, kinds, cfg, device)
            for j, r in enumerate(batch["rows"]):
                record = {"row": r, "source": table.source[r], "image": table.image[r], "caption": table.caption[r]}
                record.update({k: scores[k][j] for k in kinds})
                if r in batch["errors"]:
                    record["error"] = batch["errors"][r]
                    logger.warning("not scored: %s", record["error"])
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()  # a kill now loses at most the batch being scored
            progress.update(len(batch["rows"]))
    shard.finish()


# ----------------------------------------------------------------------------- merge and report

def _csv_line(record: dict) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerow(["" if record.get(c) is None else record.get(c) for c in CSV_COLUMNS])
    return buf.getvalue()


def merge_shards(parts: Path, plan: ShardPlan, out_path: Path, kinds) -> dict:
    """Concatenate the shards in order into ``out_path``; return the values for the report."""
    missing = [s for s in range(plan.n_shards) if not JsonlShard(parts, s).complete]
    if missing:
        raise RuntimeError(f"cannot merge: shards {missing[:10]} of {plan.n_shards} are not complete in {parts}")
    stats = {"values": {k: [] for k in kinds}, "sources": {}, "errors": []}

    def lines():
        if out_path.suffix == ".csv":
            yield ",".join(CSV_COLUMNS) + "\r\n"
        expected = 0
        for s in range(plan.n_shards):
            for record in read_jsonl(JsonlShard(parts, s).final):
                if record["row"] != expected:  # the shards must tile the rows exactly, in order
                    raise RuntimeError(f"shard {s}: found row {record['row']}, expected {expected}")
                expected += 1
                src = stats["sources"].setdefault(record["source"], {"pairs": 0, "errors": 0})
                src["pairs"] += 1
                if "error" in record:
                    src["errors"] += 1
                    stats["errors"].append(record["error"])
                else:
                    for k in kinds:
                        stats["values"][k].append(record[k])
                yield _csv_line(record) if out_path.suffix == ".csv" else json.dumps(record, ensure_ascii=False) + "\n"

    write_lines_atomic(out_path, lines())
    return stats


def score_report(stats: dict) -> dict:
    report = {"pairs": sum(s["pairs"] for s in stats["sources"].values()), "errors": len(stats["errors"]),
              "per_source": stats["sources"], "quantiles": {}, "mean": {}}
    for kind, values in stats["values"].items():
        if values:
            v = np.asarray(values, dtype=np.float64)
            report["quantiles"][kind] = {f"{q:g}": float(x) for q, x in zip(QUANTILES, np.quantile(v, QUANTILES))}
            report["mean"][kind] = float(v.mean())
    report["first_errors"] = stats["errors"][:20]
    return report


def plot_histograms(values: Dict[str, List[float]], path: Path, bins: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k, v in values.items() if v]
    fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(5.5 * max(1, len(kinds)), 3.8), squeeze=False)
    titles = {"itc": "ITC cosine", "itm": "ITM match probability"}
    for ax, kind in zip(axes[0], kinds):
        v = np.asarray(values[kind], dtype=np.float64)
        ax.hist(v, bins=bins, color="#4c72b0")
        for q, style in ((0.05, ":"), (0.5, "--"), (0.95, ":")):
            x = float(np.quantile(v, q))
            ax.axvline(x, color="#c44e52", linestyle=style, label=f"{int(q * 100)}%: {x:.3f}")
        ax.set_title(f"{titles.get(kind, kind)} ({len(v)} pairs)")
        ax.set_xlabel("score")
        ax.set_ylabel("pairs")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None, prog: str = "python -m tools score") -> dict:
    run = start(argv, prog, __doc__.splitlines()[0], _extra_args)
    args, cfg, info = run.args, run.cfg, run.info
    try:
        table = read_pair_args(args)
        bad_images = check_pair_images(table, cfg)
        kinds = KINDS[args.scores]
        plan = ShardPlan(len(table), args.shard_size)
        parts = run.output_dir / "parts"
        check_run_plan(run.output_dir, {"inputs": table.files, "pairs": len(table), "fingerprint": table.fingerprint(),
                                        "shard_size": args.shard_size, "scores": list(kinds),
                                        "image_root": cfg.image_root, "model": model_signature(cfg)}, info.is_main,
                       fresh=args.overwrite)
        logger.info("%d pairs from %d files in shards of %d", len(table), len(table.files), args.shard_size)
        todo = split_pending(list(range(plan.n_shards)), lambda s: not args.overwrite and JsonlShard(parts, s).complete,
                             info)
        if todo:
            model, tokenizer = inference_model(cfg, info.device)
            log_unk_rate(tokenizer, table.caption, "the captions", clean=lambda c: pre_caption(c, cfg.max_words))
            transform = build_test_transform(cfg.image_size)
            progress = Heartbeat("score (this rank)", sum(len(plan.rows(s)) for s in todo), "pairs", logger)
        if args.overwrite:
            delete_at_commit(["parts", "score_report.json", "score_hist.png", "scores.jsonl", "scores.csv"])
        commit_run()  # inputs, plan and model checked: files are written from here on
        du.barrier()
        if todo:
            for s in todo:
                score_shard(JsonlShard(parts, s), plan.rows(s), table, model, tokenizer, transform, kinds, cfg,
                            info.device, bad_images, progress)
        du.barrier()
        report = {}
        if info.is_main:
            out_path = run.output_dir / f"scores.{args.out_format}"
            stats = merge_shards(parts, plan, out_path, kinds)
            report = score_report(stats)
            (run.output_dir / "score_report.json").write_text(json.dumps(report, indent=1))
            plot_histograms(stats["values"], run.output_dir / "score_hist.png", args.bins)
            logger.info("wrote %s (%d pairs, %d not scored); quantiles: %s", out_path, report["pairs"],
                        report["errors"], {k: {q: round(v, 4) for q, v in qs.items()}
                                           for k, qs in report["quantiles"].items()})
        return report
    finally:
        du.cleanup()


if __name__ == "__main__":
    main()
