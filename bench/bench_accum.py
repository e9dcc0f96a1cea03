"""One optimiser step of BLIP retrieval training (ITC with momentum encoders and queue, ITM with hard
negatives, AdamW) three ways, at the mid size of bench_eval.py by default:

- ``batch``: one batch of k x B;
- ``naive``: ``grad_accum_steps: k``, k batches of B (each its own ITC, momentum update, enqueue);
- ``cached``: ``accum_freq: k``, k micro-batches of B as one virtual batch of kB (models/accum.py).

    python -m bench.bench_accum [--k 4 --micro 8 --steps 2 --precision fp32|bf16 --device cpu]

Each variant runs in its own process, so the peak memory (``torch.cuda.max_memory_allocated`` on
CUDA, the process's peak resident set size on CPU, which includes the runtime itself) is its own.
Results: printed, and ``bench/results/bench_accum_<device>.json``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch


def run_variant(args) -> dict:
    from bench.bench_eval import build, captions
    from bench.bench_train import timed_steps
    from models.accum import feature_cached_step
    from models.blip import ITCSettings
    from utils.precision import autocast

    device = torch.device(args.device)
    torch.manual_seed(0)
    n = args.k * args.micro
    model = build(args.width, args.depth, args.image_size, itc=ITCSettings(queue_size=4 * n)).to(device).train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5, weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    ids, mask = captions(n, 30524, False, g)
    pixels = torch.randn(n, 3, args.image_size, args.image_size, generator=g)
    idx = torch.arange(n)
    data = [t.to(device) for t in (pixels, ids, mask, idx)]
    micro = [{"pixel_values": data[0][m * args.micro:(m + 1) * args.micro],
              "input_ids": data[1][m * args.micro:(m + 1) * args.micro],
              "attention_mask": data[2][m * args.micro:(m + 1) * args.micro],
              "idx": data[3][m * args.micro:(m + 1) * args.micro]} for m in range(args.k)]
    gen = torch.Generator(device=device).manual_seed(0)

    def step():
        with autocast(device, args.precision):
            if args.variant == "batch":
                losses = model(*data[:3], data[3], alpha=0.4, generator=gen)
                (losses["loss_ita"] + losses["loss_itm"]).backward()
            elif args.variant == "naive":
                for b in micro:
                    losses = model(b["pixel_values"], b["input_ids"], b["attention_mask"], b["idx"], alpha=0.4,
                                   generator=gen)
                    ((losses["loss_ita"] + losses["loss_itm"]) / args.k).backward()
            else:
                feature_cached_step(model, micro, 0.4, gen, lambda loss: loss.backward())
        opt.step()
        opt.zero_grad(set_to_none=True)

    step_s, peak = timed_steps(step, args.warmup, args.steps, device)
    return {"variant": args.variant, "step_s": round(step_s, 3), "samples_per_s": round(n / step_s, 2),
            "peak_memory_gib": round(peak / 2**30, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=4, help="micro-batches per optimiser step")
    p.add_argument("--micro", type=int, default=8, help="pairs per micro-batch")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variant", default=None, choices=["batch", "naive", "cached"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    rows = []
    for variant in ("batch", "naive", "cached"):
        cmd = [sys.executable, "-m", "bench.bench_accum", *sys.argv[1:], "--variant", variant]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
        print(rows[-1], flush=True)
    by = {r["variant"]: r for r in rows}
    result = {"device": args.device, "threads": torch.get_num_threads(), "precision": args.precision, "k": args.k,
              "micro": args.micro, "width": args.width, "depth": args.depth, "image_size": args.image_size,
              "rows": rows, "cached_over_naive_time": round(by["cached"]["step_s"] / by["naive"]["step_s"], 3)}
    out = Path("bench/results") / f"bench_accum_{torch.device(args.device).type}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
