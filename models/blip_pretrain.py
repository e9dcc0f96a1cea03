"""BLIP's own pretraining model (``BLIP_Pretrain``; the official ``model_base.pth`` layout).

One model, three losses per batch (docs/BLIP.md "Pretraining"):

- ITC with momentum encoders and queues, positives on the diagonal only: every pair is its own
  class (the caller gives each pair a unique ``idx``; queued features are never positives);
- ITM with hard negatives from the batch;
- LM with ``text_decoder``: the caption after ``[DEC]`` (no prompt), label smoothing 0.1.

The decoder is **tied** to the text encoder for everything but its self-attention: embeddings,
cross-attention, feed-forward and LayerNorms are the same ``nn.Module`` objects (one parameter, not
a copy, so a step updates both views), while ``text_decoder.bert.encoder.layer.N.attention`` is the
decoder's own causal self-attention. The state dict still lists every tensor under both names, as
the official file does, so it loads into retrieval (``train_retrieval.py``: the decoder is an
expected extra) and captioning (``train_caption.py``: the encoder is) unchanged. The queue pointer is
``queue_ptr`` and there is no ``idx_queue``, as in ``model_base.pth``.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from models.accum import MicroTerm, feature_cached_step
from models.blip import BLIPRetrieval, BlipArch, ITCSettings
from models.caption import TextDecoder, lm_loss
from models.distill import (DistillSettings, Views, cosine_distill, distillation_losses, per_pair_terms,
                            soft_itc_terms, teacher_views)
from models.med import MedEncoder, med_config_for
from models.vit import BlipViT, build_vit
from utils.config import ConfigError

IGNORE = -100


def tie_decoder_to_encoder(encoder: MedEncoder, decoder: MedEncoder) -> None:
    """Make ``decoder`` share every module of ``encoder`` except the self-attention blocks (BLIP's
    ``tie_encoder_decoder_weights(..., skip_key='/attention')``: cross-attention is shared)."""
    if len(encoder.layers) != len(decoder.layers):
        raise ConfigError(f"cannot tie a {len(decoder.layers)}-layer decoder to a {len(encoder.layers)}-layer encoder")
    decoder.embeddings = encoder.embeddings
    for enc, dec in zip(encoder.layers, decoder.layers):
        dec.crossattention = enc.crossattention
        dec.intermediate = enc.intermediate
        dec.output = enc.output


class BLIPPretrain(BLIPRetrieval):
    checkpoint_format = "blip"

    def __init__(self, visual_encoder: BlipViT, med_config, tokenizer, embed_dim: int = 256, queue_size: int = 57600,
                 momentum: float = 0.995, negative_all_rank: bool = False, itc_all_rank_keys: bool = True,
                 with_momentum: bool = True):
        """``with_momentum=False``: no momentum encoders and queues (a frozen distillation teacher)."""
        super().__init__(visual_encoder, med_config, embed_dim=embed_dim, queue_size=queue_size, momentum=momentum,
                         negative_all_rank=negative_all_rank, enc_token_id=tokenizer.enc_token_id,
                         itc_all_rank_keys=itc_all_rank_keys, with_momentum=with_momentum)
        if with_momentum:
            # model_base.pth's layout: the pointer is `queue_ptr`, and pairs need no id queue.
            del self._buffers["idx_queue"]
            del self._buffers["ptr_queue"]
            self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
            self.register_buffer("_no_ids", torch.full((queue_size,), -1, dtype=torch.long), persistent=False)
        self.text_decoder = TextDecoder(self.text_encoder.config)
        tie_decoder_to_encoder(self.text_encoder, self.text_decoder.bert)
        # The LM head's projection stays tied to the (now shared) word embeddings.
        self.text_decoder.cls.predictions.decoder.weight = self.text_encoder.embeddings.word_embeddings.weight
        self.bos_token_id = tokenizer.bos_token_id

    def pointer_buffer(self) -> torch.Tensor:
        return self.queue_ptr

    def queue_ids(self) -> torch.Tensor:
        return self._no_ids  # -1: never equal to a pair's id (>= 0), so queued keys are negatives

    def lm_logits(self, input_ids, attention_mask, image_tokens, attentions: bool = False, full: bool = False):
        """The decoder's logits and targets for the captions (``[DEC]`` first, no prompt): (logits,
        targets) or, ``full``, (logits, targets, the decoder's output)."""
        dec_ids = self.decoder_ids(input_ids)
        targets = dec_ids.masked_fill(attention_mask == 0, IGNORE)
        dec = self.text_decoder.bert(dec_ids, attention_mask, mode="decoder", encoder_hidden_states=image_tokens,
                                     output_last_attentions=attentions)
        logits = self.text_decoder.cls.predictions(dec.last_hidden_state)
        return (logits, targets, dec) if full else (logits, targets)

    def decoder_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The decoder's input: the caption with ``[DEC]`` in place of ``[CLS]``."""
        dec_ids = input_ids.clone()
        dec_ids[:, 0] = self.bos_token_id
        return dec_ids

    def accumulated(self, micro, alpha: float, generator, backward, use_queue: bool = True,
                    teacher: Optional["BLIPPretrain"] = None, distill: Optional[DistillSettings] = None):
        """ITC + ITM + LM (+ with a ``teacher`` DLIP's terms, weighted) of ``micro`` as one virtual
        batch (``accum_freq``; models/accum.py)."""
        extra = LMTerm() if teacher is None else DistillTerm(teacher, distill or DistillSettings())
        return feature_cached_step(self, micro, alpha, generator, backward, use_queue=use_queue, extra=extra)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                idx: torch.Tensor, alpha: float, use_queue: bool = True,
                generator: Optional[torch.Generator] = None, teacher: Optional["BLIPPretrain"] = None,
                distill: Optional[DistillSettings] = None) -> Dict[str, torch.Tensor]:
        """``loss_ita``, ``loss_itm``, ``loss_lm`` of a batch; ``idx`` ``[B]``: a unique id >= 0 per
        pair (diagonal positives). With a frozen ``teacher`` (not a submodule: it is passed in, so
        checkpoints hold the student only) and ``distill``, also DLIP's distillation terms of
        nonzero weight (``models/distill.py``), unweighted, computed as the release does: after
        this step's enqueue."""
        distilling = teacher is not None
        losses, parts = self.contrastive_and_matching(pixel_values, input_ids, attention_mask, idx, alpha,
                                                      use_queue, generator, full_positive=distilling)
        image_tokens = parts["image_tokens"]
        logits, targets, dec = self.lm_logits(input_ids, attention_mask, image_tokens, attentions=distilling,
                                               full=True)
        dec_ids = self.decoder_ids(input_ids)
        losses["loss_lm"] = lm_loss(logits, targets)
        if distilling:
            positive = parts["positive"]
            student = Views(parts["image_feat"], parts["text_feat"], positive.last_hidden_state[:, 0],
                            positive.last_attentions, dec.last_hidden_state[:, 0], logits, dec.last_attentions[0])
            tviews = teacher_views(teacher, pixel_values, input_ids, attention_mask, dec_ids)
            E = self.embed_dim
            keys = ((self.image_queue.t().clone(), self.text_queue.t().clone()) if use_queue
                    else (pixel_values.new_zeros(0, E), pixel_values.new_zeros(0, E)))
            losses.update(distillation_losses(self, teacher, student, tviews, keys[0], keys[1], alpha,
                                              distill or DistillSettings()))
        return losses


