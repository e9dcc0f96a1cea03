"""Checkpoint I/O: local files and URLs, safe loading, saving (atomic writes, safetensors, epoch copies);
mapping onto a model: tests/test_state_dict.py."""
from __future__ import annotations

import errno
import functools
import http.server
import os
import socket
import threading
import time

import pytest
import torch

from utils.atomic import WriteError, atomic_write
from utils.checkpoint import load_checkpoint, save_checkpoint_atomic
from utils.download import resolve_checkpoint
from utils.errors import CheckpointDownloadError, CheckpointError, UnsafeCheckpointError
from utils.state_dict import extract_state_dict

RAN_ON_UNPICKLE: list[str] = []


def _record_unpickle() -> str:
    RAN_ON_UNPICKLE.append("ran")
    return "payload"


class Payload:
    """Unpickling this runs `_record_unpickle`: a stand-in for arbitrary code in a pickle."""

    def __reduce__(self):
        return (_record_unpickle, ())


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    # A proxy from the environment would intercept requests meant for 127.0.0.1.
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def http_server(tmp_path):
    """Serve `tmp_path / 'www'` on 127.0.0.1:<ephemeral>; yields (root dir, base url, server)."""
    root = tmp_path / "www"
    root.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}", server
    server.shutdown()
    server.server_close()


def _tiny_sd() -> dict[str, torch.Tensor]:
    return {"fc.weight": torch.randn(3, 2), "fc.bias": torch.randn(3)}


# --------------------------------------------------------------------------- local files

def test_load_official_layout_and_raw_dict(tmp_path):
    sd = _tiny_sd()
    official = tmp_path / "model_base.pth"
    torch.save({"model": sd, "optimizer": {"state": {}}, "config": {"lr": 1e-5}, "epoch": 3},
               official)
    raw = tmp_path / "raw.pth"
    torch.save(sd, raw)

    for path in (official, str(raw)):
        got = extract_state_dict(load_checkpoint(path))
        assert got.keys() == sd.keys()
        for key in sd:
            assert torch.equal(got[key], sd[key])
    assert extract_state_dict({"state_dict": sd}).keys() == sd.keys()


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "nope" / "model_base.pth"
    with pytest.raises(FileNotFoundError) as info:
        resolve_checkpoint(missing)
    assert str(missing) in str(info.value) and "http" in str(info.value)
    with pytest.raises(FileNotFoundError, match="model_base.pth"):
        load_checkpoint(str(missing))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy_format"])
def test_pickle_with_custom_object_is_refused_and_not_run(tmp_path, legacy):
    path = tmp_path / "evil.pth"
    torch.save({"model": _tiny_sd(), "extra": Payload()}, path,
               _use_new_zipfile_serialization=not legacy)
    RAN_ON_UNPICKLE.clear()
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint(path)
    assert "for safety" in str(info.value) and str(path) in str(info.value)
    if not legacy:  # torch lists the globals of zip checkpoints only
        assert "_record_unpickle" in str(info.value)
    assert RAN_ON_UNPICKLE == []


