"""The shared training engine: one loop for every entry script.

What it guarantees:
- the same code runs single-process, and under torchrun on CPU (gloo) or GPUs (NCCL);
- mixed precision (bf16/fp16 autocast; GradScaler for fp16 on CUDA), gradient accumulation,
  clipping, a stop with a clear message on a non-finite loss (the last good checkpoint stays);
- exact resume: checkpoints hold model, optimiser, scaler, epoch, step, the position inside the
  epoch, RNG states and the negative-sampling generator, and every sample's augmentation is seeded by
  (seed, epoch, index) — so a resumed run computes the same losses and weights as an uninterrupted
  one, whatever the number of DataLoader workers;
- checkpoints are written atomically (temp file, fsync, rename);
- ``deterministic: true`` makes a run bitwise repeatable on the same machine and software;
- a run owns its ``output_dir`` (``utils/rundir.py``: a lock, no fresh start over a previous run,
  nothing written before the first optimiser step) and ends on our own errors with their one-line
  message (``utils.rundir.run_entry``).
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from utils import dist as du
from utils.checkpoint import (SAFETENSORS_SUFFIX, CheckpointError, CheckpointMismatchError, LoadReport, collapse_keys,
                              find_checkpoint, link_checkpoint, load_checkpoint, remove_checkpoint,
                              save_checkpoint_atomic, save_safetensors_checkpoint)
from utils.compile import compile_regions
from utils.config import ConfigError, config_diff, config_to_dict, describe_diff
from utils.errors import DataError, UserError
from utils.logging import Heartbeat, Reporters, TensorBoard, WandB, append_json_line
from utils.rundir import TENSORBOARD_DIR, commit_run, epoch_checkpoints

logger = logging.getLogger(__name__)


class NonFiniteLossError(UserError, RuntimeError):
    pass


def _mix(*values: int) -> int:
    """A 63-bit seed from a tuple of ints, stable across processes and runs: PYTHONHASHSEED
    randomises the hashes of str and bytes only, never those of ints and tuples of ints."""
    return hash(tuple(values)) & 0x7FFF_FFFF_FFFF_FFFF


class SeededItems(Dataset):
    """Wraps a dataset so that item ``i`` in epoch ``e`` draws its augmentation from a seed of
    ``(seed, e, i)``: resume and worker count cannot change what a sample looks like. The global
    RNGs are restored afterwards, so the main process's dropout stream is untouched."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):  # expose the wrapped dataset's attributes (text, img2txt, ...)
        if name in ("dataset", "seed", "epoch"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int):
        s = _mix(self.seed, self.epoch, index)
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            random.seed(s)
            # CPU only: torch.manual_seed also seeds the lazy CUDA/XPU/MTIA generators and captures a
            # stack trace each time (~1.5 ms a sample); augmentation draws from the CPU generator.
            torch.default_generator.manual_seed(s)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)


