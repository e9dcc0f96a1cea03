"""Does the text-guided mask pick the objects? On the synthetic benchmark (shapes on a plain grey
background) a patch "holds a shape" when over 5% of its pixels differ from the background colour.
Prints the share of masked patches that hold a shape, for the text-guided mask of a pretrained
checkpoint (one mask per val caption) and for random masks at the same rate, and the share of
shape patches overall (what random masking hits in expectation).

    python -m bench.mask_on_shapes outputs/demo/pretrain/checkpoint_last.pth \\
        --ann outputs/demo/data/retrieval/annotation/synthetic_val.json \\
        --image_root outputs/demo/data/retrieval/images [--guide_token any]
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from bench.zeroshot_itm import load
from data.collate import tokenize
from data.retrieval import RetrievalEvalDataset
from data.transforms import build_test_transform
from data.utils import load_image
from models.tmim import random_mask


def shape_patches(path: str, image_size: int, patch: int) -> torch.Tensor:
    """``[N]`` bool: patches (row-major) of the resized image that hold shape pixels."""
    img = np.asarray(load_image(path).resize((image_size, image_size)), dtype=np.int16)
    fg = np.abs(img - img[0, 0]).max(-1) > 30  # the corner pixel is background in every scene
    g = image_size // patch
    tiles = fg.reshape(g, patch, g, patch).mean(axis=(1, 3))
    return torch.from_numpy(tiles.reshape(-1) > 0.05)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--ann", required=True)
    p.add_argument("--image_root", required=True)
    p.add_argument("--guide_token", default=None, help="override the checkpoint's (words | any)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    model, tok, cfg = load(args.checkpoint, False)
    if args.guide_token:
        model.settings.guide_token = args.guide_token
    model.settings.mask_strategy = "text"
    ds = RetrievalEvalDataset(args.ann, args.image_root, build_test_transform(cfg.image_size), cfg.max_words)
    g = torch.Generator().manual_seed(args.seed)
    patch, n = model.vit.arch.patch_size, model.vit.num_patches
    guided, rand, share = [], [], []
    for i in range(len(ds)):
        shapes = shape_patches(f"{args.image_root}/{ds.image[i]}", cfg.image_size, patch)
        share.append(shapes.float().mean())
        pixels = ds[i][0][None]
        for t in ds.img2txt[i]:
            ids, mask = tokenize(tok, [ds.text[t]], cfg.max_tokens)  # padded: 'any' may pick padding
            guided.append(shapes[model.compute_mask(pixels, ids, mask, g).mask[0]].float().mean())
            rand.append(shapes[random_mask(1, n, cfg.mask_rate, "cpu", g).mask[0]].float().mean())
    pct = lambda xs: round(100 * float(torch.stack(xs).mean()), 1)  # noqa: E731
    print(json.dumps({"checkpoint": args.checkpoint, "guide_token": model.settings.guide_token,
                      "mask_rate": cfg.mask_rate, "text_guided_on_shapes": pct(guided),
                      "random_on_shapes": pct(rand), "shape_patch_share": pct(share)}))


if __name__ == "__main__":
    main()
