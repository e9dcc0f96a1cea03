"""The embedded synthetic benchmark: the project's default data, written in the real formats.

    from data.synthetic import generate
    out = generate("data_cache/synthetic", seed=0)      # parts=("retrieval",)
    out["retrieval"]["train_file"], out["tokenizer"], out["vocab_size"]

or `python -m data.synthetic --out DIR --seed 0`. Real PNG files and json annotations are written
so the real dataset code paths run on them; a BERT tokenizer folder is built from the captions.
The output is a pure function of the arguments (same json bytes, same pixels); a stamp
`DIR/.complete` holding the arguments, written last, makes a repeated call return at once.

Parts: `retrieval` (BLIP retrieval json, docs/FORMATS.md section 1), `imagecode` (ImageCoDe sets,
docs/FORMATS.md section 3), `mmvp` (MMVP-VLM pairs, docs/FORMATS.md section 4), `vqa` (BLIP VQA json:
questions with 10 annotator answers, docs/FORMATS.md section 6), `nlvr` (BLIP's NLVR2 json, section 9: image
pairs, a sentence and a True/False label, balanced per sentence), `video` (MSRVTT 1k-A test layout:
.mp4 clips of moving shapes and a jsonl of captions; needs PyAV). Further parts are (spec, writer,
paths) entries of `PARTS` built on `scenes`; `python -m data.synthetic` writes all of them by default,
`generate` only the parts it is given (retrieval alone by default).
"""

from __future__ import annotations

import difflib
import json
import logging
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable

from .imagecode import ImageCodeSpec, imagecode_paths, write_imagecode
from .mmvp import MMVPSpec, mmvp_paths, write_mmvp
from .nlvr import NLVRSpec, nlvr_paths, write_nlvr
from .retrieval import PartOutput, RetrievalSpec, retrieval_paths, write_retrieval
from .vocab import N_ADDED_TOKENS, write_tokenizer
from .video import VideoSpec, video_paths, write_video
from .vqa import VQASpec, vqa_paths, write_vqa

logger = logging.getLogger(__name__)

# Bump when the generated content changes, so stamps of older outputs no longer match.
GENERATOR_VERSION = 2
STAMP_NAME = ".complete"


@dataclass(frozen=True)
class Part:
    """One benchmark part: its argument dataclass, its writer and its (fixed) file layout."""

    spec: type
    write: Callable[[Path, int, int, Any], PartOutput]
    paths: Callable[[Path], dict[str, str]]


PARTS: dict[str, Part] = {
    "retrieval": Part(RetrievalSpec, write_retrieval, retrieval_paths),
    "imagecode": Part(ImageCodeSpec, write_imagecode, imagecode_paths),
    "mmvp": Part(MMVPSpec, write_mmvp, mmvp_paths),
    "vqa": Part(VQASpec, write_vqa, vqa_paths),
    "nlvr": Part(NLVRSpec, write_nlvr, nlvr_paths),
    "video": Part(VideoSpec, write_video, video_paths),
}


def _parse_parts(parts: str | Iterable[str]) -> tuple[str, ...]:
    names = [p.strip() for p in parts.split(",")] if isinstance(parts, str) else [str(p) for p in parts]
    names = [p for p in names if p]
    if not names:
        raise ValueError("no parts selected")
    for name in names:
        if name not in PARTS:
            raise ValueError(f"unknown part {name!r}; available: {', '.join(PARTS)}")
    return tuple(dict.fromkeys(names))  # drop repeats, keep order


def _build_specs(parts: tuple[str, ...], options: dict[str, Any]) -> dict[str, Any]:
    """Route each keyword to every selected part that has a field of that name."""
    valid = {f.name for p in parts for f in fields(PARTS[p].spec)}
    for key in options:
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"unknown synthetic-data argument {key!r} for parts {list(parts)}{hint}")
    specs = {}
    for p in parts:
        names = {f.name for f in fields(PARTS[p].spec)}
        specs[p] = PARTS[p].spec(**{k: v for k, v in options.items() if k in names})
    return specs


