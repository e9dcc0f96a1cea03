"""A run's safety as a user meets it through the entry points: output_dir is locked and a previous
run is not overwritten by accident, checkpoint read/write failures are one line that names the file
(and, for writes, says the previous checkpoint is intact), our own errors print one line with exit
status 1 (traceback in run.log, on the console with --debug), stale temp files are cleared, and a
run without progress bars is never silent for long."""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.scripts.campaign_runs import run_inprocess, snapshot

REPO = Path(__file__).resolve().parents[1]
INTACT = ("the previous checkpoint_last.pth is intact (it is replaced only by a complete new file: written to a "
          "temporary file, then renamed)")


def _snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes and modification time: equal means nothing was written."""
    return snapshot([folder])


_run_inprocess = run_inprocess  # (monkeypatch, capsys, target, *argv) -> (exit status, stdout, stderr)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_small, tiny_train_config, run_script):
    """(config, output dir) of a finished 1-epoch run; tests work on copies of the directory."""
    tmp = tmp_path_factory.mktemp("trained")
    cfg = tiny_train_config(tmp, synthetic_small, max_epoch=1)
    run_script("train_retrieval.py", ["--config", cfg, "--output_dir", tmp / "run", "--no_progress"])
    return cfg, tmp / "run"


@pytest.fixture
def previous_run(trained, tmp_path):
    cfg, run = trained
    shutil.copytree(run, tmp_path / "run")
    return cfg, tmp_path / "run"


def _hold(folder: Path) -> subprocess.Popen:
    """A process that has claimed ``folder`` as a running run does (until it is killed)."""
    code = ("import sys; from pathlib import Path; from utils.rundir import _claim_output_dir; "
            f"_claim_output_dir(Path({str(folder)!r}), None, None, False, False); print('held', flush=True); "
            "sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def holder():
    """``holder(folder) -> Popen``: :func:`_hold`, killed after the test."""
    procs = []

    def hold(folder: Path) -> subprocess.Popen:
        procs.append(_hold(folder))
        return procs[-1]

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def busy(tmp_path_factory):
    """(folder, holder process): an output_dir another run holds, for the whole module."""
    folder = tmp_path_factory.mktemp("busy") / "run"
    proc = _hold(folder)
    yield folder, proc
    proc.kill()
    proc.wait()


def _train(run_script, cfg, out, *extra):
    return run_script("train_retrieval.py", ["--config", cfg, "--output_dir", out, "--no_progress", *extra],
                      check=False)


# ----------------------------------------------------------------------------- output_dir guard

def test_a_fresh_run_over_a_previous_run_is_refused_and_writes_nothing(previous_run, run_script):
    cfg, out = previous_run
    before = _snapshot(out)
    proc = _train(run_script, cfg, out)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"error: {out} holds a previous run (checkpoint_last.pth); continue it with --resume auto, start afresh "
        "with --overwrite (deletes its checkpoints and log.txt), or choose another --output_dir"]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert _snapshot(out) == before  # nothing trained, no config, log or lock file rewritten


def test_resume_auto_of_a_finished_run_says_so_and_exits_0(previous_run, run_script):
    cfg, out = previous_run
    before = _snapshot(out)
    proc = _train(run_script, cfg, out, "--resume", "auto")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"nothing to do: the run in {out} has finished (1 of max_epoch 1 epochs trained); to train further, "
        "raise max_epoch (--opts max_epoch=N)"]
    assert proc.stderr == "" and _snapshot(out) == before


def test_overwrite_trains_afresh_without_the_previous_log(previous_run, run_script):
    cfg, out = previous_run
    proc = _train(run_script, cfg, out, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((out / "log.txt").read_text().splitlines()) == 1  # not appended to the previous run's
    assert ("--overwrite: deleted the previous run's checkpoint_last.pth, checkpoint_best.pth, log.txt"
            in (out / "run.log").read_text())
    assert torch.load(out / "checkpoint_last.pth", weights_only=True)["epoch"] == 1


def test_a_second_run_is_refused_naming_the_holder_until_it_dies(previous_run, holder, monkeypatch, capsys):
    cfg, out = previous_run
    proc = holder(out)
    before = _snapshot(out)
    # Evaluation writes no checkpoint but takes the lock too.
    code, _, err = _run_inprocess(monkeypatch, capsys, "train_retrieval.py", "--config", cfg, "--output_dir", out,
                                  "--evaluate", "--no_progress")
    assert code == 1
    (line,) = err.splitlines()
    assert line.startswith(f"error: {out} is in use by another run (pid {proc.pid} on host {socket.gethostname()}, "
                           "since ")
    assert line.endswith("); wait for it to end, or choose another --output_dir")
    assert _snapshot(out) == before
    proc.kill()  # the OS releases a dead process's lock: a crashed run never blocks the next
    proc.wait()
    code, _, err = _run_inprocess(monkeypatch, capsys, "train_retrieval.py", "--config", cfg, "--output_dir", out,
                                  "--evaluate", "--no_progress", "--opts", f"pretrained={out / 'checkpoint_last.pth'}")
    assert code == 0, err
    assert (out / ".lock").read_text().split()[:2] == [str(os.getpid()), socket.gethostname()]


ENTRY_SCRIPTS = {
    "train_retrieval.py": "{tiny}",
    "pretrain.py": "configs/demo/pretrain.yaml",
    "zero_shot.py": "configs/demo/imagecode_zeroshot.yaml",
    "finetune_imagecode.py": "configs/demo/imagecode_stage1.yaml",
    "eval_mmvp.py": "configs/demo/mmvp.yaml",
}


@pytest.mark.parametrize("script", list(ENTRY_SCRIPTS))
def test_every_entry_script_is_refused_in_one_line_while_another_run_holds_output_dir(
        script, trained, busy, monkeypatch, capsys):
    """Each script goes through start_run and run_entry: a busy output_dir is one line on stderr and
    exit status 1, before anything is written (training and evaluation-only scripts alike)."""
    busy, proc = busy
    before = _snapshot(busy)
    code, out, err = _run_inprocess(monkeypatch, capsys, script, "--config",
                                    ENTRY_SCRIPTS[script].format(tiny=trained[0]), "--output_dir", busy)
    assert code == 1
    (line,) = err.splitlines()
    assert re.fullmatch(rf"error: {re.escape(str(busy))} is in use by another run \(pid {proc.pid} on host "
                        rf"{re.escape(socket.gethostname())}, since [\d-]+ [\d:]+\); wait for it to end, or choose "
                        r"another --output_dir", line), line
    assert "Traceback" not in out and _snapshot(busy) == before


@pytest.mark.dist
def test_under_torchrun_rank_0_claims_output_dir_and_alone_reports_the_refusal(trained, busy, free_port):
    busy, proc = busy
    before = _snapshot(busy)
    # The torchrun command line itself, ranks exec'd as `python -u train_retrieval.py` (the other
    # torchrun tests fork them: tests/scripts/forked.py).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "--master_addr=127.0.0.1", str(REPO / "train_retrieval.py"), "--config", str(trained[0]), "--output_dir",
           str(busy), "--evaluate", "--no_progress"]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 1
    errors = [line for line in (run.stdout + run.stderr).splitlines() if "error: " in line and "in use" in line]
    assert errors == [f"[rank 0] error: {busy} is in use by another run (pid {proc.pid} on host "
                      f"{socket.gethostname()}, since {(busy / '.lock').read_text().split(maxsplit=2)[2].strip()}); "
                      "wait for it to end, or choose another --output_dir"]
    assert _snapshot(busy) == before


# ----------------------------------------------------------------------------- readable errors

def test_our_error_is_one_line_its_traceback_on_the_console_with_debug_and_nothing_written(
        trained, tmp_path, run_script, monkeypatch, capsys):
    """A run that fails before its first step writes nothing (not even run.log or the folder it
    would have made); --debug shows the traceback. After the commit, run.log gets it."""
    cfg, _ = trained
    text = tmp_path / "model.pth"
    text.write_text("epoch: 1\nweights: none\n")
    message = (f"error: {str(text)!r} (23 bytes) is not a checkpoint: it is a text file starting with 'epoch: 1', "
               "while torch.save writes a zip archive (a pickle before torch 1.6); check the path, or if it was "
               "downloaded, delete it to fetch it again")
    out = tmp_path / "run"
    proc = _train(run_script, cfg, out, "--opts", f"pretrained={text}")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [message] and "Traceback" not in proc.stdout
    assert not out.exists()
    code, _, err = _run_inprocess(monkeypatch, capsys, "train_retrieval.py", "--config", cfg, "--output_dir", out,
                                  "--no_progress", "--opts", f"pretrained={text}", "--debug")
    assert code == 1
    assert "Traceback (most recent call last)" in err and err.splitlines()[-1] == message
    assert not out.exists()


def test_tools_report_our_errors_in_one_line(trained, synthetic_small, tmp_path, monkeypatch, capsys):
    text = tmp_path / "model.pth"
    text.write_text("<html>404</html>")
    out = tmp_path / "scores"
    code, _, err = _run_inprocess(monkeypatch, capsys, "tools", "score", "--config", trained[0], "--output_dir", out,
                                  "--input", synthetic_small / "retrieval" / "annotation" / "synthetic_test.json",
                                  "--opts", f"pretrained={text}")
    assert code == 1
    assert err.splitlines() == [f"error: {str(text)!r} (16 bytes) is not a checkpoint: it is a text file starting "
                                "with '<html>404</html>', while torch.save writes a zip archive (a pickle before torch "
                                "1.6); check the path, or if it was downloaded, delete it to fetch it again"]
    assert not out.exists()  # failed before its commit: nothing written


def test_an_unexpected_error_keeps_its_traceback(trained, tmp_path, monkeypatch, capsys):
    import tasks.retrieval

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    # After the commit (the model loaded, evaluation started): run.log holds the traceback.
    monkeypatch.setattr(tasks.retrieval, "evaluate_retrieval", broken)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="a bug"):  # the interpreter prints it in full
        _run_inprocess(monkeypatch, capsys, "train_retrieval.py", "--config", trained[0], "--output_dir", out,
                       "--evaluate", "--no_progress", "--opts", f"pretrained={trained[1] / 'checkpoint_last.pth'}")
    log = (out / "run.log").read_text()
    assert "unexpected error (a bug: please report it with this traceback)" in log and "RuntimeError: a bug" in log


# ----------------------------------------------------------------------------- checkpoint writes

def _is_checkpoint_temp(fd_or_path) -> bool:
    path = os.readlink(f"/proc/self/fd/{fd_or_path}") if isinstance(fd_or_path, int) else str(fd_or_path)
    return re.fullmatch(r"\.checkpoint_\w+\.pth\.\d+\.[0-9a-f]{8}\.tmp", Path(path).name) is not None


def _continue_run(monkeypatch, capsys, cfg, out):
    """``--resume auto`` one more epoch, saving checkpoint_last.pth after 4 steps (mid-epoch)."""
    return _run_inprocess(monkeypatch, capsys, "train_retrieval.py", "--config", cfg, "--output_dir", out,
                          "--no_progress", "--resume", "auto", "--opts", "max_epoch=2", "ckpt_every_steps=4")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the checkpoint's temp file through /proc")
def test_disk_full_names_the_checkpoint_and_keeps_the_previous_one(previous_run, monkeypatch, capsys, full_disk):
    cfg, out = previous_run
    before = (out / "checkpoint_last.pth").read_bytes()
    fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: full_disk(fdopen(fd, *a, **k), 1 << 16)
                        if _is_checkpoint_temp(fd) else fdopen(fd, *a, **k))
    code, _, err = _continue_run(monkeypatch, capsys, cfg, out)
    assert code == 1
    assert err.splitlines() == [f"error: cannot write checkpoint '{out}/checkpoint_last.pth': disk full (no space "
                                f"left on device); {INTACT}; free space in '{out}' and run again"]
    assert (out / "checkpoint_last.pth").read_bytes() == before
    assert not list(out.glob(".*.tmp"))
    # torch reports the failed write as its own error; the cause is chained, in the log.
    assert "No space left on device" in (out / "run.log").read_text()


@pytest.mark.parametrize("how", ["chmod", "fake"])
def test_read_only_directory_names_the_checkpoint_and_keeps_the_previous_one(how, previous_run, monkeypatch, capsys):
    cfg, out = previous_run
    before = (out / "checkpoint_last.pth").read_bytes()
    if how == "chmod":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only directories (the 'fake' case runs instead)")
        out.chmod(0o555)
    else:
        real_open = os.open

        def refuse(path, flags, *args, **kwargs):
            if flags & os.O_CREAT and _is_checkpoint_temp(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", refuse)
    try:
        code, _, err = _continue_run(monkeypatch, capsys, cfg, out)
    finally:
        out.chmod(0o755)
    assert code == 1
    assert err.splitlines() == [f"error: cannot write checkpoint '{out}/checkpoint_last.pth': permission denied; "
                                f"{INTACT}; make '{out}' writable, or write elsewhere (--output_dir)"]
    assert (out / "checkpoint_last.pth").read_bytes() == before and not list(out.glob(".*.tmp"))


def test_stale_temp_files_of_our_writes_are_removed_at_start(previous_run, monkeypatch, capsys):
    cfg, out = previous_run
    ours = [out / ".checkpoint_last.pth.4242.0a1b2c3d.tmp", out / ".config.yaml.17.deadbeef.tmp"]
    theirs = [out / ".notes.tmp", out / "data.tmp", out / "sub" / ".checkpoint_last.pth.4242.0a1b2c3d.tmp"]
    for p in ours + theirs:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"half a file")
    code, _, err = _run_inprocess(monkeypatch, capsys, "train_retrieval.py", "--config", cfg, "--output_dir", out,
                                  "--evaluate", "--no_progress", "--opts", f"pretrained={out / 'checkpoint_last.pth'}")
    assert code == 0, err
    assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)
    assert (f"removed 2 stale temp file(s) of interrupted writes in {out}: .checkpoint_last.pth.4242.0a1b2c3d.tmp, "
            ".config.yaml.17.deadbeef.tmp") in (out / "run.log").read_text()


# ----------------------------------------------------------------------------- always alive

def test_training_without_progress_bars_logs_on_time_not_only_every_log_every_steps(
        trained, tmp_path, monkeypatch, capsys):
    import utils.logging
    monkeypatch.setattr(utils.logging, "HEARTBEAT_S", 0.0)  # a line per step instead of every 30 s
    out = tmp_path / "run"
    code, _, err = _run_inprocess(monkeypatch, capsys, "train_retrieval.py", "--config", trained[0], "--output_dir",
                                  out, "--no_progress")  # log_every 1000 > 18 steps per epoch
    assert code == 0, err
    lines = [l for l in (out / "run.log").read_text().splitlines() if " batch " in l]
    assert len(lines) == 18
    assert re.search(r"epoch 0 batch 18/18 step 18 loss_ita=\d+\.\d{4} loss_itm=\d+\.\d{4} lr=\S+ "
                     r"samples/s=\d+\.\d eta=0s$", lines[-1]), lines[-1]


def test_heartbeat_logs_at_most_once_per_interval(caplog):
    from utils.logging import Heartbeat, format_duration

    log = logging.getLogger("test.heartbeat")
    with caplog.at_level(logging.INFO, logger="test.heartbeat"):
        quiet = Heartbeat("rerank", total=100, unit="pairs", log=log, every=3600)
        assert not quiet.tick(10) and not quiet.update(5) and caplog.records == []
        beat = Heartbeat("rerank", total=100, unit="pairs", log=log, every=0)
        assert beat.tick(25) and beat.update(25)
    assert [r.getMessage().split(", ")[0] for r in caplog.records] == ["rerank: 25/100 pairs (25.0%)",
                                                                        "rerank: 50/100 pairs (50.0%)"]
    assert re.search(r"\d+\.\d pairs/s, ETA \S+$", caplog.records[0].getMessage())
    assert [format_duration(s) for s in (42, 185, 3720, float("inf"))] == ["42s", "3m 05s", "1h 02m", "unknown"]
