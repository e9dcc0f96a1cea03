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

Test data without ground truth (``--gallery`` and ``--queries`` pair files instead of the config's
split) has nothing to compute recall against: the fused scores rank the gallery for every query and
``--submission STEM`` gets the top ``--k`` distinct gallery ids per query (``tools/submission.py``)::

    python -m tools ensemble --config cfg.yaml --checkpoints a.pth b.pth --gallery gallery.csv \
        --queries queries.csv --image_col file --image_dir_col folder --caption_col title \
        --id_col product_id --query_id_col query_id --k 10 --submission outputs/ens/submission

Per member, as BLIP's protocol ranks one direction (``--direction t2i``: text queries, gallery images;
``i2t``: image queries, gallery texts): ITC cosine of every (query, gallery item), its ``k_test``
best re-scored with ``ITM logit + cosine`` (``tools search --rerank``). Score fusion (``--fusion
score``, the default) sums the members' normalised re-scored entries, a member's floor where it did
not re-score an item, and breaks ties by the fused-feature cosine (the items no member re-scored
come last, in cosine order, with the score ``FLOOR`` = -1e4 in the submission);
``--fusion feature`` ranks by the fused-feature cosine alone. The gallery needs no caption column
(t2i) and the queries no image column; ids default to the image path (gallery) and to the text or
image path (queries). Files and images are checked before any model is built. One process.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, List

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from data.collate import tokenize
from data.utils import pre_caption
from data.preflight import log_unk_rate
from data.transforms import build_test_transform
from data.pairs import FORMATS
from tools.common import inference_model, inspect_members, load_member_config, read_pair_args, start
from tools.submission import check_submission_target
from utils import dist as du
from tasks.retrieval import build_datasets
from utils.rundir import commit_run
from utils.precision import autocast
from tasks.retrieval_eval import embed_texts, evaluate_retrieval, retrieval_metrics

logger = logging.getLogger("tools.ensemble")

OUTPUTS = ("ensemble.json", "fused_scores.npz", "submission.csv", "submission.json")
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
    g = parser.add_argument_group("without ground truth: a submission from the fused scores")
    g.add_argument("--gallery", nargs="+", metavar="FILE", help="gallery pair files (CSV/TSV or json)")
    g.add_argument("--queries", nargs="+", metavar="FILE", help="query pair files (CSV/TSV or json)")
    g.add_argument("--direction", default="t2i", choices=("t2i", "i2t"),
                   help="t2i: text queries, gallery images; i2t: image queries, gallery texts")
    g.add_argument("--fusion", default="score", choices=("score", "feature"), help="what ranks the gallery")
    g.add_argument("--k", type=int, default=10, help="ids per query in the submission")
    g.add_argument("--submission", metavar="STEM", help="write STEM.csv and STEM.json (default: OUTPUT_DIR/submission)")
    g.add_argument("--id_col", default=None, help="gallery column (json field) of the ids (default: the image path)")
    g.add_argument("--query_id_col", default=None, help="query column (json field) of the ids (default: text / image)")
    g.add_argument("--format", default="auto", choices=FORMATS, help="--gallery / --queries format (auto: extension)")
    g.add_argument("--image_col", default="image", help="CSV column with the image path (with --image_dir_col: file)")
    g.add_argument("--caption_col", default="caption", help="CSV column with the caption")
    g.add_argument("--image_dir_col", default=None, help="CSV column with the image's folder: path = FOLDER/FILE")


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


def _member_configs(args, cfg) -> list:
    if not args.member_configs:
        return [cfg] * len(args.checkpoints)
    return [load_member_config(c, f"--member_configs {n + 1} ({c})") for n, c in enumerate(args.member_configs)]


def _inspect(args, members) -> None:
    inspect_members([(ckpt, member, f"member {n + 1} of --checkpoints")
                     for n, (ckpt, member) in enumerate(zip(args.checkpoints, members))])


def _weights(args) -> List[float]:
    n = len(args.checkpoints)
    w = args.weights or [1.0] * n
    if len(w) != n or any(x < 0 for x in w) or sum(w) <= 0:
        raise SystemExit(f"error: --weights needs {n} non-negative numbers with a positive sum, got {args.weights}")
    return [x / sum(w) for x in w]


