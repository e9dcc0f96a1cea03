"""Where the retrieval training step's time goes: ``torch.profiler`` over one mid-size step (the
top ops by self time) and ``torch.utils.flop_counter`` over the same step (FLOPs per module,
forward and backward, counted from the ops that ran, not estimated):

    python -m bench.profile_train [--precision fp32|bf16] [--compile] [--top 15] [--out FILE.json]

The step is bench_train.py's at the size of ../perf (the side-by-side harness): ViT 384 x 6 at 224 px,
BERT 384 x 6, batch 16, ITC queue 57,600, captions of 8-24 tokens padded to 35 as BLIP's
``padding='max_length'`` gives them. ``achieved GFLOP/s`` = counted FLOPs / the step's wall time.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from bench.bench_eval import build, captions
from models.blip import ITCSettings
from utils.precision import autocast


def make_step(precision: str, compile_model: bool, batch: int = 16, queue: int = 57600):
    torch.manual_seed(0)
    model = build(384, 6, 224, itc=ITCSettings(queue_size=queue)).train()
    if compile_model:
        from utils.compile import compile_regions
        compile_regions(model)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5, weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    ids, mask = captions(batch, 30524, False, g)
    pixels = torch.randn(batch, 3, 224, 224, generator=g)
    gen = torch.Generator().manual_seed(0)
    device = torch.device("cpu")

    def step():
        with autocast(device, precision):
            losses = model(pixels, ids, mask, torch.arange(batch), alpha=0.4, generator=gen)
        loss = losses["loss_ita"] + losses["loss_itm"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return model, step


def module_flops(counter: FlopCounterMode, depth: int = 2) -> dict:
    """``{module path: GFLOPs}`` of the modules ``depth`` levels below the model (fwd + bwd)."""
    out = {}
    for name, ops in counter.get_flop_counts().items():
        if name == "Global" or name.count(".") != depth - 1:
            continue
        out[name] = round(sum(ops.values()) / 1e9, 2)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true", help="models.compile.compile_regions first")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=None, help="write the record as json here")
    args = p.parse_args()
    model, step = make_step(args.precision, args.compile)
    for _ in range(args.warmup):
        step()
    t0 = time.perf_counter()
    step()
    wall = time.perf_counter() - t0
    with FlopCounterMode(display=False, depth=3) as counter:
        step()
    total = counter.get_total_flops()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    rows = []
    self_total = 0.0
    grouped = defaultdict(lambda: [0.0, 0])
    for ev in prof.key_averages():
        grouped[ev.key][0] += ev.self_cpu_time_total
        grouped[ev.key][1] += ev.count
        self_total += ev.self_cpu_time_total
    for key, (us, n) in sorted(grouped.items(), key=lambda kv: -kv[1][0])[:args.top]:
        rows.append({"op": key, "self_ms": round(us / 1e3, 1), "share": round(us / self_total, 3), "calls": n})
    record = {"precision": args.precision, "compile": args.compile, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "step_s": round(wall, 3), "samples_per_s": round(16 / wall, 2),
              "gflop_per_step": round(total / 1e9, 1), "achieved_gflop_s": round(total / 1e9 / wall, 1),
              "profiled_self_ms": round(self_total / 1e3, 1), "top_ops": rows,
              "gflop_per_module": module_flops(counter)}
    print(f"step {wall:.3f} s ({16 / wall:.2f} samples/s), {total / 1e9:.1f} GFLOP counted, "
          f"{total / 1e9 / wall:.1f} GFLOP/s achieved")
    print("| op | self ms | share | calls |\n|---|---|---|---|")
    for r in rows:
        print(f"| `{r['op']}` | {r['self_ms']} | {100 * r['share']:.1f}% | {r['calls']} |")
    print("| module (fwd + bwd) | GFLOP |\n|---|---|")
    for name, gf in record["gflop_per_module"].items():
        print(f"| {name} | {gf} |")
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