class ResumableSampler(Sampler[int]):
    """A distributed sampler (shuffle per epoch, each rank a strided share, padded to equal length)
    that can start part-way through an epoch."""

    def __init__(self, n: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1, drop_last: bool = False):
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.drop_last = drop_last
        self.num_samples = n // world_size if drop_last else -(-n // world_size)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def resize(self, n: int) -> None:
        """A dataset whose items change per epoch (BLIP's ``laion_path``): ``n`` items from now on."""
        self.n = n
        self.num_samples = n // self.world_size if self.drop_last else -(-n // self.world_size)

    def _indices(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.num_samples * self.world_size
        order = (order * (-(-total // max(1, len(order)))))[:total]
        return order[self.rank:total:self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AVX512-BF16 or AMX). Without them
    oneDNN emulates bf16 and CPU autocast is several times *slower* than fp32 (docs/PERFORMANCE.md)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # an older torch without the probes: assume it can
        return True


_warned_slow_bf16 = False


def autocast(device: torch.device, precision: str):
    """The autocast context of ``precision`` on ``device`` (fp32: none). bf16 on a CPU without
    native bf16 is warned about once: it runs, but slower than fp32."""
    global _warned_slow_bf16
    if precision == "fp32":
        return nullcontext()
    if precision == "bf16" and device.type == "cpu" and not _warned_slow_bf16 and not cpu_has_bf16():
        _warned_slow_bf16 = True
        logger.warning("precision bf16 on a CPU without bf16 instructions (AVX512-BF16 / AMX; this one has %s): "
                       "bf16 is emulated and slower than fp32 here (8.5x slower for a 3152x384x1536 linear "
                       "measured on an AVX2 EPYC); use precision fp32 on this machine",
                       torch.backends.cpu.get_cpu_capability())
    return torch.autocast(device_type=device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])


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


class Trainer:
    """Owns model (DDP-wrapped when distributed), optimiser, schedule, scaler, RNG and loop state;
    :meth:`fit` is the one epoch loop of every training stage.

    ``loss_fn(model, batch, ctx) -> dict[str, Tensor]`` returns named losses; their sum is
    optimised. ``ctx`` carries ``epoch``, ``batch_index``, ``batches_per_epoch`` and ``generator``.

    A model that trains only part of itself (adapters on a frozen backbone) may define
    ``checkpoint_state_dict()`` and ``load_checkpoint_state_dict(sd)``: checkpoints then hold what
    those return instead of the full ``state_dict()``. A model's ``checkpoint_format`` tag is written
    into every checkpoint (``models/factory.py`` dispatches on it).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, schedule: Callable[[int, int], float],
                 info: du.DistInfo, cfg, progress: bool = True):
        """``cfg``: the run config (``RunSettings`` + ``LoopSettings`` fields), stored in checkpoints."""
        self.raw_model = model
        if getattr(cfg, "compile", False):
            compile_regions(model, backend=cfg.compile_backend)  # in place, before DDP wraps it: the state-dict keys stay
        self.model = model
        # Feature-cached accumulation (models/accum.py): the task's loss runs k micro-batches as one
        # virtual batch; the model is then not wrapped in DDP (several backward passes per step):
        # rank 0's weights are broadcast here and gradients averaged once per virtual batch.
        self.accum_freq = int(getattr(cfg, "accum_freq", 1) or 1)
        if self.accum_freq > 1 and cfg.grad_accum_steps > 1:
            raise ConfigError("accum_freq (feature-cached accumulation) and grad_accum_steps (naive accumulation) "
                             "cannot be combined: set one of them to 1")
        if info.distributed and self.accum_freq > 1:
            import torch.distributed as dist
            with torch.no_grad():
                for t in list(model.parameters()) + list(model.buffers()):
                    dist.broadcast(t.data, 0)
        elif info.distributed:
            ddp_kwargs = {"device_ids": [info.device.index]} if info.device.type == "cuda" else {}
            # Buffers (queues) are kept identical by the models' own all-gathers; no broadcast needed.
            self.model = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False, **ddp_kwargs)
        self.optimizer = optimizer
        self.schedule = schedule
        self.info = info
        self.output_dir = Path(cfg.output_dir)
        self.precision = cfg.precision
        if self.precision == "fp16" and info.device.type != "cuda":
            raise ConfigError("precision fp16 needs CUDA; use bf16 on CPU")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.accum = cfg.grad_accum_steps
        self.clip = cfg.clip_grad_norm
        self.log_every = cfg.log_every
        self.ckpt_every_steps = cfg.ckpt_every_steps
        # Checkpoint files: `save_format` (.pth, or .safetensors + a state file), epoch copies kept
        # every `save_every` epochs (the newest `keep_checkpoints` of them), TensorBoard events.
        self.ext = SAFETENSORS_SUFFIX if getattr(cfg, "save_format", "torch") == "safetensors" else ".pth"
        self.save_every = int(getattr(cfg, "save_every", 0) or 0)
        self.keep_checkpoints = getattr(cfg, "keep_checkpoints", None)
        report_to = getattr(cfg, "report_to", "none")
        self.report_to = [r for r in ([report_to] if isinstance(report_to, str) else report_to) if r != "none"]
        self.wandb_settings = (getattr(cfg, "wandb_project", "blip"), getattr(cfg, "wandb_mode", "offline"))
        self.board = None  # utils.logging.Reporters (TensorBoard, WandB) on rank 0 while fit runs
        self.config = config_to_dict(cfg)
        self.progress = progress and info.is_main
        self.generator = torch.Generator(device=info.device).manual_seed(_mix(cfg.seed, info.rank, 7))
        self.seed = cfg.seed
        self.log_sample_keys = bool(getattr(cfg, "log_sample_keys", False))
        self.state = LoopState()
        self.data_counts = _DataCounts()
        self.last_data_record: dict = {}
        self.my_slots = range(0)  # this rank's data slots (streamed data)
        # The run commits (utils.rundir.commit_run: config.yaml, run.log, --overwrite, the lock's
        # signature) after the first optimiser step; until then nothing is written to output_dir.
        self.committed = False
        self._resumed = False
        self._held_keys: list = []  # log_sample_keys lines of the steps before the commit

    # ------------------------------------------------------------------ checkpoints
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

    # ------------------------------------------------------------------ data
    def loader(self, dataset: Dataset, batch_size: int, collate_fn, num_workers: int = 0, shuffle: bool = True,
               drop_last: bool = True) -> DataLoader:
        """A training loader whose order and augmentation are functions of (seed, epoch, index); a
        streamed dataset (``data/stream.py``) makes its own, positioned per slot."""
        if hasattr(dataset, "make_loader"):
            return dataset.make_loader(batch_size, collate_fn, num_workers, self.info.rank, self.info.world_size,
                                       pin_memory=self.info.device.type == "cuda")
        wrapped = SeededItems(dataset, self.seed)
        sampler = ResumableSampler(len(dataset), shuffle, self.seed, self.info.rank, self.info.world_size)
        return DataLoader(wrapped, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                          num_workers=num_workers, drop_last=drop_last, pin_memory=self.info.device.type == "cuda",
                          persistent_workers=False, generator=torch.Generator().manual_seed(self.seed))

    # ------------------------------------------------------------------ training
    def train_epoch(self, loader: DataLoader, loss_fn: Callable) -> Dict[str, float]:
        """Train ``self.state.epoch`` from ``state.batch_in_epoch``; returns epoch-mean losses.
        Logs a line (step, losses, lr, samples/s, ETA of the epoch) every ``log_every`` steps and,
        without a progress bar, also whenever ``utils.logging.HEARTBEAT_S`` seconds have passed
        since the last one: an epoch shorter than ``log_every`` steps is never silent."""
        epoch = self.state.epoch
        streamed = hasattr(loader, "set_epoch")
        if streamed:
            slots = loader.dataset.slots
            if self.state.stream.get("states") and self.state.stream.get("slots") != slots:
                raise UserError(f"this run was checkpointed mid-epoch with {self.state.stream.get('slots')} data slots "
                                f"(ranks x dataloader workers) and resumes with {slots}: resume a streamed run with "
                                "the same number of processes and num_workers")
            self.state.stream = {"slots": slots, "states": dict(self.state.stream.get("states", {}))}
            per_rank = slots // self.info.world_size
            self.my_slots = range(self.info.rank * per_rank, (self.info.rank + 1) * per_rank)
            loader.set_epoch(epoch, self.state.stream["states"], self.state.batch_in_epoch)
        else:
            select = getattr(loader.dataset, "select_epoch", None)
            if select is not None:  # a dataset of per-epoch items (data/pretrain.py RotatingPairs)
                select(epoch)
                loader.sampler.resize(len(loader.dataset))
            loader.sampler.set_epoch(epoch, self.state.batch_in_epoch * loader.batch_size)
            loader.dataset.epoch = epoch
            # log_sample_keys: the items of this rank's batches, in order (drop_last batches).
            order = list(loader.sampler) if self.log_sample_keys else []
            name = getattr(loader.dataset, "image_path", str)
        n_batches = self.state.batch_in_epoch + len(loader)
        self.model.train()
        # Running sums survive a mid-epoch checkpoint so the epoch means are those of a straight run:
        # the checkpoint holds the sums over every rank, which rank 0 carries on (summed at the end).
        carried = self.info.is_main
        sums: Dict[str, torch.Tensor] = {k: torch.tensor(v if carried else 0.0, device=self.info.device)
                                         for k, v in self.state.epoch_sums.items()}
        count = self.state.epoch_count if carried else 0
        it = loader
        if self.progress:
            from tqdm import tqdm
            it = tqdm(loader, desc=f"epoch {epoch}", initial=self.state.batch_in_epoch, total=n_batches,
                      dynamic_ncols=True, leave=False)
        t0, seen = time.perf_counter(), 0
        beat = Heartbeat(f"epoch {epoch}", n_batches, "batches", logger, initial=self.state.batch_in_epoch)
        # Only the main process logs; the clock is host-side, so checking it costs no sync.
        heartbeat = self.info.is_main and not self.progress
        # No host-device sync per step: non-finiteness is recorded on the device (the first bad
        # batch, its step and losses) and checked at log steps, before any save and at the end.
        bad = _NonFinite(self.info.device)
        pending: list = []  # accum_freq: the micro-batches of the current virtual batch
        for batch in it:
            i = self.state.batch_in_epoch
            if streamed:
                batch = self._stream_batch(batch, epoch)
            elif self.log_sample_keys:
                k = i - (n_batches - len(loader))
                self._log_keys(epoch, [name(j) for j in order[k * loader.batch_size:(k + 1) * loader.batch_size]])
            batch = {k: v.to(self.info.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            ctx = {"epoch": epoch, "batch_index": i, "batches_per_epoch": n_batches, "generator": self.generator}
            if self.accum_freq > 1:
                pending.append(batch)
                if len(pending) < self.accum_freq:
                    if i + 1 == n_batches:
                        # Fewer than accum_freq micro-batches left: dropped, as drop_last drops the
                        # end of an epoch that does not fill a batch (the large batch's steps).
                        logger.info("epoch %d: the last %d micro-batch(es) do not fill a virtual batch of %d: "
                                    "dropped", epoch, len(pending), self.accum_freq)
                        pending = []
                    self.state.batch_in_epoch = i + 1
                    continue
                boundary = True
                # Positions in virtual batches (the alpha ramp's): those of the kB-batch run.
                ctx["batch_index"] = (i + 1 - len(pending)) // self.accum_freq
                ctx["batches_per_epoch"] = n_batches // self.accum_freq
                with autocast(self.info.device, self.precision):
                    losses = self._accumulated(loss_fn, pending, ctx)
                total = sum(losses.values())
                bad.record(total, losses, i, self.state.step)
                n_in_step = sum(_batch_size(b) for b in pending)
                pending = []
            else:
                boundary = (i + 1) % self.accum == 0 or i + 1 == n_batches
                sync = nullcontext() if boundary or not self.info.distributed else self.model.no_sync()
                with sync:
                    with autocast(self.info.device, self.precision):
                        losses = loss_fn(self.model, batch, ctx)
                    total = sum(losses.values())
                    bad.record(total, losses, i, self.state.step)
                    self.scaler.scale(total / self.accum).backward()
                n_in_step = _batch_size(batch)
            if boundary:
                for g in self.optimizer.param_groups:
                    g["lr"] = self.schedule(epoch, self.state.step) * g.get("lr_scale", 1.0)
                if self.clip:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.state.step += 1
                if not self.committed:
                    self.commit()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            count += 1
            self.state.epoch_count = count
            seen += n_in_step
            self.state.batch_in_epoch = i + 1
            save_now = (self.ckpt_every_steps and boundary and self.state.step % self.ckpt_every_steps == 0
                        and i + 1 < n_batches)
            if (self.log_every and (i + 1) % self.log_every == 0) or save_now or (heartbeat and beat.due()):
                bad.check(epoch, self.output_dir)
                values = " ".join(f"{k}={v.item():.4f}" for k, v in losses.items())
                rate = seen * self.info.world_size / max(time.perf_counter() - t0, 1e-9)
                logger.info("epoch %d batch %d/%d step %d %s lr=%.3g samples/s=%.1f eta=%s", epoch, i + 1,
                            n_batches, self.state.step, values, self.optimizer.param_groups[0]["lr"], rate,
                            beat.eta(i + 1))
                beat.logged()
                if self.board is not None:
                    self.board.scalars({**{k: v.item() for k, v in losses.items()},
                                        "lr": self.optimizer.param_groups[0]["lr"], "samples_per_s": rate},
                                       self.state.step, "train")
                if self.progress:
                    it.set_postfix({**{k: f"{v.item():.3f}" for k, v in losses.items()},
                                    "lr": f"{self.optimizer.param_groups[0]['lr']:.2e}", "samples/s": f"{rate:.1f}"})
            if save_now:
                names = sorted(sums)
                total = torch.stack([sums[k].reshape(()) for k in names]
                                    + [torch.tensor(float(count), device=self.info.device)])
                du.all_reduce_sum(total)
                self.state.epoch_sums = {k: float(v) for k, v in zip(names, total[:-1].tolist())}
                self.state.epoch_count = int(total[-1].item())
                self.save("checkpoint_last")
                self.state.epoch_count = count
        bad.check(epoch, self.output_dir)
        self.last_data_record = self._data_record(epoch) if streamed else {}
        up_front = getattr(loader.dataset, "skipped_up_front", None)
        if up_front:
            self.last_data_record["data_skipped_up_front"] = up_front
        means = {}
        for k, v in sums.items():
            t = torch.stack([v, torch.tensor(float(count), device=v.device)])
            du.all_reduce_sum(t)
            means[k] = (t[0] / t[1].clamp_min(1)).item()
        return means

    def dry_run(self, loader: DataLoader, loss_fn: Callable, extra: Optional[dict] = None) -> dict:
        """``--dry_run``: one forward of ``loader``'s first batch in eval mode (no dropout), under
        no_grad, with ``ctx["dry_run"] = True`` (a task's loss then uses its config values as they
        are, e.g. ``alpha`` without its ramp); no backward, no optimiser step, no checkpoint. Writes
        ``output_dir/dry_run.json`` (rank 0): every loss term as a float (under torchrun, the mean
        over ranks), their sum, the per-rank batch size and the number of parameters; ``extra``
        joins it. Returns that record."""
        self.model.eval()
        t0 = time.perf_counter()
        try:
            batch = next(iter(loader))
        except StopIteration:
            raise ConfigError("--dry_run: the training data gives no batch (fewer pairs than one batch "
                             "with drop_last?)") from None
        if hasattr(loader, "set_epoch"):
            batch = self._stream_batch(batch, 0, record=False)
        batch = {k: v.to(self.info.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        ctx = {"epoch": 0, "batch_index": 0, "batches_per_epoch": len(loader), "generator": self.generator,
               "dry_run": True}
        with torch.no_grad(), autocast(self.info.device, self.precision):
            losses = loss_fn(self.model, batch, ctx)
        # Every rank's terms are averaged (equal batches per rank: the global batch's mean).
        names = list(losses)
        stacked = torch.stack([losses[k].detach().float().reshape(()) for k in names]) if names else None
        if stacked is not None and self.info.distributed:
            du.all_reduce_sum(stacked)
            stacked = stacked / self.info.world_size
        terms = {k: float(v) for k, v in zip(names, stacked.tolist())} if names else {}
        first = next((v for v in batch.values() if torch.is_tensor(v)), None)
        record = {"losses": terms, "total": sum(terms.values()),
                  "batch_size": int(first.shape[0]) if first is not None else 0,
                  "world_size": self.info.world_size, "precision": self.precision,
                  "parameters": sum(p.numel() for p in self.raw_model.parameters()),
                  "trainable_parameters": sum(p.numel() for p in self.raw_model.parameters() if p.requires_grad),
                  "seconds": round(time.perf_counter() - t0, 3), **(extra or {})}
        record.update(terms)  # each term also at the top level: dry_run.json["loss_ita"]
        bad = [k for k, v in terms.items() if not math.isfinite(v)]
        self.committed = True
        commit_run(output_dir=self.output_dir)  # the checks passed: the dry run's report is its output
        if self.info.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "dry_run.json").write_text(json.dumps(record, indent=1) + "\n")
            logger.info("dry run: %s -> %s", " ".join(f"{k}={v:.6g}" for k, v in terms.items()),
                        self.output_dir / "dry_run.json")
        if bad:
            raise NonFiniteLossError(f"--dry_run: non-finite loss term(s) {', '.join(bad)} on the first batch "
                                     f"(see {self.output_dir / 'dry_run.json'})")
        return record

    def _accumulated(self, loss_fn: Callable, micro: list, ctx: dict) -> Dict[str, torch.Tensor]:
        """One virtual batch of ``accum_freq`` micro-batches through the task's
        ``loss_fn.accumulated(model, micro, ctx, backward)`` (feature-cached accumulation: it runs
        its own backward passes), then the gradients averaged over the ranks."""
        run = getattr(loss_fn, "accumulated", None)
        if run is None:
            raise UserError("accum_freq > 1 (feature-cached accumulation) is not available for this task's loss; "
                             "use grad_accum_steps")
        losses = run(self.raw_model, micro, ctx, lambda loss: self.scaler.scale(loss).backward())
        if self.info.distributed:
            du.all_reduce_gradients(self.raw_model.parameters())
        return losses

    # ------------------------------------------------------------------ streamed data
    def _stream_batch(self, batch: dict, epoch: int, record: bool = True) -> dict:
        """Take a streamed batch's bookkeeping (``data/stream.py``: ``_failure``, ``_state``,
        ``_skipped``, ``_keys`` ...) out of it: the slot's state for the next checkpoint, the skip
        counts for log.txt, and (``log_sample_keys``) the keys for ``samples_rank<R>.txt``."""
        meta = {k: batch.pop(k) for k in [k for k in batch if k.startswith("_")]}
        if "_failure" in meta:
            raise DataError(meta["_failure"])
        if not record:
            return batch
        self.state.stream["states"][meta["_slot"]] = meta["_state"]
        self.data_counts.add(meta)
        if self.log_sample_keys:
            self._log_keys(epoch, meta["_keys"])
        return batch

    def _log_keys(self, epoch: int, keys) -> None:
        """``log_sample_keys``: one line per sample, ``epoch step key``, with the step this batch is
        trained in (a resumed run redoes the steps after its checkpoint: keep the lines of the
        steps the checkpoint holds). Before the commit the lines are held back."""
        lines = [f"{epoch} {self.state.step} {key}\n" for key in keys]
        if not self.committed:
            self._held_keys += lines
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)  # another node's output_dir may not exist
        with open(self.output_dir / f"samples_rank{self.info.rank}.txt", "a") as f:
            f.writelines(lines)

    def commit(self) -> None:
        """The run has made its first optimiser step: write what the start deferred
        (``utils.rundir.commit_run``), open the TensorBoard events, and the held sample keys."""
        self.committed = True
        commit_run(output_dir=self.output_dir)
        if self.report_to and self.info.is_main and self.board is None:
            backends = []
            if "tensorboard" in self.report_to:
                # A resumed run drops what its previous attempt logged after the checkpoint's step.
                backends.append(TensorBoard(self.output_dir / TENSORBOARD_DIR,
                                            purge_step=self.state.step if self._resumed else None))
            if "wandb" in self.report_to:
                project, mode = self.wandb_settings
                backends.append(WandB(self.output_dir, project, mode, self.config, group=self.output_dir.name))
            self.board = Reporters(backends)
        held, self._held_keys = self._held_keys, []
        if held:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / f"samples_rank{self.info.rank}.txt", "a") as f:
                f.writelines(held)

    def _data_record(self, epoch: int) -> dict:
        """The epoch's data counts summed over ranks, for log.txt (and one log line naming the
        skipped records)."""
        parts = du.all_gather_object(self.data_counts.as_dict()) if self.info.distributed else [
            self.data_counts.as_dict()]
        total = _DataCounts.merged(parts)
        skipped = {shard: dict(reasons) for shard, reasons in total.skipped.items()}
        n_skipped = sum(sum(r.values()) for r in skipped.values())
        if n_skipped and self.info.is_main:
            logger.warning("epoch %d: skipped %d bad record(s): %s", epoch, n_skipped, "; ".join(
                f"{shard}: " + ", ".join(f"{n} {reason} (e.g. {', '.join(total.examples.get(shard, {}).get(reason, []))})"
                                         for reason, n in reasons.items()) for shard, reasons in skipped.items()))
        return {"data_samples": total.samples, "data_skipped": n_skipped, "data_repeats": total.repeats,
                "data_skipped_by_shard": skipped}

    def end_epoch(self, record: dict, metric: Optional[float] = None) -> bool:
        """Decide whether ``metric`` is a new best (the one place this is decided), log the
        epoch's record and advance the state. Returns the decision."""
        if not self.committed:
            self.commit()
        is_best = self.is_new_best(metric)
        if is_best:
            self.state.best, self.state.best_epoch = metric, self.state.epoch
        record = {**record, "epoch": self.state.epoch, "best_epoch": self.state.best_epoch}
        self.state.history.append(record)
        if self.info.is_main:
            append_json_line(self.output_dir / "log.txt", record)
        if self.board is not None:
            self.board.scalars(record, self.state.step, "epoch")
            self.board.flush()
        self.state.epoch += 1
        self.state.batch_in_epoch = 0
        self.state.epoch_sums, self.state.epoch_count = {}, 0
        self.state.stream = {}
        self.data_counts = _DataCounts()
        return is_best

    def is_new_best(self, metric: Optional[float]) -> bool:
        return metric is not None and metric > self.state.best

    def fit(self, loader: DataLoader, loss_fn: Callable, max_epoch: int, *,
            evaluate: Optional[Callable[[int], Tuple[dict, float]]] = None, eval_every: int = 1,
            after_epoch: Optional[Callable[..., Optional[dict]]] = None, resume: Optional[str] = None) -> dict:
        """Train until ``max_epoch``: per epoch, train, evaluate when due, decide best once, let the
        task add to the record, log, and save ``checkpoint_best.pth`` (on a new best) and
        ``checkpoint_last.pth`` atomically. Returns the last epoch's record.

        - ``evaluate(epoch) -> (record, metric)``: called every ``eval_every`` epochs and on the
          last; a higher ``metric`` is better.
        - ``after_epoch(epoch, is_best=..., is_last=...) -> dict | None``: what differs per task
          (test split on a new best, prediction files, pictures); its dict joins the record.
        - ``resume``: ``'auto'`` or a checkpoint path (see :meth:`resume`).
        """
        self._resumed = bool(resume) and self.resume(resume)
        if self.state.epoch < max_epoch and len(loader) == 0:
            raise ConfigError("the training data gives no batch per epoch (fewer samples per rank than "
                              "batch_size_train, whose last partial batch is dropped): lower batch_size_train")
        if resume:
            if self.state.epoch >= max_epoch:
                logger.info("nothing to train: the run in %s already finished %d epochs", self.output_dir, max_epoch)
        try:
            while self.state.epoch < max_epoch:
                epoch = self.state.epoch
                is_last = epoch + 1 == max_epoch
                losses = self.train_epoch(loader, loss_fn)
                record = {"train_lr": self.optimizer.param_groups[0]["lr"], **{f"train_{k}": v for k, v in losses.items()},
                          **self.last_data_record}
                metric = None
                if evaluate is not None and ((epoch + 1) % eval_every == 0 or is_last):
                    extra, metric = evaluate(epoch)
                    record.update(extra)
                is_best = self.is_new_best(metric)
                if after_epoch is not None:
                    record.update(after_epoch(epoch, is_best=is_best, is_last=is_last) or {})
                self.end_epoch(record, metric)
                logger.info("epoch %d: %s", epoch, {k: round(v, 5) if isinstance(v, float) else v
                                                    for k, v in record.items()})
                if is_best:
                    self.save("checkpoint_best")
                self.save("checkpoint_last")
                if self.save_every and (epoch + 1) % self.save_every == 0:
                    self._keep_epoch_checkpoint(epoch)
        finally:
            if self.board is not None:
                self.board.close()
                self.board = None
        return self.state.history[-1] if self.state.history else {}

    def report_picture(self, tag: str, path, epoch: int) -> None:
        """A picture the task drew for ``epoch`` (mask overlays, contact sheets), as a TensorBoard
        image when ``report_to: tensorboard`` (rank 0; a no-op otherwise)."""
        if self.board is not None and Path(path).is_file():
            self.board.picture(tag, path, self.state.step)

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


def _batch_size(batch: dict) -> int:
    first = next((v for v in batch.values() if torch.is_tensor(v) and v.dim()), None)
    return int(first.shape[0]) if first is not None else 0


class _DataCounts:
    """A streamed epoch's data bookkeeping on one rank: samples trained, repeats, and skipped
    records by shard and reason (with a few example keys)."""

    def __init__(self, samples: int = 0, repeats: int = 0, skipped: Optional[dict] = None,
                 examples: Optional[dict] = None):
        self.samples, self.repeats = samples, repeats
        self.skipped: Dict[str, Dict[str, int]] = skipped or {}
        self.examples: Dict[str, Dict[str, list]] = examples or {}

    def add(self, meta: dict) -> None:
        self.samples += len(meta["_keys"])
        self.repeats += meta["_repeats"]
        for (shard, reason), n in meta["_skipped"].items():
            by = self.skipped.setdefault(shard, {})
            by[reason] = by.get(reason, 0) + n
        for (shard, reason), keys in meta["_examples"].items():
            named = self.examples.setdefault(shard, {}).setdefault(reason, [])
            named.extend(keys[: max(0, 3 - len(named))])

    def as_dict(self) -> dict:
        return {"samples": self.samples, "repeats": self.repeats, "skipped": self.skipped, "examples": self.examples}

    @classmethod
    def from_dict(cls, d: dict) -> "_DataCounts":
        return cls(d["samples"], d["repeats"], {k: dict(v) for k, v in d["skipped"].items()},
                   {k: {r: list(x) for r, x in v.items()} for k, v in d["examples"].items()})

    @classmethod
    def merged(cls, parts: list) -> "_DataCounts":
        out = cls()
        for p in parts:
            out.samples += p["samples"]
            out.repeats += p["repeats"]
            for shard, reasons in p["skipped"].items():
                by = out.skipped.setdefault(shard, {})
                for reason, n in reasons.items():
                    by[reason] = by.get(reason, 0) + n
            for shard, reasons in p["examples"].items():
                for reason, keys in reasons.items():
                    named = out.examples.setdefault(shard, {}).setdefault(reason, [])
                    named.extend(keys[: max(0, 3 - len(named))])
        return out


class _NonFinite:
    """The first non-finite total loss of an epoch, recorded on the device without a sync: a device
    counter of the steps seen (no host-to-device copy per step) and, on the host, the (batch, step)
    of each count, looked up only when a check finds one."""

    def __init__(self, device: torch.device):
        self.count = torch.zeros((), dtype=torch.long, device=device)   # losses recorded so far
        self.first = torch.full((), -1, dtype=torch.long, device=device)  # count of the first bad one
        self.positions: list = []                                          # (batch, step) per count
        self.losses: Dict[str, torch.Tensor] = {}

    def record(self, total: torch.Tensor, losses: Dict[str, torch.Tensor], batch: int, step: int) -> None:
        self.positions.append((batch, step))
        first = ~torch.isfinite(total.detach()) & (self.first < 0)
        self.first = torch.where(first, self.count, self.first)
        self.count += 1
        for k, v in losses.items():
            v = v.detach().float()
            self.losses[k] = torch.where(first, v, self.losses.get(k, torch.zeros_like(v)))

    def check(self, epoch: int, output_dir: Path) -> None:
        first = int(self.first)
        if first >= 0:
            batch, step = self.positions[first]
            raise NonFiniteLossError(
                f"non-finite loss at epoch {epoch}, batch {batch}, step {step}: "
                + ", ".join(f"{k}={v.item():.4g}" for k, v in self.losses.items())
                + f"; the last good checkpoint in {output_dir} is kept")


# ---------------------------------------------------------------------- determinism

def set_deterministic(on: bool) -> None:
    """``deterministic: true``: bitwise repeatable runs on the same machine and software (same
    thread count, same GPU). Kernels with a non-deterministic reduction order are replaced by
    deterministic ones, or raise naming themselves where torch has none. On CPU the one we hit is
    the backward of advanced indexing (``image_tokens[neg_idx]`` in the ITM loss): with several
    threads and >= 32768 elements it accumulates with float atomics."""
    if on:
        # cuBLAS reads this when it creates its first handle, i.e. before any model exists.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False  # benchmarking may pick a different algorithm per run
    torch.use_deterministic_algorithms(on)
