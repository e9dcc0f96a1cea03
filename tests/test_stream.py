"""Streamed training data (data/stream.py, data/shards.py, data/slots.py, data/stream_loader.py): the
epoch plan, shards read by slots (ranks x workers) with no record twice, exact mid-epoch resume, bad
records counted, max_bad_fraction, mixed sources, parquet shards, pipe: URLs, and the entry scripts
training on shards."""
from __future__ import annotations

import json
import os
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import torchvision.transforms as T

from data.shards import classify, expand_shards
from data.slots import plan_epoch
from data.stream import BAD_CHECK_AFTER, build_stream
from tests.scripts import forked
from utils.errors import DataError

REPO = Path(__file__).resolve().parents[1]


def _collate(items):
    images, captions, idx = zip(*items)
    return {"pixel_values": torch.stack(images), "captions": list(captions), "idx": torch.tensor(idx)}


def _stream(files, list_builder=None, **kw):
    settings = dict(seed=0, shuffle=True, shuffle_buffer=5, num_samples=None, max_bad_fraction=0.01)
    settings.update(kw)
    return build_stream([str(f) for f in files], T.Compose([T.Resize((16, 16)), T.ToTensor()]), 30,
                        list_builder=list_builder, **settings)


def _epoch(files, rank, world, workers, batch, epoch=0, states=None, done=0, stop=None, **kw):
    """The batches one rank takes: (keys per batch, slot states after them, pixel tensors)."""
    loader = _stream(files, **kw).make_loader(batch, _collate, workers, rank, world)
    loader.set_epoch(epoch, states, done)
    keys, out_states, pixels, extra = [], dict(states or {}), [], []
    for j, b in enumerate(loader):
        if stop is not None and j == stop:
            break
        assert "_failure" not in b, b.get("_failure")
        keys.append(b["_keys"])
        out_states[b["_slot"]] = b["_state"]
        pixels.append(b["pixel_values"])
        extra.append({k: b[k] for k in ("_skipped", "_repeats")})
    assert stop is not None or len(keys) == len(loader)
    return keys, out_states, pixels, extra


def test_plan_gives_equal_disjoint_ranges_covering_every_record():
    counts = [8, 3, 11, 8, 0, 5, 9]
    for slots in (1, 3, 4, 7):
        plans = plan_epoch(counts, slots, batch_size=2, seed=1, epoch=5, shuffle=True)
        sizes = [p.stop - p.start for p in plans]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == sum(counts)
        assert [p.start for p in plans[1:]] == [p.stop for p in plans[:-1]]
        assert len({p.quota for p in plans}) == 1 and plans[0].quota == min(sizes) // 2
    a = plan_epoch(counts, 4, 2, seed=1, epoch=0, shuffle=True)[0].order
    b = plan_epoch(counts, 4, 2, seed=1, epoch=1, shuffle=True)[0].order
    assert sorted(a) == list(range(7)) and a != b  # reshuffled per epoch
    assert plan_epoch(counts, 4, 2, seed=1, epoch=0, shuffle=True, num_samples=80)[0].quota == 10


def test_two_ranks_two_workers_seven_shards_read_every_record_once_and_resume_exactly(tmp_path, write_shards):
    good = write_shards(tmp_path / "s", 7, 8)
    pattern = tmp_path / "s" / "{00000..00006}.tar"
    assert classify(str(pattern)) == "stream" and len(expand_shards(str(pattern))) == 7
    seen = []
    for rank in range(2):
        keys, _, _, _ = _epoch([pattern], rank, 2, 2, batch=2, epoch=3)
        assert len(keys) == 14  # 56 records / 4 slots = 14 each = 7 batches of 2 per worker
        seen += [k for batch in keys for k in batch]
    assert len(seen) == len(set(seen)) and set(seen) == set(good)

    # Stopped after 5 batches (worker 0 had given 3, worker 1 two), resumed from the slot states:
    # the same batches, pixel for pixel, in the same order.
    full, _, full_pixels, _ = _epoch([pattern], 1, 2, 2, batch=2, epoch=3)
    head, states, head_pixels, _ = _epoch([pattern], 1, 2, 2, batch=2, epoch=3, stop=5)
    tail, _, tail_pixels, _ = _epoch([pattern], 1, 2, 2, batch=2, epoch=3, states=states, done=5)
    assert set(states) == {2, 3}  # rank 1's slots
    assert head + tail == full
    assert all(torch.equal(a, b) for a, b in zip(full_pixels, head_pixels + tail_pixels))


