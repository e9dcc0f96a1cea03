"""Ensembles of several checkpoints on a retrieval split: score fusion and feature fusion.

    python -m tools ensemble --config configs/retrieval_coco.yaml --checkpoints a.pth b.pth c.pth \\
        --weights 0.5 0.3 0.2 --output_dir outputs/ensemble
    # members of different sizes: one model config per checkpoint (data always from --config)
    torchrun --nproc_per_node 8 -m tools ensemble --config base.yaml --checkpoints base.pth large.pth \\
        --member_configs base.yaml large.yaml

Per member: BLIP's protocol scores (``tasks/retrieval_eval.py``: ITC top-k, ``ITM logit + cosine``, -100
elsewhere) and its ITC features. Then
- score fusion: the weighted sum of each member's protocol score matrices, each normalised over its
  re-ranked entries (``--normalize zscore`` | ``minmax`` | ``none``); an entry that a member did
  not re-rank gets that member's floor (below every re-ranked entry, as BLIP's -100);
- feature fusion: per modality, the concatenation of the members' normalised features, member m
  scaled by sqrt(w_m) (weights sum to 1, so the result is unit length and its cosine is the weighted
  sum of the members' cosines); retrieval by that cosine alone.
Both are evaluated with BLIP's recall metrics; ``ensemble.json`` has every member's protocol and
ITC-only metrics next to the fused ones. The split is parsed and its images checked before any
model is built (``skip_bad_images`` as in ``train_retrieval.py``).
"""
from __future__ import annotations

import json
import logging
from typing import Dict, List

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from data.collate import tokenize
from data.preflight import log_unk_rate
from data.transforms import build_test_transform
from tools.common import inference_model, start
from utils import dist as du
from tasks.retrieval import RetrievalConfig, build_datasets
from utils.config import load_config
from utils.engine import autocast
from tasks.retrieval_eval import embed_texts, evaluate_retrieval, retrieval_metrics

logger = logging.getLogger("tools.ensemble")

FLOOR = -1e4  # normalised score of an entry a member did not re-rank (BLIP: -100)
FILL = -100.0  # what tasks/retrieval_eval.py writes outside the top k


def _extra_args(parser) -> None:
    parser.add_argument("--checkpoints", nargs="+", required=True, help="member checkpoints")
    parser.add_argument("--weights", nargs="+", type=float, help="member weights (default: equal); normalised to sum 1")
    parser.add_argument("--member_configs", nargs="+", help="one model config per checkpoint (default: --config)")
    parser.add_argument("--split", default="test", choices=("val", "test"), help="split of the config's dataset")
    parser.add_argument("--normalize", default="zscore", choices=("zscore", "minmax", "none"),
                        help="score normalisation before score fusion")
    parser.add_argument("--save_scores", action="store_true", help="write the fused matrices to fused_scores.npz")
    parser.add_argument("--no_progress", action="store_true")


def normalise_scores(score: np.ndarray, how: str) -> np.ndarray:
    """Normalise the re-ranked entries (``!= -100``) of a protocol score matrix; the rest -> ``FLOOR``.

    Computed in float64 and strictly increasing, so the order and the ties of the matrix are kept:
    a single member, whatever its weight, ranks exactly as it does alone.
    """
    score = np.asarray(score, dtype=np.float64)
    valid = score != FILL
    out = np.full(score.shape, FLOOR)
    v = score[valid]
    if v.size:
        if how == "zscore":
            v = (v - v.mean()) / (v.std() or 1.0)
        elif how == "minmax":
            v = (v - v.min()) / ((v.max() - v.min()) or 1.0)
        out[valid] = v
    return out


def fuse_scores(matrices: List[np.ndarray], weights: List[float], how: str) -> np.ndarray:
    return sum(w * normalise_scores(m, how) for w, m in zip(weights, matrices))


def fuse_features(features: List[torch.Tensor], weights: List[float]) -> torch.Tensor:
    """``[n, sum E_m]``: member features ``[n, E_m]`` (unit length) scaled by sqrt(w_m) and concatenated."""
    return torch.cat([f * w ** 0.5 for f, w in zip(features, weights)], dim=1)


