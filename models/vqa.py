"""BLIP's question answering (``BLIP_VQA``'s state-dict layout): ViT + question encoder + answer decoder.

Parts, with BLIP's keys:

- ``visual_encoder``: the ViT (drop path 0.1 by default, as ``BLIP_VQA`` builds it for any size);
- ``text_encoder``: the question encoder, a :class:`~models.med.MedEncoder` in ``multimodal`` mode
  (``[ENC]`` first, cross-attention to every image token; its ``encoder_width`` is the ViT's);
- ``text_decoder``: the answer decoder (:class:`~models.caption.TextDecoder`: ``bert.*`` in
  ``decoder`` mode + the LM head ``cls.predictions.*``), whose cross-attention attends to the
  *question states*. Its config is ``med_config.json`` with ``encoder_width`` = the text
  ``hidden_size`` (the release reads the json's ``encoder_width``, 768 = hidden 768 in BLIP's; a
  loader that used the ViT width would fail on the fixture, whose ViT is 64 and text 32 wide).

Semantics (docs/BLIP.md, "VQA"), pinned by ``tests/fixtures/blip_vqa_tiny``:

- **Training** (:meth:`BLIPVQA.forward`): every question's states are repeated for each of its
  ``n`` answers; per answer the *sum* over its tokens (``[SEP]`` included, padding not) of the
  label-smoothed (0.1) cross-entropy; the loss is ``sum(weights * answer_losses) / B`` (B questions).
- **Ranking** (:meth:`BLIPVQA.rank`): one decoder step from ``[DEC]`` gives every candidate's
  first-token probability; the top ``k`` candidates are re-scored by ``-(their summed smoothed
  loss)`` and the best is the answer (the release's ``rank_answer``).
- **Generation** (:meth:`BLIPVQA.generate_ids`): beam search (3 beams, max 10 tokens, min 1) from
  ``[DEC]``. The release passes an all-ones question mask there, so the decoder also attends to the
  states of the question's padding positions and a batched answer can depend on the batch's
  padding; that is the default (``mask_question_padding: false``), the masked variant an option.
  The question's cross-attention keys/values are projected once per question (not per beam) and
  every decoder layer keeps its self-attention cache.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Dict, List, Literal, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import nn

from models.caption import IGNORE, LABEL_SMOOTHING, TextDecoder
from models.generation import CachedDecoder, GenerationSettings, RecomputeDecoder, beam_search
from models.med import MedArch, MedConfig, MedEncoder, med_config_for
from models.vit import BlipViT, ViTSettings, build_vit
from utils.config import Config, NonNegInt, PosInt, Probability

logger = logging.getLogger(__name__)

MAX_QUESTION_TOKENS = 35  # the release's question truncation ([ENC] and [SEP] included)


class VQAArch(ViTSettings, MedArch):
    """BLIP's VQA model: the ViT keys (drop path 0.1, as ``BLIP_VQA``) and the med config of both text towers."""

    vit_drop_path_rate: Optional[Probability] = 0.1


class VQASettings(Config):
    """Inference keys (BLIP's ``configs/vqa.yaml``: ``inference: rank``, ``k_test: 128``) and the
    answer search (the release's fixed beam 3, max 10, min 1)."""

    inference: Literal["rank", "generate"] = "rank"
    k_test: PosInt = 128                 # candidates re-scored per question (rank)
    answer_list: str = ""                # candidate answers for rank ('' -> <ann_root>/answer_list.json)
    num_beams: PosInt = 3                # generate
    answer_max_length: PosInt = 10       # generate: tokens, [DEC] included
    answer_min_length: NonNegInt = 1     # generate: tokens, [DEC] included, before [SEP] may end it
    mask_question_padding: bool = False  # generate: hide the question's padding from the decoder (the release does not)

    @model_validator(mode="after")
    def _lengths(self):
        if self.answer_min_length > self.answer_max_length:
            raise ValueError(f"answer_min_length: {self.answer_min_length} is above answer_max_length "
                             f"{self.answer_max_length} (both count [DEC]); no answer could end")
        return self

    def answer_generation(self) -> GenerationSettings:
        return GenerationSettings(num_beams=self.num_beams, max_length=self.answer_max_length,
                                  min_length=self.answer_min_length)


