"""Training-step throughput and peak memory of BLIP retrieval fine-tuning (ITC + ITM, momentum
encoders, queue, hard negatives), at the mid size of bench_eval.py by default:

    python -m bench.bench_train [--batch 16 --steps 5 --precision fp32|bf16 --grad_ckpt 0 --compile]

FLOPs are counted (``torch.utils.flop_counter`` over one step: every matmul, convolution and
attention product that ran, forward and backward), not estimated; ``achieved_tflops`` is that count
over the mean step time and ``mfu`` its share of the device's dense peak for the precision
(``--peak_tflops``, or the datasheet figure of a known GPU: H100/H200 SXM fp32 67, bf16/fp16 989;
fp32 matmuls run in full fp32, torch's default, not TF32).

Peak memory is torch.cuda.max_memory_allocated on CUDA, and the process's peak resident set size on
CPU (which includes the Python/torch runtime itself).
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from torch.utils.flop_counter import FlopCounterMode

from bench.bench_eval import build, captions
from models.blip import ITCSettings
from utils.compile import compile_regions
from utils.precision import autocast

# Dense datasheet peaks, TFLOP/s (SXM parts; no sparsity).
PEAK_TFLOPS = {"H100": {"fp32": 67.0, "bf16": 989.4, "fp16": 989.4},
               "H200": {"fp32": 67.0, "bf16": 989.4, "fp16": 989.4},
               "A100": {"fp32": 19.5, "bf16": 312.0, "fp16": 312.0}}


def peak_tflops(device: torch.device, precision: str, given=None):
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v[precision] for k, v in PEAK_TFLOPS.items() if k in name), None)


def timed_steps(step, warmup: int, steps: int, device: torch.device) -> tuple:
    """(mean seconds of ``step()`` after ``warmup`` calls, peak memory in bytes:
    ``torch.cuda.max_memory_allocated`` on CUDA, the process's peak resident set size on CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return sum(times) / len(times), peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--grad_ckpt", type=int, default=0, help="checkpoint the last N ViT blocks")
    p.add_argument("--compile", action="store_true", help="compile: true (utils/compile.py) before the warm-up")
    p.add_argument("--peak_tflops", type=float, default=None, help="the device's dense peak for --precision")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    # Momentum encoders and a short ITC queue: 4 batches.
    model = build(args.width, args.depth, args.image_size, itc=ITCSettings(queue_size=4 * args.batch))
    model = model.to(device).train()
    model.visual_encoder.ckpt_layer = args.grad_ckpt
    compile_s = None
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5, weight_decay=0.05)
    scaler = torch.amp.GradScaler("cuda", enabled=args.precision == "fp16")
    g = torch.Generator().manual_seed(0)
    ids, mask = captions(args.batch, 30524, False, g)
    pixels = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g)
    batch = [t.to(device) for t in (pixels, ids, mask, torch.arange(args.batch))]
    gen = torch.Generator(device=device).manual_seed(0)

    def step():
        with autocast(device, args.precision):
            losses = model(*batch[:3], batch[3], alpha=0.4, generator=gen)
        scaler.scale(losses["loss_ita"] + losses["loss_itm"]).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    # One eager step under the FLOP counter: what the step computes (compiling changes how, not what).
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    if args.compile:  # the first steps compile (forward and backward graphs)
        compile_regions(model)
        t0 = time.perf_counter()
        step()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
    step_s, peak = timed_steps(step, args.warmup, args.steps, device)
    achieved = flops / step_s / 1e12
    peak_t = peak_tflops(device, args.precision, args.peak_tflops)
    print(json.dumps({"device": str(device), "threads": torch.get_num_threads(), "precision": args.precision,
                      "batch": args.batch, "width": args.width, "depth": args.depth, "image_size": args.image_size,
                      "grad_ckpt_blocks": args.grad_ckpt, "compile": args.compile,
                      "compile_s": None if compile_s is None else round(compile_s, 1), "step_s": round(step_s, 3),
                      "gflop_per_step": round(flops / 1e9, 1), "achieved_tflops": round(achieved, 3),
                      "peak_tflops": peak_t, "mfu": None if not peak_t else round(achieved / peak_t, 4),
                      "samples_per_s": round(args.batch / step_s, 2), "peak_memory_gib": round(peak / 2**30, 2)},
                     indent=1))


if __name__ == "__main__":
    main()
