"""The run directory: lock, claim, start-up, commit and the entry wrapper every command shares.

A run goes through two moments:

1. :func:`start_run` (before any work): joins torchrun's process group, takes the lock on
   ``output_dir`` and checks it (rank 0; a fresh training run over a previous run's checkpoint is
   refused unless ``--resume`` or ``--overwrite``), and logs to the console. **Nothing is written
   into ``output_dir`` yet**: log records are kept in memory.
2. :func:`commit_run`, once every check has passed: the pre-flight, the model build and its
   weights, resume, and for training the first optimiser step (``utils.engine.Trainer`` calls it);
   evaluation-only runs and tools call it before their first output. Rank 0 then signs the lock
   (pid, host, start time), clears stale temp files of interrupted atomic writes, carries out
   ``--overwrite`` (the previous run's checkpoints, ``log.txt``, TensorBoard events, a tool's named
   outputs), opens ``run.log`` (append) with what was logged so far, and writes ``config.yaml``
   atomically, with any file the command registered (a tool's ``args.json``). A run that does not
   train writes its config as ``config_<mode>.yaml`` where ``output_dir`` holds a training run
   (``--evaluate`` into a run's folder keeps the run's own ``config.yaml``).

So a run that is refused or fails before its commit leaves every file of a previous run
byte-identical (``config.yaml``, ``run.log``, ``log.txt``, checkpoints, events, outputs, the lock
file); a directory it created for its lock is removed again. Its one-line error is on stderr; the
traceback is on the console with ``--debug`` (``run.log`` gets tracebacks of committed runs only).
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from utils import dist as du
from utils.atomic import atomic_write, remove_stale_temp_files
from utils.checkpoint_files import checkpoint_epoch, epoch_checkpoints, find_checkpoint, remove_checkpoint
from utils.errors import UserError
from utils.logging import debug_enabled, has_log_file, open_log_file, reset_logging

logger = logging.getLogger("utils.engine")

LOCK_NAME = ".lock"
RUN_FILES = ("checkpoint_last.pth", "checkpoint_best.pth", "checkpoint_last.safetensors",
             "checkpoint_best.safetensors", "log.txt")
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"  # report_to: wandb (wandb's own folder name under its dir)

# A person can act on these from their message alone; anything else is a bug and keeps its traceback.
USER_ERRORS = (UserError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class OutputDirError(UserError):
    """``output_dir`` is in use, or holds a previous run that this one would overwrite."""


class _Finished(Exception):
    """``--resume auto`` found the run complete: nothing to do (exit status 0)."""


# ----------------------------------------------------------------------------- previous runs' files

def run_files(output_dir: Path) -> list:
    """What ``--overwrite`` deletes: the engine's checkpoints (with safetensors state files and the
    epoch copies), log.txt, the TensorBoard events and the Weights & Biases runs."""
    files = [output_dir / name for name in RUN_FILES if (output_dir / name).is_file()]
    files += epoch_checkpoints(output_dir)
    return files + [output_dir / d for d in (TENSORBOARD_DIR, WANDB_DIR) if (output_dir / d).is_dir()]


# ----------------------------------------------------------------------------- the lock

_held_locks: Dict[Path, int] = {}  # output_dir -> descriptor of its locked .lock, held by this process


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(fd: int, lock_path: Path) -> str:
    """Who holds the lock, from its signature: ``pid P on host H, since T``; a signature of a
    process that is gone (a run still starting up signs only when it commits) is not named."""
    fields_ = os.pread(fd, 256, 0).decode("utf-8", "replace").strip().split(maxsplit=2)
    if len(fields_) >= 2 and fields_[0].isdigit():
        pid, host = int(fields_[0]), fields_[1]
        if host != socket.gethostname() or _pid_alive(pid):
            return f"pid {pid} on host {host}" + (f", since {fields_[2]}" if len(fields_) > 2 else "")
    return f"a process still starting up, holding {lock_path}"


def _lock_output_dir(output_dir: Path) -> Optional[int]:
    """Take an exclusive ``flock`` on ``output_dir/.lock``, held until :func:`release_output_dirs`
    or the end of the process: the OS drops it however the process ends, so a crashed or killed run
    never blocks the next one. Returns the lock file's descriptor (None where the file system has
    no locks); re-entrant per process. Refused: an OutputDirError naming the holder (pid, host)."""
    key = output_dir.resolve()
    if key in _held_locks:
        return _held_locks[key]
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # A run that never committed removes the lock file it created (before it releases it): a
        # lock taken on that removed file is no lock on the folder, so take the current one.
        while os.path.exists(path) and os.fstat(fd).st_ino != os.stat(path).st_ino:
            os.close(fd)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        who = _holder(fd, output_dir / LOCK_NAME)
        os.close(fd)
        raise OutputDirError(f"{output_dir} is in use by another run ({who}); wait for it to end, or choose "
                             "another --output_dir") from None
    except OSError as err:
        os.close(fd)
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        # Some cluster file systems (Lustre without -o flock) have no locks: run unguarded rather than not at all.
        logger.warning("cannot lock %s (%s): a second run into it would not be refused", output_dir, err.strerror)
        return None
    _held_locks[key] = fd
    return fd


def _sign_lock(fd: Optional[int]) -> None:
    if fd is not None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)


def release_output_dirs() -> None:
    """Release the ``output_dir`` locks this process holds (closing the descriptor drops the lock)."""
    while _held_locks:
        os.close(_held_locks.popitem()[1])


def _claim_output_dir(output_dir: Path, cfg, resume: Optional[str], overwrite: bool, trains: bool,
                      sign: bool = True, outputs: Sequence[str] = ()) -> Optional[int]:
    """Rank 0's checks before a run writes anything: take the lock; refuse a fresh training run over
    a previous run's checkpoint unless ``--resume`` or ``--overwrite`` (``outputs``: a tool's named
    output files, refused the same way unless ``--overwrite``); stop a ``--resume auto`` of a
    finished run (raises ``_Finished``). ``sign``: sign the lock now (else at the commit).
    Returns the lock's descriptor."""
    fd = _lock_output_dir(output_dir)
    last = find_checkpoint(output_dir, "checkpoint_last")
    if trains and last.is_file():
        if resume == "auto":
            epoch = checkpoint_epoch(last)
            if isinstance(epoch, int) and epoch >= cfg.max_epoch:
                raise _Finished(f"nothing to do: the run in {output_dir} has finished ({epoch} of max_epoch "
                                f"{cfg.max_epoch} epochs trained); to train further, raise max_epoch "
                                "(--opts max_epoch=N)")
        elif not resume and not overwrite:
            raise OutputDirError(f"{output_dir} holds a previous run ({last.name}); continue it with --resume "
                                 "auto, start afresh with --overwrite (deletes its checkpoints and log.txt), or "
                                 "choose another --output_dir")
    existing = [name for name in outputs if (output_dir / name).exists()]
    if existing and not overwrite:
        raise OutputDirError(f"{output_dir} holds the outputs of a previous run of this command "
                             f"({', '.join(existing)}); pass --overwrite to replace them, or choose another "
                             "--output_dir")
    if sign:
        _sign_lock(fd)
    return fd


