"""BLIP's retrieval evaluation protocol, computed image-major.

Protocol (docs/BLIP.md): cosine ITC similarities of all images and texts; for each image its top
``k_test`` texts and for each text its top ``k_test`` images are re-scored with ``ITM logit[:, 1] +
sim``; every other entry is -100; recall@K from the ranks.

How we compute it: the (image, text) pairs that either direction needs are collected into one set,
grouped by image, and each image's cross-attention keys/values are projected once for all of its
texts (the original projects them again for every pair and scores shared pairs twice); the texts of
one image attend to it as one folded query sequence, a single large attention product per layer. Texts are
sorted by length and each batch is cut to its longest text: padding receives exactly zero attention
weight (additive -10000 underflows to 0 in the softmax), so the real tokens' states do not change.
Under torchrun each rank embeds a contiguous shard of texts and images and scores the pairs of its
own images; scores are summed across ranks, each pair having been scored by exactly one rank.

Videos (``eval_retrieval_video.py``, ``tasks/video_retrieval.py``) go through the same code: ``encode``
is then ``model.encode_video`` (a video's "image" is its frames: one feature, and the frames'
tokens concatenated as the cross-attention sequence).

An image that fails to decode under ``skip_bad_images`` (the dataset gives index -1) is left out
with its captions, with a count in the log: its similarities are set to -inf before the top-k, so
every other query sees exactly the candidates it would see in a set without it, and its row and
its captions' columns are removed from the score matrices before the metrics.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from data.collate import tokenize
from utils import dist as du
from utils.logging import Heartbeat
from utils.precision import autocast

logger = logging.getLogger(__name__)


@dataclass
class EvalOutput:
    metrics: Dict[str, float]
    score_i2t: np.ndarray  # [n_img, n_txt] (of the images and texts evaluated)
    score_t2i: np.ndarray  # [n_txt, n_img]
    txt2img: Dict[int, int]  # of the texts and images evaluated: dataset.txt2img unless images were left out
    left_out: List[int] = field(default_factory=list)  # dataset images that failed to decode (skip_bad_images)
    image_index: Optional[np.ndarray] = None  # with left_out: the dataset image / text of each row, column
    text_index: Optional[np.ndarray] = None

    def index_arrays(self) -> Dict[str, np.ndarray]:
        """``image_index`` / ``text_index`` for a scores file when images were left out, else nothing."""
        return {} if not self.left_out else {"image_index": self.image_index, "text_index": self.text_index}


@torch.no_grad()
def embed_texts(model, input_ids, attention_mask, batch_size, device, precision="fp32") -> torch.Tensor:
    """Normalised text features ``[n, E]`` of the given ids ``[n, T]``."""
    feats = []
    for s in range(0, input_ids.shape[0], batch_size):
        with autocast(device, precision):
            _, f = model.encode_text(input_ids[s:s + batch_size].to(device), attention_mask[s:s + batch_size].to(device))
        feats.append(f.float())
    local = torch.cat(feats) if feats else torch.zeros(0, model.embed_dim, device=device)
    return local


@torch.no_grad()
def embed_images(model, dataset, indices: Sequence[int], batch_size: int, device, num_workers=0,
                 precision="fp32", keep_tokens_on: Optional[torch.device] = None, failed: Optional[list] = None,
                 encode: Optional[Callable] = None):
    """Image tokens ``[n, 1+N, Dv]`` (kept on ``keep_tokens_on``) and features ``[n, E]`` for ``indices``.
    ``failed``: gets the indices whose image the dataset could not decode (item index -1).
    ``encode``: batch -> (tokens, features); default ``model.encode_image`` (videos: ``model.encode_video``)."""
    encode = encode or model.encode_image
    indices = list(indices)
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers)
    tokens, feats = [], []
    for start, (images, index) in zip(range(0, len(indices), batch_size), loader):
        if failed is not None:
            failed.extend(indices[start + j] for j in (index < 0).nonzero().flatten().tolist())
        with autocast(device, precision):
            t, f = encode(images.to(device))
        tokens.append(t.float().to(keep_tokens_on or device))
        feats.append(f.float())
    if not feats:
        N = model.visual_encoder.num_patches + 1
        return torch.zeros(0, N, model.visual_encoder.width), torch.zeros(0, model.embed_dim, device=device)
    return torch.cat(tokens), torch.cat(feats)


def topk_pairs(sims: torch.Tensor, k_test: int):
    """Top-``k`` texts per image ``[n_img, k]`` and top-``k`` images per text ``[n_txt, k]``."""
    k_i2t = min(k_test, sims.shape[1])
    k_t2i = min(k_test, sims.shape[0])
    return sims.topk(k_i2t, dim=1).indices, sims.t().topk(k_t2i, dim=1).indices


@torch.no_grad()
def rerank_itm(model, image_tokens: torch.Tensor, image_offset: int, needed: torch.Tensor,
               input_ids, attention_mask, device, batch_size=128, image_chunk=16, precision="fp32",
               progress=False, report: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """ITM logit[:, 1] of every needed pair whose image this rank holds.

    ``image_tokens`` ``[m, 1+N, Dv]`` are images ``image_offset .. image_offset+m`` of the full
    set; ``needed`` ``[n_img, n_txt]`` (bool) marks the pairs to score. Returns a dense
    ``[n_img, n_txt]`` float tensor, zero where this rank scored nothing.

    Cross-attention keys/values are projected for ``image_chunk`` images at a time; then each
    image's texts, shortest first, go through the text encoder in batches of ``batch_size`` that
    all attend to that one image (one folded attention product per layer, no per-pair copy of the
    keys/values), each batch cut to its longest text. ``progress``: a progress bar; ``report(n)``:
    called as each chunk of ``n`` images starts (progress lines in logs).
    """
    n_img, n_txt = needed.shape
    itm = torch.zeros(n_img, n_txt, device=device)
    lengths = attention_mask.sum(dim=1).cpu()
    needed_cpu = needed.cpu()
    chunks = range(0, image_tokens.shape[0], image_chunk)
    if progress:
        from tqdm import tqdm
        chunks = tqdm(chunks, desc="rerank", unit="chunk", dynamic_ncols=True)
    m = image_tokens.shape[0]
    for c in chunks:
        end = min(c + image_chunk, m)  # never past this rank's own images
        if report is not None:
            report(end - c)
        if not needed_cpu[image_offset + c: image_offset + end].any():
            continue
        with autocast(device, precision):
            cross_kv = model.text_encoder.project_cross_kv(image_tokens[c:end].to(device))
        for j in range(end - c):
            row = image_offset + c + j
            txt = needed_cpu[row].nonzero(as_tuple=True)[0]
            if txt.numel() == 0:
                continue
            txt = txt[torch.argsort(lengths[txt], stable=True)]  # shortest together: little padding
            kv_j = [(k[j:j + 1], v[j:j + 1]) for k, v in cross_kv]
            for s in range(0, txt.numel(), batch_size):
                t = txt[s:s + batch_size]
                L = int(lengths[t].max())
                with autocast(device, precision):
                    logits = model.itm_logits(input_ids[t, :L].to(device), attention_mask[t, :L].to(device),
                                              cross_kv=kv_j)
                itm[row, t.to(device)] = logits[:, 1].float()
    return itm


def scores_from_itm(sims: torch.Tensor, itm: torch.Tensor, topk_i2t, topk_t2i):
    """Assemble BLIP's score matrices: itm + sim at the top-k entries, -100 elsewhere."""
    total = itm + sims
    score_i2t = torch.full_like(sims, -100.0)
    score_i2t.scatter_(1, topk_i2t, total.gather(1, topk_i2t))
    score_t2i = torch.full_like(sims.t(), -100.0)
    total_t = total.t()
    score_t2i.scatter_(1, topk_t2i, total_t.gather(1, topk_t2i))
    return score_i2t, score_t2i