class RankOutput(NamedTuple):
    answer_ids: torch.Tensor   # [B] indices into the candidate list
    topk_ids: torch.Tensor     # [B, k] the candidates kept by first-token probability, in topk order
    scores: torch.Tensor       # [B, k] -(summed label-smoothed token losses) of those candidates


def answer_losses_from_states(head: nn.Module, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per row: the sum over its tokens of the label-smoothed (0.1) cross-entropy of ``head(states)``,
    position ``t`` predicting token ``t + 1``, targets ``-100`` ignored (BertLMHeadModel's
    ``reduction='none'``). The LM head and the cross-entropy run only at the positions that have a
    target (not the last one, not padding, which adds 0 there): the vocabulary projection is most of
    the cost of scoring candidates."""
    shifted = targets[:, 1:]
    keep = shifted != IGNORE
    rows = keep.nonzero(as_tuple=True)[0]
    logits = head(states[:, :-1][keep])
    loss = F.cross_entropy(logits.float(), shifted[keep], label_smoothing=LABEL_SMOOTHING, reduction="none")
    return torch.zeros(states.shape[0], dtype=loss.dtype, device=loss.device).index_add_(0, rows, loss)


class BLIPVQA(nn.Module):
    checkpoint_format = "blip-vqa"  # the tag checkpoints of this model carry (models/factory.py)

    def __init__(self, visual_encoder: BlipViT, encoder_config: MedConfig, decoder_config: MedConfig, tokenizer):
        super().__init__()
        if encoder_config.encoder_width != visual_encoder.width:
            encoder_config = dataclasses.replace(encoder_config, encoder_width=visual_encoder.width)
        self.visual_encoder = visual_encoder
        self.text_encoder = MedEncoder(encoder_config)
        self.text_decoder = TextDecoder(decoder_config)
        self.tokenizer = tokenizer
        self.enc_token_id = tokenizer.enc_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self.eos_token_id = tokenizer.sep_token_id
        self.pad_token_id = tokenizer.pad_token_id

    # ------------------------------------------------------------------ questions
    def encode_questions(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor) -> torch.Tensor:
        """Question states ``[B, T, D]`` (the first token becomes ``[ENC]``; the question attends
        to every image token)."""
        ids = input_ids.clone()
        ids[:, 0] = self.enc_token_id
        image_embeds = self.visual_encoder(pixel_values)
        return self.text_encoder(ids, attention_mask, mode="multimodal",
                                 encoder_hidden_states=image_embeds).last_hidden_state

    def _states(self, ids: torch.Tensor, mask: Optional[torch.Tensor], cross_kv, index: Optional[torch.Tensor],
                question_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Decoder states ``[R, T, D]``; row r attends to question ``index[r]`` (its keys/values in
        ``cross_kv``, projected once per question) under that question's mask."""
        return self.text_decoder.bert(ids, mask, mode="decoder", cross_kv=cross_kv, cross_index=index,
                                      encoder_attention_mask=question_mask).last_hidden_state

    def _decode(self, ids, mask, cross_kv, index, question_mask) -> torch.Tensor:
        """Decoder logits ``[R, T, V]`` (see :meth:`_states`)."""
        return self.text_decoder.cls.predictions(self._states(ids, mask, cross_kv, index, question_mask))

    def answer_losses(self, question_states: torch.Tensor, question_mask: torch.Tensor, answer_ids: torch.Tensor,
                      answer_mask: torch.Tensor, question_index: torch.Tensor) -> torch.Tensor:
        """Per answer ``[A]``: its summed label-smoothed token loss given question ``question_index[a]``."""
        ids = answer_ids.clone()
        ids[:, 0] = self.bos_token_id
        targets = ids.masked_fill(ids == self.pad_token_id, IGNORE)
        cross_kv = self.text_decoder.bert.project_cross_kv(question_states)
        states = self._states(ids, answer_mask, cross_kv, question_index, question_mask[question_index])
        return answer_losses_from_states(self.text_decoder.cls.predictions, states, targets)

    # ------------------------------------------------------------------ training
    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                answer_input_ids: torch.Tensor, answer_attention_mask: torch.Tensor, n: torch.Tensor,
                weights: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``loss_vqa``: ``sum(weights * answer_losses) / B``; ``n`` ``[B]`` answers per question (the
        answers of question b are consecutive), ``weights`` ``[A]``."""
        states = self.encode_questions(pixel_values, input_ids, attention_mask)
        index = torch.repeat_interleave(torch.arange(len(n), device=states.device), n.to(states.device))
        losses = self.answer_losses(states, attention_mask, answer_input_ids, answer_attention_mask, index)
        return {"loss_vqa": (weights.to(losses.dtype) * losses).sum() / pixel_values.shape[0]}

    # ------------------------------------------------------------------ ranking
    @torch.no_grad()
    def rank(self, question_states: torch.Tensor, question_mask: torch.Tensor, answer_ids: torch.Tensor,
             answer_mask: torch.Tensor, k: int) -> RankOutput:
        """The release's ``rank_answer``: candidates ``answer_ids`` ``[C, L]`` (``[DEC]`` first,
        padded with 0) -> the best of the top ``k`` by first-token probability, re-scored whole.

        The ``[DEC]`` step is shared by every candidate of a question: it runs once (its logits
        give the top k and each kept candidate's first-token loss; its self-attention keys/values
        are the candidates' cache), and the candidates are decoded from their first answer token on."""
        B, C = question_states.shape[0], answer_ids.shape[0]
        k = min(k, C)
        bert, head = self.text_decoder.bert, self.text_decoder.cls.predictions
        cross_kv = bert.project_cross_kv(question_states)
        start = bert(answer_ids[:1, :1].expand(B, 1), None, mode="decoder", cross_kv=cross_kv,
                     encoder_attention_mask=question_mask, use_cache=True)
        first = head(start.last_hidden_state[:, 0]).float()                      # [B, V]
        first_tokens = answer_ids[:, 1]
        _, topk_ids = first.softmax(dim=1).index_select(1, first_tokens).topk(k, dim=1)
        # Position 0's label-smoothed loss of each kept candidate, from the shared logits.
        logp = first.log_softmax(dim=1)
        picked = logp.gather(1, first_tokens[topk_ids])                           # [B, k]
        loss0 = -(1 - LABEL_SMOOTHING) * picked - LABEL_SMOOTHING * logp.mean(dim=1, keepdim=True)
        rows = topk_ids.reshape(-1)
        ids, mask = answer_ids[rows], answer_mask[rows]
        targets = ids.masked_fill(ids == self.pad_token_id, IGNORE)
        index = torch.arange(B, device=ids.device).repeat_interleave(k)
        past = [(pk[index], pv[index]) for pk, pv in start.past_key_values]
        states = bert(ids[:, 1:], mask, mode="decoder", cross_kv=cross_kv, cross_index=index, past_key_values=past,
                      encoder_attention_mask=question_mask[index]).last_hidden_state   # positions 1..L-1
        rest = answer_losses_from_states(head, states, targets[:, 1:])
        scores = -(loss0 + rest.view(B, k))
        best = scores.argmax(dim=1)
        return RankOutput(topk_ids.gather(1, best[:, None]).squeeze(1), topk_ids, scores)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_ids(self, question_states: torch.Tensor, question_mask: torch.Tensor, settings: GenerationSettings,
                     mask_question_padding: bool = False, use_cache: bool = True) -> torch.Tensor:
        """Answer ids ``[B, L]`` (``[DEC]`` first, ``[SEP]`` then padding) by beam search."""
        settings.check()
        B, nb = question_states.shape[0], settings.num_beams
        rows_mask = question_mask.repeat_interleave(nb, dim=0) if mask_question_padding else None
        start = torch.full((B * nb, 1), self.bos_token_id, dtype=torch.long, device=question_states.device)
        if use_cache:
            cross_kv = [(k.repeat_interleave(nb, dim=0), v.repeat_interleave(nb, dim=0))
                        for k, v in self.text_decoder.bert.project_cross_kv(question_states)]

            def step(ids, past):
                out = self.text_decoder.bert(ids, None, mode="decoder", cross_kv=cross_kv, past_key_values=past,
                                             use_cache=True, encoder_attention_mask=rows_mask)
                return self.text_decoder.cls.predictions(out.last_hidden_state[:, -1]), out.past_key_values
            decoder = CachedDecoder(step)
        else:  # the release's way: the whole prefix and the keys/values recomputed at every step
            rows = question_states.repeat_interleave(nb, dim=0)

            def step(ids, _):
                out = self.text_decoder.bert(ids, None, mode="decoder", encoder_hidden_states=rows,
                                             encoder_attention_mask=rows_mask)
                return self.text_decoder.cls.predictions(out.last_hidden_state[:, -1]), None
            decoder = RecomputeDecoder(step)
        return beam_search(decoder, start, B, settings, self.eos_token_id, self.pad_token_id)

    def decode(self, ids: torch.Tensor) -> List[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)]

    # ------------------------------------------------------------------ convenience
    @torch.no_grad()
    def answer(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               inference: str = "generate", candidates: Optional[Sequence[str]] = None,
               candidate_ids: Optional[torch.Tensor] = None, candidate_mask: Optional[torch.Tensor] = None,
               k_test: int = 128, settings: Optional[GenerationSettings] = None,
               mask_question_padding: bool = False) -> List[str]:
        """Answers of a batch of images and tokenised questions, by ``generate`` or ``rank`` over
        ``candidates`` (strings; their ids from :func:`tokenize_candidates` when not given)."""
        states = self.encode_questions(pixel_values, input_ids, attention_mask)
        if inference == "generate":
            ids = self.generate_ids(states, attention_mask, settings or VQASettings().answer_generation(),
                                    mask_question_padding)
            return self.decode(ids)
        if inference != "rank":
            raise ValueError(f"inference {inference!r}: 'rank' or 'generate'")
        if not candidates:
            raise ValueError("inference 'rank' needs the candidate answers (answer_list)")
        if candidate_ids is None:
            candidate_ids, candidate_mask = tokenize_candidates(self.tokenizer, candidates)
        out = self.rank(states, attention_mask, candidate_ids.to(states.device), candidate_mask.to(states.device),
                        k_test)
        return [candidates[i] for i in out.answer_ids.tolist()]