def test_bad_records_are_skipped_counted_per_shard_and_the_quota_refilled(tmp_path, write_shards):
    bad = {(0, 1): "corrupt", (0, 4): "empty_caption", (1, 2): "no_image"}
    good = write_shards(tmp_path / "s", 2, 6, bad=bad)
    # 3 bad of this 12-record source: above 1%, judged at its end; told to train on anyway.
    keys, _, _, extra = _epoch([tmp_path / "s"], 0, 1, 0, batch=3, max_bad_fraction=0.5)
    flat = [k for b in keys for k in b]
    assert len(flat) == 12  # 12 records (stats count them all) -> 4 batches of 3
    skipped = Counter()
    for e in extra:
        skipped.update(e["_skipped"])
    s0, s1 = str(tmp_path / "s" / "00000.tar"), str(tmp_path / "s" / "00001.tar")
    assert skipped == {(s0, "undecodable image"): 1, (s0, "empty caption"): 1, (s1, "no image in sample"): 1}
    # Every good record once, then 3 repeats from the start of the slot's range to fill the quota.
    assert set(flat) == set(good) and len(set(flat)) == 9
    assert sum(e["_repeats"] for e in extra) == 3


def test_a_small_source_is_judged_at_its_end_and_a_broken_shard_is_read_once_per_epoch(tmp_path, write_shards,
                                                                                      monkeypatch):
    import data.shards as S
    write_shards(tmp_path / "s", 2, 6, size=4)
    tar = tmp_path / "s" / "00001.tar"
    with tarfile.open(tar) as t:  # cut after the first sample's members: 1 record readable, then damage
        third = t.getmembers()[2]
        end = third.offset_data + -(-third.size // 512) * 512
    tar.write_bytes(tar.read_bytes()[:end] + b"\x00broken" * 64)
    opened = Counter()
    real = S._tar_records

    def counting(url):
        opened[url] += 1
        return real(url)

    monkeypatch.setattr(S, "_tar_records", counting)
    # 5 of the 12 records of this source are unreadable: fewer than BAD_CHECK_AFTER records, so judged at its end.
    loader = _stream([tmp_path / "s"], shuffle=False).make_loader(3, _collate, 0, 0, 1)
    loader.set_epoch(0)
    failure = next(b["_failure"] for b in loader if "_failure" in b)
    assert f"train_file entry '{tmp_path / 's'}': 5 of the first 12 records read were bad" in failure
    # Told to train on, the slot goes round its range again for its quota (7 good of 12): the
    # damaged shard is opened on the first pass only.
    opened.clear()
    keys, _, _, extra = _epoch([tmp_path / "s"], 0, 1, 0, batch=3, max_bad_fraction=0.5, shuffle=False)
    assert sum(len(b) for b in keys) == 12 and sum(e["_repeats"] for e in extra) == 5
    assert opened[str(tar)] == 1 and opened[str(tmp_path / "s" / "00000.tar")] == 2


def test_max_bad_fraction_stops_with_the_source_named(tmp_path, write_shards):
    n = BAD_CHECK_AFTER + 50
    write_shards(tmp_path / "s", 1, n, bad={(0, i): "corrupt" for i in range(0, n, 10)}, size=4)  # 10% bad
    loader = _stream([tmp_path / "s" / "00000.tar"], shuffle_buffer=100).make_loader(8, _collate, 0, 0, 1)
    loader.set_epoch(0)
    failure = next(b["_failure"] for b in loader if "_failure" in b)
    assert f"train_file entry '{tmp_path / 's' / '00000.tar'}'" in failure
    assert "max_bad_fraction 0.01" in failure and "10.0%" in failure
    # Raised, with that message, by the trainer before the batch is used.
    from utils.engine import Trainer
    with pytest.raises(DataError, match="max_bad_fraction"):
        Trainer._stream_batch(None, {"_failure": failure}, 0)
    # 20% tolerated: the whole epoch runs.
    loader = _stream([tmp_path / "s" / "00000.tar"], shuffle_buffer=100, max_bad_fraction=0.2).make_loader(
        64, _collate, 0, 0, 1)
    loader.set_epoch(0)
    assert sum(1 for b in loader if "_failure" not in b) == len(loader) == n // 64


def test_lists_and_shards_mix_and_parquet_and_pipe_urls_are_read(tmp_path, write_shards, synthetic_small):
    from data.pretrain import PretrainDataset
    good = write_shards(tmp_path / "s", 2, 4)
    # A pipe: URL (an object store's CLI) gets its counts from the _stats.json through the same opener.
    pipe = f"pipe:cat {tmp_path / 's' / '{00000..00001}.tar'}"
    assert [s.count for s in expand_shards(pipe)] == [4, 4]
    # A parquet shard with the image bytes in a column, failed rows skipped up front.
    import pyarrow as pa
    import pyarrow.parquet as pq
    from data.utils import read_json
    train = synthetic_small / "retrieval" / "annotation" / "synthetic_train.json"
    entries = read_json(train)[:6]
    images = synthetic_small / "retrieval" / "images"
    rows = {"key": [f"p{i}" for i in range(7)], "caption": [e["caption"] for e in entries] + ["x"],
            "jpg": [(images / e["image"]).read_bytes() for e in entries] + [None],
            "status": ["success"] * 6 + ["failed_to_download"]}
    pq.write_table(pa.table(rows), tmp_path / "p.parquet")
    (shard,) = expand_shards(str(tmp_path / "p.parquet"))
    assert shard.count == 6 and shard.skipped_up_front == {"failed download (status)": 1}

    def lists(names):
        return PretrainDataset(names, str(images), T.ToTensor(), max_words=30)
    stream = _stream([pipe, tmp_path / "p.parquet", train], list_builder=lists)
    assert stream.total == 8 + 6 + len(lists([train]))
    loader = stream.make_loader(2, _collate, 0, 0, 1)
    loader.set_epoch(0)
    seen = [k for b in loader for k in b["_keys"]]
    assert len(seen) == len(set(seen)) == stream.total - stream.total % 2
    assert {k.split("/")[-1] for k in seen if k.startswith("pipe:")} == {g.split("/")[-1] for g in good}
    assert {k for k in seen if ".parquet/" in k} == {f"{tmp_path / 'p.parquet'}/p{i}" for i in range(6)}
    assert sum(1 for k in seen if k.startswith(str(train))) >= len(lists([train])) - 1
    assert stream.skipped_up_front == {str(tmp_path / "p.parquet"): {"failed download (status)": 1}}


def test_missing_shards_and_metadata_parquets_are_clear_errors(tmp_path, write_shards):
    with pytest.raises(DataError, match=r"2 of its 2 shards do not exist: .*00008.tar, .*00009.tar"):
        expand_shards(str(tmp_path / "{00008..00009}.tar"))
    write_shards(tmp_path / "s", 1, 2)
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"key": ["a"], "status": ["success"]}), tmp_path / "s" / "meta.parquet")
    with pytest.raises(DataError, match="has no image column .* not a shard"):
        expand_shards(str(tmp_path / "s" / "meta.parquet"))
    with pytest.raises(DataError, match="no record count for shard pipe:false"):
        expand_shards("pipe:false 00000.tar")


