"""Build one pretraining pair list (docs/FORMATS.md 2) from the corpora BLIP and DLIP pretrain on.

    python -m tools pairs --out data/pretrain \\
        data/cc3m_download data/coco_karpathy_train.json vg:data/vg/region_descriptions.json \\
        data/flickr30k/results.csv data/dlip/all.json \\
        --coco_image_root data/coco --vg_image_root data/vg/VG_100K \\
        --flickr_image_root data/flickr30k/flickr30k_images --check_images

Each SOURCE is read by ``data/corpora.py``: its kind is detected from the path and content (an
img2dataset output folder, VG ``region_descriptions.json``, COCO Karpathy train json, DLIP
``all.json``, the Kaggle Flickr30k ``results.csv``, our own pair lists, any other CSV/TSV of pairs
with ``--image_col`` / ``--caption_col`` / ``--image_dir_col``), or forced as
``KIND:PATH`` (``vg:/data/region_descriptions.json``). Writes ``OUT/pairs.json`` (one
``{"image", "caption": str, "source"}`` entry per pair; absolute image paths, or relative to
``--image_root``) and ``OUT/report.json`` (per source: records read, pairs kept, skipped by reason,
exact duplicates removed; the dedup totals), and prints the counts as a table.

Dedup: a pair whose (image path, ``pre_caption``-cleaned caption, without the word limit) was
already kept, from any source, is removed and counted under its own source; the first one is
written with its raw caption.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from data.columns import DEFAULT as DEFAULT_COLUMNS, FLAGS, Columns
from data.corpora import KINDS, MISSING_IMAGE, Corpus, read_source
from data.utils import pre_caption
from utils.outputs import refuse_existing

logger = logging.getLogger("tools.pairs")
CHECK_THREADS = 32


def parse_source(text: str) -> tuple[Optional[str], str]:
    """``KIND:PATH`` -> (KIND, PATH); anything else -> (None, text): the kind is detected."""
    kind, sep, path = text.partition(":")
    return (kind, path) if sep and kind in KINDS else (None, text)


def _labels(sources: list[tuple[Optional[str], str]]) -> list[str]:
    names = [Path(p).name or p for _, p in sources]
    return [n if names.count(n) == 1 else p for n, (_, p) in zip(names, sources)]


def _absolute(path: str) -> str:
    return os.path.normpath(os.path.abspath(path))


def check_images(paths: list[str]) -> set[str]:
    """The paths (of those given) that are not files; a stat each, in threads."""
    with ThreadPoolExecutor(CHECK_THREADS) as pool:
        exists = list(pool.map(os.path.isfile, paths))
    return {p for p, ok in zip(paths, exists) if not ok}


def build(sources: list[tuple[Optional[str], str]], roots: dict, vg_min_words: int, vg_min_area: float,
          check: bool, image_root: Optional[str], columns: Columns = DEFAULT_COLUMNS) -> tuple[list[dict], dict]:
    """Read, filter and dedup every source: ``(pair entries, report)``; ``columns``: of CSV sources."""
    labels = _labels(sources)
    corpora: list[Corpus] = []
    for (kind, path), label in zip(sources, labels):
        corpus = read_source(kind, path, roots=roots, vg_min_words=vg_min_words, vg_min_area=vg_min_area,
                             columns=columns)
        logger.info("%s (%s): %d records read, %d candidate pairs", label, corpus.kind, corpus.read, len(corpus))
        corpora.append(corpus)
    missing: set[str] = set()
    if check:
        distinct = list(dict.fromkeys(_absolute(i) for c in corpora if c.kind != "img2dataset" for i in c.image))
        missing = check_images(distinct)
        logger.info("--check_images: %d of %d images missing", len(missing), len(distinct))
    root = _absolute(image_root) if image_root else None
    seen: set[tuple[str, str]] = set()
    captions_of: dict[str, int] = {}
    pairs: list[dict] = []
    rows = []
    for corpus, label in zip(corpora, labels):
        kept = duplicates = 0
        for image, caption, where in zip(corpus.image, corpus.caption, corpus.where):
            path = _absolute(image)
            if path in missing:
                corpus.skip(MISSING_IMAGE, where)
                corpus.read -= 1  # counted when added
                continue
            key = (path, pre_caption(caption, 10 ** 9))
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            captions_of[path] = captions_of.get(path, 0) + 1
            pairs.append({"image": os.path.relpath(path, root) if root else path, "caption": caption,
                          "source": label})
            kept += 1
        skipped = dict(sorted(corpus.skipped.items()))
        rows.append({"source": label, "kind": corpus.kind, "path": corpus.path, "read": corpus.read, "kept": kept,
                     "skipped": skipped, "skipped_total": sum(skipped.values()), "duplicates": duplicates,
                     "skipped_examples": {r: corpus.examples[r] for r in skipped}, "notes": corpus.notes})
        if kept == 0:
            logger.warning("%s: no pair kept (%d records read)", label, corpus.read)
    report = {
        "sources": rows,
        "total": {k: sum(r[k] for r in rows) for k in ("read", "kept", "skipped_total", "duplicates")},
        "dedup": {"duplicates_removed": sum(r["duplicates"] for r in rows), "pairs": len(pairs),
                  "images": len(captions_of),
                  "images_with_several_captions": sum(1 for n in captions_of.values() if n > 1),
                  "max_captions_per_image": max(captions_of.values(), default=0)},
        "options": {"vg_min_words": vg_min_words, "vg_min_area": vg_min_area, "check_images": check,
                    "image_root": root, "roots": {k: v for k, v in roots.items() if v}},
    }
    return pairs, report


def print_table(report: dict) -> None:
    rows = report["sources"]
    reasons = sorted({r for row in rows for r in row["skipped"]})
    width = max([len("source")] + [len(r["source"]) for r in rows])
    head = f"{'source':<{width}}  {'kind':<13} {'read':>9} {'kept':>9} {'dups':>7}" + "".join(
        f" {r:>{max(9, len(r))}}" for r in reasons)
    print(head)
    for row in rows + [{"source": "total", "kind": "", **report["total"],
                        "skipped": {r: sum(x["skipped"].get(r, 0) for x in rows) for r in reasons}}]:
        print(f"{row['source']:<{width}}  {row['kind']:<13} {row['read']:>9} {row['kept']:>9} {row['duplicates']:>7}"
              + "".join(f" {row['skipped'].get(r, 0):>{max(9, len(r))}}" for r in reasons))
    d = report["dedup"]
    print(f"{d['pairs']} pairs of {d['images']} images ({d['images_with_several_captions']} with several captions); "
          f"{d['duplicates_removed']} exact duplicates removed")


def _args(argv, prog):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help=f"a file or folder, or KIND:PATH to force its kind ({', '.join(KINDS)})")
    p.add_argument("--out", required=True, help="output folder for pairs.json and report.json")
    p.add_argument("--image_root", default=None,
                   help="write image paths relative to this folder (default: absolute paths)")
    p.add_argument("--vg_image_root", default=None,
                   help="Visual Genome image folder (VG_100K): a region's image is <this>/<image id>.jpg")
    p.add_argument("--coco_image_root", default=None,
                   help="COCO image folder (holding train2014/, val2014/) for coco_karpathy_train.json paths")
    p.add_argument("--flickr_image_root", default=None,
                   help="Flickr30k image folder (flickr30k_images) for the Kaggle results.csv image_name")
    p.add_argument("--pairs_image_root", default=None,
                   help="folder that relative paths of pair lists, CSV files (and vg_caption.json) are under "
                        "(default: the working directory)")
    p.add_argument("--image_col", default="image", help="CSV sources: the image path column (the file, with "
                   "--image_dir_col)")
    p.add_argument("--caption_col", default="caption", help="CSV sources: the caption column")
    p.add_argument("--image_dir_col", default=None, help="CSV sources: a folder column; the image is FOLDER/FILE")
    p.add_argument("--vg_min_words", type=int, default=5,
                   help="a VG phrase needs at least this many words (default 5: more than 4)")
    p.add_argument("--vg_min_area", type=float, default=5000,
                   help="a VG region's width x height must be above this many pixels (default 5000, an absolute "
                        "area: region_descriptions.json has no image sizes; about 70 x 70 px)")
    p.add_argument("--overwrite", action="store_true", help="replace pairs.json / report.json of a previous run")
    p.add_argument("--check_images", action="store_true",
                   help="skip (and count) pairs whose image file does not exist (a stat per image; "
                        "img2dataset samples are always checked)")
    return p.parse_args(argv)


def main(argv=None, prog: str = "python -m tools pairs") -> dict:
    args = _args(argv, prog)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    roots = {"vg": args.vg_image_root, "coco": args.coco_image_root, "flickr_kaggle": args.flickr_image_root,
             "pairs": args.pairs_image_root}
    columns = Columns(image=args.image_col, caption=args.caption_col, image_dir=args.image_dir_col, named_by=FLAGS)
    refuse_existing([Path(args.out, "pairs.json"), Path(args.out, "report.json")], args.overwrite, "--out")
    pairs, report = build([parse_source(s) for s in args.sources], roots, args.vg_min_words, args.vg_min_area,
                          args.check_images, args.image_root, columns)
    if not pairs:
        print_table(report)
        raise SystemExit("error: no pair kept from any source; nothing written (see the counts above)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "pairs.json.tmp"
    tmp.write_text(json.dumps(pairs, ensure_ascii=False))
    os.replace(tmp, out / "pairs.json")
    report["written"] = str(out / "pairs.json")
    (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    print_table(report)
    print(f"wrote {out / 'pairs.json'} and {out / 'report.json'}")
    return report


if __name__ == "__main__":
    main()
