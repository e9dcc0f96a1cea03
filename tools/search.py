"""Top-k search of queries against an embedded gallery (``tools embed`` output), optional ITM rerank.

    # text -> image: captions against the gallery's images
    python -m tools search --config cfg.yaml --gallery outputs/gallery_embeds --queries "a red circle" "two squares" \\
        --k 10 --rerank --output_dir outputs/search
    # image -> text: query images against the gallery's captions
    python -m tools search --config cfg.yaml --gallery outputs/gallery_embeds --direction i2t --query_images a.jpg b.jpg ...
    # queries from an annotation file, or already embedded (another `tools embed` output)
    python -m tools search ... --query_input queries.csv --caption_col text
    python -m tools search ... --query_embeddings outputs/query_embeds

Similarity is the cosine of the normalised ITC features. The top k are exact: the gallery is
multiplied in chunks of ``--chunk_size`` rows and the running top k merged (memory ``[Q, chunk]``);
with ``--backend faiss`` (or ``auto`` when faiss is installed) an exact inner-product index gives the
same results. ``--rerank`` re-scores each query's k candidates as BLIP's evaluation does:
``ITM logit[match] + cosine``, with the image-major reranker of ``tasks/retrieval_eval.py``.
Writes ``results.json`` (per query, its ranked results with ``score``, ``itc`` and, reranked,
``itm``) and ``contact_sheet.png`` (the top results of the first ``--sheet_queries`` queries).
``--submission STEM`` (test data without ground truth) also writes ``STEM.csv`` / ``STEM.json``,
the top ``--k`` distinct gallery ids per query (``tools/submission.py``): the gallery's ids are its
``tools embed --id_col`` column (default: the image path), the queries' ``--query_id_col`` (default:
the text, or the image path). When gallery items share an id, the search (and ``--rerank``) covers
``k`` x (most items of one id) candidates, so that ``k`` distinct ids are found.

Before the model is built, every image the command will decode is checked (query images; with
``--rerank`` in t2i the gallery's images): a missing or unreadable one stops it naming the file, or
for query images with ``--opts skip_bad_images=true`` is left out with a count. Progress is logged
at least every 30 s.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader

from data.collate import tokenize
from data.pairs import PairBatches, PairTable
from data.preflight import check_images, log_unk_rate
from data.transforms import build_test_transform
from data.utils import BadImageError, load_image, pre_caption
from tools.common import add_pair_args, batches_of, inference_model, model_signature, read_pair_args, start
from tools.embed import check_embed_dim, embed_captions, load_embeddings, read_manifest
from tools.submission import check_submission_target, distinct_top, fetch_size, key_of, write_submission
from utils import dist as du
from utils.precision import autocast
from utils.errors import UserError
from utils.rundir import commit_run
from utils.logging import Heartbeat
from tasks.retrieval_eval import rerank_itm

logger = logging.getLogger("tools.search")
OUTPUTS = ("results.json", "contact_sheet.png")


def _extra_args(parser) -> None:
    parser.add_argument("--gallery", required=True, help="folder written by `tools embed`")
    parser.add_argument("--direction", default="t2i", choices=("t2i", "i2t"),
                        help="t2i: text queries, gallery images; i2t: image queries, gallery texts")
    q = parser.add_argument_group("queries (one of)")
    q.add_argument("--queries", nargs="+", help="query texts (t2i)")
    q.add_argument("--query_images", nargs="+", help="query image files (i2t)")
    q.add_argument("--query_embeddings", help="a `tools embed` folder: its texts (t2i) or images (i2t)")
    add_pair_args(parser, required=False)  # --input: queries from annotation files
    parser.add_argument("--k", type=int, default=10, help="results per query")
    parser.add_argument("--chunk_size", type=int, default=65536, help="gallery rows per matrix product")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "faiss"),
                        help="exact search backend (auto: faiss when installed)")
    parser.add_argument("--rerank", action="store_true", help="re-score the top k with ITM (+ cosine)")
    parser.add_argument("--sheet_queries", type=int, default=4, help="queries shown in contact_sheet.png")
    parser.add_argument("--sheet_k", type=int, default=5, help="results per query in the contact sheet")
    s = parser.add_argument_group("submission (test data without ground truth)")
    s.add_argument("--submission", metavar="STEM",
                   help="also write STEM.csv and STEM.json: the top --k distinct gallery ids per query (the gallery's "
                        "`tools embed --id_col`, else the image path)")
    s.add_argument("--query_id_col", default=None,
                   help="--input queries: the CSV column (json field) of each query's id (default: the query text, "
                        "or the image path)")


# ----------------------------------------------------------------------------- exact top-k

def topk_chunked(queries: torch.Tensor, gallery: torch.Tensor, k: int, chunk_size: int = 65536,
                 query_chunk: int = 4096) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` inner products: queries ``[Q, E]`` x gallery ``[G, E]`` -> (scores, indices)
    ``[Q, min(k, G)]``, best first. Memory stays ``[query_chunk, chunk_size + k]``."""
    k = min(k, gallery.shape[0])
    progress = Heartbeat("search", queries.shape[0], "queries", logger)
    out_s, out_i = [], []
    for q0 in range(0, queries.shape[0], query_chunk):
        q = queries[q0:q0 + query_chunk]
        best_s = q.new_empty(q.shape[0], 0)
        best_i = torch.empty(q.shape[0], 0, dtype=torch.long, device=q.device)
        for g0 in range(0, gallery.shape[0], chunk_size):
            s = q @ gallery[g0:g0 + chunk_size].t()
            cand_s = torch.cat([best_s, s], dim=1)
            idx = torch.arange(g0, g0 + s.shape[1], device=q.device).expand(q.shape[0], -1)
            cand_i = torch.cat([best_i, idx], dim=1)
            top = cand_s.topk(min(k, cand_s.shape[1]), dim=1)
            best_s, best_i = top.values, cand_i.gather(1, top.indices)
        out_s.append(best_s)
        out_i.append(best_i)
        progress.update(q.shape[0])
    if not out_s:
        return queries.new_empty(0, k), torch.empty(0, k, dtype=torch.long)
    return torch.cat(out_s), torch.cat(out_i)


