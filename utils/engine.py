"""The shared training engine: one loop for every entry script (``Trainer``).

What it guarantees:
- the same code runs single-process, and under torchrun on CPU (gloo) or GPUs (NCCL);
- mixed precision (bf16/fp16 autocast: ``utils/precision.py``; GradScaler for fp16 on CUDA),
  gradient accumulation, clipping, a stop with a clear message on a non-finite loss (the last good
  checkpoint stays);
- exact resume: checkpoints hold model, optimiser, scaler, epoch, step, the position inside the
  epoch, RNG states and the negative-sampling generator (``utils/resume.py``), and every sample's
  augmentation is seeded by (seed, epoch, index) (``utils/sampling.py``) — so a resumed run computes
  the same losses and weights as an uninterrupted one, whatever the number of DataLoader workers;
- checkpoints are written atomically (temp file, fsync, rename: ``utils/atomic.py``);
- ``deterministic: true`` makes a run bitwise repeatable on the same machine and software
  (``utils.precision.set_deterministic``);
- a run owns its ``output_dir`` (``utils/rundir.py``: a lock, no fresh start over a previous run,
  nothing written before the first optimiser step) and ends on our own errors with their one-line
  message (``utils.rundir.run_entry``).

The Trainer's other concerns are mixins it inherits, each in its own module: its checkpoints and
resume (``utils.resume.TrainerCheckpoints``), the bookkeeping of streamed batches
(``utils.stream_state.StreamBookkeeping``) and ``--dry_run`` (``utils.dry_run.DryRun``).
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from utils import dist as du
from utils.checkpoint import SAFETENSORS_SUFFIX
from utils.compile import compile_regions
from utils.config import ConfigError, config_to_dict
from utils.dry_run import DryRun
from utils.errors import NonFiniteLossError, UserError
from utils.logging import Heartbeat, Reporters, TensorBoard, WandB, append_json_line
from utils.precision import autocast
from utils.resume import LoopState, TrainerCheckpoints
from utils.rundir import TENSORBOARD_DIR, commit_run
from utils.sampling import ResumableSampler, SeededItems, _mix
from utils.stream_state import StreamBookkeeping, _DataCounts

logger = logging.getLogger(__name__)


class Trainer(TrainerCheckpoints, StreamBookkeeping, DryRun):
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


def _batch_size(batch: dict) -> int:
    first = next((v for v in batch.values() if torch.is_tensor(v) and v.dim()), None)
    return int(first.shape[0]) if first is not None else 0


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
