"""Feature-cached gradient accumulation for BLIP's contrastive training (``accum_freq: k``).

k micro-batches of B pairs give the gradient of **one batch of kB** (GradCache, as open_clip's
``accum_freq``), not the naive average of k small-batch losses:

1. **Features, no graph.** For each micro-batch, in order: the RNG state is recorded, then the
   online image tokens and ITC features and the text features are computed without a graph. Then,
   once per virtual batch: the momentum update and the momentum features of all k micro-batches.
2. **ITC over the virtual batch.** The ITC loss of all kB queries against the kB (x ranks) momentum
   keys plus the queue is computed on the cached features as leaves and back-propagated: the
   gradient lands on ``temp`` and on the cached features. The queue takes the virtual batch once.
3. **ITM.** Hard negatives are drawn once from the virtual batch's similarity matrix (the same draw
   a kB batch makes). Each micro-batch then runs its own ITM forward/backward (positives, its
   texts with their negative images, its images with their negative texts), the image tokens taken
   from the cache as leaves, so the gradient of a negative image drawn from another micro-batch is
   kept for that micro-batch's encoder. Its loss is its share of the virtual batch's mean.
4. **Encoders with graph.** Each micro-batch is encoded again with the RNG state of step 1 (the
   same dropout masks), and the cached gradients of its tokens and features are back-propagated
   through the encoders (``(x * grad).sum().backward()``).

The optimiser step (and the lr schedule, alpha ramp, momentum update and enqueue) then happens once
per virtual batch. Under torchrun the model is not wrapped in DDP: the caller all-reduces the
gradients once per virtual batch (``utils.dist.all_reduce_gradients``).

Cost: one extra forward of the encoders per micro-batch (step 4 repeats step 1) and a cache of the
virtual batch's image tokens and their gradient (kB x (1 + N) x D floats each).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from models.losses import itc_momentum_loss, sample_hard_negatives
from utils import dist as du
from utils.config import ConfigError


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _pad_to(t: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return F.pad(t, (0, length - t.shape[1]), value=value) if t.shape[1] < length else t


def feature_cached_step(model, micro: List[Dict[str, torch.Tensor]], alpha: float,
                        generator: Optional[torch.Generator], backward: Callable[[torch.Tensor], None],
                        use_queue: bool = True, pad_token_id: int = 0,
                        extra: Optional["MicroTerm"] = None) -> Dict[str, torch.Tensor]:
    """ITC + ITM of the virtual batch made of ``micro`` (dicts with ``pixel_values``,
    ``input_ids``, ``attention_mask``, ``idx``) for a :class:`~models.blip.BLIPRetrieval`;
    accumulates the virtual batch's gradients into the parameters. ``backward(loss)`` back-propagates
    a loss term (the trainer's gradient scaler applies there). ``extra``: further terms
    (:class:`MicroTerm`: BLIP pretraining's LM, DLIP's distillation), on the cached features after
    the enqueue and with each micro-batch's ITM. Returns the virtual batch's ``loss_ita``,
    ``loss_itm`` and ``extra``'s terms (detached)."""
    if model.negative_all_rank:
        raise ConfigError("accum_freq > 1 with negative_all_rank is not supported: the hard negatives are drawn "
                         "from the virtual batch of each rank")
    device = micro[0]["pixel_values"].device
    with torch.no_grad():
        model.temp.clamp_(0.001, 0.5)
    sizes = [b["pixel_values"].shape[0] for b in micro]
    length = max(b["input_ids"].shape[1] for b in micro)
    ids = torch.cat([_pad_to(b["input_ids"], length, pad_token_id) for b in micro])
    mask = torch.cat([_pad_to(b["attention_mask"], length, 0) for b in micro])
    idx = torch.cat([b["idx"].view(-1) for b in micro])

    # 1. Features without a graph, recording each micro-batch's RNG state; momentum once.
    states, tokens, image_feat, text_feat = [], [], [], []
    with torch.no_grad():
        for b in micro:
            states.append(_rng_state(device))
            t, f = model.encode_image(b["pixel_values"])
            _, g = model.encode_text(b["input_ids"], b["attention_mask"])
            tokens.append(t)
            image_feat.append(f)
            text_feat.append(g)
        model.momentum_update()
        moms = [model.momentum_features(b["pixel_values"], b["input_ids"], b["attention_mask"]) for b in micro]
        image_feat_m = torch.cat([m[0] for m in moms])
        text_feat_m = torch.cat([m[1] for m in moms])
        idx_all = du.concat_all_gather(idx)
        image_m_all, text_m_all = du.concat_all_gather(image_feat_m), du.concat_all_gather(text_feat_m)
        if extra is not None:
            extra.prepare(model, micro)

    # 2. ITC of the virtual batch on the cached features (as leaves).
    feats_i = torch.cat(image_feat).detach().requires_grad_(True)
    feats_t = torch.cat(text_feat).detach().requires_grad_(True)
    image_keys, text_keys, idx_keys = model.itc_keys(image_m_all, text_m_all, idx_all, image_feat_m, text_feat_m, idx,
                                                     use_queue)
    loss_ita = itc_momentum_loss(feats_i, feats_t, image_keys, text_keys, image_feat_m, text_feat_m, idx, idx_keys,
                                 model.temp, alpha)
    if use_queue:
        model.enqueue(image_m_all, text_m_all, idx_all)
    out = {"loss_ita": loss_ita.detach()}
    batch_terms = extra.batch_terms(model, feats_i, feats_t, alpha, use_queue) if extra is not None else {}
    backward(loss_ita + sum(batch_terms.values()))
    out.update({k: v.detach() for k, v in batch_terms.items()})

    # 3. ITM: negatives drawn once over the virtual batch, then one forward/backward per micro-batch.
    all_tokens = torch.cat(tokens).detach().requires_grad_(True)
    neg_img, neg_txt, valid_img, valid_txt = sample_hard_negatives(
        feats_i.detach(), feats_t.detach(), feats_i.detach(), feats_t.detach(), idx, idx, model.temp.detach(),
        generator)
    weight_total = (len(idx) + valid_img.sum() + valid_txt.sum()).float()
    loss_itm = torch.zeros((), device=device)
    micro_sums: Dict[str, torch.Tensor] = {}
    start = 0
    for b, n in zip(micro, sizes):
        rows = slice(start, start + n)
        start += n
        m_ids, m_mask = ids[rows], mask[rows]
        pair_ids = torch.cat([m_ids, m_ids, ids[neg_txt[rows]]])
        pair_mask = torch.cat([m_mask, m_mask, mask[neg_txt[rows]]])
        # Cross K/V projected once per distinct image (the micro-batch's and its drawn negatives).
        own = torch.arange(n, device=device)
        cross_kv = model.text_encoder.project_cross_kv(torch.cat([all_tokens[rows], all_tokens[neg_img[rows]]]))
        logits = model.itm_logits(pair_ids, pair_mask, cross_kv=cross_kv, cross_index=torch.cat([own, own + n, own]))
        labels = torch.cat([torch.ones(n, dtype=torch.long), torch.zeros(2 * n, dtype=torch.long)]).to(device)
        weight = torch.cat([torch.ones(n, dtype=torch.bool, device=device), valid_img[rows], valid_txt[rows]]).float()
        share = (F.cross_entropy(logits.float(), labels, reduction="none") * weight).sum() / weight_total
        loss_itm = loss_itm + share.detach()
        if extra is not None:
            for name, part in extra.micro_terms(model, b, all_tokens[rows], rows, n / len(idx)).items():
                micro_sums[name] = micro_sums.get(name, 0.0) + part.detach()
                share = share + part
        backward(share)
    after = _rng_state(device)

    # 4. Each micro-batch's encoders again, with graph and the same dropout, fed the cached gradients.
    start = 0
    for b, n, state in zip(micro, sizes, states):
        rows = slice(start, start + n)
        start += n
        _set_rng_state(state, device)
        t, f = model.encode_image(b["pixel_values"])
        _, g = model.encode_text(b["input_ids"], b["attention_mask"])
        surrogate = (t * all_tokens.grad[rows].to(t.dtype)).sum() + (f * feats_i.grad[rows].to(f.dtype)).sum() \
            + (g * feats_t.grad[rows].to(g.dtype)).sum()
        surrogate.backward()  # the cached gradients already carry the loss scale
    _set_rng_state(after, device)
    out["loss_itm"] = loss_itm
    out.update(micro_sums)
    return out


class MicroTerm:
    """Further loss terms of a feature-cached step (``extra``):

    - ``prepare(model, micro)``: once, after step 1, without a graph (a teacher's forward, counts);
    - ``batch_terms(model, image_feat, text_feat, alpha, use_queue)``: terms of the whole virtual
      batch's cached features (leaves ``[V, E]``), after the enqueue;
    - ``micro_terms(model, batch, image_tokens, rows, fraction)``: each micro-batch's share of terms
      that are means over the virtual batch (``rows``: its rows in it; ``fraction``: its share of the
      virtual batch's pairs), with a graph through ``image_tokens`` (the cached leaves).
    Each returns ``{name: tensor}`` as it is optimised (and logged)."""

    def prepare(self, model, micro: List[Dict[str, torch.Tensor]]) -> None:
        pass

    def batch_terms(self, model, image_feat, text_feat, alpha: float, use_queue: bool) -> Dict[str, torch.Tensor]:
        return {}

    def micro_terms(self, model, batch, image_tokens, rows: slice, fraction: float) -> Dict[str, torch.Tensor]:
        return {}

