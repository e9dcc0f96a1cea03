"""Caption generation speed: our KV-cached beam search vs. the recompute-everything baseline.

Same random captioner (``models/caption.py``), same random images, BLIP's caption evaluation
settings (3 beams, max 20 tokens, min 5, prompt "a picture of " included in both lengths):

- **cached** (ours, ``use_cache=True``): every decoder layer keeps its self-attention keys/values,
  so a step runs one new position per beam; the image's cross-attention keys/values are projected
  once per generation;
- **recompute** (``use_cache=False``): the whole prefix, and the cross-attention keys/values of all
  image tokens (197 at the mid size) in every layer, are recomputed at every step, which is what the
  original BLIP code does under current transformers.

Both repeat each image's embeddings once per beam, as BLIP does.

Both must produce IDENTICAL token ids (the script exits 1 otherwise). Each path is warmed up, then
timed ``--repeats`` times (median). End to end includes the ViT forward, which both paths share;
the decoder-only lines time the same searches with the image embeddings computed beforehand.
``--greedy`` adds the same comparison for greedy search (1 beam). Sizes (as the other benchmarks):

- demo: ViT 64 x 2 at 64 px (16 patches), text 64 x 2;
- mid:  ViT 384 x 6 at 224 px (196 patches), text 384 x 6 (heads of 64).

The tokenizer is a BERT-layout vocabulary of ``--vocab`` tokens (30,522 as ``bert-base-uncased``,
so the LM head and the top-k run over BLIP's real vocabulary of 30,524 with [DEC]/[ENC]), written
to a temporary folder: no network. Nothing is biased: the JSON reports the mean caption length
(tokens after the prompt, before [SEP]) and the share of captions that ran to ``--max_length``; with
random weights [SEP] is one token in 30,524 and every caption runs to max length (16 tokens after
the 4-token prompt), so BLIP's min_length 5 is kept.

    python -m bench.bench_caption [--size mid --images 16 --repeats 3 --greedy --json out.json]
    python -m bench.bench_caption --device cuda --images 64 [--precision bf16] [--profile 30]

Peak memory is ``torch.cuda.max_memory_allocated`` per method on CUDA (not measured on CPU).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, List

import torch

from models.caption import CaptionArch, build_captioner
from models.generation import GenerationSettings
from models.tokenizer import build_tokenizer
from utils.precision import autocast

SIZES = {  # ViT and text width, depth, image size
    "demo": (64, 2, 64),
    "mid": (384, 6, 224),
    "base": (768, 12, 384),  # ViT-B/16 at 384 with BERT-base: BLIP base captioner (GPU runs)
}


def write_vocab(folder: Path, size: int) -> None:
    """A BERT-layout ``vocab.txt`` of ``size`` tokens: the special tokens at bert-base-uncased's ids
    ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103), the prompt's words, then filler words."""
    vocab = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]",
             "a", "picture", "of"]
    vocab += [f"w{i}" for i in range(size - len(vocab))]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512,
                                                              "tokenizer_class": "BertTokenizer"}))


def build(size: str, vocab: int):
    """(random captioner in eval mode, tokenizer, image size)."""
    width, depth, image_size = SIZES[size]
    heads = max(1, width // 64)
    with tempfile.TemporaryDirectory() as tmp:
        write_vocab(Path(tmp) / "tokenizer", vocab)
        tokenizer = build_tokenizer(str(Path(tmp) / "tokenizer"))
        med = Path(tmp) / "med.json"
        med.write_text(json.dumps({"vocab_size": None, "hidden_size": width, "num_hidden_layers": depth,
                                   "num_attention_heads": heads, "intermediate_size": 4 * width,
                                   "encoder_width": width, "add_cross_attention": True}))
        arch = CaptionArch(vit={"width": width, "depth": depth, "heads": heads, "patch_size": 16},
                           image_size=image_size, med_config=str(med))
        model = build_captioner(arch, tokenizer).eval()
    return model, tokenizer, image_size


def caption_lengths(ids: torch.Tensor, prompt_length: int, eos: int) -> torch.Tensor:
    """Generated tokens per row: after the prompt, up to (not counting) the first eos."""
    body = ids[:, prompt_length:]
    is_eos = body == eos
    return torch.where(is_eos.any(1), is_eos.int().argmax(1), body.shape[1])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fns: Dict[str, Callable[[], torch.Tensor]], device: torch.device, repeats: int, warmup: int) -> dict:
    """Times each of ``fns`` ``repeats`` times after ``warmup`` calls, interleaved (a, b, a, b, ...)
    so that a busy period of a shared machine slows every method alike. Per name: (median seconds,
    all timings, the last output, peak CUDA memory GiB of its timed calls or None)."""
    out = {name: None for name in fns}
    for _ in range(warmup):
        for name, fn in fns.items():
            out[name] = fn()
    sync(device)
    times: Dict[str, List[float]] = {name: [] for name in fns}
    peaks: Dict[str, float] = {name: 0.0 for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            out[name] = fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
            if device.type == "cuda":
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device) / 2**30)
    return {name: (statistics.median(times[name]), times[name], out[name],
                   peaks[name] if device.type == "cuda" else None) for name in fns}


