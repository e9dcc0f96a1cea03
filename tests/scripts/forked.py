"""Run an entry script as ``python script args`` would, in a forked child of the test process.

A fresh ``python train_retrieval.py`` pays 6-9 s on the 2-core CI machine importing torch,
torchvision, timm and transformers before its first line runs; most end-to-end tests launch
several. Here the test process imports the script's modules once, and each run is a ``fork()`` of
it: a real process of its own (its own pid, exit status, stdout/stderr, environment and working
directory, killable with SIGKILL mid-epoch, nothing it changes reaching the tests), which starts
with those modules already imported.

What a fresh interpreter gives and a fork would not is reset in the child: the signal
dispositions, atexit handlers, logging handlers, the torch thread count (from ``OMP_NUM_THREADS``
or this worker's share of the cores), the global torch flags a test may have left
(deterministic algorithms, default dtype, grad mode) and the random generators' seeds.

GNU OpenMP cannot be used in a child forked from a process that had started its thread pool (the
child hangs in its first parallel region). So the test process runs torch on one thread
(:func:`single_threaded_parent`, called from conftest before any torch operation) and only the
children use several.

``torchrun`` (``python -m torch.distributed.run ...``) runs the same way: the launcher is forked
from the test process and runs torchrun's own ``main`` (argument parsing, rendezvous, the elastic
agent, its failure report and exit status), with one change: each rank is a fork of the launcher
(the agent's ``fork`` start method, as ``torchrun --start-method fork`` gives a function entry
point) instead of a fresh ``python -u script.py``. The ranks are still processes of their own, with
the environment torchrun gives them (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...), talking gloo
over TCP; a rank that fails makes torchrun stop the others and exit 1, as it does.

``BLIP_TEST_SUBPROCESS=1`` runs every launch as a real subprocess instead (the old way: same
results, slower), e.g. to rule the fork out when a test fails.
"""
from __future__ import annotations

import ast
import atexit
import importlib
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = "torch.distributed.run"
_preloaded: set = set()


def use_subprocess() -> bool:
    return os.environ.get("BLIP_TEST_SUBPROCESS", "") not in ("", "0")


def single_threaded_parent() -> None:
    """Keep this (the test) process's torch on one thread, so forked children may start a pool."""
    import torch
    torch.set_num_threads(1)