@torch.no_grad()
def evaluate_retrieval(model, dataset, tokenizer, *, k_test: int, max_tokens: int = 35,
                       batch_size: int = 64, rerank_batch_size: int = 128, device=None,
                       num_workers: int = 0, precision: str = "fp32", progress: bool = True,
                       encode: Optional[Callable] = None, image_chunk: int = 16) -> EvalOutput:
    """Run the whole protocol on an eval dataset (``text``, ``img2txt``, ``txt2img``, items
    ``(image, index)``). Every rank must call it; every rank gets the same result. ``encode``:
    how a batch of items becomes (tokens, features), default ``model.encode_image``;
    ``image_chunk``: images whose cross K/V are projected together (``rerank_itm``)."""
    device = device or next(model.parameters()).device
    model.eval()
    input_ids, attention_mask = tokenize(tokenizer, dataset.text, max_tokens)
    n_txt, n_img = input_ids.shape[0], len(dataset)

    txt_shard, img_shard = du.shard_range(n_txt), du.shard_range(n_img)
    text_feat = du.gather_variable(embed_texts(model, input_ids[txt_shard.start:txt_shard.stop],
                                               attention_mask[txt_shard.start:txt_shard.stop],
                                               batch_size, device, precision))
    # Image tokens stay with the rank that made them: it scores all pairs of those images.
    keep_on = torch.device("cpu") if device.type == "cuda" else device
    failed_local: List[int] = []
    image_tokens, image_feat_local = embed_images(model, dataset, img_shard, batch_size, device,
                                                  num_workers, precision, keep_tokens_on=keep_on, failed=failed_local,
                                                  encode=encode)
    image_feat = du.gather_variable(image_feat_local)
    bad_img = torch.zeros(n_img, device=device)
    bad_img[failed_local] = 1.0
    bad_img = du.all_reduce_sum(bad_img) > 0
    txt2img = torch.tensor([dataset.txt2img[t] for t in range(n_txt)], device=device)
    bad_txt = bad_img[txt2img]

    sims = image_feat @ text_feat.t()  # [n_img, n_txt]
    sims[bad_img] = float("-inf")  # never anyone's top-k candidate
    sims[:, bad_txt] = float("-inf")
    topk_i2t, topk_t2i = topk_pairs(sims, k_test)
    needed = torch.zeros(n_img, n_txt, dtype=torch.bool, device=device)
    needed.scatter_(1, topk_i2t, True)
    needed.t().scatter_(1, topk_t2i, True)
    needed[bad_img] = False
    needed[:, bad_txt] = False
    logger.info("rerank: %d pairs (i2t %d + t2i %d before de-duplication)", int(needed.sum()),
                topk_i2t.numel(), topk_t2i.numel())

    show = progress and du.is_main_process()
    # Without a progress bar, a line at least every 30 s (this rank's images).
    beat = None if progress else Heartbeat("ITM rerank (this rank)", len(img_shard), "images", logger)
    itm = rerank_itm(model, image_tokens, img_shard.start, needed, input_ids, attention_mask, device,
                     rerank_batch_size, image_chunk=image_chunk, precision=precision, progress=show,
                     report=beat.update if beat is not None else None)
    du.all_reduce_sum(itm)
    score_i2t, score_t2i = scores_from_itm(sims, itm, topk_i2t, topk_t2i)
    score_i2t, score_t2i = score_i2t.cpu().numpy(), score_t2i.cpu().numpy()
    if not bad_img.any():
        return EvalOutput(retrieval_metrics(score_i2t, score_t2i, dataset.txt2img), score_i2t, score_t2i,
                          dataset.txt2img)
    keep_img = (~bad_img).nonzero().flatten().cpu().numpy()
    keep_txt = (~bad_txt).nonzero().flatten().cpu().numpy()
    logger.warning("%d of %d images could not be decoded (skip_bad_images): evaluated without them and their %d "
                   "captions", n_img - len(keep_img), n_img, n_txt - len(keep_txt))
    new_image = np.full(n_img, -1)
    new_image[keep_img] = np.arange(len(keep_img))
    txt2img_kept = {t: int(new_image[dataset.txt2img[int(old)]]) for t, old in enumerate(keep_txt)}
    score_i2t, score_t2i = score_i2t[np.ix_(keep_img, keep_txt)], score_t2i[np.ix_(keep_txt, keep_img)]
    return EvalOutput(retrieval_metrics(score_i2t, score_t2i, txt2img_kept), score_i2t, score_t2i, txt2img_kept,
                      left_out=bad_img.nonzero().flatten().tolist(), image_index=keep_img, text_index=keep_txt)