def tokenize_candidates(tokenizer, answers: Sequence[str]):
    """The candidate list as ``train_vqa.evaluation`` tokenises it: padded to the longest, the
    first id set to ``[DEC]`` -> (``input_ids``, ``attention_mask``) ``[C, L]``."""
    enc = tokenizer(list(answers), padding="longest", return_tensors="pt")
    ids = enc["input_ids"]
    ids[:, 0] = tokenizer.bos_token_id
    return ids, enc["attention_mask"]


def decoder_med_config(path, tokenizer) -> MedConfig:
    """The answer decoder's config: ``med_config.json`` with its cross-attention reading the question
    states, i.e. ``encoder_width`` = the text ``hidden_size``. The release takes the json's
    ``encoder_width`` as it is, which works only where the two are equal (768 in BLIP's json); a json
    written for a ViT of another width (``encoder_width`` = the ViT's) is read the only way that
    runs, and logged."""
    cfg = med_config_for(path, tokenizer, encoder_width=0)
    raw = MedConfig.from_json(path)
    if raw.encoder_width != cfg.hidden_size:
        logger.info("med_config %s: encoder_width %d, hidden_size %d: the VQA answer decoder attends to the "
                    "question states, so its cross-attention reads %d-wide inputs", path, raw.encoder_width,
                    cfg.hidden_size, cfg.hidden_size)
    return dataclasses.replace(cfg, encoder_width=cfg.hidden_size)


def build_vqa(arch: VQAArch, tokenizer) -> BLIPVQA:
    """A BLIP VQA model with random weights."""
    vit = build_vit(arch)
    return BLIPVQA(vit, med_config_for(arch.med_config, tokenizer, vit.width),
                   decoder_med_config(arch.med_config, tokenizer), tokenizer)
