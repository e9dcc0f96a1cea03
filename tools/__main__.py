"""``python -m tools <command> [args]`` (under torchrun: ``torchrun --nproc_per_node N -m tools ...``)."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "score": ("tools.score_pairs", "score every (image, caption) pair with ITC and/or ITM"),
    "filter": ("tools.filter_pairs", "keep the pairs above a score threshold or the top fraction"),
    "embed": ("tools.embed", "write image and text embeddings of a dataset to shards"),
    "search": ("tools.search", "top-k search of queries against an embedded gallery"),
    "ensemble": ("tools.ensemble", "score and feature fusion of several checkpoints, evaluated"),
    "pairs": ("tools.pairs", "build one pretraining pair list from img2dataset, VG, COCO, DLIP, Kaggle Flickr30k"),
    "caption": ("tools.caption", "caption images (beam or nucleus sampling); --filter: keep ITM matches (CapFilt)"),
    "captions": ("tools.captions", "caption variants: clean (BLIP's pre_caption) or template a caption column"),
    "sweep": ("tools.sweep", "evaluate checkpoints x caption columns on one split; one table (CSV + markdown)"),
    "convert": ("tools.convert", "convert checkpoints: official BLIP .pth <-> HuggingFace folder"),
    "vqa": ("tools.vqa", "official VQA v2 / OK-VQA question + annotation files -> BLIP's vqa json layout"),
    "models": ("tools.models", "the official BLIP checkpoints by name (pretrained: blip/model_base): task, ViT, URL"),
}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        lines = [f"  {name:<9} {help}" for name, (_, help) in COMMANDS.items()]
        print("usage: python -m tools <command> [--help | args]\n\ncommands:\n" + "\n".join(lines))
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:], prog=f"python -m tools {argv[0]}")


if __name__ == "__main__":
    from utils.rundir import run_entry  # our errors as one line, exit status 1 (as every entry script)
    run_entry(main)