def topk_faiss(queries: np.ndarray, gallery: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexFlatIP(gallery.shape[1])  # exact inner product: no approximation
    index.add(np.ascontiguousarray(gallery, dtype=np.float32))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, gallery.shape[0]))


def search(queries: np.ndarray, gallery: np.ndarray, k: int, backend: str = "auto",
           chunk_size: int = 65536) -> Tuple[np.ndarray, np.ndarray]:
    """(scores, indices) ``[Q, min(k, G)]`` of the exact top-k inner products, best first."""
    if backend == "auto":
        try:
            import faiss  # noqa: F401
            backend = "faiss"
        except ImportError:
            backend = "torch"
    if backend == "faiss":
        return topk_faiss(queries, gallery, k)
    s, i = topk_chunked(torch.from_numpy(np.asarray(queries, np.float32)),
                        torch.from_numpy(np.asarray(gallery, np.float32)), k, chunk_size)
    return s.numpy(), i.numpy()


# ----------------------------------------------------------------------------- queries

def _join_root(root: str, path: str) -> str:
    return path if not root else os.path.join(root, path)


def load_queries(args, cfg) -> Tuple[List[dict], Optional[np.ndarray]]:
    """Query records (``text`` or ``image`` path) and, when already embedded, their features."""
    t2i = args.direction == "t2i"
    given = [n for n in ("queries", "query_images", "query_embeddings", "input") if getattr(args, n)]
    if len(given) != 1:
        raise SystemExit("error: give exactly one of --queries, --query_images, --query_embeddings, --input")
    if args.queries:
        if not t2i:
            raise SystemExit("error: --queries are texts: use --direction t2i (or --query_images for i2t)")
        return [{"text": q} for q in args.queries], None
    if args.query_images:
        if t2i:
            raise SystemExit("error: --query_images are images: use --direction i2t")
        return [{"image": p} for p in args.query_images], None
    if args.query_embeddings:
        manifest = read_manifest(args.query_embeddings)
        check_embed_dim(manifest, args.query_embeddings, cfg, what="the query embeddings")
        feats, ids = load_embeddings(args.query_embeddings, "text" if t2i else "image")
        if manifest["model"] != model_signature(cfg):
            logger.warning("the queries in %s were embedded with another model config than this one",
                           args.query_embeddings)
        root = manifest.get("image_root", "")
        return [({"text": r["caption"], "image": _join_root(root, r["image"])} if t2i
                 else {"image": _join_root(root, r["image"])}) | ({"key": r["key"]} if "key" in r else {})
                for r in ids], feats
    # Text queries need no image column, image queries no caption column (test data without ground truth).
    table = read_pair_args(args, id_col=args.query_id_col, need_image=not t2i, need_caption=t2i)
    keys = [{} if k is None else {"key": k} for k in table.key]
    if t2i:
        return [{"text": c, **({"image": _join_root(cfg.image_root, i)} if i else {}), **keys[r]}
                for r, (c, i) in enumerate(zip(table.caption, table.image))], None
    return [{"image": _join_root(cfg.image_root, table.image[r]), **keys[r]}
            for r in table.first_rows_of_images()], None