@pytest.mark.parametrize("damage", ["cut_early", "cut_half", "cut_last_byte"])
def test_truncated_file_is_named(tmp_path, damage):
    path = tmp_path / "model.pth"
    torch.save({"model": {"w": torch.randn(64, 64)}}, path)
    data = path.read_bytes()
    damaged = {"cut_early": data[:100], "cut_half": data[: len(data) // 2], "cut_last_byte": data[:-1]}[damage]
    path.write_bytes(damaged)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value).startswith(f"cannot read checkpoint {str(path)!r} ({len(damaged)} bytes): it is "
                                      "truncated or damaged (")
    assert len(str(info.value).splitlines()) == 1 and not isinstance(info.value, UnsafeCheckpointError)


@pytest.mark.parametrize("content, what", [
    (b"epoch: 1\nweights: none\n", "a text file starting with 'epoch: 1'"),   # unpickled, this was KeyError: 101
    (b"<html>404</html>", "a text file starting with '<html>404</html>'"),
    (b"", "an empty file"),
    (b"\x00\x01\x02\x03binary", "a binary file starting with b'\\x00\\x01\\x02\\x03bina'"),
], ids=["yaml", "html", "empty", "binary"])
def test_a_file_that_is_no_checkpoint_says_so_in_one_line(tmp_path, content, what):
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value) == (f"{str(path)!r} ({len(content)} bytes) is not a checkpoint: it is {what}, while "
                               "torch.save writes a zip archive (a pickle before torch 1.6); check the path, or if "
                               "it was downloaded, delete it to fetch it again")
    assert info.value.__cause__ is None and info.value.__context__ is None  # no unpickler traceback behind it


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads unreadable files")
def test_unreadable_file_says_permission_denied(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"model": _tiny_sd()}, path)
    path.chmod(0)
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*model\.pth'?: permission denied; make it "
                                              r"readable or give another path"):
        load_checkpoint(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_intact_file_error_is_not_called_corrupt(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"model": _tiny_sd()}, path)
    with pytest.raises(RuntimeError) as info:
        load_checkpoint(path, map_location="cuda")
    assert not isinstance(info.value, CheckpointError)


# --------------------------------------------------------------------------- URLs

def test_url_downloads_once_then_uses_cache(tmp_path, http_server):
    root, base, server = http_server
    sd = _tiny_sd()
    (root / "coco").mkdir()
    (root / "flickr").mkdir()
    torch.save({"model": sd}, root / "coco" / "model.pth")
    torch.save({"model": {"other": torch.ones(1)}}, root / "flickr" / "model.pth")
    cache = tmp_path / "cache"

    first = resolve_checkpoint(f"{base}/coco/model.pth", cache_dir=cache, timeout=5)
    assert first.parent == cache and first.name.endswith("_model.pth")
    assert first.read_bytes() == (root / "coco" / "model.pth").read_bytes()
    # Same basename, different URL: a different cache entry.
    other = resolve_checkpoint(f"{base}/flickr/model.pth", cache_dir=cache, timeout=5)
    assert other != first and "other" in extract_state_dict(torch.load(other, weights_only=True))
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]

    server.shutdown()
    server.server_close()
    again = load_checkpoint(f"{base}/coco/model.pth", cache_dir=cache, timeout=1)
    assert torch.equal(extract_state_dict(again)["fc.weight"], sd["fc.weight"])


def test_default_cache_dir_from_env(tmp_path, http_server, monkeypatch):
    root, base, _ = http_server
    torch.save(_tiny_sd(), root / "m.pth")
    monkeypatch.setenv("CONTEXTBLIP_CACHE", str(tmp_path / "envcache"))
    assert resolve_checkpoint(f"{base}/m.pth", timeout=5).parent == tmp_path / "envcache"


def test_http_404_is_clear(tmp_path, http_server):
    _, base, _ = http_server
    url = f"{base}/missing.pth"
    with pytest.raises(CheckpointDownloadError) as info:
        resolve_checkpoint(url, cache_dir=tmp_path / "cache", timeout=5)
    msg = str(info.value)
    assert url in msg and "404" in msg and "manually" in msg
    assert not any((tmp_path / "cache").glob("*"))  # nothing half-written left in the cache


def test_interrupted_download_leaves_no_file(tmp_path):
    # A server that promises 1000 bytes, sends 10 and hangs up.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)

    def serve_once():
        conn, _ = sock.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/model.pth"
    try:
        with pytest.raises(CheckpointDownloadError, match="10 of 1000 bytes") as info:
            resolve_checkpoint(url, cache_dir=tmp_path, timeout=5)
    finally:
        thread.join(timeout=5)
        sock.close()
    assert url in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timing  # asserts a wall-time bound: run alone, not beside another worker
