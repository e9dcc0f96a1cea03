"""ContextBLIP pretraining step time: our batched visible-patch encoding vs. the release's per-patch
re-embedding.

The TMIM branch encodes only the visible patches with the frozen ViT. Ours embeds the image once
and gathers the kept tokens (one batched pass, MAE-style: ``BlipViT.embed_visible``); the release
cuts every kept patch out and embeds it on its own (``models.tmim.embed_visible_per_patch``, one
conv call per patch). Both then run the ViT blocks on the same tokens, so the losses agree
(printed). Times a full training step (forward, backward, AdamW) of the same random model at two
sizes:

- demo: ViT 64 x 2 at 64 px (16 patches), text 64 x 2, batch 64 (configs/demo/pretrain.yaml);
- mid:  ViT 384 x 6 at 224 px (196 patches), text 384 x 6, batch 16.

    python -m bench.bench_pretrain [--sizes demo,mid --steps 3 --mask_rate 0.25]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bench.bench_eval import _Tok, captions
from models.factory import build_model
from models.tmim import embed_visible_per_patch
from tasks.contextblip_pretrain import PretrainConfig
from utils.config import load_config
from utils.precision import autocast

SIZES = {  # width, depth, image size, batch, decoder depth, decoder heads
    "demo": (64, 2, 64, 64, 2, 4),
    "mid": (384, 6, 224, 16, 4, 8),
}


def build(size: str, mask_rate: float, vocab: int = 30524):
    width, depth, image_size, batch, dec_depth, dec_heads = SIZES[size]
    with tempfile.TemporaryDirectory() as tmp:
        med = Path(tmp) / "med.json"
        med.write_text(json.dumps({"vocab_size": vocab, "hidden_size": width, "num_hidden_layers": depth,
                                   "num_attention_heads": max(1, width // 64), "intermediate_size": 4 * width,
                                   "encoder_width": width}))
        cfg, _ = load_config(None, PretrainConfig, [
            f"vit={{width: {width}, depth: {depth}, heads: {max(1, width // 64)}, patch_size: 16}}",
            f"image_size={image_size}", f"med_config={med}", "train_file=unused.json",
            f"decoder_depth={dec_depth}", f"decoder_heads={dec_heads}", f"mask_rate={mask_rate}"])
        model = build_model(cfg, "contextblip_pretrain", _Tok(range(vocab)))  # with the TMIM decoder
    return model, batch, image_size


def time_steps(model, batch, steps: int, warmup: int, precision: str, device) -> tuple[float, float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)
    times, losses = [], []
    for step in range(warmup + steps):
        gen = torch.Generator(device=device).manual_seed(step)  # the same masks for both methods
        t0 = time.perf_counter()
        with autocast(device, precision):
            out = model(*batch, generator=gen)
        total = sum(out.values())
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
            losses.append(total.item())
    return sum(times) / len(times), losses[0]


@torch.no_grad()
def time_embedding(vit, pixels: torch.Tensor, args) -> float:
    """Seconds for the visible-patch embedding alone (no blocks), mean over ``args.steps`` calls."""
    N = vit.num_patches
    keep = torch.rand(pixels.shape[0], N, device=pixels.device).argsort(1)[:, :N - int(args.mask_rate * N)]
    keep = keep.sort(1).values
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        vit.embed_visible(pixels, keep)
        if pixels.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return sum(times) / len(times)


def bench_size(size: str, args, device) -> dict:
    result = {"size": size}
    for method in ("batched", "per_patch"):
        torch.manual_seed(0)
        model, B, image_size = build(size, args.mask_rate)
        model = model.to(device).train()
        if method == "per_patch":
            vit = model.vit
            vit.embed_visible = lambda px, keep, vit=vit: embed_visible_per_patch(vit, px, keep)
        g = torch.Generator().manual_seed(0)
        ids, mask = captions(B, 30524, False, g)
        pixels = torch.randn(B, 3, image_size, image_size, generator=g)
        batch = [t.to(device) for t in (pixels, ids, mask, torch.arange(B))]
        step_s, loss = time_steps(model, batch, args.steps, args.warmup, args.precision, device)
        result[f"{method}_step_s"] = round(step_s, 4)
        result[f"{method}_embed_ms"] = round(1000 * time_embedding(model.vit, pixels.to(device), args), 2)
        result[f"{method}_first_loss"] = round(loss, 6)
    result["speedup"] = round(result["per_patch_step_s"] / result["batched_step_s"], 2)
    result["embed_speedup"] = round(result["per_patch_embed_ms"] / result["batched_embed_ms"], 1)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="demo,mid")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--mask_rate", type=float, default=0.25)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    for size in args.sizes.split(","):
        res = bench_size(size.strip(), args, device)
        print(json.dumps({"device": str(device), "threads": torch.get_num_threads(), "precision": args.precision,
                          "mask_rate": args.mask_rate, **res}))


if __name__ == "__main__":
    main()
