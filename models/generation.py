"""Text generation for BLIP's decoder: beam search, greedy and nucleus sampling.

The search semantics are those of the HuggingFace ``generate`` that BLIP was released with
(transformers 4.15), so that captions are token-identical to the original implementation:

- **beam search** (classic ``BeamSearchScorer``): beams start from the prompt, the first beam at
  score 0 and the others at -1e9; every step takes the ``2 * num_beams`` best (beam, token)
  continuations of ``log_softmax`` scores; a continuation by ``eos`` among the ``num_beams`` best
  closes a hypothesis of score ``sum(log-probs) / len(hypothesis) ** length_penalty`` (its length
  counts the prompt and not the eos); a sentence is done once it holds ``num_beams`` hypotheses
  and its worst is at least the best running score divided by the current length (no early
  stopping); at ``max_length`` the open beams close as hypotheses too; the best one wins.
- **greedy**: argmax; finished rows are padded.
- **sampling**: top-k (50, HuggingFace's default, which BLIP keeps), then top-p, then a draw.

Logits processors (as HuggingFace): ``eos`` is banned until the sequence holds ``min_length``
tokens (prompt included); a repetition penalty divides positive scores of tokens already in the
sequence (prompt included) by the penalty and multiplies negative ones. Beam search applies them to
log-probabilities, greedy and sampling to the logits.

The model side is a :class:`Decoder`: ``start(prompt_ids)`` runs the prompt and returns the
last position's logits; ``step(tokens)`` feeds one new token per row; ``reorder(rows)`` keeps the
state of the given rows (the beams' parents). :class:`CachedDecoder` keeps every layer's
self-attention keys/values (one new position per step); :class:`RecomputeDecoder` re-runs the
whole prefix at every step, which is what the original BLIP code does under current transformers
(used by ``bench/bench_caption.py`` as the baseline, and by tests as a cross-check).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Protocol, Tuple

import torch

# logits [R, V] for the last position of each row, from ids [R, T] (the new tokens) and a state.
NEG_INF = float("-inf")


class Decoder(Protocol):
    def start(self, prompt_ids: torch.Tensor) -> torch.Tensor: ...

    def step(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def reorder(self, rows: torch.Tensor) -> None: ...


ForwardFn = Callable[[torch.Tensor, Optional[list]], Tuple[torch.Tensor, Optional[list]]]


class CachedDecoder:
    """Feeds only the new tokens; ``forward(ids, past) -> (logits of the last position, new past)``
    where ``past`` is a per-layer list of self-attention ``(k, v)`` ``[R, H, P, d]``."""

    def __init__(self, forward: ForwardFn):
        self.forward = forward
        self.past = None

    def start(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        logits, self.past = self.forward(prompt_ids, None)
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        logits, self.past = self.forward(tokens[:, None], self.past)
        return logits

    def reorder(self, rows: torch.Tensor) -> None:
        self.past = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.past]


class RecomputeDecoder:
    """Re-runs the whole sequence at every step (no cache): ``forward(ids, None) -> (logits, _)``."""

    def __init__(self, forward: ForwardFn):
        self.forward = forward
        self.ids = None

    def start(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        self.ids = prompt_ids
        return self.forward(prompt_ids, None)[0]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        return self.forward(self.ids, None)[0]

    def reorder(self, rows: torch.Tensor) -> None:
        self.ids = self.ids.index_select(0, rows)


@dataclass
class GenerationSettings:
    num_beams: int = 3
    max_length: int = 30          # tokens, prompt included
    min_length: int = 10          # tokens, prompt included
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    sample: bool = False
    top_p: float = 0.9
    top_k: int = 50
    num_return_sequences: int = 1

    def check(self) -> None:
        if self.num_beams < 1 or self.num_return_sequences < 1:
            raise ValueError("num_beams and num_return_sequences must be >= 1")
        if self.min_length > self.max_length:
            raise ValueError(f"min_length {self.min_length} > max_length {self.max_length}")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if not self.sample and self.num_return_sequences > self.num_beams:
            raise ValueError("num_return_sequences must be <= num_beams for beam search / greedy")
        if self.sample and self.num_beams != 1:
            raise ValueError("sampling draws one sequence per row: num_beams must be 1 (use num_return_sequences)")


# ---------------------------------------------------------------------- logits processors

def apply_repetition_penalty(scores: torch.Tensor, ids: torch.Tensor, penalty: float) -> torch.Tensor:
    if penalty == 1.0:
        return scores
    seen = scores.gather(1, ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter(1, ids, seen)


def ban_eos(scores: torch.Tensor, cur_len: int, min_length: int, eos: int) -> torch.Tensor:
    if cur_len < min_length:
        scores[:, eos] = NEG_INF
    return scores


def top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """HuggingFace's TopKLogitsWarper then TopPLogitsWarper (min_tokens_to_keep 1)."""
    if top_k and top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k)[0][..., -1, None]
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(1, sorted_idx, remove), NEG_INF)
    return logits


