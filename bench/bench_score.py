"""Speed of pair scoring (`python -m tools score`): image loading vs. the model, separately.

    python -m bench.bench_score --device cuda --precision bf16            # ViT-B/16 384 px + BERT-base
    python -m bench.bench_score --device cpu --vit small --n_images 50    # a quick look on a laptop

Generates the synthetic benchmark at the model's resolution (``--n_images`` train images, 3 captions
each) in ``--work``, loads every batch once through ``PairBatches`` (decode + resize, each distinct
image of a batch once), then times ``score_batch`` (ITC + ITM) on the loaded batches. Random weights:
speed does not depend on them.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from data.pairs import PairBatches, read_pairs
from data.synthetic import generate
from data.transforms import build_test_transform
from tasks.retrieval import RetrievalConfig
from tools.common import batches_of, inference_model
from tools.score_pairs import score_batch
from utils.config import load_config

SIZES = {"base": ["vit=base", "image_size=384", "med_config=configs/med_config.json"],
         "small": ["vit={width: 64, depth: 2, heads: 4, patch_size: 16}", "image_size=64",
                   "med_config=configs/demo/med_config_tiny.json", "embed_dim=64"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--vit", default="base", choices=sorted(SIZES))
    ap.add_argument("--n_images", type=int, default=1000)
    ap.add_argument("--batch_size", type=int, default=128)
    ap.add_argument("--num_workers", type=int, default=8)
    ap.add_argument("--work", default="/tmp/bench_score")
    args = ap.parse_args()

    opts = SIZES[args.vit]
    size = int(next(o for o in opts if o.startswith("image_size="))[len("image_size="):])
    data = Path(args.work) / f"synthetic_{size}"
    generate(data, seed=0, n_train=args.n_images, n_val=10, n_test=10, image_size=size)
    cfg, _ = load_config(None, RetrievalConfig, opts + [
        "pretrained=", f"tokenizer={data / 'tokenizer'}", f"image_root={data / 'retrieval' / 'images'}",
        f"device={args.device}", f"precision={args.precision}", f"batch_size_test={args.batch_size}"])
    device = torch.device(args.device)
    table = read_pairs(data / "retrieval" / "annotation" / "synthetic_train.json")
    dataset = PairBatches(table, batches_of(list(range(len(table))), args.batch_size), cfg.image_root,
                          build_test_transform(cfg.image_size), cfg.max_words)
    t = time.perf_counter()
    batches = list(DataLoader(dataset, batch_size=None, num_workers=args.num_workers))
    t_load = time.perf_counter() - t

    model, tokenizer = inference_model(cfg, device)
    score_batch(model, tokenizer, batches[0], ("itc", "itm"), cfg, device)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for batch in batches:
        score_batch(model, tokenizer, batch, ("itc", "itm"), cfg, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_model = time.perf_counter() - t
    n, decodes = len(table), sum(b["pixel_values"].shape[0] for b in batches)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, vit {args.vit} {size} px, {args.precision}, batch {args.batch_size}: {n} pairs, {decodes} image "
          f"decodes | loading ({args.num_workers} workers) {t_load:.1f} s = {n / t_load:.0f} pairs/s | "
          f"ITC+ITM model {t_model:.1f} s = {n / t_model:.0f} pairs/s")


if __name__ == "__main__":
    main()