def worker_threads() -> int:
    """This test worker's share of the cores (pytest-xdist runs ``PYTEST_XDIST_WORKER_COUNT``)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    return max(1, (os.cpu_count() or 1) // workers)


def _top_level_imports(path: Path) -> list:
    names = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def preload(target: str) -> None:
    """Import, in this process, what ``target`` (a script under the repo, or a module such as
    ``tools``) imports at its top, so that its forked runs start with them imported."""
    if target in _preloaded:
        return
    _preloaded.add(target)
    if target.endswith(".py"):
        names = _top_level_imports(REPO / target)
    else:
        names = [target]
        main = REPO / target / "__main__.py"
        if main.is_file():
            names += _top_level_imports(main)
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the child reports it as a fresh interpreter would
            pass
    try:  # every run builds its tokenizer, importing transformers' tokenizers (3 s) in the function
        import transformers
        transformers.BertTokenizerFast
    except Exception:  # noqa: BLE001
        pass


def _reset_child(env: dict, cwd: Path, stdout_fd: int, stderr_fd: int) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM, signal.SIGCHLD, signal.SIGPIPE):
        try:
            signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
        except (OSError, ValueError):
            pass
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as CPython sets it at start-up
    os.dup2(stdout_fd, 1)
    os.dup2(stderr_fd, 2)
    sys.stdout = open(1, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False, buffering=1)
    sys.stdin = open(os.devnull)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    atexit._clear()
    import logging
    logging.getLogger().handlers.clear()
    logging.getLogger().setLevel(logging.WARNING)
    logs = sys.modules.get("utils.logging")
    if logs is not None:
        logs._installed.clear()
    import warnings
    warnings.resetwarnings()
    import torch
    threads = int(env.get("OMP_NUM_THREADS") or worker_threads())
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(False)
    torch.set_default_dtype(torch.float32)
    torch.set_grad_enabled(True)
    torch.seed()
    import random
    random.seed()


def run_main(target: str, args: Sequence[str]) -> int:
    """Run ``target`` in this process as ``python target args`` (``python -m target args`` without
    ``.py``) would: its exit status, a string exit message printed to stderr as the interpreter
    does. Any other exception propagates. The one way the tests run an entry point in-process."""
    saved = sys.argv
    sys.argv = [target, *map(str, args)]  # the repo root is on the path already (pytest.ini pythonpath)
    try:
        if target.endswith(".py"):
            runpy.run_path(target if os.path.isabs(target) else str(REPO / target), run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        if isinstance(exit_.code, str):
            print(exit_.code, file=sys.stderr)
            return 1
        return exit_.code if isinstance(exit_.code, int) else (1 if exit_.code else 0)
    finally:
        sys.argv = saved
    return 0


def _torchrun_script(args: Sequence[str]) -> str:
    """The script (or, with ``--module``, the module) a torchrun command line launches."""
    from torch.distributed.run import parse_args
    parsed = parse_args([str(a) for a in args])
    return parsed.training_script


def _rank(target: str, *args: str) -> None:
    """One torchrun rank, forked by the launcher with torchrun's environment set: ``python -u target
    args`` as a fresh interpreter would run it (its exit status the process's)."""
    _reset_child(dict(os.environ), Path.cwd(), 1, 2)
    code = _child(target, list(args))
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        sys.exit(code)


def _torchrun(args: Sequence[str]) -> None:
    """torchrun's ``main`` with the ranks forked from this process (see the module's docstring)."""
    import torch
    import torch.distributed.run as launcher
    torch.set_num_threads(1)  # the launcher computes nothing; its forked ranks take OMP_NUM_THREADS
    own = launcher.config_from_args

    def config_from_args(parsed):
        config, cmd, cmd_args = own(parsed)
        if cmd != sys.executable or cmd_args[:1] != ["-u"]:  # --no-python, PYTHON_EXEC: exec'd as torchrun does
            return config, cmd, cmd_args
        rest = list(cmd_args[1:])
        module = rest[0] == "-m"
        target, script_args = (rest[1], rest[2:]) if module else (rest[0], rest[1:])
        config.start_method = "fork"
        return config, _rank, [target, *script_args]  # run_main takes a path or a module
    launcher.config_from_args = config_from_args
    launcher.main([str(a) for a in args])


def _child(target: str, args: Sequence[str]) -> int:
    try:
        if target == TORCHRUN:
            _torchrun(args)
            code = 0
        else:
            code = run_main(target, args)
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 130
    except BaseException:  # noqa: BLE001 - as the interpreter does: traceback, status 1
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    return code


def start(target: str, args: Sequence[str], env: dict, cwd: Path = REPO,
          stdout_path: Optional[Path] = None, stderr_path: Optional[Path] = None) -> int:
    """Fork a child running ``target args`` (``env`` is its whole environment); returns its pid.
    Its stdout / stderr go to the given files (else nowhere). ``target`` ``torch.distributed.run``
    is torchrun, its ranks forked in turn."""
    preload(_torchrun_script(args) if target == TORCHRUN else target)
    out_fd = os.open(stdout_path or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err_fd = os.open(stderr_path or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            _reset_child(env, cwd, out_fd, err_fd)
            code = _child(target, [str(a) for a in args])
        except BaseException:  # noqa: BLE001
            try:
                traceback.print_exc()
            except BaseException:  # noqa: BLE001
                pass
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code & 0xFF if code >= 0 else 1)
    os.close(out_fd)
    os.close(err_fd)
    return pid


def descendants(pid: int) -> list:
    """Every process below ``pid`` (from /proc), children first."""
    children: dict = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(pid: int) -> None:
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait(pid: int, timeout: Optional[float] = None) -> int:
    """The child's exit status as ``subprocess`` reports it (``-N``: killed by signal N)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.005
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if deadline is not None and time.monotonic() > deadline:
            kill_tree(pid)
            os.waitpid(pid, 0)
            raise subprocess.TimeoutExpired(str(pid), timeout)
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def poll(pid: int) -> Optional[int]:
    done, status = os.waitpid(pid, os.WNOHANG)
    return os.waitstatus_to_exitcode(status) if done else None


def run(target: str, args: Sequence[str], env: dict, cwd: Path = REPO,
        timeout: Optional[float] = None) -> subprocess.CompletedProcess:
    """``python target args`` (``python -m target`` without ``.py``) with ``env`` as its whole
    environment: a :class:`subprocess.CompletedProcess` with text stdout / stderr."""
    args = [str(a) for a in args]
    if use_subprocess():
        cmd = [sys.executable, str(REPO / target)] if target.endswith(".py") else [sys.executable, "-m", target]
        cmd += args
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    with tempfile.TemporaryDirectory(prefix="forked-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        pid = start(target, args, env, cwd, out, err)
        code = wait(pid, timeout)
        return subprocess.CompletedProcess([target, *args], code, out.read_text(errors="backslashreplace"),
                                           err.read_text(errors="backslashreplace"))


def split_cmd(cmd: Sequence) -> tuple:
    """``[sys.executable, "-m", module, ...]`` or ``[sys.executable, script.py, ...]`` (torchrun:
    ``-m torch.distributed.run``) as the ``(target, args)`` that :func:`run` and :func:`start` take."""
    cmd = [str(c) for c in cmd]
    if cmd[0] != sys.executable or len(cmd) < 2:
        raise ValueError(f"not a python command: {cmd[:3]}")
    if cmd[1] == "-m":
        return cmd[2], cmd[3:]
    script = Path(cmd[1])
    return (str(script.relative_to(REPO)) if script.is_absolute() else str(script)), cmd[2:]


def run_cmd(cmd: Sequence, env: Optional[dict] = None, cwd: Path = REPO,
            timeout: Optional[float] = None) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` for a command :func:`split_cmd`
    takes, forked as :func:`run` does."""
    target, args = split_cmd(cmd)
    return run(target, args, dict(os.environ if env is None else env), cwd, timeout)