# ---------------------------------------------------------------------- searches

def _pad_outputs(seqs: List[torch.Tensor], max_length: int, eos: int, pad: int, device) -> torch.Tensor:
    """Hypotheses (without their eos) -> ``[N, L]``: eos appended when there is room, pad after."""
    lengths = [len(s) for s in seqs]
    width = min(max(lengths) + 1, max_length)
    out = torch.full((len(seqs), width), pad, dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
        if len(s) < max_length:
            out[i, len(s)] = eos
    return out


class _Hypotheses:
    """The finished hypotheses of one sentence (HuggingFace's ``BeamHypotheses``)."""

    def __init__(self, num_beams: int, length_penalty: float):
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.beams: List[Tuple[float, torch.Tensor]] = []
        self.worst_score = 1e9

    def add(self, hyp: torch.Tensor, sum_logprobs: float) -> None:
        score = sum_logprobs / (hyp.shape[-1] ** self.length_penalty)
        if len(self.beams) < self.num_beams or score > self.worst_score:
            self.beams.append((score, hyp))
            if len(self.beams) > self.num_beams:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, cur_len: int) -> bool:
        if len(self.beams) < self.num_beams:
            return False
        return self.worst_score >= best_sum_logprobs / cur_len ** self.length_penalty

    def best(self, n: int) -> List[torch.Tensor]:
        ranked = sorted(self.beams, key=lambda x: x[0])
        return [ranked.pop()[1] for _ in range(n)]