def _result(out_dir: Path, parts: tuple[str, ...], n_tokens: int, skipped: bool) -> dict:
    result: dict[str, Any] = {"out_dir": str(out_dir), "parts": list(parts)}
    for p in parts:
        result[p] = PARTS[p].paths(out_dir)
    result.update(
        tokenizer=str(out_dir / "tokenizer"),
        tokenizer_vocab_size=n_tokens,  # lines of vocab.txt
        vocab_size=n_tokens + N_ADDED_TOKENS,  # the text model's embedding rows ([DEC], [ENC] added)
        readme=str(out_dir / "README.md"),
        stamp=str(out_dir / STAMP_NAME),
        skipped=skipped,
    )
    return result


def _up_to_date(out_dir: Path, args: dict, parts: tuple[str, ...]) -> dict | None:
    """The result of an earlier identical run, or None when anything must be (re)written."""
    stamp = out_dir / STAMP_NAME
    try:
        stamped = json.loads(stamp.read_text(encoding="utf-8"))
        vocab = (out_dir / "tokenizer" / "vocab.txt").read_text(encoding="utf-8")
    except (OSError, ValueError):
        return None
    if stamped.get("args") != args:
        return None
    result = _result(out_dir, parts, len(vocab.splitlines()), skipped=True)
    # Cheap guard against hand-deleted outputs: every listed file or folder must still be there.
    if not all(Path(v).exists() for p in parts for v in result[p].values()):
        return None
    return result


def _readme(args: dict, part_meta: dict[str, dict], n_tokens: int) -> str:
    lines = [
        "# Synthetic benchmark (generated by `python -m data.synthetic`; do not edit)",
        "",
        f"Seed {args['seed']}, images {args['image_size']}x{args['image_size']} px: 1-3 coloured shapes",
        "(colour, circle/square/triangle, small/big, left/right/top/bottom/center) on a grey background.",
        "",
    ]
    if "retrieval" in part_meta:
        lines.append("- `retrieval/`: BLIP retrieval json (`annotation/synthetic_{train,val,test}.json`,")
        lines.append("  image_root `retrieval/images`); train one entry per caption, val/test one per image.")
        for split, c in part_meta["retrieval"]["splits"].items():
            lines.append(f"  - {split}: {c['images']} images, {c['captions']} captions")
        lines.append("  Val/test signatures are unique per split and captions name every attribute.")
    if "imagecode" in part_meta:
        lines.append("- `imagecode/`: ImageCoDe layout (`image-sets/<set>/img<N>.jpg`, `data/*_data*.json`,")
        lines.append("  `data/analysis/manual_annotation_valid.yaml`); video sets = frames of moving shapes")
        lines.append("  (non-contiguous frame numbers), static (`open-images-`) sets = 10 near-identical scenes.")
        for split, c in part_meta["imagecode"]["splits"].items():
            lines.append(f"  - {split}: {c['sets']} sets ({c['video_sets']} video, {c['static_sets']} static), "
                         f"{c['descriptions']} descriptions")
    if "mmvp" in part_meta:
        m = part_meta["mmvp"]
        lines.append(f"- `mmvp/`: MMVP-VLM layout (`Questions.csv`, `MLLM_VLM Images/<Type>/<qid>.jpg`): {m['pairs']}")
        lines.append(f"  pairs, {m['pairs_per_pattern']} per pattern, the two images of a pair differ in that pattern.")
    if "vqa" in part_meta:
        lines.append("- `vqa/`: BLIP VQA json (`annotation/vqa_{train,val,test}.json`, `annotation/answer_list.json`,")
        lines.append("  vqa_root `vqa`): count/colour/shape/position/exists questions, 10 annotator answers each.")
        for split, c in part_meta["vqa"]["splits"].items():
            lines.append(f"  - {split}: {c['images']} images, {c['questions']} questions")
    if "nlvr" in part_meta:
        m = part_meta["nlvr"]
        lines.append("- `nlvr/`: BLIP NLVR2 json (`annotation/nlvr_{train,dev,test}.json`, image_root `nlvr`): image")
        lines.append("  pairs, a sentence and a True/False label; every sentence once true and once false.")
        for split, c in m["splits"].items():
            lines.append(f"  - {split}: {c['pairs']} pairs, {c['distinct_sentences']} distinct sentences")
        b = m["text_only_baseline"]
        lines.append(f"  Best text-only baseline: dev {b['dev']:.1f}%, test {b['test']:.1f}% (chance 50%).")
    if "video" in part_meta:
        m = part_meta["video"]
        lines.append("- `video/`: MSRVTT 1k-A test layout (`videos/<clip_name>.mp4`, `annotation/msrvtt_test.jsonl`):")
        lines.append(f"  {m['splits']['test']['clips']} clips of {m['frames_per_clip']} frames at {m['fps']} fps "
                     f"({m['codec']}, {m['pix_fmt']}), shapes moving together; one caption per clip.")
    lines += [
        f"- `tokenizer/`: BERT WordPiece vocab of {n_tokens} tokens built from the captions",
        f"  (model vocab_size = {n_tokens + N_ADDED_TOKENS} with [DEC] and [ENC]).",
        "",
    ]
    return "\n".join(lines)