def test_closed_port_fails_fast(tmp_path):
    with socket.socket() as sock:  # bind, then close: nothing listens on this port afterwards
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/model.pth"
    start = time.monotonic()
    with pytest.raises(CheckpointDownloadError) as info:
        resolve_checkpoint(url, cache_dir=tmp_path, timeout=10)
    assert time.monotonic() - start < 5
    assert url in str(info.value) and "manually" in str(info.value)


@pytest.mark.timing  # asserts a wall-time bound: run alone, not beside another worker
def test_silent_server_times_out(tmp_path):
    # A listening socket nobody accepts from: the kernel completes the handshake, then silence.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/model.pth"
        start = time.monotonic()
        with pytest.raises(CheckpointDownloadError, match="timeout") as info:
            resolve_checkpoint(url, cache_dir=tmp_path, timeout=1)
        assert time.monotonic() - start < 10
    assert url in str(info.value)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- atomic save

def test_save_checkpoint_atomic_roundtrip(tmp_path):
    path = tmp_path / "run" / "nested" / "checkpoint.pth"
    sd = _tiny_sd()
    assert save_checkpoint_atomic({"model": sd, "epoch": 1}, path) == path
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 1 and torch.equal(loaded["model"]["fc.bias"], sd["fc.bias"])
    assert os.listdir(path.parent) == ["checkpoint.pth"]


def test_failed_save_keeps_old_file_and_removes_temp(tmp_path):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint_atomic({"model": _tiny_sd(), "epoch": 1}, path)
    old_bytes = path.read_bytes()
    with pytest.raises(Exception, match="cannot pickle this"):
        save_checkpoint_atomic({"model": _tiny_sd(), "epoch": 2, "bad": Unpicklable()}, path)
    assert path.read_bytes() == old_bytes
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


@pytest.mark.parametrize("previous", [True, False], ids=["over_a_checkpoint", "first_save"])
def test_disk_full_during_save_is_one_line_naming_the_file(tmp_path, monkeypatch, previous, full_disk):
    """torch.save reports a failed write as its own RuntimeError ('unexpected pos ...') with the
    OSError only chained; the error names the file, the cause and what is intact."""
    path = tmp_path / "checkpoint_last.pth"
    if previous:
        save_checkpoint_atomic({"model": _tiny_sd(), "epoch": 1}, path)
    old = path.read_bytes() if previous else None
    fdopen = os.fdopen

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: full_disk(fdopen(fd, *a, **k), 100))
    with pytest.raises(WriteError) as info:
        save_checkpoint_atomic({"model": {"w": torch.randn(256, 256)}, "epoch": 2}, path)
    kept = ("the previous checkpoint_last.pth is intact (it is replaced only by a complete new file: written to a "
            "temporary file, then renamed)" if previous else "no checkpoint_last.pth was written")
    assert str(info.value) == (f"cannot write checkpoint {str(path)!r}: disk full (no space left on device); {kept}; "
                               f"free space in {str(tmp_path)!r} and run again")
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert os.listdir(tmp_path) == (["checkpoint_last.pth"] if previous else [])
    if previous:
        assert path.read_bytes() == old


def test_a_connection_error_while_downloading_is_not_called_a_write_error(tmp_path):
    """Only a refused write becomes a WriteError; an OSError of the source keeps its own meaning."""
    def broken(f):
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")

    with pytest.raises(ConnectionResetError):
        atomic_write(tmp_path / "model.pth", broken)
    assert os.listdir(tmp_path) == []