def main(argv=None, prog: str = "python -m tools ensemble") -> dict:
    run = start(argv, prog, __doc__.splitlines()[0], _extra_args, outputs=OUTPUTS)
    args, cfg, info = run.args, run.cfg, run.info
    try:
        weights = _weights(args)
        if args.member_configs and len(args.member_configs) != len(args.checkpoints):
            raise SystemExit(f"error: --member_configs needs one config per checkpoint ({len(args.checkpoints)}), "
                             f"got {len(args.member_configs)}")
        if bool(args.gallery) != bool(args.queries):
            raise SystemExit("error: test data without ground truth needs both --gallery and --queries")
        members = _member_configs(args, cfg)
        if args.gallery:
            return submission_mode(run, weights, members)
        record: dict = {"split": args.split, "weights": weights, "normalize": args.normalize, "members": []}
        dataset = build_datasets(cfg, (args.split,))[args.split]
        _inspect(args, members)  # every member before the first is evaluated
        commit_run()
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


# ----------------------------------------------------------------------------- without ground truth

def _read_side(args, files, t2i_side_is_text: bool, id_col, root: str) -> List[dict]:
    """Records of a query or gallery file: texts (``{"text"|"caption", "key"?}``, one per pair) or
    distinct images (``{"image": the joined path, "path": as written, "key"?}``)."""
    table = read_pair_args(args, files=files, id_col=id_col, need_image=not t2i_side_is_text,
                           need_caption=t2i_side_is_text)
    key = lambda r: {} if table.key[r] is None else {"key": table.key[r]}  # noqa: E731
    if t2i_side_is_text:
        return [{"text": table.caption[r], "caption": table.caption[r], **({"path": table.image[r]} if table.image[r]
                                                                             else {}), **key(r)}
                for r in range(len(table))]
    return [{"image": os.path.join(root, table.image[r]) if root else table.image[r], "path": table.image[r], **key(r)}
            for r in table.first_rows_of_images()]


def member_rankings(model, tokenizer, member, device, queries: List[dict], gallery: List[dict], t2i: bool,
                    k_test: int) -> Dict[str, np.ndarray]:
    """One member on queries x gallery, BLIP's protocol in one direction: normalised ITC features of
    both sides, each query's ``k_test`` best items by cosine (exact), re-scored with ``ITM logit +
    cosine``. Returns ``query_feat`` [Q, E], ``gallery_feat`` [G, E], ``cand`` [Q, k] (gallery
    indices) and ``score`` [Q, k] (re-scored; not sorted)."""
    from tools.embed import embed_captions
    from tools.search import encode_image_files, itm_rerank, search
    texts = [q["text"] for q in queries] if t2i else [g["caption"] for g in gallery]
    image_paths = [g["image"] for g in gallery] if t2i else [q["image"] for q in queries]
    log_unk_rate(tokenizer, texts, "the queries" if t2i else "the gallery texts",
                 clean=lambda c: pre_caption(c, member.max_words))
    text_feat = embed_captions(model, tokenizer, texts, member, device)
    image_feat = encode_image_files(model, image_paths, member, device)[0].cpu().numpy()
    query_feat, gallery_feat = (text_feat, image_feat) if t2i else (image_feat, text_feat)
    top_s, top_i = search(query_feat, gallery_feat, k_test, backend="torch")
    score, _, _ = itm_rerank(model, tokenizer, member, device, queries, gallery, "", top_s, top_i, t2i)
    return {"query_feat": query_feat, "gallery_feat": gallery_feat, "cand": top_i, "score": score}


def fused_ranking(members: List[Dict[str, np.ndarray]], weights: List[float], how: str, fusion: str,
                  n_rank: int) -> tuple:
    """Per query, the first ``n_rank`` gallery items by the fused scores, and their scores.

    ``fusion='score'``: each member's re-scored entries normalised over all its entries (``how``), a
    member's ``FLOOR`` where it did not re-score the item, weighted and summed (the dense fusion of
    ``fuse_scores``, computed on the re-scored items only); every tie breaks by the fused-feature
    cosine, then the gallery order, so the items no member (of positive weight) re-scored, all at
    ``FLOOR``, come last in cosine order. ``'feature'``: the fused-feature cosine alone. Returns
    (indices, scores) lists per query."""
    from tools.search import search
    q_fused = fuse_features([torch.from_numpy(m["query_feat"]) for m in members], weights).numpy()
    g_fused = fuse_features([torch.from_numpy(m["gallery_feat"]) for m in members], weights).numpy()
    n_rank = min(n_rank, g_fused.shape[0])
    cos_s, cos_i = search(q_fused, g_fused, n_rank, backend="torch")
    if fusion == "feature":
        return [list(i) for i in cos_i], [list(s) for s in cos_s]
    normed = [normalise_scores(m["score"], how) for m in members]
    order_out, score_out = [], []
    for q in range(q_fused.shape[0]):
        fused: Dict[int, float] = {}
        for m, (member, z) in enumerate(zip(members, normed)):
            for c, v in zip(member["cand"][q], z[q]):
                fused[int(c)] = fused.get(int(c), 0.0) + weights[m] * (v - FLOOR)
        # sum_m w_m * (z or FLOOR) = FLOOR + sum over the members that re-scored it of w_m (z - FLOOR)
        union = np.array(sorted(c for c, v in fused.items() if v > 0), dtype=np.int64)  # above FLOOR
        values = np.array([fused[int(c)] + FLOOR for c in union])
        cos = g_fused[union] @ q_fused[q]
        order = np.lexsort((union, -cos, -values))  # last key first: fused score, then cosine, then index
        ranked, scores = [int(i) for i in union[order]], [float(v) for v in values[order]]
        if len(ranked) < n_rank:  # the rest, all at FLOOR: by cosine (the search's order breaks its ties)
            seen = set(ranked)
            extra = [int(i) for i in cos_i[q] if int(i) not in seen][:n_rank - len(ranked)]
            ranked += extra
            scores += [FLOOR] * len(extra)
        order_out.append(ranked[:n_rank])
        score_out.append(scores[:n_rank])
    return order_out, score_out


