"""Zero-shot ITM retrieval of pretrained ContextBLIP checkpoints (the pretraining ablation's yardstick).

Every caption of a BLIP-json val/test file is scored against every image with ContextBLIP's
zero-shot score ``softmax(itm_head)[:, 1]`` (as on ImageCoDe, with all images as candidates);
prints text->image and image->text R@1 per checkpoint. ``--plain`` adds the frozen BLIP without
adapter (``use_adapter: false``) from the first checkpoint's ``pretrained``.

    python -m bench.zeroshot_itm --ann outputs/demo/data/retrieval/annotation/synthetic_val.json \\
        --image_root outputs/demo/data/retrieval/images --plain outputs/demo/pretrain/checkpoint_last.pth
"""
from __future__ import annotations

import argparse
import json

import torch

from data.collate import tokenize
from data.retrieval import RetrievalEvalDataset
from data.transforms import build_test_transform
from models.factory import create_model
from tasks.contextblip_pretrain import PretrainConfig
from utils.checkpoint import load_checkpoint
from utils.config import load_config


def load(path: str, plain: bool):
    """(model in eval mode, tokenizer, config) of a pretraining checkpoint or merged export; ``plain``:
    the frozen BLIP its config's ``pretrained`` names, without adapter."""
    cfg = load_config(None, PretrainConfig, defaults_from=load_checkpoint(path)["config"],
                      opts=["use_adapter=false"] if plain else [])[0]
    model, tok = create_model(cfg, "contextblip", pretrained=cfg.pretrained if plain else path)
    return model.eval(), tok, cfg


@torch.no_grad()
def score_matrix(model, tok, cfg, ds, batch_pairs: int = 2000) -> torch.Tensor:
    """``[n_texts, n_images]`` match probabilities."""
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    embeds = torch.cat([model.image_embeds(images[i:i + 64]) for i in range(0, len(images), 64)])
    ids, mask = tokenize(tok, ds.text, cfg.max_tokens)
    M = len(images)
    per = max(1, batch_pairs // M)
    rows = []
    for t in range(0, len(ds.text), per):
        n = min(per, len(ds.text) - t)
        rep = lambda x: x[t:t + n].repeat_interleave(M, dim=0)  # noqa: E731
        emb = embeds.repeat(n, 1, 1)
        rows.append(model.match_prob(rep(ids), rep(mask), emb).view(n, M))
    return torch.cat(rows)


def recall_at_1(scores: torch.Tensor, ds) -> dict:
    t2i = sum(int(scores[t].argmax()) == ds.txt2img[t] for t in range(scores.shape[0])) / scores.shape[0]
    i2t = sum(int(scores[:, i].argmax()) in ds.img2txt[i] for i in range(scores.shape[1])) / scores.shape[1]
    return {"t2i_r1": round(100 * t2i, 1), "i2t_r1": round(100 * i2t, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", help="pretraining checkpoints (or merged exports)")
    p.add_argument("--ann", required=True, help="BLIP-json val/test file")
    p.add_argument("--image_root", required=True)
    p.add_argument("--plain", action="store_true", help="also score the frozen BLIP without adapter")
    args = p.parse_args()
    runs = ([(args.checkpoints[0], True)] if args.plain else []) + [(c, False) for c in args.checkpoints]
    for path, plain in runs:
        model, tok, cfg = load(path, plain)
        ds = RetrievalEvalDataset(args.ann, args.image_root, build_test_transform(cfg.image_size), cfg.max_words)
        res = recall_at_1(score_matrix(model, tok, cfg, ds), ds)
        print(json.dumps({"model": "frozen BLIP, no adapter" if plain else path, **res}))


if __name__ == "__main__":
    main()