@contextmanager
def fixed_image_embeds(model, embeds: torch.Tensor):
    """The captioner's ViT returns ``embeds`` (computed beforehand) instead of running: times the
    decoding alone through the same ``generate_ids`` code path."""
    model.visual_encoder.forward = lambda pixel_values: embeds
    try:
        yield
    finally:
        del model.visual_encoder.forward


def compare(model, pixels: torch.Tensor, settings: GenerationSettings, args, device, embeds: torch.Tensor) -> dict:
    """Times cached vs. recompute for one search setting, end to end and decoder-only; checks ids."""
    n = pixels.shape[0]

    def runner(use_cache: bool):
        def run():
            with autocast(device, args.precision):
                return model.generate_ids(pixels, settings, use_cache=use_cache)
        return run
    fns = {"cached": runner(True), "recompute": runner(False)}
    full = timed(fns, device, args.repeats, args.warmup)
    with fixed_image_embeds(model, embeds):
        dec = timed(fns, device, args.repeats, args.warmup)
    res: dict = {"num_beams": settings.num_beams}
    for name in fns:
        med, times, ids, peak = full[name]
        if not torch.equal(ids, dec[name][2]):
            raise RuntimeError(f"{name}: the decoder-only run produced other ids than the end-to-end run")
        res[f"{name}_s"] = round(med, 3)
        res[f"{name}_images_per_s"] = round(n / med, 2)
        res[f"{name}_decoder_s"] = round(dec[name][0], 3)
        res[f"{name}_decoder_images_per_s"] = round(n / dec[name][0], 2)
        res[f"{name}_times_s"] = [round(t, 3) for t in times]
        if peak is not None:
            res[f"{name}_peak_memory_gib"] = round(peak, 3)
    res["speedup"] = round(res["recompute_s"] / res["cached_s"], 2)
    res["decoder_speedup"] = round(res["recompute_decoder_s"] / res["cached_decoder_s"], 2)
    cached, recompute = full["cached"][2], full["recompute"][2]
    res["identical_ids"] = bool(cached.shape == recompute.shape and torch.equal(cached, recompute))
    lengths = caption_lengths(cached.cpu(), model.prompt_length, model.eos_token_id).float()
    res["mean_caption_tokens"] = round(lengths.mean().item(), 2)   # after the prompt, before eos
    res["share_at_max_length"] = round((lengths + model.prompt_length >= settings.max_length).float().mean().item(), 3)
    res["_ids"] = {"cached": cached, "recompute": recompute}
    return res


def profile_cached(model, pixels, settings, args, device, rows: int) -> None:
    """torch.profiler table of one cached generation (stderr), the op that the time goes to."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        with autocast(device, args.precision):
            model.generate_ids(pixels, settings, use_cache=True)
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows), file=sys.stderr)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="mid", choices=sorted(SIZES))
    p.add_argument("--images", type=int, default=16, help="images per generate call (one batch)")
    p.add_argument("--num_beams", type=int, default=3)
    p.add_argument("--max_length", type=int, default=20, help="tokens, prompt included (BLIP: 20)")
    p.add_argument("--min_length", type=int, default=5, help="tokens, prompt included (BLIP: 5)")
    p.add_argument("--greedy", action="store_true", help="also compare greedy search (1 beam)")
    p.add_argument("--vocab", type=int, default=30522, help="tokenizer vocabulary (bert-base-uncased: 30522)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="print a torch.profiler table (ROWS ops) of one cached beam search to stderr")
    p.add_argument("--json", default=None, help="also write the result to this file")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, tokenizer, image_size = build(args.size, args.vocab)
    model = model.to(device)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.images, 3, image_size, image_size, generator=g).to(device)

    def vit():
        with autocast(device, args.precision):
            return model.visual_encoder(pixels)
    vit_s, _, embeds, _ = timed({"vit": vit}, device, args.repeats, args.warmup)["vit"]

    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "precision": args.precision,
              "size": args.size, "width": SIZES[args.size][0], "depth": SIZES[args.size][1],
              "image_size": image_size, "vocab": len(tokenizer), "images": args.images,
              "max_length": args.max_length, "min_length": args.min_length,
              "prompt_tokens": model.prompt_length, "repeats": args.repeats, "warmup": args.warmup,
              "vit_s": round(vit_s, 3), "runs": []}
    searches = [GenerationSettings(num_beams=args.num_beams, max_length=args.max_length,
                                   min_length=args.min_length)]
    if args.greedy and args.num_beams != 1:
        searches.append(GenerationSettings(num_beams=1, max_length=args.max_length, min_length=args.min_length))
    failed = False
    for settings in searches:
        res = compare(model, pixels, settings, args, device, embeds)
        ids = res.pop("_ids")
        res["example_caption"] = model.decode(ids["cached"][:1])[0]
        res["vit_share_of_cached"] = round(vit_s / res["cached_s"], 3)
        result["runs"].append(res)
        if not res["identical_ids"]:
            failed = True
            rows = (ids["cached"] != ids["recompute"]).any(1).nonzero().flatten().tolist() \
                if ids["cached"].shape == ids["recompute"].shape else "shapes differ"
            print(f"num_beams {settings.num_beams}: cached and recompute ids DIFFER (rows {rows})", file=sys.stderr)
    if args.profile:
        profile_cached(model, pixels, searches[0], args, device, args.profile)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
