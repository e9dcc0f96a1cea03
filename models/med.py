"""BLIP's text transformer: BERT with a cross-attention block in every layer ("MED").

State-dict names follow BLIP's checkpoints (``embeddings.*``, ``encoder.layer.N.attention.self.query``
...), which is why a submodule is called ``self``. One module serves three modes:

- ``text``: self-attention only (unimodal text features for ITC);
- ``multimodal``: self-attention, then cross-attention to image tokens (ITM);
- ``decoder``: causal self-attention plus cross-attention (captioning / LM).

Cross-attention keys/values depend only on the image, so :meth:`MedEncoder.project_cross_kv`
computes them once per image and ``forward(cross_kv=..., cross_index=...)`` reuses them for any
number of texts. Re-projecting them per (image, text) pair is where the original evaluation spends
most of its time.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from utils.config import ConfigError, Config
from utils.errors import json_error

# BLIP's masks are additive with -10000 (not -inf): identical after softmax in fp32, and it keeps
# rows that are fully masked finite.
MASK_VALUE = -10000.0

KV = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class MedConfig:
    """The fields of BLIP's ``med_config.json`` that the model uses (other BERT keys are ignored)."""

    vocab_size: Optional[int]  # None: take it from the tokenizer
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    encoder_width: int = 768
    add_cross_attention: bool = True
    initializer_range: float = 0.02

    @classmethod
    def from_json(cls, path, **overrides) -> "MedConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"med_config: no such file {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"med_config {path}: {json_error(e)}") from None
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in known}
        kwargs.update(overrides)
        if "vocab_size" not in kwargs:
            raise ConfigError(f"med_config {path}: missing 'vocab_size' (use null to take it from the tokenizer)")
        cfg = cls(**kwargs)
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ConfigError(f"med_config {path}: hidden_size {cfg.hidden_size} is not divisible by "
                             f"num_attention_heads {cfg.num_attention_heads}")
        if cfg.hidden_act != "gelu":
            raise ConfigError(f"med_config {path}: hidden_act {cfg.hidden_act!r} is not supported (BLIP uses 'gelu')")
        return cfg


class MedArch(Config):
    """The text transformer's BERT json (BLIP's ``med_config``), shared by encoder and decoder."""

    med_config: str = "configs/med_config.json"  # BERT json + encoder_width/add_cross_attention


def med_config_for(path, tokenizer, encoder_width: int) -> MedConfig:
    """The med config of ``path`` for a ViT of ``encoder_width``, its vocabulary sized by the
    tokenizer when the json says null (BLIP's ``[DEC]``/``[ENC]`` come after BERT's tokens)."""
    med = MedConfig.from_json(path, encoder_width=encoder_width)
    if med.vocab_size is None:
        med.vocab_size = len(tokenizer)
    elif med.vocab_size < len(tokenizer):
        raise ConfigError(f"med_config {path}: vocab_size {med.vocab_size} is smaller than the "
                         f"tokenizer's {len(tokenizer)} tokens (incl. [DEC] and [ENC])")
    return med


class TextOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # [B, T, D] ([B, 1, D] with first_token_only)
    cross_attentions: Optional[List[torch.Tensor]]  # per layer [B, H, T, N] when requested
    past_key_values: Optional[List[KV]] = None  # per layer self-attention (k, v) [B, H, P+T, d] (use_cache)
    # output_last_attentions: the last layer's attention probabilities, (self [B, H, T, T],
    # cross [B, H, T, N] or None in text mode) -- what DLIP's attention distillation compares.
    last_attentions: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None