def test_safetensors_checkpoint_loads_anywhere_and_keeps_its_state_apart(tmp_path, fixture_model, fixture_dir):
    """``save_format: safetensors``: the weights (tied ones stored twice) + a JSON metadata block,
    the optimiser state in a weights_only torch file. ``pretrained`` reads it as a .pth; resuming
    needs the state file, and says so when it is gone."""
    from models.factory import create_model, load_weights
    from tasks.retrieval import RetrievalConfig
    from utils.checkpoint import load_checkpoint, safetensors_metadata, save_safetensors_checkpoint
    from utils.checkpoint_files import link_checkpoint, remove_checkpoint
    model, tok, _ = fixture_model()
    state = {"model": {**model.state_dict(), "tied": model.state_dict()["temp"]}, "format": "blip",
             "config": {"image_size": 64}, "epoch": 3, "step": 12, "optimizer": {"state": {}, "param_groups": []}}
    path = save_safetensors_checkpoint(state, tmp_path / "run" / "checkpoint_last.safetensors")
    meta = safetensors_metadata(path)
    assert meta["format"] == "blip" and meta["epoch"] == 3 and meta["config"] == {"image_size": 64}
    states = list(path.parent.glob("checkpoint_last.*.state.pth"))
    assert [p.name for p in states] == [f"checkpoint_last.{meta['save_id']}.state.pth"]
    assert torch.load(states[0], weights_only=True)["optimizer"] == state["optimizer"]
    loaded = load_checkpoint(path)
    assert "optimizer" not in loaded and loaded["epoch"] == 3
    assert all(torch.equal(loaded["model"][k], v) for k, v in state["model"].items())

    # `pretrained:` through the factory, strictly (the extra "tied" key aside).
    del state["model"]["tied"]
    save_safetensors_checkpoint(state, path)
    assert len(list(path.parent.glob("checkpoint_last.*.state.pth"))) == 1  # the older state file is gone
    cfg = RetrievalConfig(vit={"width": 64, "depth": 2, "heads": 4, "patch_size": 16}, image_size=64,
                          med_config=str(fixture_dir / "med_config.json"), tokenizer=str(fixture_dir / "tokenizer"),
                          embed_dim=32, queue_size=64, pretrained=str(path), strict_load=True)
    other, _ = create_model(cfg, "blip")
    assert all(torch.equal(other.state_dict()[k], v) for k, v in model.state_dict().items())
    assert load_weights(other, path, strict=True).format == "blip"

    # An epoch copy (hard link) survives the last checkpoint's replacement; removal takes its state file.
    copy = link_checkpoint(path, tmp_path / "run" / "checkpoint_epoch002.safetensors")
    assert load_checkpoint(copy, with_state=True)["step"] == 12
    save_safetensors_checkpoint({**state, "step": 13}, path)
    assert load_checkpoint(copy, with_state=True)["step"] == 12
    assert load_checkpoint(path, with_state=True)["step"] == 13
    remove_checkpoint(copy)
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if "epoch" in p.name) == []
    for p in (tmp_path / "run").glob("*.state.pth"):
        p.unlink()
    with pytest.raises(CheckpointError, match="holds weights only.*can be loaded as `pretrained` but not resumed"):
        load_checkpoint(path, with_state=True)


def test_overwrite_deletes_every_run_file_of_either_format(tmp_path):
    from utils.checkpoint import save_safetensors_checkpoint
    from utils.checkpoint_files import epoch_checkpoints
    from utils.rundir import run_files
    out = tmp_path / "run"
    for stem in ("checkpoint_last", "checkpoint_epoch010", "checkpoint_epoch002"):
        save_safetensors_checkpoint({"model": {"w": torch.ones(2)}, "optimizer": {}}, out / f"{stem}.safetensors")
    torch.save({"model": {}}, out / "checkpoint_best.pth")
    (out / "tensorboard").mkdir()
    (out / "log.txt").write_text("{}\n")
    assert [p.name for p in epoch_checkpoints(out)] == ["checkpoint_epoch002.safetensors",
                                                       "checkpoint_epoch010.safetensors"]
    assert {p.name for p in run_files(out)} == {"checkpoint_last.safetensors", "checkpoint_best.pth", "log.txt",
                                                "checkpoint_epoch002.safetensors", "checkpoint_epoch010.safetensors",
                                                "tensorboard"}
