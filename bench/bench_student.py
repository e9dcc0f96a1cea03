"""Teacher vs. DLIP student: retrieval evaluation and captioning throughput, parameter counts.

Two random-weight models at their real shapes, built through ``models/factory.py`` (``build_model``):

- **teacher**: BLIP base, ViT-B/16 (``vit: base``) + BERT-base (``configs/med_config.json``: 768 x 12);
- **student**: DLIP's, ViT-S/16 (``vit: small``: 384 x 12, 6 heads) + BERT-small
  (``configs/med_config_small.json``: 384 x 6, 12 heads, FFN 3072);

both at ``--image_size`` (384: the fine-tuning resolution of BLIP's and DLIP's recipes), on the same
random images and captions, on the same device, one after the other (never concurrently):

1. **retrieval evaluation**: ``tasks/retrieval_eval.py`` ``evaluate_retrieval``, the code path of
   ``train_retrieval.py --evaluate`` (image and text ITC features, top-``k_test`` by similarity in
   both directions, ITM rerank of the union of those pairs, image-major), on the inference model
   (``blip_inference``: no momentum encoders). Its parts are timed by wrapping the module's
   ``embed_images`` / ``embed_texts`` / ``rerank_itm`` (the same calls, a device sync around each):
   ``features`` = image + text features, ``rerank`` = ITM rerank. ``--captions_per_image`` captions
   (COCO/Flickr: 5) of 8-24 tokens (BLIP pads them to 35; the rerank cuts each batch to its longest).
2. **captioning**: ``BLIPCaptioner.generate_ids`` + ``decode`` in batches of ``--caption_batch_size``,
   as ``tasks/caption.py`` ``generate_captions`` runs them, with the caption configs' settings
   (``GenerationConfig``: 3 beams, max 20 tokens, min 5, prompt ``a picture of`` included).
3. **parameters**: whole BLIP (pretraining layout without momentum encoders: ViT + text encoder +
   decoder, what DLIP's paper counts), the retrieval model and the captioner, each split vision/text.

Each measurement is one warm-up run on the first ``--warmup_images`` images (same code path), then
one timed run under ``torch.inference_mode`` (``time.perf_counter``, CUDA synchronised).
Random weights: with BERT's 30,524-token vocabulary [SEP] is almost never drawn, so every caption
runs to max length for both models (the JSON's ``share_at_max_length`` shows it) and both decode the
same number of steps. Retrieval at small N: ``k_test`` is capped by N (128 texts per image, 128
images per text at most), so with 16 images *every* (image, caption) pair is reranked (80 per image)
for both models; on a real 1K test set it is ~750 pairs per image, so the rerank weighs more there.
The JSON gives ``rerank_pairs_per_s`` and an estimate for Flickr30k's 1K test (1,000 images, 5,000
captions, k 128, no overlap between directions: 768,000 pairs) from the measured rates.

    python -m bench.bench_student --quick                 # tiny shapes, 4 images: checks the script runs
    python -m bench.bench_student --device cpu            # 2 threads; ~3 min on a quiet 2-core machine
    python -m bench.bench_student --device cuda [--bf16]  # 256 retrieval / 128 caption images

Prints a markdown table (stdout; progress on stderr) and writes the JSON to ``--out``
(default ``bench/results/bench_student_<device>[_bf16|_quick].json``; ``--out ''``: none).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch.utils.data import Dataset

import tasks.retrieval_eval as retrieval_eval
from bench.bench_caption import caption_lengths, sync, write_vocab
from models.blip import BlipArch
from models.blip_pretrain import build_blip_pretrain
from models.caption import CaptionArch, GenerationConfig
from models.factory import build_model
from models.tokenizer import build_tokenizer
from utils.precision import autocast

REPO = Path(__file__).resolve().parents[1]
EMBED_DIM = 256
PROMPT = CaptionArch.model_fields["prompt"].default

# name -> (vit: preset or mapping, med config: a file, or a dict written to a temporary json)
MODELS = {
    "teacher": ("base", str(REPO / "configs/med_config.json")),
    "student": ("small", str(REPO / "configs/med_config_small.json")),
}
QUICK_MODELS = {  # tiny shapes of the same structure: only checks that the script runs
    "teacher": ({"width": 64, "depth": 2, "heads": 2, "patch_size": 16},
                {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 256}),
    "student": ({"width": 32, "depth": 2, "heads": 1, "patch_size": 16},
                {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 256}),
}
LABELS = {"teacher": "teacher (BLIP: ViT-B/16 + BERT-base)", "student": "student (DLIP: ViT-S/16 + BERT-small)"}
DLIP_CLAIM = ("DLIP's claim (docs/DLIP.md): the distilled student is about 4x faster than BLIP base at captioning "
              "and retrieval, and the replication calls it 10x smaller")
FLICKR_1K = (1000, 5000, 128)  # test images, captions, k_test: for the estimate in the JSON


# ---------------------------------------------------------------------- data

class RandomRetrievalSet(Dataset):
    """An evaluation dataset as ``evaluate_retrieval`` reads one: items ``(image, index)``, ``text``,
    ``img2txt``, ``txt2img`` (caption ``t`` belongs to image ``t // per_image``)."""

    def __init__(self, images: torch.Tensor, texts: List[str], per_image: int):
        self.images, self.text = images, texts
        self.img2txt = {i: list(range(i * per_image, (i + 1) * per_image)) for i in range(len(images))}
        self.txt2img = {t: t // per_image for t in range(len(texts))}

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], i


def random_captions(n: int, n_words: int, g: torch.Generator) -> List[str]:
    """``n`` captions of 8-24 tokens with [CLS]/[SEP] (6-22 filler words, one token each)."""
    lengths = torch.randint(8, 25, (n,), generator=g).tolist()
    return [" ".join(f"w{int(w)}" for w in torch.randint(0, n_words, (L - 2,), generator=g)) for L in lengths]


# ---------------------------------------------------------------------- models

def architectures(name: str, quick: bool, image_size: int, tmp: Path):
    """(BlipArch, CaptionArch) of ``name`` at ``image_size``."""
    vit, med = (QUICK_MODELS if quick else MODELS)[name]
    if isinstance(med, dict):
        path = tmp / f"med_{name}.json"
        path.write_text(json.dumps({"vocab_size": None, "encoder_width": vit["width"], "add_cross_attention": True,
                                    **med}))
        med = str(path)
    blip = BlipArch.model_validate({"vit": vit, "image_size": image_size, "med_config": med, "embed_dim": EMBED_DIM})
    caption = CaptionArch.model_validate({"vit": vit, "image_size": image_size, "med_config": med, "prompt": PROMPT})
    return blip, caption


def millions(module: torch.nn.Module) -> float:
    return round(sum(p.numel() for p in module.parameters()) / 1e6, 3)


def split(model: torch.nn.Module, text_part: Optional[str]) -> Dict[str, float]:
    total, vision = millions(model), millions(model.visual_encoder)
    out = {"total": total, "vision": vision}
    if text_part is None:
        out["text"] = round(total - vision, 3)
    else:
        out["text"] = millions(getattr(model, text_part))
        out["heads"] = round(total - vision - out["text"], 3)   # ITC projections, ITM head, temp
    return out


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------- timing

@contextmanager
def timed_parts(device: torch.device, parts: Dict[str, float]):
    """Wraps ``tasks.retrieval_eval``'s ``embed_images``/``embed_texts``/``rerank_itm`` (looked up as
    module globals by ``evaluate_retrieval``) so that each call adds its synchronised time to ``parts``."""
    names = ("embed_images", "embed_texts", "rerank_itm")
    originals = {n: getattr(retrieval_eval, n) for n in names}

    def wrap(name, fn):
        def run(*args, **kwargs):
            sync(device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(device)
            parts[name] = parts.get(name, 0.0) + time.perf_counter() - t0
            return out
        return run
    for n in names:
        setattr(retrieval_eval, n, wrap(n, originals[n]))
    try:
        yield
    finally:
        for n, fn in originals.items():
            setattr(retrieval_eval, n, fn)


def run_retrieval(model, dataset, tokenizer, args, device, precision: str) -> dict:
    """One ``evaluate_retrieval`` call: total seconds, its parts, the pairs reranked."""
    parts: Dict[str, float] = {}
    with timed_parts(device, parts), torch.inference_mode():
        sync(device)
        t0 = time.perf_counter()
        out = retrieval_eval.evaluate_retrieval(
            model, dataset, tokenizer, k_test=args.k_test, max_tokens=35, batch_size=args.batch_size,
            rerank_batch_size=args.rerank_batch_size, device=device, precision=precision, progress=False)
        sync(device)
        total = time.perf_counter() - t0
    pairs = int(((torch.from_numpy(out.score_i2t) != -100) | (torch.from_numpy(out.score_t2i).t() != -100)).sum())
    return {"total": total, "image_features": parts["embed_images"], "text_features": parts["embed_texts"],
            "rerank": parts["rerank_itm"], "pairs": pairs}


def run_captions(model, pixels: torch.Tensor, settings, args, device, precision: str):
    """Captions of ``pixels`` in batches, as ``generate_captions`` runs them: (seconds, ids, captions)."""
    ids_all, captions = [], []
    with torch.inference_mode():
        sync(device)
        t0 = time.perf_counter()
        for s in range(0, pixels.shape[0], args.caption_batch_size):
            with autocast(device, precision):
                ids = model.generate_ids(pixels[s:s + args.caption_batch_size].to(device), settings)
            captions.extend(model.decode(ids))
            ids_all.append(ids.cpu())
        sync(device)
        seconds = time.perf_counter() - t0
    return seconds, ids_all, captions


def peak_gib(device: torch.device) -> Optional[float]:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bench_model(name: str, args, device, tokenizer, tmp: Path, data: dict, precision: str) -> dict:
    blip_arch, caption_arch = architectures(name, args.quick, args.image_size, tmp)
    res: dict = {"vit": blip_arch.vit if isinstance(blip_arch.vit, str) else blip_arch.vit.model_dump(),
                 "med_config": Path(blip_arch.med_config).name if not args.quick else "quick"}

    # Parameters of the whole BLIP (encoder + decoder, DLIP's count), built on the CPU and dropped.
    torch.manual_seed(0)
    whole = build_blip_pretrain(blip_arch, tokenizer, itc=None)
    res["params_m"] = {"blip_whole": split(whole, None)}
    del whole
    free(device)

    # 1. Retrieval evaluation.
    torch.manual_seed(0)
    model = build_model(blip_arch, "blip_inference", tokenizer).to(device).eval()
    res["params_m"]["retrieval"] = split(model, "text_encoder")
    log(f"{name}: retrieval warm-up ({len(data['warm_retrieval'])} images)")
    run_retrieval(model, data["warm_retrieval"], tokenizer, args, device, precision)
    reset_peak(device)
    log(f"{name}: retrieval, {len(data['retrieval'])} images, {len(data['retrieval'].text)} captions")
    r = run_retrieval(model, data["retrieval"], tokenizer, args, device, precision)
    n = len(data["retrieval"])
    features = r["image_features"] + r["text_features"]
    res["retrieval"] = {
        "seconds": round(r["total"], 3), "images_per_s": round(n / r["total"], 3),
        "image_features_s": round(r["image_features"], 3), "text_features_s": round(r["text_features"], 3),
        "features_images_per_s": round(n / features, 3), "rerank_s": round(r["rerank"], 3),
        "rerank_images_per_s": round(n / r["rerank"], 3), "pairs_reranked": r["pairs"],
        "rerank_pairs_per_s": round(r["pairs"] / r["rerank"], 2),
        "other_s": round(r["total"] - features - r["rerank"], 3),   # tokenisation, top-k, metrics
        "peak_memory_gib": peak_gib(device)}
    n_img, n_txt, k = FLICKR_1K
    est = (r["image_features"] / n * n_img + r["text_features"] / len(data["retrieval"].text) * n_txt
           + r["rerank"] / r["pairs"] * (n_img * k + n_txt * k))
    res["retrieval"]["estimated_flickr_1k_test_s"] = round(est, 1)
    log(f"{name}: retrieval {r['total']:.2f} s ({n / r['total']:.3f} images/s; features {features:.2f} s, "
        f"rerank {r['rerank']:.2f} s for {r['pairs']} pairs)")
    del model
    free(device)

    # 2. Captioning.
    torch.manual_seed(0)
    model = build_model(caption_arch, "caption", tokenizer).to(device).eval()
    res["params_m"]["caption"] = split(model, "text_decoder")
    settings = GenerationConfig().generation_settings()
    log(f"{name}: caption warm-up ({data['warm_pixels'].shape[0]} images)")
    run_captions(model, data["warm_pixels"], settings, args, device, precision)
    reset_peak(device)
    log(f"{name}: captioning, {data['pixels'].shape[0]} images")
    seconds, ids, captions = run_captions(model, data["pixels"], settings, args, device, precision)
    lengths = torch.cat([caption_lengths(i, model.prompt_length, model.eos_token_id) for i in ids]).float()
    n = data["pixels"].shape[0]
    res["caption"] = {
        "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 3),
        "mean_caption_tokens": round(lengths.mean().item(), 2),
        "share_at_max_length": round((lengths + model.prompt_length >= settings.max_length).float().mean().item(), 3),
        "example_caption": captions[0][:80], "peak_memory_gib": peak_gib(device)}
    log(f"{name}: captioning {seconds:.2f} s ({n / seconds:.3f} images/s)")
    del model
    free(device)
    return res


# ---------------------------------------------------------------------- report

def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def mega(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def table(result: dict) -> str:
    t, s = result["models"]["teacher"], result["models"]["student"]
    rows = ["| model | params (M): whole BLIP / retrieval / captioner | vision / text (retrieval) | "
            "retrieval images/s (features / rerank) | caption images/s |",
            "|---|---|---|---|---|"]
    quick = result["setup"]["quick"]
    for name, m in (("teacher", t), ("student", s)):
        p, r, c = m["params_m"], m["retrieval"], m["caption"]
        label = f"{name} (tiny quick shapes)" if quick else LABELS[name]
        rows.append(f"| {label} | {mega(p['blip_whole']['total'])} / {mega(p['retrieval']['total'])} / "
                    f"{mega(p['caption']['total'])} | {mega(p['retrieval']['vision'])} / {mega(p['retrieval']['text'])} | "
                    f"{r['images_per_s']:.3g} ({r['features_images_per_s']:.3g} / {r['rerank_images_per_s']:.3g}) | "
                    f"{c['images_per_s']:.3g} |")
    pt, ps = t["params_m"], s["params_m"]
    rt, rs = t["retrieval"], s["retrieval"]
    rows.append(
        f"| **student vs teacher** | {ratio(pt['blip_whole']['total'], ps['blip_whole']['total'])} smaller "
        f"({100 * ps['blip_whole']['total'] / pt['blip_whole']['total']:.1f}% of the parameters) / "
        f"{ratio(pt['retrieval']['total'], ps['retrieval']['total'])} / {ratio(pt['caption']['total'], ps['caption']['total'])} | "
        f"{ratio(pt['retrieval']['vision'], ps['retrieval']['vision'])} / {ratio(pt['retrieval']['text'], ps['retrieval']['text'])} | "
        f"**{ratio(rs['images_per_s'], rt['images_per_s'])}** faster "
        f"({ratio(rs['features_images_per_s'], rt['features_images_per_s'])} / "
        f"{ratio(rs['rerank_images_per_s'], rt['rerank_images_per_s'])}) | "
        f"**{ratio(s['caption']['images_per_s'], t['caption']['images_per_s'])}** faster |")
    a = result["setup"]
    lines = [f"{a['device_name']}, {a['threads']} threads, {a['precision']}, image {a['image_size']} px, "
             f"retrieval: {a['retrieval_images']} images x {a['captions_per_image']} captions, k_test {a['k_test']} "
             f"({rt['pairs_reranked']} pairs reranked); captioning: {a['caption_images']} images, "
             f"{a['num_beams']} beams, max {a['max_length']}, min {a['min_length']}"
             + (" -- QUICK MODE (tiny shapes, not the real models)" if a["quick"] else ""), "", *rows, "",
             f"Estimated Flickr30k 1K test evaluation (768,000 pairs): teacher {rt['estimated_flickr_1k_test_s']} s, "
             f"student {rs['estimated_flickr_1k_test_s']} s "
             f"({ratio(rt['estimated_flickr_1k_test_s'], rs['estimated_flickr_1k_test_s'])})",
             DLIP_CLAIM + "."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: 2 on CPU)")
    p.add_argument("--images", type=int, default=None,
                   help="retrieval images (default: 16 on CPU, 256 on CUDA, 4 with --quick)")
    p.add_argument("--caption_images", type=int, default=None,
                   help="captioning images (default: 8 on CPU, 128 on CUDA, 4 with --quick)")
    p.add_argument("--captions_per_image", type=int, default=5)
    p.add_argument("--k_test", type=int, default=128, help="rerank candidates per query (capped by N)")
    p.add_argument("--image_size", type=int, default=None, help="default 384 (64 with --quick)")
    p.add_argument("--batch_size", type=int, default=64, help="images/texts per feature batch (batch_size_test)")
    p.add_argument("--rerank_batch_size", type=int, default=128)
    p.add_argument("--caption_batch_size", type=int, default=32, help="images per generate call (batch_size)")
    p.add_argument("--warmup_images", type=int, default=None,
                   help="images of the warm-up run (default: 2 on CPU, 16 on CUDA)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (both tasks)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and 4 images: checks that the script runs")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/bench_student_<device>.json; '': none)")
    args = p.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    cpu = device.type == "cpu"
    if args.threads is not None or cpu:
        torch.set_num_threads(args.threads or 2)
    if args.image_size is None:
        args.image_size = 64 if args.quick else 384
    if args.images is None:
        args.images = 4 if args.quick else 16 if cpu else 256
    if args.caption_images is None:
        args.caption_images = 4 if args.quick else 8 if cpu else 128
    if args.warmup_images is None:
        args.warmup_images = 2 if cpu or args.quick else 16
    precision = "bf16" if args.bf16 else "fp32"
    if args.out is None:
        suffix = "_quick" if args.quick else "_bf16" if args.bf16 else ""
        args.out = str(REPO / "bench" / "results" / f"bench_student_{device.type}{suffix}.json")
    settings = GenerationConfig().generation_settings()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        vocab = 1000 if args.quick else 30522   # bert-base-uncased's size (+ [DEC], [ENC] = 30,524)
        write_vocab(tmp / "tokenizer", vocab)
        tokenizer = build_tokenizer(str(tmp / "tokenizer"))
        n_words = vocab - 200   # filler words w0.. (the vocabulary's first ~110 tokens are special/prompt)

        g = torch.Generator().manual_seed(0)
        n, per = args.images, args.captions_per_image
        images = torch.randn(n, 3, args.image_size, args.image_size, generator=g)
        texts = random_captions(n * per, n_words, g)
        w = min(args.warmup_images, n)
        data = {"retrieval": RandomRetrievalSet(images, texts, per),
                "warm_retrieval": RandomRetrievalSet(images[:w], texts[:w * per], per),
                "pixels": torch.randn(args.caption_images, 3, args.image_size, args.image_size, generator=g)}
        data["warm_pixels"] = data["pixels"][:min(args.warmup_images, args.caption_images)]

        result = {"setup": {
            "device": device.type, "device_name": torch.cuda.get_device_name(device) if not cpu else "CPU",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "precision": precision,
            "quick": args.quick, "image_size": args.image_size, "retrieval_images": n, "captions_per_image": per,
            "k_test": args.k_test, "batch_size": args.batch_size, "rerank_batch_size": args.rerank_batch_size,
            "caption_images": args.caption_images, "caption_batch_size": args.caption_batch_size,
            "num_beams": settings.num_beams, "max_length": settings.max_length, "min_length": settings.min_length,
            "warmup_images": args.warmup_images, "vocab": len(tokenizer)}, "models": {}}
        t_start = time.perf_counter()
        for name in ("teacher", "student"):
            result["models"][name] = bench_model(name, args, device, tokenizer, tmp, data, precision)
        result["setup"]["wall_s"] = round(time.perf_counter() - t_start, 1)

    text = table(result)
    result["table"] = text
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        log(f"wrote {out}")


if __name__ == "__main__":
    main()