def submission_mode(run, weights: List[float], members_cfg: list) -> dict:
    """``--gallery`` / ``--queries`` without ground truth: fused ranking -> submission files."""
    from data.preflight import check_images
    from data.utils import BadImageError
    from tools.submission import distinct_top, fetch_size, key_of, write_submission
    args, cfg, info = run.args, run.cfg, run.info
    if not info.is_main:
        return {}  # one process: the other torchrun ranks have nothing to do
    if args.k < 1:
        raise SystemExit(f"error: --k must be >= 1, got {args.k}")
    stem = args.submission or run.output_dir / "submission"
    if args.submission:
        check_submission_target(stem, args.overwrite)
    t2i = args.direction == "t2i"
    root = cfg.image_root or ""
    queries = _read_side(args, args.queries, t2i, args.query_id_col, root)
    gallery = _read_side(args, args.gallery, not t2i, args.id_col, root)
    images = gallery if t2i else queries
    try:  # every image the members decode, before any model is built
        bad = check_images([r["image"] for r in images], lambda k: f"{'gallery' if t2i else 'query'} image {k}",
                           "the gallery images" if t2i else "the query images", cfg.skip_bad_images,
                           hint="pass --opts skip_bad_images=true to leave them out", collective=False)
    except (FileNotFoundError, BadImageError) as err:
        raise SystemExit(f"error: {err}") from None
    if bad:
        logger.warning("left out %d of %d %s images that are missing or unreadable (skip_bad_images)", len(bad),
                       len(images), "gallery" if t2i else "query")
        images[:] = [r for r in images if r["image"] not in bad]
        if not images:
            raise SystemExit("error: no image left (all missing or unreadable)")
    _inspect(args, members_cfg)  # every member before the first is run
    commit_run()
    # Default ids: the image path as written (a text: its image's, else the text itself).
    gallery_keys = [key_of(r, r.get("path") or r.get("caption")) for r in gallery]
    query_keys = [key_of(r, r["text"] if t2i else r["path"]) for r in queries]
    rankings = []
    for ckpt, member in zip(args.checkpoints, members_cfg):
        model, tokenizer = inference_model(member, info.device, pretrained=ckpt)
        rankings.append(member_rankings(model, tokenizer, member, info.device, queries, gallery, t2i, cfg.k_test))
        logger.info("member %s: %d queries x %d gallery items, %d re-scored per query", ckpt, len(queries),
                    len(gallery), rankings[-1]["cand"].shape[1])
        del model
    order, scores = fused_ranking(rankings, weights, args.normalize, args.fusion, fetch_size(gallery_keys, args.k))
    top = [distinct_top(o, s, gallery_keys, args.k) for o, s in zip(order, scores)]
    paths = write_submission(stem, query_keys, [t[0] for t in top], [t[1] for t in top], args.k)
    record = {"mode": "submission", "direction": args.direction, "fusion": args.fusion, "normalize": args.normalize,
              "weights": weights, "checkpoints": list(args.checkpoints), "queries": len(queries),
              "gallery": len(gallery), "k": args.k, "k_test": cfg.k_test, "submission": [str(p) for p in paths]}
    (run.output_dir / "ensemble.json").write_text(json.dumps(record, indent=1))
    logger.info("wrote the submission %s and %s (%d queries, top %d of %d gallery items, %s fusion)", *paths,
                len(queries), args.k, len(gallery), args.fusion)
    return record


if __name__ == "__main__":
    main()
