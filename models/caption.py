"""BLIP's captioner (``BLIP_Decoder``'s state-dict layout): ViT + the BERT decoder with an LM head.

Parts: ``visual_encoder`` (ViT) and ``text_decoder``, whose keys are BLIP's:
``text_decoder.bert.*`` — the same :class:`~models.med.MedEncoder` as the text encoder, run in
``decoder`` mode (causal self-attention that never sees padding, cross-attention to every image
token) — and ``text_decoder.cls.predictions.{transform.dense, transform.LayerNorm, decoder, bias}``,
BERT's LM head (dense -> GELU -> LayerNorm -> vocabulary projection tied to the word embeddings,
plus its own bias).

- Training (:meth:`BLIPCaptioner.forward`): BLIP's LM loss. Text = ``prompt + caption`` tokenised
  by the collate function (``data/collate.py`` ``CaptionCollator``); the first token becomes
  ``[DEC]``; targets are the ids with padding and the prompt's tokens ignored; logits at ``t``
  predict token ``t + 1``; cross-entropy with label smoothing 0.1, mean over the kept tokens.
- Generation (:meth:`BLIPCaptioner.generate`): the prompt (``[DEC]`` + its tokens, no ``[SEP]``)
  continued by beam search, greedy search or nucleus sampling (``models/generation.py``, the
  semantics of the HuggingFace version BLIP was released with). The image's cross-attention
  keys/values are computed once per image and every decoder layer keeps its self-attention cache,
  so a step costs one new position.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from models.generation import (CachedDecoder, GenerationSettings, RecomputeDecoder, beam_search,
                               greedy_or_sample)
from models.med import KV, MedArch, MedConfig, MedEncoder, med_config_for
from models.vit import BlipViT, ViTSettings, build_vit
from pydantic import model_validator

from utils.config import Config, ConfigError, Fraction, NonNegInt, PosFloat, PosInt

LABEL_SMOOTHING = 0.1
IGNORE = -100


class CaptionArch(ViTSettings, MedArch):
    """BLIP's captioner: the ViT keys, the decoder's med config and the prompt."""

    prompt: str = "a picture of "               # prefix of every training caption and of generation


class GenerationConfig(Config):
    """Decoding keys (BLIP's caption configs: 3 beams, max 20, min 5)."""

    num_beams: PosInt = 3                       # 1: greedy (or sampling)
    max_length: PosInt = 20                     # tokens, prompt included
    min_length: NonNegInt = 5                   # tokens, prompt included, before [SEP] may end it
    repetition_penalty: PosFloat = 1.0
    sample: bool = False                        # nucleus sampling instead of beam/greedy search
    top_p: Fraction = 0.9                       # nucleus mass when sampling, in (0, 1] (1: no nucleus filter)
    top_k: NonNegInt = 50                       # top-k filter before top-p (HuggingFace's default; 0: off)

    @model_validator(mode="after")
    def _lengths(self):
        if self.min_length > self.max_length:
            raise ValueError(f"min_length: {self.min_length} is above max_length {self.max_length} (both count the "
                             "prompt's tokens); no caption could end")
        return self

    def generation_settings(self, **overrides) -> GenerationSettings:
        values = dict(num_beams=1 if self.sample else self.num_beams, max_length=self.max_length,
                      min_length=self.min_length, repetition_penalty=self.repetition_penalty,
                      sample=self.sample, top_p=self.top_p, top_k=self.top_k)
        values.update(overrides)
        return GenerationSettings(**values)


class _Transform(nn.Module):
    def __init__(self, cfg: MedConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class LMPredictionHead(nn.Module):
    """``cls.predictions``: transform, then the vocabulary projection (weight tied to the word
    embeddings by :class:`TextDecoder`) with its own ``bias`` (also reachable as ``decoder.bias``,
    as in BERT's checkpoints, which carry both keys)."""

    def __init__(self, cfg: MedConfig):
        super().__init__()
        self.transform = _Transform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


class _LMHeads(nn.Module):
    def __init__(self, cfg: MedConfig):
        super().__init__()
        self.predictions = LMPredictionHead(cfg)


class TextDecoder(nn.Module):
    """``text_decoder``: ``bert`` (a :class:`MedEncoder`, decoder mode) + ``cls`` (LM head)."""

    def __init__(self, cfg: MedConfig):
        super().__init__()
        self.bert = MedEncoder(cfg)
        self.cls = _LMHeads(cfg)
        head = self.cls.predictions
        for m in head.transform.modules():
            self.bert._init_weights(m)
        head.decoder.weight = self.bert.embeddings.word_embeddings.weight  # tied, as BERT's LM head

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                image_embeds: Optional[torch.Tensor] = None, cross_kv: Optional[List[KV]] = None,
                past_key_values: Optional[List[KV]] = None, use_cache: bool = False,
                last_only: bool = False) -> Tuple[torch.Tensor, Optional[List[KV]]]:
        """LM logits ``[B, T, V]`` (``[B, V]`` with ``last_only``) and, with ``use_cache``, the
        self-attention cache including these positions."""
        out = self.bert(input_ids, attention_mask, mode="decoder", encoder_hidden_states=image_embeds,
                        cross_kv=cross_kv, past_key_values=past_key_values, use_cache=use_cache)
        states = out.last_hidden_state[:, -1] if last_only else out.last_hidden_state
        return self.cls.predictions(states), out.past_key_values


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """BLIP's LM loss: position ``t`` predicts token ``t + 1``; label smoothing 0.1; mean (or
    ``reduction="sum"``) over the targets that are not ``-100``."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets[:, 1:].reshape(-1),
                           ignore_index=IGNORE, label_smoothing=LABEL_SMOOTHING, reduction=reduction)


def prompt_ids(tokenizer, prompt: str) -> List[int]:
    """The ids generation starts from: ``[DEC]`` + the prompt's tokens (no ``[SEP]``)."""
    ids = tokenizer(prompt).input_ids[:-1]
    ids[0] = tokenizer.bos_token_id
    return ids


def check_prompt(tokenizer, prompt: str, max_length: int, max_tokens: Optional[int] = None,
                 where: str = "the config") -> int:
    """The prompt must leave room: fewer tokens (``[DEC]`` included) than ``max_length`` (which
    counts them: else nothing is generated) and, for training, than ``max_tokens`` (else no
    caption token is left to learn from). Returns its length; a ConfigError naming the keys."""
    n = len(prompt_ids(tokenizer, prompt))
    if n >= max_length:
        raise ConfigError(f"prompt {prompt!r} is {n} tokens ([DEC] included) and max_length is {max_length} in "
                          f"{where}: max_length counts the prompt, so no caption token could be generated; raise "
                          f"max_length above {n} or shorten the prompt")
    if max_tokens is not None and n >= max_tokens:
        raise ConfigError(f"prompt {prompt!r} is {n} tokens ([DEC] included) and max_tokens is {max_tokens} in "
                          f"{where}: training text is truncated at max_tokens, so no caption token would be left; "
                          f"raise max_tokens above {n} or shorten the prompt")
    return n


class BLIPCaptioner(nn.Module):
    checkpoint_format = "blip-caption"  # the tag checkpoints of this model carry (models/factory.py)

    def __init__(self, visual_encoder: BlipViT, med_config: MedConfig, tokenizer, prompt: str = "a picture of "):
        super().__init__()
        if med_config.encoder_width != visual_encoder.width:
            med_config = dataclasses.replace(med_config, encoder_width=visual_encoder.width)
        self.visual_encoder = visual_encoder
        self.text_decoder = TextDecoder(med_config)
        self.tokenizer = tokenizer
        self.prompt = prompt
        ids = prompt_ids(tokenizer, prompt)
        self.prompt_length = len(ids)   # tokens of the prompt before the caption, [DEC] included
        self.register_buffer("prompt_input_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        self.bos_token_id = tokenizer.bos_token_id
        self.eos_token_id = tokenizer.sep_token_id
        self.pad_token_id = tokenizer.pad_token_id

    # ------------------------------------------------------------------ training
    def decoder_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       prompt_tokens: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(ids with ``[DEC]`` first, targets with padding and the first ``prompt_tokens``
        (default: the prompt's) ignored)."""
        ids = input_ids.clone()
        ids[:, 0] = self.bos_token_id
        targets = ids.masked_fill(attention_mask == 0, IGNORE)
        targets[:, :self.prompt_length if prompt_tokens is None else prompt_tokens] = IGNORE
        return ids, targets

    def logits(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """LM logits ``[B, T, V]`` of tokenised ``prompt + caption`` texts (first token: any)."""
        ids, _ = self.decoder_inputs(input_ids, attention_mask)
        image_embeds = self.visual_encoder(pixel_values)
        return self.text_decoder(ids, attention_mask, image_embeds=image_embeds)[0]

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``loss_lm`` of a batch of images and tokenised ``prompt + caption`` texts."""
        ids, targets = self.decoder_inputs(input_ids, attention_mask)
        image_embeds = self.visual_encoder(pixel_values)
        logits, _ = self.text_decoder(ids, attention_mask, image_embeds=image_embeds)
        return {"loss_lm": lm_loss(logits, targets)}

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_ids(self, pixel_values: torch.Tensor, settings: GenerationSettings, use_cache: bool = True,
                     generator=None) -> torch.Tensor:
        """Token ids ``[B * num_return_sequences, L]`` (prompt included, eos then padding).
        Sampling draws from ``generator``: one ``torch.Generator``, or a sequence of ``B``, image
        ``i``'s draws from the ``i``-th only (its captions then do not depend on the batch)."""
        settings.check()
        B = pixel_values.shape[0]
        # Rows per image: the beams (beam search) or the samples (greedy/sampling).
        per_image = settings.num_beams if settings.num_beams > 1 else settings.num_return_sequences
        image_embeds = self.visual_encoder(pixel_values)
        prompt = self.prompt_input_ids.to(pixel_values.device).expand(B * per_image, -1)
        decoder = self._decoder(image_embeds, per_image, use_cache)
        if settings.num_beams > 1:
            return beam_search(decoder, prompt, B, settings, self.eos_token_id, self.pad_token_id)
        return greedy_or_sample(decoder, prompt, settings, self.eos_token_id, self.pad_token_id, generator)

    def _decoder(self, image_embeds: torch.Tensor, per_image: int, use_cache: bool):
        """The search's view of the decoder for ``per_image`` rows (beams or samples) per image."""
        if not use_cache:
            # The original under current transformers: the image tokens repeated per row, and the
            # whole prefix and the cross-attention keys/values recomputed at every step.
            rows = image_embeds.repeat_interleave(per_image, dim=0)
            return RecomputeDecoder(lambda ids, _: self.text_decoder(ids, None, image_embeds=rows, last_only=True))
        # The image's cross-attention keys/values projected once per image and generation (its
        # beams never change image), then laid out per row.
        cross_kv = [(k.repeat_interleave(per_image, dim=0), v.repeat_interleave(per_image, dim=0))
                    for k, v in self.text_decoder.bert.project_cross_kv(image_embeds)]
        return CachedDecoder(lambda ids, past: self.text_decoder(ids, None, cross_kv=cross_kv, past_key_values=past,
                                                                 use_cache=True, last_only=True))

    def decode(self, ids: torch.Tensor) -> List[str]:
        """Token ids -> captions: special tokens skipped, the prompt's characters cut off the front."""
        texts = self.tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)
        return [t[len(self.prompt):] for t in texts]

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, sample: bool = False, num_beams: int = 3,
                 max_length: int = 30, min_length: int = 10, top_p: float = 0.9, top_k: int = 50,
                 repetition_penalty: float = 1.0, num_return_sequences: int = 1,
                 generator: Optional[torch.Generator] = None, use_cache: bool = True) -> List[str]:
        """Captions of ``pixel_values`` ``[B, 3, H, W]`` (BLIP's ``generate`` signature and defaults;
        ``B * num_return_sequences`` strings, those of image ``i`` together)."""
        settings = GenerationSettings(num_beams=1 if sample else num_beams, max_length=max_length,
                                      min_length=min_length, repetition_penalty=repetition_penalty,
                                      sample=sample, top_p=top_p, top_k=top_k,
                                      num_return_sequences=num_return_sequences)
        return self.decode(self.generate_ids(pixel_values, settings, use_cache=use_cache, generator=generator))


def build_captioner(arch: CaptionArch, tokenizer) -> BLIPCaptioner:
    """A BLIP captioner with random weights."""
    vit = build_vit(arch)
    return BLIPCaptioner(vit, med_config_for(arch.med_config, tokenizer, vit.width), tokenizer, prompt=arch.prompt)