# ----------------------------------------------------------------------------- start and commit

@dataclass
class _Pending:
    """What a started run writes when it commits (rank 0), and what it created to be removed if it
    never does."""
    output_dir: Path
    doc: object
    is_main: bool
    lock_fd: Optional[int] = None
    delete_run_files: bool = False                  # --overwrite of a training run
    delete_outputs: List[str] = field(default_factory=list)  # --overwrite of a tool's outputs
    files: Dict[str, bytes] = field(default_factory=dict)    # name -> bytes, written at the commit
    created: List[Path] = field(default_factory=list)        # directories made for the lock, deepest first
    lock_created: bool = False                               # the lock file did not exist before
    config_name: str = "config.yaml"
    committed: bool = False


_run: Optional[_Pending] = None


def _missing_dirs(path: Path) -> List[Path]:
    """The directories ``path.mkdir(parents=True)`` would create, deepest first."""
    out = []
    path = path.absolute()
    while not path.exists():
        out.append(path)
        if path.parent == path:
            break
        path = path.parent
    return out


def _mode(args) -> str:
    for flag in ("dry_run", "evaluate", "visualize"):
        if getattr(args, flag, False):
            return flag
    return Path(sys.argv[0]).stem or "run"


def start_run(cfg, doc, args, *, trains: bool, outputs: Sequence[str] = (), mode: Optional[str] = None) -> tuple:
    """What every entry script does first: make the run deterministic if configured, join
    torchrun's process group (if any), claim ``output_dir`` (rank 0; the others wait for its
    verdict), log to the console, seed per rank. Returns ``(DistInfo, output_dir)``. Nothing is
    written into ``output_dir`` until :func:`commit_run`.

    ``args``: the parsed command line (``--overwrite``, and ``--resume`` where the script has it);
    ``trains``: whether this run trains (writes checkpoints); ``outputs``: the files a tool writes
    into ``output_dir`` (an existing one is refused unless ``--overwrite``, which deletes them at the
    commit; ``mode``: the name of what runs, for the config file a run that does not train writes
    in a training run's folder: ``config_<mode>.yaml``, so that the training run's ``config.yaml``
    stays; default ``dry_run`` / ``evaluate`` / ``visualize`` / the script's name). Any run is
    refused while another one holds ``output_dir``; a fresh training run also
    when ``output_dir`` holds a previous run's checkpoint, unless ``--resume`` or ``--overwrite``.
    ``--resume auto`` of a finished run prints one line and exits with status 0.
    """
    global _run
    import torch
    from utils.precision import set_deterministic
    from utils.logging import setup_logging

    set_deterministic(cfg.deterministic)
    info = du.init_distributed(cfg.device)
    output_dir = Path(cfg.output_dir)
    resume = getattr(args, "resume", None)
    overwrite = bool(getattr(args, "overwrite", False))
    pending = _Pending(output_dir, doc, info.is_main)
    verdict = None
    if info.is_main:
        pending.created = _missing_dirs(output_dir)
        pending.lock_created = not (output_dir / LOCK_NAME).exists()
        try:
            pending.lock_fd = _claim_output_dir(output_dir, cfg, resume, overwrite, trains, sign=False,
                                                outputs=outputs)
        except (*USER_ERRORS, _Finished) as err:
            _abandon(pending)
            verdict = err
    verdict = du.broadcast_object(verdict)  # also the barrier the other ranks wait at
    if isinstance(verdict, _Finished):
        if info.is_main:
            print(verdict, flush=True)
        raise SystemExit(0)
    if verdict is not None:
        # Rank 0 tells the user and fails the job; the others leave quietly, since a rank that
        # failed first would make torchrun stop rank 0 before it could say why.
        raise verdict if info.is_main else SystemExit(0)
    if info.is_main and not trains and find_checkpoint(output_dir, "checkpoint_last").is_file():
        # A run that does not train, in a training run's folder, keeps that run's config.yaml.
        pending.config_name = f"config_{mode or _mode(args)}.yaml"
    pending.delete_run_files = trains and overwrite and not resume
    pending.delete_outputs = [name for name in outputs if overwrite]
    _run = pending
    setup_logging(None, info.rank, defer=info.is_main)  # run.log opens at the commit
    torch.manual_seed(cfg.seed + info.rank)
    return info, output_dir


