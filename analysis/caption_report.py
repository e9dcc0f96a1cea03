"""What a captioning run achieved, next to the baseline it must beat, and what its captions look like.

    python -m analysis.caption_report outputs/demo/caption --train_file TRAIN.json --test_file TEST.json \\
        --image_root IMAGES [--split test] [--n 12] [--candidates 200]

Reads the run's ``captions_<split>.json`` and ``log.txt`` (the scores of its best epoch; nothing is
regenerated) and writes into the run folder:

- ``caption_baseline.json``: the best *constant* caption — among the ``--candidates`` most frequent
  training captions, the one that, given for every image of the split, scores the highest CIDEr —
  with its CIDEr and BLEU-4, beside the run's (``tasks.caption_metrics.best_constant_caption``);
- ``caption_sheet.png``: a contact sheet of the first ``--n`` images with the generated caption
  and the references.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import List

from data.utils import read_json
from tasks.caption_metrics import best_constant_caption
from tools.search import _font, _thumb, _wrap


def best_record(run_dir: Path, split: str) -> dict:
    """The ``log.txt`` record of the best epoch holding ``<split>_CIDEr`` (or the last such)."""
    records = [json.loads(line) for line in (run_dir / "log.txt").read_text().splitlines() if line.strip()]
    with_split = [r for r in records if f"{split}_CIDEr" in r]
    if not with_split:
        raise SystemExit(f"error: {run_dir / 'log.txt'} has no {split}_CIDEr record")
    best = records[-1].get("best_epoch")
    return next((r for r in with_split if r.get("epoch") == best), with_split[-1])


def caption_sheet(items: List[dict], path: Path, thumb: int = 96) -> None:
    """One row per image: the picture, ``ours:`` the generated caption, ``ref:`` the references."""
    from PIL import Image, ImageDraw
    pad, text_w = 6, 560
    row_h = thumb + pad
    sheet = Image.new("RGB", (thumb + text_w + 3 * pad, pad + row_h * max(1, len(items))), "white")
    draw, font = ImageDraw.Draw(sheet), _font(13)
    for r, item in enumerate(items):
        y = pad + r * row_h
        sheet.paste(_thumb(item["path"], thumb), (pad, y))
        lines = [_wrap("ours: " + item["caption"], 80)] + [_wrap("ref: " + ref, 80) for ref in item["references"][:3]]
        draw.multiline_text((thumb + 2 * pad, y), "\n".join(lines), fill="black", font=font)
        draw.text((thumb + 2 * pad, y), "ours:", fill="darkblue", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m analysis.caption_report", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--train_file", type=Path, required=True, help="the training annotations (constant-caption candidates)")
    p.add_argument("--test_file", type=Path, required=True, help="the split's annotations (references, image paths)")
    p.add_argument("--image_root", type=Path, required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=12, help="images on the contact sheet")
    p.add_argument("--candidates", type=int, default=200, help="most frequent training captions tried as constants")
    args = p.parse_args(argv)

    results = read_json(args.run_dir / f"captions_{args.split}.json")
    entries = read_json(args.test_file)
    by_image = {e["image"]: e for e in entries}
    gts = {}
    for r in results:
        refs = by_image[r["image_id"]]["caption"]
        gts[r["image_id"]] = [refs] if isinstance(refs, str) else list(refs)
    train = read_json(args.train_file)
    counts = Counter(c.strip() for e in train for c in ([e["caption"]] if isinstance(e["caption"], str) else e["caption"]))
    candidates = [c for c, _ in counts.most_common(args.candidates)]
    baseline = best_constant_caption(gts, candidates)
    ours = best_record(args.run_dir, args.split)
    report = {"split": args.split, "images": len(results), "epoch": ours.get("epoch"),
              "ours": {k[len(args.split) + 1:]: v for k, v in ours.items() if k.startswith(args.split + "_")},
              "constant_baseline": baseline}
    (args.run_dir / "caption_baseline.json").write_text(json.dumps(report, indent=1))
    items = [{"path": str(args.image_root / r["image_id"]), "caption": r["caption"], "references": gts[r["image_id"]]}
             for r in results[:args.n]]
    caption_sheet(items, args.run_dir / "caption_sheet.png")
    print(f"{args.split}: ours CIDEr {report['ours'].get('CIDEr', float('nan')):.3f} BLEU-4 "
          f"{report['ours'].get('Bleu_4', float('nan')):.3f}; best constant caption {baseline['caption']!r}: "
          f"CIDEr {baseline['CIDEr']:.3f} BLEU-4 {baseline['Bleu_4']:.3f} (of {baseline['candidates']} candidates)")
    return report


if __name__ == "__main__":
    main()
