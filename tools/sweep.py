"""Evaluate checkpoints x caption columns on one split with BLIP's retrieval protocol: one table.

    python -m tools sweep --config configs/products.yaml --split test \\
        --checkpoints 'outputs/products_*/checkpoint_best.pth' outputs/base/checkpoint_last.pth \\
        --caption_cols title title_clean title_prompt --output_dir outputs/sweep
    # checkpoints of other architectures: one model config per --checkpoints argument (a glob's
    # checkpoints share it), or `run`: the config.yaml next to each checkpoint (a run's folder)
    python -m tools sweep --config data.yaml --checkpoints a/checkpoint_best.pth b/checkpoint_last.pth \\
        --member_configs run --caption_cols title title_aug --output_dir outputs/sweep

The split is the config's ``val`` or ``test`` file (``--opts test_file=...``); with ``--caption_cols``
it must be a CSV/TSV file, read once per column as that column's eval set (``caption_col``; the
image columns, ``image_col`` / ``image_dir_col``, from the config): rows grouped by image, BLIP's test
layout. Without ``--caption_cols`` the config's own captions (json, or its ``caption_col``). Every
column's file is parsed and its images checked, and every checkpoint is found, before any model is
built. Each checkpoint is then loaded once and evaluated on every column (``tasks/retrieval_eval.py``,
as ``train_retrieval.py --evaluate`` and ``tools ensemble`` do: ITC top ``k_test``, ``ITM logit +
cosine``), its model keys from its member config (``--member_configs``; default ``--config``), the
data and evaluation keys (``k_test``, batch sizes, ``max_words``) from ``--config``.

Outputs (``output_dir``): ``sweep.json`` (every metric of every cell, and the settings),
``sweep.csv`` (a row per checkpoint: ``checkpoint``, ``path``, then a column ``<caption col>/<metric>``
per caption column x ``--metrics``, then ``best``: the columns in which this row is best, space
separated) and ``sweep.md`` (the same table, the best value of each column in bold; ties all bold).
"""
from __future__ import annotations

import csv
import glob
import io
import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Sequence

from data.transforms import build_test_transform
from data.preflight import log_unk_rate
from tasks.retrieval import RetrievalConfig, build_datasets
from tasks.retrieval_eval import evaluate_retrieval
from tools.common import inference_model, inspect_members, load_member_config, start
from utils import dist as du
from utils.atomic import atomic_write
from utils.rundir import commit_run

logger = logging.getLogger("tools.sweep")

METRICS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "txt_r_mean", "img_r_mean", "r_mean")
OUTPUTS = ("sweep.json", "sweep.csv", "sweep.md")
RUN_CONFIG = "run"  # --member_configs: the config.yaml next to the checkpoint


def _extra_args(parser) -> None:
    parser.add_argument("--checkpoints", nargs="+", required=True,
                        help="checkpoint files or glob patterns (quoted: expanded here, sorted)")
    parser.add_argument("--names", nargs="+", help="row names, one per checkpoint after expansion (default: the paths)")
    parser.add_argument("--member_configs", nargs="+",
                        help="model config per --checkpoints argument (a glob's checkpoints share it), or 'run': the "
                             "config.yaml next to each checkpoint (default: --config)")
    parser.add_argument("--caption_cols", nargs="+",
                        help="caption columns of the split's CSV/TSV file (default: the config's captions)")
    parser.add_argument("--split", default="test", choices=("val", "test"), help="split of the config's dataset")
    parser.add_argument("--metrics", nargs="+", default=["txt_r1", "img_r1", "r_mean"], choices=METRICS,
                        help="metrics in the table (sweep.json has all)")
    parser.add_argument("--no_progress", action="store_true")


def expand_checkpoints(patterns: Sequence[str]) -> List[tuple]:
    """``[(path, index of the --checkpoints argument it came from)]``: glob patterns expanded (sorted),
    each file once. A pattern without a match or a missing file is an error naming it."""
    out, seen = [], set()
    for i, pattern in enumerate(patterns):
        if glob.has_magic(pattern):
            found = sorted(glob.glob(pattern))
            if not found:
                raise SystemExit(f"error: --checkpoints pattern {pattern!r} matches no file")
        else:
            if not os.path.isfile(pattern) and "://" not in pattern:
                raise SystemExit(f"error: checkpoint not found: {pattern}")
            found = [pattern]
        for path in found:
            if path not in seen:
                seen.add(path)
                out.append((path, i))
    return out


def member_configs(args, cfg, checkpoints: List[tuple]) -> List[RetrievalConfig]:
    """The model config of every checkpoint (see ``--member_configs``), all loaded up front."""
    given = args.member_configs
    if not given:
        return [cfg] * len(checkpoints)
    if len(given) == 1 and len(args.checkpoints) > 1:
        given = given * len(args.checkpoints)
    if len(given) != len(args.checkpoints):
        raise SystemExit(f"error: --member_configs needs one config per --checkpoints argument "
                         f"({len(args.checkpoints)}), or one for all; got {len(given)}")
    configs = []
    for path, i in checkpoints:
        source = Path(path).parent / "config.yaml" if given[i] == RUN_CONFIG else Path(given[i])
        if not source.is_file():
            raise SystemExit(f"error: model config of {path} not found: {source}"
                             + (" (--member_configs run: the config.yaml of the checkpoint's run)"
                                if given[i] == RUN_CONFIG else ""))
        configs.append(load_member_config(source, f"the model config of checkpoint {path}"))
    return configs