@torch.no_grad()
def dataset_features(model, dataset, tokenizer, cfg, device):
    """Normalised ITC features of every image ``[n_img, E]`` and text ``[n_txt, E]`` of an eval split;
    under torchrun each rank embeds a slice and every rank gets all. A collective."""
    ids, mask = tokenize(tokenizer, dataset.text, cfg.max_tokens)
    txt = du.shard_range(ids.shape[0])
    text_feat = du.gather_variable(embed_texts(model, ids[txt.start:txt.stop], mask[txt.start:txt.stop],
                                               cfg.batch_size_test, device, cfg.precision))
    # Features only: unlike evaluation, nothing here needs the image tokens kept.
    loader = DataLoader(Subset(dataset, list(du.shard_range(len(dataset)))), batch_size=cfg.batch_size_test,
                        num_workers=cfg.num_workers)
    image_feat = [torch.zeros(0, model.embed_dim, device=device)]
    for images, _ in loader:
        with autocast(device, cfg.precision):
            image_feat.append(model.encode_image(images.to(device))[1].float())
    return du.gather_variable(torch.cat(image_feat)).cpu(), text_feat.cpu()


def _metrics(score_i2t: np.ndarray, score_t2i: np.ndarray, txt2img) -> Dict[str, float]:
    return retrieval_metrics(np.asarray(score_i2t), np.asarray(score_t2i), txt2img)


def _weights(args) -> List[float]:
    n = len(args.checkpoints)
    w = args.weights or [1.0] * n
    if len(w) != n or any(x < 0 for x in w) or sum(w) <= 0:
        raise SystemExit(f"error: --weights needs {n} non-negative numbers with a positive sum, got {args.weights}")
    return [x / sum(w) for x in w]


def main(argv=None, prog: str = "python -m tools ensemble") -> dict:
    run = start(argv, prog, __doc__.splitlines()[0], _extra_args)
    args, cfg, info = run.args, run.cfg, run.info
    try:
        weights = _weights(args)
        if args.member_configs and len(args.member_configs) != len(args.checkpoints):
            raise SystemExit("error: --member_configs needs one config per checkpoint")
        members = [load_config(c, RetrievalConfig)[0] for c in args.member_configs] if args.member_configs \
            else [cfg] * len(args.checkpoints)
        record: dict = {"split": args.split, "weights": weights, "normalize": args.normalize, "members": []}
        dataset = build_datasets(cfg, (args.split,))[args.split]
        protocol, features, txt2img = [], [], None
        for ckpt, member in zip(args.checkpoints, members):
            dataset.transform = build_test_transform(member.image_size)
            model, tokenizer = inference_model(member, info.device, pretrained=ckpt)
            log_unk_rate(tokenizer, dataset.text, f"the {args.split} captions")
            out = evaluate_retrieval(model, dataset, tokenizer, k_test=cfg.k_test, max_tokens=member.max_tokens,
                                     batch_size=cfg.batch_size_test, rerank_batch_size=cfg.rerank_batch_size,
                                     num_workers=cfg.num_workers, precision=cfg.precision,
                                     progress=not args.no_progress and info.is_main)
            image_feat, text_feat = dataset_features(model, dataset, tokenizer, member, info.device)
            if out.left_out:  # images that failed to decode: evaluated without them, as the protocol was
                image_feat, text_feat = image_feat[out.image_index], text_feat[out.text_index]
            txt2img = out.txt2img
            sims = (image_feat @ text_feat.t()).numpy()
            protocol.append((out.score_i2t, out.score_t2i))
            features.append((image_feat, text_feat))
            record["members"].append({"checkpoint": ckpt, "protocol": out.metrics,
                                      "itc": _metrics(sims, sims.T, txt2img)})
            logger.info("member %s: r_mean %.2f (ITC only %.2f)", ckpt, out.metrics["r_mean"],
                        record["members"][-1]["itc"]["r_mean"])
            del model
        fused_i2t = fuse_scores([p[0] for p in protocol], weights, args.normalize)
        fused_t2i = fuse_scores([p[1] for p in protocol], weights, args.normalize)
        record["score_fusion"] = _metrics(fused_i2t, fused_t2i, txt2img)
        image_fused = fuse_features([f[0] for f in features], weights)
        text_fused = fuse_features([f[1] for f in features], weights)
        sims = (image_fused @ text_fused.t()).numpy()
        record["feature_fusion"] = _metrics(sims, sims.T, txt2img)
        if info.is_main:
            (run.output_dir / "ensemble.json").write_text(json.dumps(record, indent=1))
            if args.save_scores:
                np.savez(run.output_dir / "fused_scores.npz", score_i2t=fused_i2t, score_t2i=fused_t2i,
                         feature_sims=sims)
            logger.info("score fusion: %s", {k: round(v, 2) for k, v in record["score_fusion"].items()})
            logger.info("feature fusion (ITC only): %s", {k: round(v, 2) for k, v in record["feature_fusion"].items()})
        return record
    finally:
        du.cleanup()


if __name__ == "__main__":
    main()