def add_run_file(name: str, data: bytes) -> None:
    """A file of the run (``output_dir/name``) written at the commit (now if already committed)."""
    if _run is None or not _run.is_main:
        return
    if _run.committed:
        atomic_write(_run.output_dir / name, lambda f: f.write(data))
    else:
        _run.files[name] = data


def delete_at_commit(names: Sequence[str]) -> None:
    """``--overwrite``: files or folders of ``output_dir`` a previous run left, deleted at the commit
    (now if already committed), so that a run that fails before never loses them."""
    if _run is None or not _run.is_main:
        return
    _run.delete_outputs += [n for n in names if n not in _run.delete_outputs]
    if _run.committed:
        for name in names:
            path = _run.output_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


def run_committed() -> bool:
    """Whether the current run has committed (True outside a run: nothing to defer)."""
    return _run is None or _run.committed


def commit_run(doc=None, output_dir=None) -> None:
    """The run has passed its checks: write what :func:`start_run` deferred (see the module's doc).
    ``doc``: the resolved config to save, if it changed since the start (e.g. a switch the model
    made); ``output_dir``: commit only if it is the started run's (a Trainer built outside an entry
    script commits nothing). Idempotent; a no-op outside a run and on ranks other than 0 (they only
    mark it)."""
    from utils.config import save_config

    run = _run
    if run is None or run.committed:
        return
    if output_dir is not None and Path(output_dir).absolute() != run.output_dir.absolute():
        return
    run.committed = True
    if not run.is_main:
        return
    out = run.output_dir
    out.mkdir(parents=True, exist_ok=True)
    _sign_lock(run.lock_fd)
    open_log_file(out)
    stale = remove_stale_temp_files(out)
    if stale:
        logger.info("removed %d stale temp file(s) of interrupted writes in %s: %s", len(stale), out,
                    ", ".join(p.name for p in stale))
    gone = run_files(out) if run.delete_run_files else []
    gone += [out / n for n in run.delete_outputs if (out / n).exists()]
    for path in gone:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            remove_checkpoint(path)
    if gone:
        logger.info("--overwrite: deleted the previous run's %s", ", ".join(p.name for p in gone))
    save_config(doc if doc is not None else run.doc, out / run.config_name)
    for name, data in run.files.items():
        atomic_write(out / name, lambda f, data=data: f.write(data))
    run.files.clear()


