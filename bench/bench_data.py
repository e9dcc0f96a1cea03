"""Data-pipeline throughput per worker: decoded + augmented images/s from webdataset tar shards
(data/stream.py) vs. from loose image files listed in a json (data/pretrain.py), plus the rate at
which a resumed stream skips records (read, not decoded).

    python -m bench.bench_data [--n 1000 --image_size 384 --sizes 224,384]

Images are synthetic but photo-like in size and compression (500 x 375 JPEG, quality 90, smooth
shapes and noise: ~43 KB; a COCO picture averages ~160 KB, so real files decode slower), written once to ``--work``; every source is read
once before timing, so the figures are decode + augmentation (BLIP's train transform: random
resized crop, flip, RandAugment(2, 5)) + the reader's own overhead, with the files in the page
cache. One process, one thread per op (``torch.set_num_threads(1)``): one dataloader worker.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter


def synth_image(rng: np.random.Generator, w: int = 500, h: int = 375) -> Image.Image:
    base = np.linspace(rng.uniform(0, 255, 3), rng.uniform(0, 255, 3), w)[None].repeat(h, 0)
    img = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        box = [x0, y0, x0 + rng.integers(20, 200), y0 + rng.integers(20, 160)]
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(1.5))
    noise = rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8))


def write_sources(work: Path, n: int, per_shard: int) -> tuple[Path, Path, float]:
    """(pair list json, shard folder, mean JPEG size in KB)."""
    import webdataset as wds
    files, shards = work / "files", work / "shards"
    if (work / "done.json").is_file():
        return work / "pairs.json", shards, json.loads((work / "done.json").read_text())["kb"]
    files.mkdir(parents=True, exist_ok=True)
    shards.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pairs, sizes, writer = [], [], None
    for i in range(n):
        if i % per_shard == 0:
            if writer is not None:
                writer.close()
            s = i // per_shard
            writer = wds.TarWriter(str(shards / f"{s:05d}.tar"))
            count = min(per_shard, n - i)
            (shards / f"{s:05d}_stats.json").write_text(json.dumps({"count": count, "successes": count}))
        buf = io.BytesIO()
        synth_image(rng).save(buf, "JPEG", quality=90)
        data = buf.getvalue()
        sizes.append(len(data))
        caption = f"a synthetic photograph number {i} of some shapes"
        (files / f"{i:07d}.jpg").write_bytes(data)
        pairs.append({"image": str(files / f"{i:07d}.jpg"), "caption": caption})
        writer.write({"__key__": f"{i:07d}", "jpg": data, "txt": caption})
    writer.close()
    (work / "pairs.json").write_text(json.dumps(pairs))
    kb = float(np.mean(sizes)) / 1024
    (work / "done.json").write_text(json.dumps({"kb": kb}))
    return work / "pairs.json", shards, kb


def time_files(pairs: Path, transform, n: int) -> float:
    from data.pretrain import PretrainDataset
    ds = PretrainDataset([pairs], None, transform)
    order = np.random.default_rng(0).permutation(len(ds))[:n]
    t0 = time.perf_counter()
    for i in order:
        ds[int(i)]
    return n / (time.perf_counter() - t0)


def _stream(shards: Path, transform, buffer: int):
    from data.stream import build_stream
    stream = build_stream([str(shards)], transform, 30, list_builder=None, seed=0, shuffle=True,
                          shuffle_buffer=buffer, num_samples=None, max_bad_fraction=0.01)
    stream.configure(0, 1, 0, 1)
    return stream


def time_shards(shards: Path, transform, n: int, buffer: int) -> float:
    stream = _stream(shards, transform, buffer)
    t0 = time.perf_counter()
    k = 0
    for _ in stream:
        k += 1
        if k == n:
            break
    return k / (time.perf_counter() - t0)


def time_skip(shards: Path, n: int) -> float:
    """Records/s a resumed slot moves past (read from the tar, not decoded)."""
    from data.slots import _range_records
    stream = _stream(shards, None, 1000)
    plan = stream.plan(0)[0]
    t0 = time.perf_counter()
    k = sum(1 for _ in zip(range(n), _range_records(plan, stream.shards, 0)))
    return k / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000, help="images (each source is read once to warm, once timed)")
    p.add_argument("--per_shard", type=int, default=250)
    p.add_argument("--sizes", default="224,384", help="train image sizes")
    p.add_argument("--buffer", type=int, default=1000, help="shuffle_buffer of the stream")
    p.add_argument("--work", default="outputs/bench_data")
    p.add_argument("--out", default="bench/results/bench_data_cpu.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    from data.transforms import build_train_transform
    pairs, shards, kb = write_sources(Path(args.work), args.n, args.per_shard)
    results = {"n": args.n, "jpeg_kb": round(kb, 1), "cpu_count": os.cpu_count(), "torch": torch.__version__,
               "sizes": {}}
    for size in [int(s) for s in args.sizes.split(",")]:
        transform = build_train_transform(size, scale=(0.5, 1.0), hflip=True, randaug=True)
        time_files(pairs, transform, min(args.n, 100))  # warm the page cache and the code paths
        time_shards(shards, transform, min(args.n, 100), args.buffer)
        files_rate = time_files(pairs, transform, args.n)
        shard_rate = time_shards(shards, transform, args.n, args.buffer)
        results["sizes"][size] = {"files_images_per_s": round(files_rate, 1), "shards_images_per_s": round(shard_rate, 1)}
        print(f"{size} px: loose files {files_rate:.1f} images/s per worker, tar shards {shard_rate:.1f} images/s "
              f"per worker", flush=True)
    results["skip_records_per_s"] = round(time_skip(shards, args.n), 1)
    print(f"resume skip: {results['skip_records_per_s']:.0f} records/s (read, not decoded)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
