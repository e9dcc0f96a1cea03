"""Shared test fixtures: paths, the official-layout fixture's config, launching entry points like a
user does, and tiny synthetic data and configs. Tests take them as fixture arguments (the project
root is on the import path through pytest.ini's ``pythonpath``)."""
from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.scripts import forked

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "blip_official_tiny"

# Torch on one thread in the test process, so that the runs forked from it may use several (GNU
# OpenMP hangs in a child forked after its thread pool started); a forked run without
# OMP_NUM_THREADS in its environment gets this worker's share of the cores (two pytest-xdist
# workers on two cores: one each). Nothing is exported: torchrun's ranks keep its default (1).
forked.single_threaded_parent()


def _fixture_config(tmp_path: Path, **overrides) -> Path:
    """A retrieval config that evaluates the official-layout fixture checkpoint."""
    cfg = {
        "dataset": "custom", "image_root": str(FIXTURE), "ann_root": str(FIXTURE), "test_file": "test.json",
        "pretrained": str(FIXTURE / "checkpoint.pth"), "strict_load": True,
        "vit": "{width: 64, depth: 2, heads: 4, patch_size: 16}", "image_size": 64,
        "med_config": str(FIXTURE / "med_config.json"), "tokenizer": str(FIXTURE / "tokenizer"),
        "embed_dim": 32, "queue_size": 64, "k_test": 3, "batch_size_test": 4, "rerank_batch_size": 5,
        "num_workers": 0, "device": "cpu", "deterministic": "true",
    }
    cfg.update(overrides)
    path = tmp_path / "fixture.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in cfg.items()))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_torchrun(script: str, args, nproc: int = 2, timeout: float = 600, env=None) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N script args`` on CPU (gloo), from the repo root. ``script`` is a
    file (``train_retrieval.py``) or, without ``.py``, a module run like ``python -m`` (``tools``)."""
    target = [str(REPO / script)] if script.endswith(".py") else ["--module", script]
    launcher_args = [f"--nproc_per_node={nproc}", f"--master_port={_free_port()}", "--master_addr=127.0.0.1",
                     *target, *map(str, args)]
    # The repo root on the path, as for pytest itself (pytest.ini's pythonpath): helper scripts under
    # tests/scripts import the project and each other by package path.
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO),
                **(env or {})}
    # torchrun's own main, forked from this process, its ranks forked from it (tests/scripts/forked.py);
    # BLIP_TEST_SUBPROCESS=1: the torchrun command line itself.
    proc = forked.run(forked.TORCHRUN, launcher_args, full_env, cwd=REPO, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def _run_script(script: str, args, timeout: float = 900, env=None, check=True) -> subprocess.CompletedProcess:
    """``python script args`` (``python -m script`` without ``.py``) from the repo root: a process of
    its own, forked from this one with the script's imports done (``tests/scripts/forked.py``)."""
    full_env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    proc = forked.run(script, args, full_env, cwd=REPO, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    """The official-layout BLIP retrieval fixture (tests/fixtures/blip_official_tiny)."""
    return FIXTURE


@pytest.fixture(scope="session")
def fixture_config():
    """``fixture_config(tmp_path, **overrides) -> Path``: a retrieval config evaluating the fixture."""
    return _fixture_config


@pytest.fixture(scope="session")
def fixture_model():
    """``fixture_model(image_size=64) -> (model in eval mode, tokenizer, load report)``: the
    official-layout fixture loaded strictly through the model factory, as users' files are."""
    from models.factory import build_model, load_weights
    from models.tokenizer import build_tokenizer
    from tasks.retrieval import RetrievalConfig

    def make(image_size: int = 64):
        cfg = RetrievalConfig(vit={"width": 64, "depth": 2, "heads": 4, "patch_size": 16}, image_size=image_size,
                              med_config=str(FIXTURE / "med_config.json"), tokenizer=str(FIXTURE / "tokenizer"),
                              embed_dim=32, queue_size=64)
        tok = build_tokenizer(cfg.tokenizer)
        model = build_model(cfg, "blip", tok)
        report = load_weights(model, FIXTURE / "checkpoint.pth", strict=True).blip
        return model.eval(), tok, report
    return make


@pytest.fixture(scope="session")
def free_port():
    return _free_port


@pytest.fixture(scope="session")
def run_torchrun():
    """``run_torchrun(script, args, nproc=2)``: torchrun on CPU (gloo) from the repo root."""
    return _run_torchrun


@pytest.fixture(scope="session")
def run_script():
    """``run_script(script, args)``: ``python script args`` from the repo root."""
    return _run_script


@pytest.fixture(scope="session")
def tiny_train_config():
    """``tiny_train_config(tmp_path, data, **overrides) -> Path``: a seconds-per-epoch retrieval run
    (an override of None drops that key: e.g. the retrieval-only ones for another task)."""
    return _tiny_train_config


def _kill_at_step(cmd, checkpoint: Path, step: int, timeout: float = 300) -> None:
    """Start ``cmd`` from the repo root and SIGKILL it as soon as ``checkpoint`` records loop step
    ``>= step`` (a run saving every few steps: killed mid-epoch, as a crash would). ``python
    script.py ...`` and torchrun (``python -m torch.distributed.run ...``) run forked from this
    process (``tests/scripts/forked.py``), anything else as a subprocess; the whole process tree is
    killed."""
    import time
    import torch
    cmd = [str(c) for c in cmd]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    if cmd[0] == sys.executable and (cmd[1].endswith(".py") or cmd[1:3] == ["-m", forked.TORCHRUN]) \
            and not forked.use_subprocess():
        pid = forked.start(*forked.split_cmd(cmd), env, cwd=REPO)
        poll, finish = (lambda: forked.poll(pid)), (lambda: forked.wait(pid))
    else:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        pid, poll, finish = proc.pid, proc.poll, proc.wait
    deadline = time.time() + timeout
    status = None
    while time.time() < deadline and status is None:
        if checkpoint.is_file():
            try:
                if torch.load(checkpoint, weights_only=True)["loop"]["step"] >= step:
                    break
            except Exception:  # noqa: BLE001 - replaced atomically, but read while renamed: retry
                pass
        time.sleep(0.05)
        status = poll()
    assert status is None, "the run finished before it could be killed"
    # torchrun starts each rank in a session of its own: kill the whole tree, as a crash would.
    forked.kill_tree(pid)
    finish()


@pytest.fixture(scope="session")
def kill_at_step():
    """``kill_at_step(cmd, checkpoint, step)``: run ``cmd``, SIGKILL it once ``checkpoint`` is at ``step``."""
    return _kill_at_step


def _write_shards(folder: Path, n_shards: int, per_shard: int, bad: dict | None = None, stats: bool = True,
                  size: int = 16) -> list[str]:
    """webdataset tar shards ``folder/00000.tar ...`` of ``per_shard`` samples (``KEY.jpg`` + ``KEY.txt``
    + ``KEY.json``), with img2dataset's ``NNNNN_stats.json`` when ``stats``. ``bad``: {(shard, i):
    "corrupt" | "empty_caption" | "no_image"}. Returns the keys of the good samples as the stream
    names them (``<tar path>/<key>``)."""
    import io
    import json
    import numpy as np
    import webdataset as wds
    from PIL import Image
    bad = bad or {}
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n_shards * 1000 + per_shard)
    good = []
    for s in range(n_shards):
        tar = folder / f"{s:05d}.tar"
        with wds.TarWriter(str(tar)) as writer:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
                kind = bad.get((s, i))
                sample = {"__key__": key, "jpg": buf.getvalue(), "txt": f"a photo of thing {s} {i}",
                          "json": json.dumps({"key": key, "status": "success"}).encode()}
                if kind == "corrupt":
                    sample["jpg"] = b"\xff\xd8\xff\xe0 not really a jpeg"
                elif kind == "empty_caption":
                    sample["txt"] = "  "
                elif kind == "no_image":
                    del sample["jpg"]
                writer.write(sample)
                if kind is None:
                    good.append(f"{tar}/{key}")
        if stats:
            (folder / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard,
                                                                      "failed_to_download": 0, "failed_to_resize": 0}))
    return good