def retrieval_ranks(score_i2t: np.ndarray, score_t2i: np.ndarray, txt2img):
    """0-based ranks ``(ranks_i2t [n_img], ranks_t2i [n_txt])``: an image's is the best rank among
    its captions, a text's the rank of its image. From a descending ``np.argsort`` like the
    original, so ties (the -100 entries) resolve the same way."""
    txt2img = np.asarray([txt2img[t] for t in range(len(txt2img))], dtype=np.int64)
    n_img, n_txt = score_i2t.shape
    order = np.argsort(score_i2t, axis=1)[:, ::-1]
    position = np.empty_like(order)
    np.put_along_axis(position, order, np.arange(n_txt)[None, :].repeat(n_img, 0), axis=1)
    ranks_i2t = np.full(n_img, np.iinfo(np.int64).max)
    np.minimum.at(ranks_i2t, txt2img, position[txt2img, np.arange(n_txt)])

    order_t = np.argsort(score_t2i, axis=1)[:, ::-1]
    ranks_t2i = np.argmax(order_t == txt2img[:, None], axis=1)
    return ranks_i2t, ranks_t2i


def retrieval_metrics(score_i2t: np.ndarray, score_t2i: np.ndarray, txt2img) -> Dict[str, float]:
    """BLIP's recall metrics (names as in BLIP's logs), from :func:`retrieval_ranks`."""
    ranks_i2t, ranks_t2i = retrieval_ranks(score_i2t, score_t2i, txt2img)

    def recall(ranks, k):
        return 100.0 * float(np.mean(ranks < k))

    m = {"txt_r1": recall(ranks_i2t, 1), "txt_r5": recall(ranks_i2t, 5), "txt_r10": recall(ranks_i2t, 10),
         "img_r1": recall(ranks_t2i, 1), "img_r5": recall(ranks_t2i, 5), "img_r10": recall(ranks_t2i, 10)}
    m["txt_r_mean"] = (m["txt_r1"] + m["txt_r5"] + m["txt_r10"]) / 3
    m["img_r_mean"] = (m["img_r1"] + m["img_r5"] + m["img_r10"]) / 3
    m["r_mean"] = (m["txt_r_mean"] + m["img_r_mean"]) / 2
    return m


