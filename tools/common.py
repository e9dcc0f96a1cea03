"""What the tools share: start-up (process group, logging, model), pair-file arguments and their
pre-flight check, progress lines, and the sharded, resumable output engine.

Pre-flight: a tool reads and checks its inputs (``read_pair_args``, ``check_pair_images``) before it
builds a model, so a bad file or a missing image stops it at once, naming the file, the entry (or
row and line) and the field. With ``--opts skip_bad_images=true`` the pairs of bad images are
reported as not processed (``error`` in the output) and the others processed.

Progress: long loops log a line at least every ``utils.logging.HEARTBEAT_S`` seconds
(``Heartbeat``: rows done, rows/s, ETA), for logs rather than a progress bar.

Sharding: rows ``0..n-1`` are cut into shards of ``shard_size`` consecutive rows; the unfinished
shards are dealt to the ranks round-robin. Each shard is one output file, renamed into place only
when complete, so a restarted run (with any number of ranks) skips finished shards. Line-oriented shards
also grow a ``.partial`` file, one flushed line per row, so a restart skips the rows it holds too.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Sequence

import torch

from data.pairs import FORMATS, PairTable, read_pairs
from data.preflight import check_images
from data.utils import BadImageError
from utils import dist as du
from utils.atomic import atomic_write
from models.factory import create_model
from tasks.retrieval import RetrievalConfig
from utils.cli import NOT_TRAINING
from utils.config import ConfigError, load_config, parse_config
from utils.rundir import add_run_file, start_run

logger = logging.getLogger("tools")

# The config keys that decide what a model computes: a restart must not mix two models' outputs.
MODEL_KEYS = ("vit", "image_size", "med_config", "tokenizer", "embed_dim", "pretrained", "max_tokens",
              "max_words", "precision")


def add_pair_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    g = parser.add_argument_group("pairs")
    g.add_argument("--input", nargs="+", required=required, metavar="FILE",
                   help="annotation files: BLIP-json, pretraining json or CSV/TSV (image paths are "
                        "relative to the config's image_root unless absolute)")
    g.add_argument("--format", default="auto", choices=FORMATS, help="input format (auto: by extension)")
    g.add_argument("--image_col", default="image", help="CSV column with the image path")
    g.add_argument("--caption_col", default="caption", help="CSV column with the caption")
    g.add_argument("--image_dir_col", default=None,
                   help="CSV column with the image's folder: the image path is then FOLDER/FILE (FILE: --image_col)")
    g.add_argument("--source_key", default=None,
                   help="json field / CSV column naming each pair's source (default: the file name)")


def read_pair_args(args, files=None, id_col: Optional[str] = None, need_image: bool = True,
                   need_caption: bool = True) -> PairTable:
    """The pairs of ``--input`` (or of ``files``, read with the same column flags); a bad file ends
    the command with its message (file, entry or row and line, field; a missing column with the
    file's columns). ``id_col``, ``need_image``, ``need_caption``: as ``data.pairs.read_pairs``."""
    try:
        return read_pairs(args.input if files is None else files, args.format, args.image_col, args.caption_col,
                          getattr(args, "source_key", None), image_dir_col=getattr(args, "image_dir_col", None),
                          id_col=id_col, need_image=need_image, need_caption=need_caption)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None


def check_pair_images(table: PairTable, cfg) -> dict:
    """Pre-flight image check of every distinct image of ``table`` (under ``cfg.image_root``); a
    collective. A bad image ends the command naming its pair's file entry (or row and line), unless
    ``cfg.skip_bad_images``: then ``{joined path: message}`` of the bad ones, for ``PairBatches``."""
    paths, where = table.image_checks(cfg.image_root or None)
    try:
        bad = check_images(paths, where, "the inputs", cfg.skip_bad_images,
                           hint="pass --opts skip_bad_images=true to report their pairs as not processed")
    except (FileNotFoundError, BadImageError) as err:
        raise SystemExit(f"error: {err}") from None
    if bad and du.is_main_process():
        logger.warning("%d of %d images are missing or unreadable (skip_bad_images): their pairs are reported, not "
                       "processed", len(bad), len(paths))
    return {path: b.error for path, b in bad.items()}


@dataclass
class ToolRun:
    args: argparse.Namespace
    cfg: RetrievalConfig          # an instance of ``start``'s ``schema``
    info: du.DistInfo
    output_dir: Path


def start(argv, prog: str, description: str, extra_args, schema: type = RetrievalConfig,
          outputs: Sequence[str] = (), unused: Sequence[str] = NOT_TRAINING) -> ToolRun:
    """Parse ``--config/--output_dir/--opts`` plus the tool's flags, then start the run as every
    entry script does (``utils.rundir.start_run``: process group, the lock on ``output_dir``,
    logging, ``deterministic``; nothing written before :func:`utils.rundir.commit_run`, which also
    writes the resolved config and, on rank 0, the command line as ``args.json``).
    ``schema``: the config class ``--config`` is validated against (a retrieval config by default;
    ``tools caption`` reads a ``tasks.caption.CaptionConfig``); ``outputs``: the files the tool writes
    into ``output_dir`` (present ones are refused unless ``--overwrite``); ``unused``: config keys
    a tool never uses (a training run's ``max_epoch``...), not cross-checked."""
    args, cfg, doc = parse_config(schema, argv, description=description, extra_args=extra_args, prog=prog,
                                  unused_keys=lambda _: tuple(unused))
    info, output_dir = start_run(cfg, doc, args, trains=False, outputs=outputs, mode=prog.split()[-1])
    add_run_file("args.json", json.dumps(vars(args), indent=1, default=str).encode())
    return ToolRun(args, cfg, info, output_dir)


def inference_model(cfg, device, pretrained: Optional[str] = None, role: str = "pretrained"):
    """The config's BLIP without momentum encoders (``pretrained`` overrides the config's
    checkpoint), in eval mode, its weights loaded under the evaluation policy (every weight from
    the file; ``role`` names it in messages). With no checkpoint at all (``pretrained: ''``) the
    model is random, seeded with ``cfg.seed`` on every rank (the same model everywhere: tests use
    that), and a warning says so."""
    torch.manual_seed(cfg.seed)
    source = cfg.pretrained if pretrained is None else pretrained
    model, tokenizer = create_model(cfg, "blip_inference", device, pretrained=pretrained, load=bool(source),
                                    purpose="eval", role=role)
    if not source:
        logger.warning("`pretrained` is empty: this tool runs a model with random weights")
    return model.eval(), tokenizer


def load_member_config(path, role: str) -> RetrievalConfig:
    """A member's model config (``--member_configs``): a bad one ends the command naming it."""
    try:
        return load_config(path, RetrievalConfig, unused_keys=NOT_TRAINING)[0]
    except ConfigError as err:
        raise SystemExit(f"error: {role}: {err}") from None


def inspect_members(members: Sequence[tuple]) -> None:
    """Every ``(checkpoint, config, role)`` of a multi-checkpoint command judged by the loading
    policy (``models.factory.inspect_weights``: shapes only, nothing loaded) before the first one
    is evaluated: a bad member stops the command at once, naming it."""
    from models.factory import inspect_weights
    for ckpt, member, role in members:
        inspect_weights(member, "blip_inference", ckpt, role=role)
    logger.info("%d checkpoints checked against their model configs", len(members))


def model_signature(cfg) -> dict:
    return {k: str(getattr(cfg, k)) for k in MODEL_KEYS}


# ----------------------------------------------------------------------------- shards

@dataclass(frozen=True)
class ShardPlan:
    n_rows: int
    shard_size: int

    def __post_init__(self):
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")

    @property
    def n_shards(self) -> int:
        return -(-self.n_rows // self.shard_size)

    def rows(self, shard: int) -> range:
        return range(shard * self.shard_size, min(self.n_rows, (shard + 1) * self.shard_size))



def split_pending(jobs: List, done: Callable[[object], bool], info: du.DistInfo) -> List:
    """This rank's share of the unfinished ``jobs``, dealt round-robin so that the ranks finish
    together even after a resume (they then wait for each other at a barrier). Rank 0 decides and
    broadcasts, so every rank sees the same list. A collective: all ranks must call."""
    pending = du.broadcast_object([j for j in jobs if not done(j)] if info.is_main else None)
    logger.info("%d of %d shards to write (%d already complete); this rank: %d", len(pending), len(jobs),
                len(jobs) - len(pending), len(pending[info.rank::info.world_size]))
    return pending[info.rank::info.world_size]


def check_run_plan(output_dir: Path, plan: dict, main: bool, fresh: bool = False) -> None:
    """A restart must find the ``plan.json`` of the first run, so outputs of different inputs,
    models or settings are never mixed; a first run (or ``fresh``: ``--overwrite``) writes it at the
    commit. A collective: all ranks must call."""
    path = output_dir / "plan.json"
    error = None
    if main:
        if path.exists() and not fresh:
            old = json.loads(path.read_text())
            changed = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
            if changed:
                error = (f"{output_dir} holds a run with different {', '.join(changed)} "
                         f"(see {path}); use a new --output_dir, --overwrite to start over, or delete it")
        elif not path.exists() or fresh:
            add_run_file("plan.json", json.dumps(plan, indent=1).encode())
    error = du.broadcast_object(error)
    if error:
        raise SystemExit(f"error: {error}")


class JsonlShard:
    """One shard's rows as JSON lines: ``<name>.jsonl`` when complete, ``<name>.partial`` while
    being written. A torn last line (a kill mid-write) is dropped when the partial file is reopened."""

    def __init__(self, folder: Path, index: int):
        self.final = folder / f"shard_{index:06d}.jsonl"
        self.partial = folder / f"shard_{index:06d}.partial"

    @property
    def complete(self) -> bool:
        return self.final.exists()

    def done_rows(self) -> set:
        """Rows already in the partial file; truncates it to its last complete line."""
        if not self.partial.exists():
            return set()
        data = self.partial.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with open(self.partial, "r+b") as f:
                f.truncate(end)
        return {json.loads(line)["row"] for line in data[:end].splitlines() if line.strip()}

    def open_append(self):
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        return open(self.partial, "a", encoding="utf-8")

    def finish(self) -> None:
        """Sort the partial file's lines by row and move them into place as the final file."""
        records = sorted(read_jsonl(self.partial), key=lambda r: r["row"])
        atomic_write(self.final, lambda f: f.write("".join(json.dumps(r) + "\n" for r in records).encode()))
        self.partial.unlink()


def read_jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def write_lines_atomic(path: Path, lines: Iterable[str]) -> None:
    def write(f: io.BufferedWriter) -> None:
        for line in lines:
            f.write(line.encode("utf-8"))
    atomic_write(path, write)


def batches_of(rows: List[int], size: int) -> List[List[int]]:
    return [rows[s:s + size] for s in range(0, len(rows), size)]
