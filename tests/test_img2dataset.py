"""The real img2dataset, run against an HTTP server on 127.0.0.1 that serves synthetic images (some
URLs 404, one corrupt file, one non-image), in the files, webdataset and parquet formats; then one
epoch of BLIP pretraining on each output: every good sample trained exactly once, every bad one
counted in log.txt."""
from __future__ import annotations

import csv
import functools
import http.server
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

N_GOOD, N_MISSING = 10, 3


@pytest.fixture(scope="module")
def url_list(tmp_path_factory):
    """A URL list (csv: url, caption) served on 127.0.0.1: N_GOOD images, N_MISSING 404s, one
    truncated JPEG and one HTML page named .jpg. Yields (csv path, {url: kind})."""
    root = tmp_path_factory.mktemp("www")
    rng = np.random.default_rng(0)
    for i in range(N_GOOD):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / f"img{i}.jpg", quality=90)
    good = (root / "img0.jpg").read_bytes()
    (root / "corrupt.jpg").write_bytes(good[:40])  # the header, then nothing
    (root / "page.jpg").write_text("<html><body>not an image</body></html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    kinds = {f"{base}/img{i}.jpg": "good" for i in range(N_GOOD)}
    kinds.update({f"{base}/missing{i}.jpg": "404" for i in range(N_MISSING)})
    kinds.update({f"{base}/corrupt.jpg": "corrupt", f"{base}/page.jpg": "non-image"})
    urls = list(kinds)
    np.random.default_rng(1).shuffle(urls)  # bad ones spread over the shards
    path = root.parent / "urls.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "caption"])
        for k, url in enumerate(urls):
            writer.writerow([url, f"a synthetic photo number {k}"])
    yield path, kinds
    server.shutdown()


def _download(url_list: Path, out: Path, fmt: str, reencode: bool = True) -> Path:
    cmd = [shutil.which("img2dataset", path=str(Path(sys.executable).parent)) or "img2dataset",
           "--url_list", str(url_list), "--input_format", "csv", "--url_col", "url", "--caption_col", "caption",
           "--output_format", fmt, "--output_folder", str(out), "--processes_count", "1", "--thread_count", "4",
           "--number_sample_per_shard", "4", "--image_size", "32", "--timeout", "5", "--retries", "0",
           "--enable_wandb", "False", "--disable_all_reencoding", str(not reencode)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _metadata(out: Path) -> dict:
    """{key: (url, status)} from img2dataset's per-shard parquet files."""
    import pyarrow.parquet as pq
    rows = {}
    for p in sorted(out.glob("*.parquet")):
        t = pq.read_table(p, columns=["key", "url", "status"]).to_pydict()
        rows.update({k: (u, s) for k, u, s in zip(t["key"], t["url"], t["status"])})
    return rows


def _train(tmp_path, data, make, run_script, source: Path, name: str, **extra) -> tuple[dict, list]:
    cfg = make(tmp_path, data, dataset=None, ann_root=None, val_file=None, test_file=None, k_test=None,
               batch_size_test=None, train_file=f"['{source}']", image_root=None, alpha=0.4, batch_size_train=2,
               queue_size=16, max_epoch=1, log_sample_keys="true", **extra)
    out = tmp_path / name
    run_script("pretrain_blip.py", ["--config", cfg, "--output_dir", out, "--no_progress"])
    record = json.loads((out / "log.txt").read_text())
    keys = [line.split(" ", 2)[2] for line in (out / "samples_rank0.txt").read_text().splitlines()]
    return record, keys


def _collate_keys(items):
    return {"n": len(items)}


def _key(sample_key: str) -> str:
    return Path(sample_key).stem if sample_key.endswith(".jpg") else sample_key.rsplit("/", 1)[1]


def _up_front(record: dict) -> int:
    return sum(n for reasons in record.get("data_skipped_up_front", {}).values() for n in reasons.values())


@pytest.mark.parametrize("fmt", ["files", "webdataset", "parquet"])
def test_img2dataset_output_trains_every_good_sample_once(fmt, tmp_path, url_list, synthetic_small,
                                                          tiny_train_config, run_script):
    urls, kinds = url_list
    out = _download(urls, tmp_path / fmt, fmt)
    meta = _metadata(out)
    assert len(meta) == len(kinds)
    good = {k for k, (u, s) in meta.items() if s == "success"}
    # img2dataset itself fails the 404s (download) and the corrupt file and the page (decode/resize).
    assert {meta[k][0] for k in good} == {u for u, kind in kinds.items() if kind == "good"}

    if fmt == "files":
        # The list reader pretrain_blip.py uses for a `files` folder (training on it end to end is
        # the tar case's path after the reader), in-process: a training subprocess per format costs
        # the suite time. Every good sample once, the 5 failures counted up front.
        from data.corpora import read_img2dataset
        corpus = read_img2dataset(out)
        assert len(corpus) == N_GOOD and {Path(p).stem for p in corpus.image} == good
        assert sum(corpus.skipped.values()) == N_MISSING + 2
        return
    if fmt == "parquet":
        # The training path is the tar one's (data/stream.py); its parquet reader, read in-process
        # here: one epoch, every good sample once, the failed rows skipped up front.
        import torchvision.transforms as T
        from data.stream import build_stream
        stream = build_stream([str(out)], T.Compose([T.Resize((16, 16)), T.ToTensor()]), 30, list_builder=None,
                              seed=0, shuffle=True,
                              shuffle_buffer=5, num_samples=None, max_bad_fraction=0.01)
        keys = []
        for b in stream.make_loader(2, _collate_keys, 0, 0, 1):
            assert "_failure" not in b and not b["_skipped"], b
            keys += b["_keys"]
        assert len(keys) == len(set(keys)) == N_GOOD and {_key(k) for k in keys} == good
        assert sum(n for r in stream.skipped_up_front.values() for n in r.values()) == N_MISSING + 2
        return
    record, keys = _train(tmp_path, synthetic_small, tiny_train_config, run_script, out, fmt)
    assert len(keys) == len(set(keys)) == N_GOOD == record.get("data_samples", N_GOOD)
    assert {_key(k) for k in keys} == good
    assert _up_front(record) == N_MISSING + 2 and record.get("data_skipped", 0) == 0


def test_undecodable_records_in_shards_are_skipped_and_counted(tmp_path, url_list, synthetic_small,
                                                               tiny_train_config, run_script):
    """With re-encoding off, img2dataset stores the corrupt file and the page as they came: the
    stream finds them undecodable, counts them by shard, and fills its quota with repeats. (2 bad of
    this 12-record source is above the default max_bad_fraction, judged at the source's end: the
    run is told to train on anyway.)"""
    urls, kinds = url_list
    out = _download(urls, tmp_path / "raw", "webdataset", reencode=False)
    meta = _metadata(out)
    success = {k for k, (u, s) in meta.items() if s == "success"}
    assert len(success) == N_GOOD + 2
    record, keys = _train(tmp_path, synthetic_small, tiny_train_config, run_script, out, "raw",
                          max_bad_fraction=0.5)
    bad_keys = {k for k in success if kinds[meta[k][0]] in ("corrupt", "non-image")}
    by_shard = record["data_skipped_by_shard"]
    assert sum(r.get("undecodable image", 0) for r in by_shard.values()) == 2 == record["data_skipped"]
    assert _up_front(record) == N_MISSING
    # 12 records -> 6 batches of 2: the 10 good samples, then 2 repeats from the range's start.
    assert record["data_samples"] == 12 and record["data_repeats"] == 2
    assert {_key(k) for k in keys} == success - bad_keys
