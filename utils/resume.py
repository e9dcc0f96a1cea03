"""A training run's checkpoints: what one holds, its atomic save, the strict exact resume, and the
kept epoch copies (``save_every``, ``keep_checkpoints``).

A checkpoint holds the model (or what its ``checkpoint_state_dict()`` returns), its format tag, the
optimiser, the scaler, the loop state (``LoopState``: epoch, step, position inside the epoch, best,
running sums, a streamed epoch's slot states), the config, and the random streams (python, numpy,
torch, CUDA, the negative-sampling generator; under torchrun every rank's), so that a resumed run
computes what an uninterrupted one does. ``TrainerCheckpoints`` is a mixin of
``utils.engine.Trainer``: its methods are the Trainer's and use the attributes ``Trainer.__init__``
sets.
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from utils import dist as du
from utils.checkpoint import SAFETENSORS_SUFFIX, load_checkpoint, save_checkpoint_atomic, save_safetensors_checkpoint
from utils.checkpoint_files import epoch_checkpoints, find_checkpoint, link_checkpoint, remove_checkpoint
from utils.config import config_diff, describe_diff
from utils.errors import CheckpointError, CheckpointMismatchError
from utils.state_dict import LoadReport, collapse_keys
from utils.stream_state import _DataCounts

logger = logging.getLogger("utils.engine")  # the Trainer's log lines keep the engine's name


def _rng_state() -> dict:
    # Only tensors and plain containers, so the checkpoint loads with weights_only=True.
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class LoopState:
    epoch: int = 0            # the epoch being trained (or next to train)
    step: int = 0             # optimiser steps taken so far
    batch_in_epoch: int = 0   # batches of `epoch` already consumed (mid-epoch checkpoints)
    best: float = -math.inf
    best_epoch: int = -1
    history: list = field(default_factory=list)
    epoch_sums: dict = field(default_factory=dict)  # running loss sums of the current epoch
    epoch_count: int = 0
    # Streamed data (data/stream.py): {"slots": N, "states": {slot: state}, "counts": {...}} of the
    # current epoch, every rank's slots (gathered at each save).
    stream: dict = field(default_factory=dict)


class TrainerCheckpoints:
    """The Trainer's checkpoints (a mixin of ``utils.engine.Trainer``): ``save`` writes one,
    ``resume`` continues a run from one, strictly (``_check_resume``), and ``_keep_epoch_checkpoint``
    keeps the epoch copies."""

    def checkpoint_state(self) -> dict:
        model_state = getattr(self.raw_model, "checkpoint_state_dict", self.raw_model.state_dict)()
        return {"model": model_state, "format": getattr(self.raw_model, "checkpoint_format", None),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "loop": asdict(self.state), "config": self.config,
                "rng": _rng_state(), "generator": self.generator.get_state(),
                "epoch": self.state.epoch, "step": self.state.step}

    def save(self, stem: str) -> Optional[Path]:
        """Write ``output_dir/<stem>.pth`` (or ``.safetensors`` and its state file, ``save_format``)
        atomically from rank 0 (a collective: all ranks must call)."""
        path = None
        # Every rank's random streams (rank 0's are also the checkpoint's "rng" / "generator").
        rngs = du.all_gather_object({"rng": _rng_state(), "generator": self.generator.get_state()}) \
            if self.info.distributed else None
        if self.state.stream:
            # Every rank's slot states and data counts go into rank 0's checkpoint.
            mine = {"states": {s: v for s, v in self.state.stream.get("states", {}).items() if s in self.my_slots},
                    "counts": self.data_counts.as_dict()}
            parts = du.all_gather_object(mine) if self.info.distributed else [mine]
            states: dict = {}
            for part in parts:
                states.update(part["states"])
            self.state.stream = {**self.state.stream, "states": states,
                                 "counts": _DataCounts.merged([p["counts"] for p in parts]).as_dict()}
        if self.info.is_main:
            state = self.checkpoint_state()
            if rngs is not None:
                state["rank_rng"] = rngs
            path = self.output_dir / f"{stem}{self.ext}"
            if self.ext == SAFETENSORS_SUFFIX:
                save_safetensors_checkpoint(state, path)
            else:
                save_checkpoint_atomic(state, path)
            logger.info("saved %s (epoch %d, step %d)", path, self.state.epoch, self.state.step)
        du.barrier()
        return path

    def resume(self, source: str) -> bool:
        """``'auto'`` resumes from ``checkpoint_last.pth`` (or ``.safetensors``) if present; a path
        must exist.

        Under torchrun rank 0 decides: its file is the run's checkpoint. Ranks that do not see that
        file (another node with a node-local ``output_dir``, where only rank 0 writes) get rank 0's
        checkpoint over the process group."""
        path = find_checkpoint(self.output_dir, "checkpoint_last") if source == "auto" else Path(source)
        have = du.all_gather_object(path.is_file()) if self.info.distributed else [path.is_file()]
        if source == "auto" and not have[0]:
            logger.info("resume=auto: no %s, starting fresh", path)
            return False
        if not have[0]:
            raise FileNotFoundError(f"--resume {source}: no checkpoint file {path}")
        if all(have):
            ckpt = load_checkpoint(path, with_state=True)
        else:
            lacking = [r for r, h in enumerate(have) if not h]
            logger.info("resume: rank(s) %s do not see %s (a node-local output_dir): rank 0 sends its checkpoint",
                        lacking, path)
            ckpt = du.broadcast_object(load_checkpoint(path, with_state=True) if self.info.is_main else None)
        self._check_resume(path, ckpt)
        getattr(self.raw_model, "load_checkpoint_state_dict", self.raw_model.load_state_dict)(ckpt["model"])
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"--resume {path}: its optimiser state does not fit this run's ({err}); the "
                                  "trainable parameters differ (a changed freeze or lr setting?)") from None
        self.scaler.load_state_dict(ckpt["scaler"])
        self.state = LoopState(**ckpt["loop"])
        # Rank 0 carries the counts so far of a streamed epoch (the others start from zero: summed
        # at the epoch's end).
        counts = self.state.stream.get("counts") if self.state.stream else None
        self.data_counts = _DataCounts.from_dict(counts) if counts and self.info.is_main else _DataCounts()
        # Each rank continues its own random streams (dropout, negatives) where a multi-rank run
        # saved them; a checkpoint of another world size (or an older one) gives rank 0's to all.
        ranks = ckpt.get("rank_rng")
        mine = ranks[self.info.rank] if isinstance(ranks, list) and len(ranks) == self.info.world_size else ckpt
        _set_rng_state(mine["rng"])
        self.generator.set_state(mine["generator"])
        logger.info("resumed from %s at epoch %d, batch %d, step %d", path, self.state.epoch,
                    self.state.batch_in_epoch, self.state.step)
        return True

    def _check_resume(self, path: Path, ckpt: dict) -> None:
        """Resume restores strictly: every tensor of this run's checkpoint layout, shape for shape,
        else one line naming the file, the first differing keys and the config keys that differ
        between the checkpoint's config and this run's. Other config changes are logged."""
        own = getattr(self.raw_model, "checkpoint_state_dict", self.raw_model.state_dict)()
        state = ckpt.get("model") or {}
        if any(k.startswith("blip.") for k in state) and not any(k.startswith("blip.") for k in own):
            own = self.raw_model.state_dict()  # a checkpoint written while BLIP trained too
        report = LoadReport(missing=[k for k in own if k not in state], unexpected=[k for k in state if k not in own],
                            mismatched=[(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
                                        if k in own and tuple(v.shape) != tuple(own[k].shape)])
        diff = config_diff(ckpt.get("config") or {}, self.config)
        if not report.is_clean:
            parts = []
            if report.mismatched:
                k, a, b = report.mismatched[0]
                parts.append(f"{len(report.mismatched)} tensor(s) have other shapes (e.g. {k} {a} in the file, {b} in "
                             "the model)")
            if report.missing:
                parts.append(f"the model has {len(report.missing)} the file lacks ({collapse_keys(report.missing, 3)})")
            if report.unexpected:
                parts.append(f"the file has {len(report.unexpected)} the model lacks "
                             f"({collapse_keys(report.unexpected, 3)})")
            changed = (f"the checkpoint's config differs from this run's in {describe_diff(diff)}" if diff else
                       "the checkpoint holds no config to compare with")
            raise CheckpointMismatchError(f"--resume {path} does not fit this run's model: {'; '.join(parts)}; "
                                          f"{changed}. Resume with the config it was trained with "
                                          f"({self.output_dir / 'config.yaml'} of that run), or start a new run "
                                          "(another --output_dir, or --overwrite)")
        if diff:
            logger.warning("resuming %s with changed config keys: %s (the weights, optimiser and schedule state are "
                           "the checkpoint's)", path, describe_diff(diff, 8))

    def _keep_epoch_checkpoint(self, epoch: int) -> None:
        """``save_every``: ``checkpoint_epochNNN`` (``epoch`` as in log.txt) beside best/last, a hard
        link to (else a copy of) the last checkpoint; then only the newest ``keep_checkpoints``
        epoch checkpoints are kept."""
        if self.info.is_main:
            path = link_checkpoint(self.output_dir / f"checkpoint_last{self.ext}",
                                   self.output_dir / f"checkpoint_epoch{epoch:03d}{self.ext}")
            logger.info("kept %s", path)
            if self.keep_checkpoints:
                kept = epoch_checkpoints(self.output_dir)
                for old in kept[:-self.keep_checkpoints]:
                    remove_checkpoint(old)
                    logger.info("keep_checkpoints %d: removed %s", self.keep_checkpoints, old.name)
        du.barrier()