def _abandon(run: _Pending) -> None:
    """A run that never committed leaves the folder as it found it: the lock file it created is
    removed while still held (a waiting run then locks the folder anew, see ``_lock_output_dir``),
    the lock released, and the directories made for it removed when nothing else is in them."""
    lock = run.output_dir / LOCK_NAME
    if run.lock_created and lock.is_file() and run.output_dir.resolve() in _held_locks:
        lock.unlink()
    release_output_dirs()
    for folder in run.created:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (or not ours to remove): leave it and its parents


def _end_run() -> None:
    """Release the lock; a run that never committed removes what it created for the lock."""
    global _run
    run, _run = _run, None
    if run is not None and run.is_main and not run.committed:
        _abandon(run)
    release_output_dirs()


def run_entry(main: Callable, log: Optional[logging.Logger] = None) -> None:
    """Run an entry script's ``main`` as a command. One of our own errors (:data:`USER_ERRORS`: a
    config key, a checkpoint, data, the output directory, a non-finite loss, a missing file) ends it
    with its message as ``error: ...`` on stderr and status 1; its traceback goes to
    ``output_dir/run.log`` when the run had committed, and, with ``--debug``, to the console. Any
    other exception keeps its full traceback on the console (and in ``run.log``). The run's
    ``output_dir`` lock and log file are released at the end, so a second run in the same process
    starts as in a fresh one."""
    log = log or logger
    reset_logging()
    try:
        main()
    except USER_ERRORS as err:
        if has_log_file():
            log.error("%s", err, exc_info=err, extra={"file_only": True})
        if debug_enabled():
            traceback.print_exception(err)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""
        print(f"{rank}error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except Exception:
        if has_log_file():
            log.exception("unexpected error (a bug: please report it with this traceback)",
                          extra={"file_only": True})
        raise
    finally:
        _end_run()
        reset_logging()
