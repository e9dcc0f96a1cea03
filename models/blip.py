"""BLIP for image-text retrieval (``BLIP_Retrieval``'s state-dict layout).

Parts: ``visual_encoder`` (ViT), ``text_encoder`` (BERT with cross-attention), ``vision_proj`` /
``text_proj`` (to ``embed_dim``), ``itm_head``, ``temp``, momentum copies ``*_m`` and the feature
queues ``image_queue`` / ``text_queue`` / ``idx_queue`` / ``ptr_queue``.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from models.losses import itc_momentum_loss, itm_loss, sample_hard_negatives
from models.med import KV, MedArch, MedConfig, MedEncoder, med_config_for
from models.vit import BlipViT, ViTSettings, build_vit
from utils import dist as du
from utils.config import ConfigError, Config, PosInt, UnitFloat

logger = logging.getLogger(__name__)


class BlipArch(ViTSettings, MedArch):
    """BLIP's encoders and projections: the ViT keys plus the text encoder's med config."""

    embed_dim: PosInt = 256                     # ITC projection dim


class ITCSettings(Config):
    """Momentum encoders, queues and the contrastive objective (retrieval training)."""

    queue_size: PosInt = 57600                  # ITC queue; a multiple of the global batch size
    momentum: UnitFloat = 0.995                 # EMA of the momentum encoders
    alpha: UnitFloat = 0.4                      # weight of momentum-distillation soft targets
    negative_all_rank: bool = False             # mine ITM hard negatives across all ranks
    itc_all_rank_keys: bool = True              # ITC keys include every rank's batch (false: BLIP's local-only)
    accum_freq: PosInt = 1                      # feature-cached accumulation: k micro-batches = one batch of
                                                # k x batch_size_train (models/accum.py; 1: off)


class BLIPRetrieval(nn.Module):
    checkpoint_format = "blip"  # the tag checkpoints of this model carry (models/factory.py)

    def __init__(self, visual_encoder: BlipViT, med_config: MedConfig, embed_dim: int = 256,
                 queue_size: int = 57600, momentum: float = 0.995, negative_all_rank: bool = False,
                 enc_token_id: int = 30523, itc_all_rank_keys: bool = True, with_momentum: bool = True):
        """``with_momentum=False`` builds no momentum encoders and no queues: enough for ITM and
        features (ContextBLIP keeps BLIP frozen and never runs ITC), at half the memory."""
        super().__init__()
        if med_config.encoder_width != visual_encoder.width:
            # BLIP sets encoder_width from the ViT; a mismatch would only surface as a shape error.
            med_config = dataclasses.replace(med_config, encoder_width=visual_encoder.width)
        self.visual_encoder = visual_encoder
        self.text_encoder = MedEncoder(med_config)
        text_width = med_config.hidden_size
        self.vision_proj = nn.Linear(visual_encoder.width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.itm_head = nn.Linear(text_width, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))

        self.with_momentum = with_momentum
        if with_momentum:
            self.visual_encoder_m = copy.deepcopy(self.visual_encoder)
            self.vision_proj_m = copy.deepcopy(self.vision_proj)
            self.text_encoder_m = copy.deepcopy(self.text_encoder)
            self.text_proj_m = copy.deepcopy(self.text_proj)
            for m in self._momentum_modules():
                m.requires_grad_(False)

            self.register_buffer("image_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))
            self.register_buffer("text_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))
            self.register_buffer("idx_queue", torch.full((1, queue_size), -100, dtype=torch.long))
            self.register_buffer("ptr_queue", torch.zeros(1, dtype=torch.long))
            # The pointer lives as a Python int (reading the buffer would sync with the GPU every
            # step) and is mirrored into the buffer, which checkpoints carry.
            self._ptr = 0
            self.register_load_state_dict_post_hook(BLIPRetrieval._pointer_from_buffer)
        self.embed_dim = embed_dim
        self.queue_size = queue_size
        self.momentum = momentum
        self.negative_all_rank = negative_all_rank
        self.enc_token_id = enc_token_id
        self.itc_all_rank_keys = itc_all_rank_keys

    @staticmethod
    def _pointer_from_buffer(module: "BLIPRetrieval", _incompatible) -> None:
        if module.with_momentum:
            module._ptr = int(module.pointer_buffer())

    def pointer_buffer(self) -> torch.Tensor:
        """The checkpointed queue pointer (``ptr_queue``; pretraining's layout calls it ``queue_ptr``)."""
        return self.ptr_queue

    def queue_ids(self) -> torch.Tensor:
        """The contrastive ids of the queued features ``[queue_size]``."""
        return self.idx_queue.view(-1)

    def _momentum_modules(self) -> List[nn.Module]:
        if not self.with_momentum:
            return []
        return [self.visual_encoder_m, self.vision_proj_m, self.text_encoder_m, self.text_proj_m]

    def _online_modules(self) -> List[nn.Module]:
        return [self.visual_encoder, self.vision_proj, self.text_encoder, self.text_proj]

    # ------------------------------------------------------------------ features
    def encode_image(self, pixel_values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``[B, 3, H, W]`` -> (tokens ``[B, 1 + N, Dv]``, normalised feature ``[B, E]``)."""
        tokens = self.visual_encoder(pixel_values)
        return tokens, F.normalize(self.vision_proj(tokens[:, 0]), dim=-1)

    def encode_video(self, frames: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``[B, F, 3, H, W]`` -> (tokens ``[B, F * (1 + N), Dv]``, normalised feature ``[B, E]``), as
        BLIP's ``eval_retrieval_video.py``: every frame through the ViT as an image, the frames'
        tokens concatenated along the sequence (frame-major: ITM cross-attends to all of them), the
        feature ``normalize(mean_f vision_proj(CLS_f))`` (the mean of the projections, then normalised)."""
        b, f = frames.shape[:2]
        tokens = self.visual_encoder(frames.flatten(0, 1))
        feat = self.vision_proj(tokens[:, 0]).view(b, f, -1).mean(dim=1)
        return tokens.reshape(b, f * tokens.shape[1], tokens.shape[2]), F.normalize(feat, dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``[B, T]`` -> (states ``[B, T, Dt]``, normalised feature ``[B, E]``)."""
        states = self.text_encoder(input_ids, attention_mask, mode="text").last_hidden_state
        return states, F.normalize(self.text_proj(states[:, 0]), dim=-1)

    def itm_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """For matching, the first token ([CLS]) is replaced by [ENC]."""
        ids = input_ids.clone()
        ids[:, 0] = self.enc_token_id
        return ids

    def itm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   image_tokens: Optional[torch.Tensor] = None, cross_kv: Optional[List[KV]] = None,
                   cross_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Match logits ``[B, 2]`` of texts (``input_ids`` with [CLS], replaced here by [ENC]) and
        images given as tokens ``[B, N, Dv]`` or as precomputed cross K/V plus ``cross_index``."""
        out = self.text_encoder(self.itm_input_ids(input_ids), attention_mask, mode="multimodal",
                                encoder_hidden_states=image_tokens, cross_kv=cross_kv,
                                cross_index=cross_index, first_token_only=True)
        return self.itm_head(out.last_hidden_state[:, 0])

    # ------------------------------------------------------------------ momentum and queues
    @torch.no_grad()
    def momentum_update(self) -> None:
        """``p_m = p_m * m + p * (1 - m)`` for every momentum parameter, as BLIP's loop does it,
        in two multi-tensor ops (the same per-element arithmetic, bit for bit)."""
        pairs = [(p_m, p) for online, mom in zip(self._online_modules(), self._momentum_modules())
                 for p, p_m in zip(online.parameters(), mom.parameters())]
        if not pairs:
            return
        mom, online = [p_m for p_m, _ in pairs], [p.detach() for _, p in pairs]
        torch._foreach_mul_(mom, self.momentum)
        torch._foreach_add_(mom, online, alpha=1.0 - self.momentum)

    @torch.no_grad()
    def momentum_features(self, pixel_values, input_ids, attention_mask) -> Tuple[torch.Tensor, torch.Tensor]:
        image_tokens = self.visual_encoder_m(pixel_values)
        image_feat = F.normalize(self.vision_proj_m(image_tokens[:, 0]), dim=-1)
        text_states = self.text_encoder_m(input_ids, attention_mask, mode="text").last_hidden_state
        text_feat = F.normalize(self.text_proj_m(text_states[:, 0]), dim=-1)
        return image_feat, text_feat

    def check_queue(self, global_batch: int) -> None:
        if self.queue_size % global_batch:
            raise ConfigError(f"queue_size {self.queue_size} must be a multiple of the global batch "
                             f"{global_batch} (batch_size_train x world size)")

    @torch.no_grad()
    def enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor, idx: torch.Tensor) -> None:
        """Write the (already all-gathered) momentum features ``[G, E]`` and ids ``[G]``."""
        G = image_feat.shape[0]
        self.check_queue(G)
        ptr = self._ptr
        self.image_queue[:, ptr:ptr + G] = image_feat.t()
        self.text_queue[:, ptr:ptr + G] = text_feat.t()
        if "idx_queue" in self._buffers:
            self.idx_queue[:, ptr:ptr + G] = idx.view(1, -1)
        self._ptr = (ptr + G) % self.queue_size
        self.pointer_buffer().fill_(self._ptr)

    # ------------------------------------------------------------------ training forward
    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                idx: torch.Tensor, alpha: float, use_queue: bool = True,
                generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """BLIP's retrieval fine-tuning losses for a batch. Returns ``loss_ita`` and ``loss_itm``."""
        return self.contrastive_and_matching(pixel_values, input_ids, attention_mask, idx, alpha, use_queue,
                                             generator)[0]

    def contrastive_and_matching(self, pixel_values, input_ids, attention_mask, idx, alpha: float,
                                 use_queue: bool = True, generator: Optional[torch.Generator] = None,
                                 full_positive: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict[str, object]]:
        """(``{loss_ita, loss_itm}``, parts for further losses: ``image_tokens`` ``[B, 1 + N, Dv]``,
        the online ``image_feat`` / ``text_feat`` ``[B, E]`` and, with ``full_positive``, ``positive``:
        the multimodal pass of the positive pairs over every position with its last layer's
        attention probabilities (a :class:`~models.med.TextOutput`), as distillation needs)."""
        if not self.with_momentum:
            raise RuntimeError("this BLIPRetrieval was built with with_momentum=False: ITC training "
                               "needs the momentum encoders and queues")
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        image_tokens, image_feat = self.encode_image(pixel_values)
        # The [CLS] features do not depend on trailing padding (it gets exactly zero attention):
        # BLIP's max_length-padded text is encoded only to its longest caption.
        itc_ids, itc_mask = trim_padding(input_ids, attention_mask)
        _, text_feat = self.encode_text(itc_ids, itc_mask)

        idx = idx.view(-1)
        with torch.no_grad():
            self.momentum_update()
            image_feat_m, text_feat_m = self.momentum_features(pixel_values, itc_ids, itc_mask)
            idx_all = du.concat_all_gather(idx)
            image_m_all, text_m_all = du.concat_all_gather(image_feat_m), du.concat_all_gather(text_feat_m)
        image_keys, text_keys, idx_keys = self.itc_keys(image_m_all, text_m_all, idx_all, image_feat_m, text_feat_m,
                                                        idx, use_queue)
        loss_ita = itc_momentum_loss(image_feat, text_feat, image_keys, text_keys, image_feat_m,
                                     text_feat_m, idx, idx_keys, self.temp, alpha)
        if use_queue:
            self.enqueue(image_m_all, text_m_all, idx_all)

        positive = None
        if full_positive:
            positive = self.text_encoder(self.itm_input_ids(input_ids), attention_mask, mode="multimodal",
                                         encoder_hidden_states=image_tokens, output_last_attentions=True)
        loss_itm = self._itm_loss(image_tokens, image_feat, text_feat, input_ids, attention_mask,
                                  idx, idx_all, generator, positive)
        parts = {"image_tokens": image_tokens, "image_feat": image_feat, "text_feat": text_feat,
                 "positive": positive}
        return {"loss_ita": loss_ita, "loss_itm": loss_itm}, parts

    def itc_keys(self, image_m_all, text_m_all, idx_all, image_feat_m, text_feat_m, idx, use_queue: bool):
        """The ITC keys (image, text, ids): every rank's momentum features of this step (so N ranks
        x B equals one process on N*B), or, as BLIP released it (``itc_all_rank_keys: false``), only
        the local batch's; then the queue."""
        if self.itc_all_rank_keys:
            image_keys, text_keys, idx_keys = image_m_all, text_m_all, idx_all
        else:
            image_keys, text_keys, idx_keys = image_feat_m, text_feat_m, idx
        if use_queue:
            # cat copies: the keys do not change when the queue is written after the loss.
            image_keys = torch.cat([image_keys, self.image_queue.t()])
            text_keys = torch.cat([text_keys, self.text_queue.t()])
            idx_keys = torch.cat([idx_keys, self.queue_ids()])
        return image_keys, text_keys, idx_keys

    def _itm_loss(self, image_tokens, image_feat, text_feat, input_ids, attention_mask, idx, idx_all,
                  generator, positive=None) -> torch.Tensor:
        """``positive``: the positives' multimodal pass if already computed (only the 2B negatives
        are then encoded here).

        The image side's cross-attention keys/values are projected once per distinct image and
        gathered per pair (BLIP re-projects them for each of the 3B pairs): locally the B images
        serve the positives, the negative images (drawn from the same B) and the negative texts;
        with ``negative_all_rank`` the B local images and the B drawn ones."""
        if self.negative_all_rank:
            # Negatives from every rank's batch; the image tokens travel with their gradient.
            image_pool = du.all_gather_with_grad(image_tokens)
            feats = (du.concat_all_gather(image_feat), du.concat_all_gather(text_feat))
            ids_pool, mask_pool, idx_pool = (du.concat_all_gather(input_ids),
                                             du.concat_all_gather(attention_mask), idx_all)
        else:
            image_pool, feats = image_tokens, (image_feat, text_feat)
            ids_pool, mask_pool, idx_pool = input_ids, attention_mask, idx
        neg_img, neg_txt, valid_img, valid_txt = sample_hard_negatives(
            image_feat.detach(), text_feat.detach(), feats[0].detach(), feats[1].detach(), idx, idx_pool,
            self.temp.detach(), generator)
        B = image_tokens.shape[0]
        own = torch.arange(B, device=image_tokens.device)
        if self.negative_all_rank:
            sources, neg_index = torch.cat([image_tokens, image_pool[neg_img]]), own + B
        else:
            sources, neg_index = image_tokens, neg_img
        cross_kv = self.text_encoder.project_cross_kv(sources)
        if positive is not None:
            ids, mask = trim_padding(torch.cat([input_ids, ids_pool[neg_txt]]),
                                     torch.cat([attention_mask, mask_pool[neg_txt]]))
            logits = torch.cat([self.itm_head(positive.last_hidden_state[:, 0]),
                                self.itm_logits(ids, mask, cross_kv=cross_kv, cross_index=torch.cat([neg_index, own]))])
        else:
            ids, mask = trim_padding(torch.cat([input_ids, input_ids, ids_pool[neg_txt]]),
                                     torch.cat([attention_mask, attention_mask, mask_pool[neg_txt]]))
            logits = self.itm_logits(ids, mask, cross_kv=cross_kv, cross_index=torch.cat([own, neg_index, own]))
        return itm_loss(logits, torch.cat([valid_img, valid_txt]))


def trim_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[B, T]`` ids and 1/0 mask without the trailing columns that no row attends to. Every
    position's output, and so every [CLS]/[ENC] feature, is unchanged: a masked key gets exactly
    zero attention (``MASK_VALUE`` underflows in the softmax), so dropping it only saves work."""
    used = attention_mask.any(dim=0).nonzero()
    T = int(used[-1]) + 1 if len(used) else 1
    if T == input_ids.shape[1]:
        return input_ids, attention_mask
    return input_ids[:, :T], attention_mask[:, :T]


def build_blip_retrieval(arch: BlipArch, tokenizer, itc: Optional[ITCSettings] = None) -> BLIPRetrieval:
    """BLIP with random weights; ``itc`` None builds no momentum encoders and queues (inference,
    or a frozen BLIP under ContextBLIP)."""
    vit = build_vit(arch)
    med = med_config_for(arch.med_config, tokenizer, vit.width)
    if itc is None:
        return BLIPRetrieval(vit, med, embed_dim=arch.embed_dim, enc_token_id=tokenizer.enc_token_id,
                             with_momentum=False)
    return BLIPRetrieval(vit, med, embed_dim=arch.embed_dim, queue_size=itc.queue_size, momentum=itc.momentum,
                         negative_all_rank=itc.negative_all_rank, enc_token_id=tokenizer.enc_token_id,
                         itc_all_rank_keys=itc.itc_all_rank_keys)