def _pretrain_config(make, tmp_path: Path, data: Path, train_file: str, **overrides) -> Path:
    settings = dict(dataset=None, ann_root=None, val_file=None, test_file=None, k_test=None, batch_size_test=None,
                    train_file=train_file, alpha=0.4, batch_size_train=2, queue_size=16, max_epoch=1,
                    log_sample_keys="true")
    settings.update(overrides)
    return make(tmp_path, data, **settings)


def _lines(path: Path):
    return [line.split(" ", 2) for line in path.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.dist
def test_torchrun_two_ranks_two_workers_epoch_and_sigkill_resume(tmp_path, write_shards, synthetic_small,
                                                                 tiny_train_config, run_torchrun, kill_at_step):
    """2 ranks x 2 workers over 7 shards of pretrain_blip.py: every key once per epoch; killed
    mid-epoch and resumed: the remaining keys only, and the same losses as the straight run."""
    good = write_shards(tmp_path / "s", 7, 24)  # 168 records: 4 slots x 21 batches of 2
    pattern = tmp_path / "s" / "{00000..00006}.tar"
    cfg = _pretrain_config(tiny_train_config, tmp_path, synthetic_small, f"['{pattern}']",  # quoted: YAML
                           num_workers=2, ckpt_every_steps=3)                               # reads {..} as a map
    straight = tmp_path / "straight"
    run_torchrun("pretrain_blip.py", ["--config", cfg, "--output_dir", straight, "--no_progress"])
    keys = [k for r in (0, 1) for _, _, k in _lines(straight / f"samples_rank{r}.txt")]
    assert len(keys) == len(set(keys)) == 168 and set(keys) == set(good)
    record = json.loads((straight / "log.txt").read_text())
    assert record["data_samples"] == 168 and record["data_skipped"] == 0 and record["data_repeats"] == 0

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_port()}", REPO / "pretrain_blip.py", "--config", cfg, "--output_dir", killed,
           "--no_progress"]
    kill_at_step(cmd, killed / "checkpoint_last.pth", 6)  # 42 steps per epoch
    step = torch.load(killed / "checkpoint_last.pth", weights_only=True)["loop"]["step"]
    assert 6 <= step < 42
    before = {r: len(_lines(killed / f"samples_rank{r}.txt")) for r in (0, 1)}
    run_torchrun("pretrain_blip.py", ["--config", cfg, "--output_dir", killed, "--no_progress", "--resume", "auto"])
    kept, resumed = [], []
    for r in (0, 1):
        lines = _lines(killed / f"samples_rank{r}.txt")
        kept += [k for _, s, k in lines[:before[r]] if int(s) < step]   # trained into the checkpoint
        resumed += [k for _, _, k in lines[before[r]:]]
        # Rank r's resumed batches are the straight run's from that step on.
        assert [k for _, _, k in lines[before[r]:]] == \
            [k for _, s, k in _lines(straight / f"samples_rank{r}.txt") if int(s) >= step]
    assert not set(kept) & set(resumed) and len(kept) + len(resumed) == 168 and set(kept + resumed) == set(good)
    # The same training: weights bit for bit; the epoch means up to the order of the float sums.
    a, b = json.loads((killed / "log.txt").read_text()), record
    assert {k: v for k, v in a.items() if k.startswith("data_")} == {k: v for k, v in b.items() if k.startswith("data_")}
    assert {k: pytest.approx(v, rel=1e-6) for k, v in a.items() if k.startswith("train_")} == \
        {k: v for k, v in b.items() if k.startswith("train_")}
    wa = torch.load(killed / "checkpoint_last.pth", weights_only=True)["model"]
    wb = torch.load(straight / "checkpoint_last.pth", weights_only=True)["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_retrieval_and_caption_train_splits_stream_from_shards(tmp_path, write_shards, synthetic_small,
                                                               tiny_train_config, run_script):
    write_shards(tmp_path / "s", 2, 8)
    cfg = tiny_train_config(tmp_path, synthetic_small, train_file=f"[{tmp_path / 's'}]", val_file=None,
                            batch_size_train=4, max_epoch=1, log_sample_keys="true")
    run_script("train_retrieval.py", ["--config", cfg, "--output_dir", tmp_path / "ret", "--no_progress"])
    record = json.loads((tmp_path / "ret" / "log.txt").read_text())
    assert record["data_samples"] == 16 and "test_r_mean" in record
    assert len({k for _, _, k in _lines(tmp_path / "ret" / "samples_rank0.txt")}) == 16
    run_script("train_caption.py", ["--config", REPO / "configs" / "caption_coco.yaml", "--dry_run",
                                    "--output_dir", tmp_path / "cap", "--opts", f"train_file=[{tmp_path / 's'}]",
                                    "dataset=custom", f"test_file={synthetic_small / 'retrieval' / 'annotation' / 'synthetic_test.json'}",
                                    f"image_root={synthetic_small / 'retrieval' / 'images'}",
                                    f"tokenizer={synthetic_small / 'tokenizer'}", f"med_config={tmp_path / 'med_tiny.json'}",
                                    "vit={width: 32, depth: 1, heads: 2, patch_size: 16}", "image_size=32",
                                    "pretrained=''", "num_workers=0", "device=cpu", "batch_size_train=4"])
    assert json.loads((tmp_path / "cap" / "dry_run.json").read_text())["losses"]["loss"] > 0


