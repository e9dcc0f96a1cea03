"""Batch collation: tokenization happens here, in the data pipeline, never in a model's forward."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch


def tokenize(tokenizer, texts: Sequence[str], max_tokens: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """BLIP's text input: pad/truncate to ``max_tokens`` -> (``input_ids``, ``attention_mask``) ``[B, T]``."""
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_tokens,
                    return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


class RetrievalCollator:
    """``[(image [3,H,W], caption, idx), ...]`` -> dict of ``pixel_values`` ``[B,3,H,W]``,
    ``input_ids`` / ``attention_mask`` ``[B,T]`` and ``idx`` ``[B]``."""

    def __init__(self, tokenizer, max_tokens: int = 35):
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens

    def __call__(self, batch: List[tuple]) -> Dict[str, torch.Tensor]:
        images, captions, idx = zip(*batch)
        input_ids, attention_mask = tokenize(self.tokenizer, captions, self.max_tokens)
        return {"pixel_values": torch.stack(images), "input_ids": input_ids,
                "attention_mask": attention_mask, "idx": torch.as_tensor(idx, dtype=torch.long)}