def generate(
    out_dir: str | Path,
    seed: int = 0,
    parts: str | Iterable[str] = ("retrieval",),
    image_size: int = 64,
    force: bool = False,
    **options: Any,
) -> dict:
    """Write the synthetic benchmark under `out_dir` and return the paths written.

    `options` are the parts' arguments (for retrieval: n_train, n_val, n_test, count_weights,
    train_captions, eval_captions, partial_frac). Nothing is rewritten when `out_dir/.complete`
    records the same arguments, unless `force`. The returned dict holds, per part, its paths
    (`result['retrieval']['train_file']`, ...), plus `tokenizer` (folder), `tokenizer_vocab_size`
    (lines of vocab.txt), `vocab_size` (the text model's, with [DEC] and [ENC]) and `skipped`.
    """
    out_dir = Path(out_dir)
    parts = _parse_parts(parts)
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 (one ViT patch), got {image_size}")
    specs = _build_specs(parts, options)
    args = {
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "parts": list(parts),
        "image_size": int(image_size),
        "options": {p: asdict(s) for p, s in specs.items()},
    }
    args = json.loads(json.dumps(args))  # tuples -> lists, as the stamp will read back
    if not force:
        done = _up_to_date(out_dir, args, parts)
        if done is not None:
            logger.info("synthetic data in %s is up to date (seed %d); skipping", out_dir, seed)
            return done

    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / STAMP_NAME).unlink(missing_ok=True)  # an interrupted run must not look complete
    outputs = {p: PARTS[p].write(out_dir, int(seed), int(image_size), specs[p]) for p in parts}
    n_tokens = write_tokenizer(out_dir / "tokenizer", [c for o in outputs.values() for c in o.captions])
    for p, o in outputs.items():
        meta = {
            **o.meta,
            "tokenizer": "../tokenizer",
            "tokenizer_vocab_size": n_tokens,
            "vocab_size": n_tokens + N_ADDED_TOKENS,
            "seed": args["seed"],
            "args": args,
        }
        Path(o.paths["meta"]).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    readme = _readme(args, {p: o.meta for p, o in outputs.items()}, n_tokens)
    (out_dir / "README.md").write_text(readme, encoding="utf-8")
    (out_dir / STAMP_NAME).write_text(json.dumps({"args": args}, indent=1) + "\n", encoding="utf-8")
    logger.info("wrote synthetic %s to %s in %.1f s", "+".join(parts), out_dir, time.perf_counter() - start)
    return _result(out_dir, parts, n_tokens, skipped=False)


__all__ = ["GENERATOR_VERSION", "MMVPSpec", "NLVRSpec", "PARTS", "RetrievalSpec", "VQASpec", "VideoSpec", "generate"]