def column_datasets(cfg: RetrievalConfig, split: str, columns: Sequence[str]) -> Dict[str, object]:
    """``{caption column: eval dataset}`` of the split, each parsed and its images checked (before any
    model); without ``columns`` the config's own captions, under its ``caption_col``."""
    if not columns:
        return {cfg.caption_col: build_datasets(cfg, (split,))[split]}
    datasets = {}
    for column in columns:
        dataset = build_datasets(cfg.model_copy(update={"caption_col": column}), (split,))[split]
        if not str(dataset.ann_file).lower().endswith((".csv", ".tsv")):
            raise SystemExit(f"error: --caption_cols needs a CSV/TSV {split} file; {dataset.ann_file} is json "
                             f"(make one with `python -m tools captions`, or leave --caption_cols out)")
        datasets[column] = dataset
    return datasets


def _best(values: List[float]) -> List[bool]:
    top = max(values)
    return [v == top for v in values]


def table(record: dict, metrics: Sequence[str]) -> tuple:
    """(header, rows, best flags) of the sweep table: one row per checkpoint, a column per caption
    column x metric."""
    columns = [(c, m) for c in record["caption_cols"] for m in metrics]
    rows = [[r["results"][c][m] for c, m in columns] for r in record["checkpoints"]]
    best_by_col = [_best([row[j] for row in rows]) for j in range(len(columns))]
    best = [[best_by_col[j][i] for j in range(len(columns))] for i in range(len(rows))]
    return [f"{c}/{m}" for c, m in columns], rows, best


def write_tables(output_dir: Path, record: dict, metrics: Sequence[str]) -> tuple:
    header, rows, best = table(record, metrics)
    names = [r["name"] for r in record["checkpoints"]]
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["checkpoint", "path"] + header + ["best"])
    for r, values, flags in zip(record["checkpoints"], rows, best):
        writer.writerow([r["name"], r["path"]] + [f"{v:.4f}" for v in values]
                        + [" ".join(h for h, f in zip(header, flags) if f)])
    atomic_write(output_dir / "sweep.csv", lambda f: f.write(buf.getvalue().encode()))
    lines = [f"Split `{record['split']}` ({record['file']}), {record['images']} images; BLIP's protocol "
             f"(k_test {record['k_test']}); the best of each column in bold.", "",
             "| checkpoint | " + " | ".join(h.replace("/", " ") for h in header) + " |",
             "|---|" + "---:|" * len(header)]
    for name, values, flags in zip(names, rows, best):
        cells = [f"**{v:.2f}**" if f else f"{v:.2f}" for v, f in zip(values, flags)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    atomic_write(output_dir / "sweep.md", lambda f: f.write(("\n".join(lines) + "\n").encode()))
    return output_dir / "sweep.csv", output_dir / "sweep.md"


def main(argv=None, prog: str = "python -m tools sweep") -> dict:
    run = start(argv, prog, __doc__.splitlines()[0], _extra_args, outputs=OUTPUTS)
    args, cfg, info = run.args, run.cfg, run.info
    try:
        checkpoints = expand_checkpoints(args.checkpoints)
        if args.names and len(args.names) != len(checkpoints):
            raise SystemExit(f"error: --names needs one name per checkpoint ({len(checkpoints)} after expansion: "
                             f"{[p for p, _ in checkpoints]}), got {len(args.names)}")
        if args.caption_cols and len(set(args.caption_cols)) != len(args.caption_cols):
            raise SystemExit(f"error: --caption_cols repeats a column: {args.caption_cols}")
        members = member_configs(args, cfg, checkpoints)
        datasets = column_datasets(cfg, args.split, args.caption_cols or [])
        # Every checkpoint against its model config before the first is evaluated (a bad one stops here).
        inspect_members([(path, member, f"checkpoint {n + 1} of --checkpoints")
                         for n, ((path, _), member) in enumerate(zip(checkpoints, members))])
        commit_run()
        first = next(iter(datasets.values()))
        record: dict = {"split": args.split, "file": str(first.ann_file), "images": len(first),
                        "k_test": cfg.k_test, "caption_cols": list(datasets), "metrics": list(args.metrics),
                        "checkpoints": []}
        logger.info("sweep: %d checkpoints x %d caption columns on split '%s' (%d images)", len(checkpoints),
                    len(datasets), args.split, len(first))
        for n, ((path, _), member) in enumerate(zip(checkpoints, members)):
            model, tokenizer = inference_model(member, info.device, pretrained=path)  # once per checkpoint
            results = {}
            for column, dataset in datasets.items():
                dataset.transform = build_test_transform(member.image_size)
                log_unk_rate(tokenizer, dataset.text, f"the {args.split} captions of column {column!r}")
                out = evaluate_retrieval(model, dataset, tokenizer, k_test=cfg.k_test, max_tokens=member.max_tokens,
                                         batch_size=cfg.batch_size_test, rerank_batch_size=cfg.rerank_batch_size,
                                         num_workers=cfg.num_workers, precision=cfg.precision,
                                         progress=not args.no_progress and info.is_main)
                results[column] = out.metrics
                logger.info("%s, column %r: %s", path, column,
                            {k: round(out.metrics[k], 2) for k in args.metrics})
            record["checkpoints"].append({"name": args.names[n] if args.names else path, "path": path,
                                          "results": results})
            del model
            if info.is_main:  # the table so far, after every checkpoint (a later failure keeps it)
                record["complete"] = n + 1 == len(checkpoints)
                atomic_write(run.output_dir / "sweep.json", lambda f: f.write(json.dumps(record, indent=1).encode()))
                paths = write_tables(run.output_dir, record, args.metrics)
        if info.is_main:
            logger.info("wrote %s, %s and sweep.json", *paths)
            print((run.output_dir / "sweep.md").read_text(), end="")
        return record
    finally:
        du.cleanup()


if __name__ == "__main__":
    main()