@pytest.mark.slow
@pytest.mark.dist
def test_two_nodes_with_node_local_output_dirs_write_on_node0_only_and_resume(tmp_path, write_shards,
                                                                              synthetic_small, tiny_train_config):
    """Two torchrun "nodes" (1 process each, one rendezvous) on shards, each with its own output_dir
    as on node-local disks: node 1 writes nothing; --resume auto continues from node 0's checkpoint
    (rank 0 sends it to rank 1)."""
    import subprocess
    write_shards(tmp_path / "s", 4, 8)
    cfg = _pretrain_config(tiny_train_config, tmp_path, synthetic_small, f"['{tmp_path / 's'}']")
    port = _port()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def launch(*extra):
        """Both nodes' torchrun at once (forked from this process, tests/scripts/forked.py)."""
        runs = []
        for node in (0, 1):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                   f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}",
                   str(REPO / "pretrain_blip.py"), "--config", str(cfg), "--output_dir", str(tmp_path / f"node{node}"),
                   "--no_progress", *extra]
            logs = [tmp_path / f"launch{len(list(tmp_path.glob('launch*')))}.{s}" for s in ("out", "err")]
            if forked.use_subprocess():
                with open(logs[0], "w") as out, open(logs[1], "w") as err:
                    proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, env=env)
                runs.append((logs, proc.wait))
            else:
                pid = forked.start(*forked.split_cmd(cmd), env, cwd=REPO, stdout_path=logs[0], stderr_path=logs[1])
                runs.append((logs, lambda pid=pid: forked.wait(pid, timeout=600)))
        codes = [wait() for _, wait in runs]
        outs = ["".join(log.read_text() for log in logs) for logs, _ in runs]
        assert codes == [0, 0], "\n".join(o[-3000:] for o in outs)
        return outs

    launch("--opts", "log_sample_keys=false")
    assert not (tmp_path / "node1").exists()  # rank 0 writes; rank 1 on "node 1" writes nothing
    assert {p.name for p in (tmp_path / "node0").iterdir()} >= {"checkpoint_last.pth", "log.txt", "run.log",
                                                                 "config.yaml"}
    outs = launch("--resume", "auto", "--opts", "log_sample_keys=false", "max_epoch=2")
    assert "rank 0 sends its checkpoint" in outs[0]
    records = [json.loads(line) for line in (tmp_path / "node0" / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1] and records[1]["data_samples"] == 32
    assert not (tmp_path / "node1").exists()


def test_train_num_samples_sets_the_epoch_and_a_longer_epoch_goes_round_the_range(tmp_path, write_shards):
    good = write_shards(tmp_path / "s", 2, 6)
    short, _, _, extra = _epoch([tmp_path / "s"], 0, 1, 2, batch=2, num_samples=8)
    assert len(short) == 4 and sum(e["_repeats"] for e in extra) == 0  # 8 of the 12 records
    long, _, _, extra = _epoch([tmp_path / "s"], 0, 1, 2, batch=2, num_samples=20)
    flat = [k for b in long for k in b]
    # 2 slots of 6 records; 5 batches of 2 each: every record once, then 4 more from the range's start.
    assert len(flat) == 20 and set(flat) == set(good) and sum(e["_repeats"] for e in extra) == 8