@torch.no_grad()
def reference_rerank(model, image_tokens, input_ids, attention_mask, sims, k_test):
    """The original algorithm, kept as the reference our fast path is checked against (tests and
    ``bench/bench_eval.py``): one query at a time, every pair's cross K/V projected again, texts
    padded to full length, shared pairs scored twice. Single process."""
    n_img, n_txt = sims.shape
    ids = model.itm_input_ids(input_ids)
    score_i2t = torch.full((n_img, n_txt), -100.0, device=sims.device)
    score_t2i = torch.full((n_txt, n_img), -100.0, device=sims.device)
    for i in range(n_img):
        top_sim, top = sims[i].topk(min(k_test, n_txt))
        enc = image_tokens[i].unsqueeze(0).repeat(top.numel(), 1, 1)
        out = model.text_encoder(ids[top], attention_mask[top], mode="multimodal", encoder_hidden_states=enc)
        score_i2t[i, top] = model.itm_head(out.last_hidden_state[:, 0])[:, 1] + top_sim
    for t in range(n_txt):
        top_sim, top = sims[:, t].topk(min(k_test, n_img))
        out = model.text_encoder(ids[t].repeat(top.numel(), 1), attention_mask[t].repeat(top.numel(), 1),
                                 mode="multimodal", encoder_hidden_states=image_tokens[top])
        score_t2i[t, top] = model.itm_head(out.last_hidden_state[:, 0])[:, 1] + top_sim
    return score_i2t, score_t2i