@pytest.fixture(scope="session")
def write_shards():
    """``write_shards(folder, n_shards, per_shard, bad=None, stats=True) -> good keys``: tar shards."""
    return _write_shards


@pytest.fixture(scope="session")
def synthetic_small(tmp_path_factory) -> Path:
    """A small copy of the embedded synthetic benchmark (real files, real formats)."""
    from data.synthetic import generate
    out = tmp_path_factory.mktemp("synthetic")
    generate(out, seed=0, n_train=96, n_val=16, n_test=16, image_size=32)
    return out


def _tiny_train_config(tmp_path: Path, data: Path, **overrides) -> Path:
    """A very small from-scratch retrieval run on the synthetic data (seconds per epoch)."""
    from tests.scripts.tiny import TINY_MED, tiny_values, write_yaml
    med = tmp_path / "med_tiny.json"
    med.write_text(TINY_MED)
    return write_yaml(tmp_path / "train.yaml", tiny_values(data, med, **overrides))


class _FullDisk:
    """A binary file whose writes fail with ENOSPC after ``room`` bytes (as a full disk does)."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if n > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= n
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.fixture(scope="session")
def full_disk():
    """``full_disk(binary_file, room) -> file``: writes fail with ENOSPC after ``room`` bytes."""
    return _FullDisk



@pytest.hookimpl(trylast=True)  # after -m / -k have deselected: only what runs counts
def pytest_collection_modifyitems(session, config, items):
    """The longest files first, each file's tests in their order: pytest-xdist (``--dist loadfile
    --no-loadscope-reorder``) hands whole files to its workers in this order, so the long ones start
    first and the short ones fill in at the end. A file's length is the sum of its selected tests'
    seconds in ``tests/durations.json`` (``tests/scripts/durations.py``); a test not there took
    under 0.1 s, or is new and guessed from its marks (``slow`` / ``dist``: an end-to-end run)."""
    from tests.scripts.durations import load
    measured = load()

    def seconds(item) -> float:
        if item.nodeid in measured:
            return measured[item.nodeid]
        if any(item.get_closest_marker(name) for name in ("slow", "dist")):
            return 20.0
        return 0.05
    weight: dict = {}
    for item in items:
        weight[item.fspath] = weight.get(item.fspath, 0.0) + seconds(item)
    first_seen = {path: i for i, path in reversed(list(enumerate(item.fspath for item in items)))}
    items.sort(key=lambda item: (-weight[item.fspath], first_seen[item.fspath]))