class LMTerm(MicroTerm):
    """BLIP pretraining's LM loss in a feature-cached step: a mean over the virtual batch's target
    tokens (each micro-batch's summed loss over the virtual batch's token count)."""

    def prepare(self, model, micro) -> None:
        self.tokens = sum(int((b["attention_mask"][:, 1:] != 0).sum()) for b in micro)

    def micro_terms(self, model, batch, image_tokens, rows, fraction) -> Dict[str, torch.Tensor]:
        logits, targets = model.lm_logits(batch["input_ids"], batch["attention_mask"], image_tokens)
        return {"loss_lm": lm_loss(logits, targets, reduction="sum") / self.tokens}


class DistillTerm(LMTerm):
    """LM plus DLIP's distillation terms (weighted, as ``tasks/blip_pretrain.py`` optimises them) in a
    feature-cached step. The feature terms and the soft ITC use the cached features of the whole
    virtual batch (the soft ITC after the enqueue, as the release); every other term is a mean over
    rows of a fixed count per pair (text padded to ``max_tokens``), so a micro-batch's share is its
    mean times its fraction of the pairs."""

    def __init__(self, teacher: "BLIPPretrain", settings: DistillSettings):
        self.teacher, self.settings = teacher, settings
        self.weights = settings.distill_weights()

    @torch.no_grad()
    def prepare(self, model, micro) -> None:
        super().prepare(model, micro)
        tokens, image_feat, text_feat = [], [], []
        for b in micro:
            t, f = self.teacher.encode_image(b["pixel_values"])
            _, g = self.teacher.encode_text(b["input_ids"], b["attention_mask"])
            tokens.append(t), image_feat.append(f), text_feat.append(g)
        self.tokens_t = torch.cat(tokens)
        self.image_feat_t, self.text_feat_t = torch.cat(image_feat), torch.cat(text_feat)

    def batch_terms(self, model, image_feat, text_feat, alpha, use_queue) -> Dict[str, torch.Tensor]:
        w, out = self.weights, {}
        if w["loss_img_dist"]:
            out["loss_img_dist"] = w["loss_img_dist"] * cosine_distill(image_feat, self.image_feat_t)
        if w["loss_text_dist"]:
            out["loss_text_dist"] = w["loss_text_dist"] * cosine_distill(text_feat, self.text_feat_t)
        if w["loss_ita_dist"]:
            E = model.embed_dim
            keys = ((model.image_queue.t().clone(), model.text_queue.t().clone()) if use_queue
                    else (image_feat.new_zeros(0, E), image_feat.new_zeros(0, E)))
            out["loss_ita_dist"] = w["loss_ita_dist"] * soft_itc_terms(model, self.teacher, image_feat, text_feat,
                                                                       self.image_feat_t, self.text_feat_t,
                                                                       keys[0], keys[1], alpha, self.settings)
        return out

    def micro_terms(self, model, batch, image_tokens, rows, fraction) -> Dict[str, torch.Tensor]:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits, targets, dec = model.lm_logits(ids, mask, image_tokens, attentions=True, full=True)
        out = {"loss_lm": lm_loss(logits, targets, reduction="sum") / self.tokens}
        positive = model.text_encoder(model.itm_input_ids(ids), mask, mode="multimodal",
                                      encoder_hidden_states=image_tokens, output_last_attentions=True)
        student = Views(None, None, positive.last_hidden_state[:, 0], positive.last_attentions,
                        dec.last_hidden_state[:, 0], logits, dec.last_attentions[0])
        with torch.no_grad():
            teacher = teacher_views(self.teacher, None, ids, mask, model.decoder_ids(ids),
                                    image_tokens=self.tokens_t[rows])
        for name, value in per_pair_terms(model, self.teacher, student, teacher, self.settings).items():
            out[name] = self.weights[name] * fraction * value
        return out


def build_blip_pretrain(arch: BlipArch, tokenizer, itc: Optional[ITCSettings] = None) -> BLIPPretrain:
    """A BLIP pretraining model with random weights; ``itc`` None: no momentum encoders and queues
    (a frozen distillation teacher)."""
    vit = build_vit(arch)
    med = med_config_for(arch.med_config, tokenizer, vit.width)
    if itc is None:
        return BLIPPretrain(vit, med, tokenizer, embed_dim=arch.embed_dim, with_momentum=False)
    return BLIPPretrain(vit, med, tokenizer, embed_dim=arch.embed_dim, queue_size=itc.queue_size,
                        momentum=itc.momentum, negative_all_rank=itc.negative_all_rank,
                        itc_all_rank_keys=itc.itc_all_rank_keys)