def _query_key(query: dict, t2i: bool) -> str:
    """A query's id in a submission: its ``--query_id_col`` value, else its text (t2i) or image path."""
    return key_of(query, query["text"] if t2i else query["image"])


def check_query_images(queries: List[dict], skip: bool) -> List[int]:
    """The indices of the queries whose image exists and has a readable header: a bad one ends the
    command naming it, or with ``skip`` (``skip_bad_images``) is left out with a count. Single process."""
    try:
        bad = check_images([query["image"] for query in queries], lambda q: f"query image {q}", "the query images",
                           skip, hint="pass --opts skip_bad_images=true to leave them out", collective=False)
    except (FileNotFoundError, BadImageError) as err:
        raise SystemExit(f"error: {err}") from None
    if bad:
        logger.warning("left out %d of %d queries whose image is missing or unreadable (skip_bad_images)", len(bad),
                       len(queries))
    return [q for q, query in enumerate(queries) if query["image"] not in bad]


def check_gallery_images(gallery_ids: List[dict], root: str, gallery: str) -> None:
    """With ``--rerank`` in t2i the candidates' images are decoded: check them all up front (they
    may have moved since ``tools embed``). Single process."""
    try:
        check_images([_join_root(root, r["image"]) for r in gallery_ids], lambda k: f"image {k} of gallery {gallery}",
                     "the gallery images", skip=False, hint="embed the gallery again", collective=False)
    except (FileNotFoundError, BadImageError) as err:
        raise SystemExit(f"error: {err}") from None


@torch.no_grad()
def encode_image_files(model, paths: List[str], cfg, device, tokens: bool = False):
    """Features ``[n, E]`` (and, with ``tokens``, ViT tokens ``[n, 1+N, Dv]``) of image files."""
    dataset = PairBatches(PairTable.from_images(paths), batches_of(list(range(len(paths))), cfg.batch_size_test),
                          None, build_test_transform(cfg.image_size), cfg.max_words)
    loader = DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers)
    progress = Heartbeat("encode images", len(paths), "images", logger)
    feats, toks = [], []
    for batch in loader:
        if batch["errors"]:
            raise FileNotFoundError("; ".join(batch["errors"].values()))
        with autocast(device, cfg.precision):
            t, f = model.encode_image(batch["pixel_values"].to(device))
        index = batch["image_index"].to(device)
        feats.append(f.float()[index])
        if tokens:
            toks.append(t.float()[index])
        progress.update(len(batch["rows"]))
    return torch.cat(feats), (torch.cat(toks) if tokens else None)


# ----------------------------------------------------------------------------- rerank