class Embeddings(nn.Module):
    """Word + absolute position embeddings, LayerNorm, dropout (no token types in BLIP)."""

    def __init__(self, cfg: MedConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        # Persistent because BLIP's checkpoints carry it; loading strictly needs the key.
        self.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings).unsqueeze(0))

    def forward(self, input_ids: torch.Tensor, past_length: int = 0) -> torch.Tensor:
        """``[B, T] -> [B, T, D]``; positions start at ``past_length`` (tokens already in a decoder's cache)."""
        T = past_length + input_ids.shape[1]
        if T > self.position_ids.shape[1]:
            raise ValueError(f"text of {T} tokens exceeds max_position_embeddings {self.position_ids.shape[1]}")
        x = self.word_embeddings(input_ids) + self.position_embeddings(self.position_ids[:, past_length:T])
        return self.dropout(self.LayerNorm(x))


class HeadProjections(nn.Module):
    """Query/key/value projections of one attention block (``<block>.self.*``)."""

    def __init__(self, cfg: MedConfig, kv_width: int):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)
        self.dropout_p = cfg.attention_probs_dropout_prob

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def project_kv(self, states: torch.Tensor) -> KV:
        """``[B, N, W] -> (k, v)``, each ``[B, H, N, d]``."""
        return self._heads(self.key(states)), self._heads(self.value(states))

    def forward(self, hidden: torch.Tensor, kv: KV, mask: Optional[torch.Tensor],
                need_weights: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Attend ``hidden`` ``[B, T, D]`` to ``kv``; ``mask`` is additive, broadcastable to
        ``[B, H, T, N]``. Returns the context ``[B, T, D]`` and, if asked, the probabilities."""
        k, v = kv
        if k.shape[0] == 1 < hidden.shape[0] and not need_weights and (mask is None or mask.shape[0] == 1):
            return self._attend_shared(hidden, k, v, mask), None
        q = self._heads(self.query(hidden))
        if mask is not None:
            mask = mask.to(q.dtype)  # SDPA wants the mask in the query's dtype (autocast)
        p = self.dropout_p if self.training else 0.0
        if need_weights:
            # SDPA does not return probabilities; ContextBLIP's text-guided mask needs them.
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores + mask
            probs = scores.softmax(dim=-1)
            ctx = F.dropout(probs, p, self.training) @ v
        else:
            probs = None
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        B, H, T, d = ctx.shape
        return ctx.transpose(1, 2).reshape(B, T, H * d), probs

    def _attend_shared(self, hidden: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       mask: Optional[torch.Tensor]) -> torch.Tensor:
        """All ``B`` rows attend to the same keys/values (``[1, H, N, d]``): fold the rows into one
        query sequence ``[1, H, B*T, d]`` — one large attention product instead of ``B`` small ones
        and no ``B``-fold copy of the keys/values. Identical results: a query row's attention does
        not depend on the other rows."""
        B, T, D = hidden.shape
        H, d = self.num_heads, self.head_dim
        q = self.query(hidden).view(B * T, H, d).transpose(0, 1).unsqueeze(0)
        if mask is not None:
            mask = mask.to(q.dtype)
        p = self.dropout_p if self.training else 0.0
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # [1, H, B*T, d]
        return ctx[0].transpose(0, 1).reshape(B, T, D)


class ResidualOutput(nn.Module):
    """``LayerNorm(dropout(dense(x)) + residual)`` (BERT's ``*.output``)."""

    def __init__(self, in_width: int, cfg: MedConfig):
        super().__init__()
        self.dense = nn.Linear(in_width, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class AttentionBlock(nn.Module):
    def __init__(self, cfg: MedConfig, kv_width: int):
        super().__init__()
        self.self = HeadProjections(cfg, kv_width)
        self.output = ResidualOutput(cfg.hidden_size, cfg)

    def forward(self, hidden, kv, mask, need_weights=False):
        ctx, probs = self.self(hidden, kv, mask, need_weights)
        return self.output(ctx, hidden), probs


class Intermediate(nn.Module):
    def __init__(self, cfg: MedConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))  # exact (erf) GELU, as BERT's "gelu"


class MedLayer(nn.Module):
    compile_region = True  # compiled by `compile: true` (utils/compile.py)
    compile_dynamic = True  # a new caption length in nearly every batch: dynamic shapes from the start

    def __init__(self, cfg: MedConfig):
        super().__init__()
        self.attention = AttentionBlock(cfg, cfg.hidden_size)
        if cfg.add_cross_attention:
            self.crossattention = AttentionBlock(cfg, cfg.encoder_width)
        self.intermediate = Intermediate(cfg)
        self.output = ResidualOutput(cfg.intermediate_size, cfg)

    def forward(self, x: torch.Tensor, self_mask: Optional[torch.Tensor], cross_kv: Optional[KV] = None,
                cross_mask: Optional[torch.Tensor] = None, first_token_only: bool = False,
                need_weights: bool = False, past_kv: Optional[KV] = None, need_self_weights: bool = False
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor], KV, Optional[torch.Tensor]]:
        """``x`` ``[B, T, D]``. With ``first_token_only`` only position 0 is computed past the
        self-attention keys/values (all a classifier on [CLS]/[ENC] needs from the last layer).
        ``past_kv``: the self-attention keys/values of earlier positions (a decoder's cache); the
        returned third item is the keys/values including ``x``'s. Returns (output, cross-attention
        probabilities if ``need_weights``, self K/V, self-attention probabilities if
        ``need_self_weights``)."""
        self_kv = self.attention.self.project_kv(x)
        if past_kv is not None:
            self_kv = (torch.cat([past_kv[0], self_kv[0]], dim=2), torch.cat([past_kv[1], self_kv[1]], dim=2))
        if first_token_only:
            x = x[:, :1]
            self_mask = self_mask[:, :, :1] if self_mask is not None and self_mask.shape[2] > 1 else self_mask
        h, self_probs = self.attention(x, self_kv, self_mask, need_self_weights)
        probs = None
        if cross_kv is not None:
            h, probs = self.crossattention(h, cross_kv, cross_mask, need_weights)
        return self.output(self.intermediate(h), h), probs, self_kv, self_probs


class _LayerStack(nn.Module):
    """Holds ``layer.N`` so keys read ``encoder.layer.N.*`` as in BLIP's checkpoints."""

    def __init__(self, cfg: MedConfig):
        super().__init__()
        self.layer = nn.ModuleList(MedLayer(cfg) for _ in range(cfg.num_hidden_layers))


def additive_mask(attention_mask: torch.Tensor, causal: bool = False, queries: Optional[int] = None) -> torch.Tensor:
    """``[B, S]`` 1/0 padding mask -> additive ``[B, 1, 1, S]`` (or ``[B, 1, Q, S]`` if causal: the
    ``Q`` = ``queries`` (default ``S``) last positions, each seeing itself and every earlier one,
    never padding; BLIP's decoder mask, also with a cache of ``S - Q`` earlier positions)."""
    m = attention_mask[:, None, None, :].float()
    if causal:
        S = attention_mask.shape[1]
        Q = S if queries is None else queries
        m = m * torch.ones(Q, S, device=m.device).tril(diagonal=S - Q)[None, None]
    return (1.0 - m) * MASK_VALUE


class MedEncoder(nn.Module):
    """BLIP's ``text_encoder`` (BERT with cross-attention, no pooler)."""

    MODES = ("text", "multimodal", "decoder")

    def __init__(self, cfg: MedConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("MedConfig.vocab_size must be set (from the tokenizer) before building")
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = _LayerStack(cfg)
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            m.weight.data.normal_(0.0, self.config.initializer_range)
        if isinstance(m, nn.Linear) and m.bias is not None:
            m.bias.data.zero_()
        elif isinstance(m, nn.LayerNorm):
            m.weight.data.fill_(1.0)
            m.bias.data.zero_()

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.layer

    def project_cross_kv(self, image_embeds: torch.Tensor) -> List[KV]:
        """Every layer's cross-attention keys/values for ``image_embeds`` ``[B, N, W]``:
        a list (one per layer) of ``(k, v)``, each ``[B, H, N, d]``."""
        return [layer.crossattention.self.project_kv(image_embeds) for layer in self.layers]

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], mode: str = "text",
                encoder_hidden_states: Optional[torch.Tensor] = None,
                encoder_attention_mask: Optional[torch.Tensor] = None,
                cross_kv: Optional[Sequence[KV]] = None, cross_index: Optional[torch.Tensor] = None,
                first_token_only: bool = False, output_cross_attentions: bool = False,
                past_key_values: Optional[Sequence[KV]] = None, use_cache: bool = False,
                output_last_attentions: bool = False) -> TextOutput:
        """Encode ``input_ids`` ``[B, T]`` (``attention_mask`` ``[B, T]`` of 1/0).

        For ``multimodal``/``decoder`` give either ``encoder_hidden_states`` ``[B, N, W]`` or
        precomputed ``cross_kv`` from :meth:`project_cross_kv` of ``M`` images plus ``cross_index``
        ``[B]`` (row b attends to image ``cross_index[b]``; omit it when ``M == B``, or when
        ``M == 1``: every row attends to that one image, computed as one folded attention).
        ``encoder_attention_mask`` ``[B, N]`` defaults to all-visible.

        Decoding with a cache (``decoder`` mode): ``past_key_values`` from the previous call's
        output (``use_cache=True``) holds ``P`` earlier positions; ``input_ids`` ``[B, T]`` are the
        new ones and ``attention_mask`` covers all ``P + T`` (or is None: nothing padded).

        ``output_last_attentions``: also return the last layer's self- and cross-attention
        probabilities (``TextOutput.last_attentions``; computed explicitly, not by SDPA).
        """
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        past = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if past and mode != "decoder":
            raise ValueError("past_key_values is only for mode 'decoder'")
        x = self.embeddings(input_ids, past_length=past)
        T = input_ids.shape[1]
        if attention_mask is None and (T == 1 or mode != "decoder"):
            self_mask = None  # nothing padded and nothing to hide: no mask (SDPA's fast path)
        else:
            if attention_mask is None:
                attention_mask = input_ids.new_ones(input_ids.shape[0], past + T)
            self_mask = additive_mask(attention_mask, causal=mode == "decoder", queries=T)
        use_cross = mode != "text"
        if use_cross and encoder_hidden_states is None and cross_kv is None:
            raise ValueError(f"mode {mode!r} needs encoder_hidden_states or cross_kv")
        if use_cross and not self.config.add_cross_attention:
            raise ValueError("this text encoder was built without cross-attention")
        cross_mask = None
        if use_cross and encoder_attention_mask is not None:
            cross_mask = additive_mask(encoder_attention_mask)
        attentions = [] if output_cross_attentions else None
        presents = [] if use_cache else None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            kv = None
            if use_cross:
                if cross_kv is not None:
                    k, v = cross_kv[i]
                    # Gather per layer so only one layer's expanded K/V is alive at a time.
                    # (index_select: its backward is an index_add, much cheaper than indexing's index_put)
                    kv = ((k.index_select(0, cross_index), v.index_select(0, cross_index))
                          if cross_index is not None else (k, v))
                else:
                    kv = layer.crossattention.self.project_kv(encoder_hidden_states)
            want_last = output_last_attentions and i == last
            x, probs, self_kv, self_probs = layer(
                x, self_mask, kv, cross_mask, first_token_only=first_token_only and i == last,
                need_weights=output_cross_attentions or want_last,
                past_kv=None if past_key_values is None else past_key_values[i], need_self_weights=want_last)
            if attentions is not None and probs is not None:
                attentions.append(probs)
            if presents is not None:
                presents.append(self_kv)
            if want_last:
                last_attentions = (self_probs, probs)
        return TextOutput(x, attentions, presents, last_attentions if output_last_attentions else None)