@torch.no_grad()
def beam_search(decoder: Decoder, prompt: torch.Tensor, batch: int, s: GenerationSettings, eos: int,
                pad: int) -> torch.Tensor:
    """``prompt`` ``[batch * num_beams, P]`` (each image's row repeated ``num_beams`` times, the
    decoder's state laid out the same way) -> ids ``[batch * num_return_sequences, L]``."""
    nb = s.num_beams
    device = prompt.device
    ids = prompt
    cur_len = ids.shape[1]
    beam_scores = torch.zeros(batch, nb, dtype=torch.float, device=device)
    beam_scores[:, 1:] = -1e9
    beam_scores = beam_scores.view(-1)
    hyps = [_Hypotheses(nb, s.length_penalty) for _ in range(batch)]
    done = [False] * batch
    logits = decoder.start(ids)
    while cur_len < s.max_length:
        scores = torch.log_softmax(logits.float(), dim=-1)
        scores = apply_repetition_penalty(scores, ids, s.repetition_penalty)
        scores = ban_eos(scores, cur_len, s.min_length, eos)
        vocab = scores.shape[-1]
        scores = (scores + beam_scores[:, None]).view(batch, nb * vocab)
        top_scores, top = torch.topk(scores, 2 * nb, dim=1, largest=True, sorted=True)
        # One host transfer per step: the bookkeeping below is per sentence, in Python (lists:
        # reading tensor elements one by one costs more than the step at large batches).
        top_scores_h, top_h = top_scores.cpu().tolist(), top.cpu().tolist()
        next_scores = torch.zeros(batch, nb, dtype=torch.float)
        next_tokens = torch.full((batch, nb), pad, dtype=torch.long)
        next_rows = torch.arange(batch).repeat_interleave(nb).view(batch, nb) * nb
        ids_h = None
        for b in range(batch):
            if done[b]:
                continue
            filled = 0
            for rank in range(2 * nb):
                token = top_h[b][rank] % vocab
                row = b * nb + top_h[b][rank] // vocab
                score = top_scores_h[b][rank]
                if token == eos:
                    if rank >= nb:
                        continue
                    if ids_h is None:
                        ids_h = ids.cpu()
                    hyps[b].add(ids_h[row].clone(), score)
                else:
                    next_scores[b, filled], next_tokens[b, filled], next_rows[b, filled] = score, token, row
                    filled += 1
                if filled == nb:
                    break
            done[b] = hyps[b].is_done(max(top_scores_h[b]), cur_len)
        beam_scores = next_scores.view(-1).to(device)
        rows = next_rows.view(-1).to(device)
        tokens = next_tokens.view(-1).to(device)
        ids = torch.cat([ids.index_select(0, rows), tokens[:, None]], dim=1)
        cur_len += 1
        if all(done) or cur_len >= s.max_length:
            break
        decoder.reorder(rows)
        logits = decoder.step(tokens)
    ids_h, final_scores = ids.cpu(), beam_scores.cpu()
    out = []
    for b in range(batch):
        if not done[b]:
            for j in range(nb):
                hyps[b].add(ids_h[b * nb + j], final_scores[b * nb + j].item())
        out.extend(hyps[b].best(s.num_return_sequences))
    return _pad_outputs(out, s.max_length, eos, pad, device)


def _draw(probs: torch.Tensor, generator) -> torch.Tensor:
    """One token per row of ``probs`` ``[R, V]``. ``generator``: one for all rows, or a sequence of
    ``G`` generators, generator ``g`` drawing for the ``g``-th block of ``R / G`` consecutive rows
    (per image: its draws then depend on nothing but its own seed, not on the batch it is in)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    if probs.shape[0] % len(generator):
        raise ValueError(f"{len(generator)} generators for {probs.shape[0]} rows")
    blocks = probs.split(probs.shape[0] // len(generator))
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(blocks, generator)]).squeeze(1)


@torch.no_grad()
def greedy_or_sample(decoder: Decoder, prompt: torch.Tensor, s: GenerationSettings, eos: int, pad: int,
                     generator=None) -> torch.Tensor:
    """Greedy search (``s.sample`` False) or top-k/top-p sampling; one output row per prompt row.
    ``generator``: a ``torch.Generator``, or one per image (see :func:`_draw`)."""
    ids = prompt
    cur_len = ids.shape[1]
    unfinished = torch.ones(ids.shape[0], dtype=torch.long, device=ids.device)
    logits = decoder.start(ids)
    while True:
        scores = apply_repetition_penalty(logits.float(), ids, s.repetition_penalty)
        scores = ban_eos(scores, cur_len, s.min_length, eos)
        if s.sample:
            probs = top_k_top_p(scores, s.top_k, s.top_p).softmax(dim=-1)
            tokens = _draw(probs, generator)
        else:
            tokens = scores.argmax(dim=-1)
        tokens = tokens * unfinished + pad * (1 - unfinished)
        ids = torch.cat([ids, tokens[:, None]], dim=1)
        cur_len += 1
        unfinished = unfinished * (tokens != eos).long()
        if cur_len >= s.max_length or not bool(unfinished.any()):
            return ids
        logits = decoder.step(tokens)