@torch.no_grad()
def itm_rerank(model, tokenizer, cfg, device, queries: List[dict], gallery_ids: List[dict], gallery_root: str,
               top_s: np.ndarray, top_i: np.ndarray, t2i: bool) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Re-score each query's candidates with ``ITM logit[match] + cosine`` and re-sort them.

    The reranker is image-major: t2i encodes the distinct candidate images, i2t the query images;
    ``needed[image, text]`` marks the (query, candidate) pairs. Returns (score, itm, order) ``[Q, k]``.
    """
    cand = np.unique(top_i)
    pos = {int(c): n for n, c in enumerate(cand)}
    if t2i:
        texts = [q["text"] for q in queries]
        image_paths = [_join_root(gallery_root, gallery_ids[c]["image"]) for c in cand]
    else:
        texts = [gallery_ids[c]["caption"] for c in cand]
        image_paths = [q["image"] for q in queries]
    _, image_tokens = encode_image_files(model, image_paths, cfg, device, tokens=True)
    ids, mask = tokenize(tokenizer, [pre_caption(t, cfg.max_words) for t in texts], cfg.max_tokens)
    needed = torch.zeros(len(image_paths), len(texts), dtype=torch.bool)
    for q in range(top_i.shape[0]):
        for c in top_i[q]:
            if t2i:
                needed[pos[int(c)], q] = True
            else:
                needed[q, pos[int(c)]] = True
    itm = rerank_itm(model, image_tokens, 0, needed.to(device), ids, mask, device, cfg.rerank_batch_size,
                     precision=cfg.precision,
                     report=Heartbeat("rerank", len(image_paths), "images", logger).update).cpu().numpy()
    cols = np.vectorize(pos.get)(top_i) if top_i.size else top_i
    rows = np.arange(top_i.shape[0])[:, None]
    itm_q = itm[cols, rows] if t2i else itm[rows, cols]
    score = itm_q + top_s
    order = np.argsort(-score, axis=1, kind="stable")
    return score, itm_q, order


# ----------------------------------------------------------------------------- outputs

def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _wrap(text: str, width: int) -> str:
    import textwrap
    return "\n".join(textwrap.wrap(text, width)[:6])


def contact_sheet(results: List[dict], t2i: bool, path: Path, k: int, thumb: int = 128) -> None:
    """One row per query: the query (text, or its image) then its top ``k`` results with rank and score."""
    from PIL import Image, ImageDraw

    pad, label_h, text_w = 6, 30, 2 * thumb
    cols = 1 + k if t2i else 2
    cell_w = [text_w if t2i else thumb] + ([thumb] * k if t2i else [3 * thumb + 120])
    width = sum(cell_w) + pad * (cols + 1)
    row_h = thumb + label_h + pad
    sheet = Image.new("RGB", (width, pad + row_h * max(1, len(results))), "white")
    draw, font = ImageDraw.Draw(sheet), _font(12)
    for r, res in enumerate(results):
        y, x = pad + r * row_h, pad
        query = res["query"]
        if t2i:
            draw.multiline_text((x, y), _wrap("Q: " + query["text"], 34), fill="black", font=font)
        else:
            sheet.paste(_thumb(query["image"], thumb), (x, y))
        x += cell_w[0] + pad
        if t2i:
            for item in res["results"][:k]:
                sheet.paste(_thumb(item["image_path"], thumb), (x, y))
                draw.text((x, y + thumb + 2), f"#{item['rank']}  {item['score']:.3f}", fill="black", font=font)
                x += thumb + pad
        else:
            lines = [f"#{it['rank']} {it['score']:.3f}  {it['caption'][:60]}" for it in res["results"][:k]]
            draw.multiline_text((x, y), "\n".join(lines), fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def _thumb(path: str, size: int):
    from PIL import Image
    try:
        img = load_image(path)
    except (FileNotFoundError, ValueError):
        return Image.new("RGB", (size, size), (200, 200, 200))  # the JSON still names the file
    scale = size / max(img.width, img.height)  # small images are enlarged too, to be seen
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
    canvas = Image.new("RGB", (size, size), "white")
    canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return canvas


def main(argv=None, prog: str = "python -m tools search") -> List[dict]:
    run = start(argv, prog, __doc__.splitlines()[0], _extra_args, outputs=OUTPUTS)
    args, cfg, info = run.args, run.cfg, run.info
    try:
        if not info.is_main:
            return []  # a single-process tool; extra torchrun ranks have nothing to do
        if args.k < 1 or args.chunk_size < 1:
            raise UserError(f"--k {args.k} / --chunk_size {args.chunk_size}: both must be >= 1")
        if args.submission:
            check_submission_target(args.submission, args.overwrite)
        t2i = args.direction == "t2i"
        manifest = read_manifest(args.gallery)
        check_embed_dim(manifest, args.gallery, cfg)
        if manifest["model"] != model_signature(cfg):
            logger.warning("the gallery was embedded with another model config (%s) than this one (%s)",
                           manifest["model"], model_signature(cfg))
        gallery, gallery_ids = load_embeddings(args.gallery, "image" if t2i else "text")
        queries, query_feats = load_queries(args, cfg)
        if not t2i and (query_feats is None or args.rerank):  # the query images are decoded
            keep = check_query_images(queries, cfg.skip_bad_images)
            queries = [queries[q] for q in keep]
            query_feats = None if query_feats is None else query_feats[keep]
        if t2i and args.rerank:
            check_gallery_images(gallery_ids, manifest.get("image_root", ""), args.gallery)
        model = tokenizer = None
        if query_feats is None or args.rerank:
            model, tokenizer = inference_model(cfg, info.device)
        commit_run()  # inputs and model checked: files are written from here on
        if query_feats is None:
            if t2i:
                log_unk_rate(tokenizer, [q["text"] for q in queries], "the queries",
                             clean=lambda c: pre_caption(c, cfg.max_words))
                query_feats = embed_captions(model, tokenizer, [q["text"] for q in queries], cfg, info.device,
                                             Heartbeat("embed queries", len(queries), "queries", logger))
            else:
                query_feats = encode_image_files(model, [q["image"] for q in queries], cfg, info.device)[0].cpu().numpy()
        k_search = args.k
        if args.submission:  # enough candidates for k distinct ids when gallery items share one
            gallery_keys = [key_of(r) for r in gallery_ids]
            k_search = max(args.k, fetch_size(gallery_keys, args.k))
        top_s, top_i = search(query_feats, gallery, k_search, args.backend, args.chunk_size)
        itm = None
        if args.rerank:
            score, itm, order = itm_rerank(model, tokenizer, cfg, info.device, queries, gallery_ids,
                                           manifest.get("image_root", ""), top_s, top_i, t2i)
        else:
            score, order = top_s, np.tile(np.arange(top_i.shape[1]), (top_i.shape[0], 1))
        gallery_root = manifest.get("image_root", "")
        results = []
        for q, query in enumerate(queries):
            ranked = []
            for rank, j in enumerate(order[q][:args.k]):
                g = int(top_i[q, j])
                item = {"rank": rank + 1, "gallery_index": g, **gallery_ids[g], "score": float(score[q, j]),
                        "itc": float(top_s[q, j])}
                if itm is not None:
                    item["itm"] = float(itm[q, j])
                if t2i:
                    item["image_path"] = _join_root(gallery_root, gallery_ids[g]["image"])
                ranked.append(item)
            results.append({"query": query, "results": ranked})
        (run.output_dir / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
        if args.submission:
            ranked = [distinct_top(top_i[q, order[q]], score[q, order[q]], gallery_keys, args.k)
                      for q in range(len(queries))]
            paths = write_submission(args.submission, [_query_key(query, t2i) for query in queries],
                                     [r[0] for r in ranked], [r[1] for r in ranked], args.k)
            logger.info("wrote the submission %s and %s (%d queries, top %d ids)", *paths, len(queries), args.k)
        if args.sheet_queries > 0 and results:
            contact_sheet(results[:args.sheet_queries], t2i, run.output_dir / "contact_sheet.png", args.sheet_k)
        logger.info("wrote %s and contact_sheet.png (%d queries, top %d of %d)", run.output_dir / "results.json",
                    len(results), min(args.k, top_i.shape[1]), gallery.shape[0])
        return results
    finally:
        du.cleanup()


if __name__ == "__main__":
    main()
