"""Evaluation speed: our image-major rerank vs. the original per-query algorithm.

Same random model, same random images and captions, same ITC top-k; prints both times, the ratio
and the largest score difference. Mid size by default (ViT 384 x 6 at 224 px, text 384 x 6,
200 images, 1,000 captions, k_test 32):

    python -m bench.bench_eval [--n_images 200 --n_texts 1000 --k_test 32 --width 384 --depth 6]

Captions get random lengths of 8-24 tokens (COCO's captions are ~10-15 words), padded to 35 as
BLIP's evaluation does; ``--fixed_length`` makes every caption 35 tokens long, which isolates the
gain of projecting each image's cross-attention keys/values once.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from models.blip import BlipArch, ITCSettings, build_blip_retrieval
from tasks.retrieval_eval import reference_rerank, rerank_itm, scores_from_itm, topk_pairs


class _Tok(list):
    """Just enough of a tokenizer for building the model (vocab size + [ENC] id)."""
    enc_token_id = 30523


def build(width: int, depth: int, image_size: int, vocab: int = 30524, itc: Optional[ITCSettings] = None):
    """A random BLIP (ViT and text encoder ``width`` x ``depth``, heads of 64) in eval mode; ``itc``
    adds the momentum encoders and queues (training), None builds the inference model."""
    with tempfile.TemporaryDirectory() as tmp:
        med = Path(tmp) / "med.json"
        med.write_text(json.dumps({"vocab_size": vocab, "hidden_size": width, "num_hidden_layers": depth,
                                   "num_attention_heads": width // 64, "intermediate_size": 4 * width,
                                   "encoder_width": width}))
        arch = BlipArch(vit={"width": width, "depth": depth, "heads": width // 64, "patch_size": 16},
                        image_size=image_size, med_config=str(med), embed_dim=256)
        return build_blip_retrieval(arch, _Tok(range(vocab)), itc=itc).eval()


def captions(n: int, vocab: int, fixed: bool, g: torch.Generator):
    ids = torch.zeros(n, 35, dtype=torch.long)
    mask = torch.zeros(n, 35, dtype=torch.long)
    lengths = torch.full((n,), 35) if fixed else torch.randint(8, 25, (n,), generator=g)
    for i, L in enumerate(lengths.tolist()):
        ids[i, 0], ids[i, L - 1] = 101, 102
        ids[i, 1:L - 1] = torch.randint(1000, vocab - 2, (L - 2,), generator=g)
        mask[i, :L] = 1
    return ids, mask


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n_images", type=int, default=200)
    p.add_argument("--n_texts", type=int, default=1000)
    p.add_argument("--k_test", type=int, default=32)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--rerank_batch_size", type=int, default=128)
    p.add_argument("--fixed_length", action="store_true")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="autocast of our rerank (the original loop always runs fp32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build(args.width, args.depth, args.image_size).to(device)
    g = torch.Generator().manual_seed(0)
    ids, mask = captions(args.n_texts, 30524, args.fixed_length, g)
    images = torch.randn(args.n_images, 3, args.image_size, args.image_size, generator=g)

    t0 = time.perf_counter()
    encoded = [model.encode_image(images[s:s + 32].to(device)) for s in range(0, len(images), 32)]
    tokens, image_feat = torch.cat([e[0] for e in encoded]), torch.cat([e[1] for e in encoded])
    text_feat = torch.cat([model.encode_text(ids[s:s + 128].to(device), mask[s:s + 128].to(device))[1]
                           for s in range(0, len(ids), 128)])
    sims = image_feat @ text_feat.t()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_features = time.perf_counter() - t0

    top_i2t, top_t2i = topk_pairs(sims, args.k_test)
    needed = torch.zeros_like(sims, dtype=torch.bool)
    needed.scatter_(1, top_i2t, True)
    needed.t().scatter_(1, top_t2i, True)
    t0 = time.perf_counter()
    itm = rerank_itm(model, tokens, 0, needed, ids.to(device), mask.to(device), device, args.rerank_batch_size,
                     precision=args.precision)
    ours_i2t, ours_t2i = scores_from_itm(sims, itm, top_i2t, top_t2i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_ours = time.perf_counter() - t0

    t0 = time.perf_counter()
    ref_i2t, ref_t2i = reference_rerank(model, tokens, ids.to(device), mask.to(device), sims, args.k_test)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_ref = time.perf_counter() - t0

    diff = max((ours_i2t - ref_i2t.to(device)).abs().max().item(), (ours_t2i - ref_t2i.to(device)).abs().max().item())
    result = {
        "device": str(device), "threads": torch.get_num_threads(), "n_images": args.n_images, "n_texts": args.n_texts,
        "k_test": args.k_test, "width": args.width, "depth": args.depth, "image_size": args.image_size,
        "fixed_length": args.fixed_length, "precision_ours": args.precision, "pairs_scored_ours": int(needed.sum()),
        "pairs_scored_original": top_i2t.numel() + top_t2i.numel(),
        "features_s": round(t_features, 2), "rerank_ours_s": round(t_ours, 2), "rerank_original_s": round(t_ref, 2),
        "rerank_speedup": round(t_ref / t_ours, 2),
        "end_to_end_speedup": round((t_features + t_ref) / (t_features + t_ours), 2),
        "max_abs_score_diff": diff,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
