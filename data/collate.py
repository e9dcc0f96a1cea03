"""Batch collation: tokenization happens here, in the data pipeline, never in a model's forward."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch


def tokenize(tokenizer, texts: Sequence[str], max_tokens: int, dynamic: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """BLIP's text input: truncate to ``max_tokens`` and pad to it (or, ``dynamic``, only to the
    longest text) -> (``input_ids``, ``attention_mask``) ``[B, T]``.

    Dynamic padding changes no result: padding gets exactly zero attention weight (BLIP's additive
    -10000 underflows to 0), so real tokens see the same keys; it only skips wasted compute."""
    enc = tokenizer(list(texts), padding="longest" if dynamic else "max_length", truncation=True,
                    max_length=max_tokens, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


class RetrievalCollator:
    """``[(image [3,H,W], caption, idx), ...]`` -> dict of ``pixel_values`` ``[B,3,H,W]``,
    ``input_ids`` / ``attention_mask`` ``[B,T]`` and ``idx`` ``[B]``."""

    def __init__(self, tokenizer, max_tokens: int = 35, dynamic_padding: bool = True):
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.dynamic_padding = dynamic_padding

    def __call__(self, batch: List[tuple]) -> Dict[str, torch.Tensor]:
        images, captions, idx = zip(*batch)
        input_ids, attention_mask = tokenize(self.tokenizer, captions, self.max_tokens, self.dynamic_padding)
        return {"pixel_values": torch.stack(images), "input_ids": input_ids,
                "attention_mask": attention_mask, "idx": torch.as_tensor(idx, dtype=torch.long)}


class CaptionCollator:
    """``[(image [3,H,W], caption, idx), ...]`` -> dict of ``pixel_values`` ``[B,3,H,W]`` and
    ``input_ids`` / ``attention_mask`` ``[B,T]`` of ``prompt + caption`` (BLIP's captioning text:
    padded to the longest, truncated at ``max_tokens``; the model puts ``[DEC]`` first)."""

    def __init__(self, tokenizer, prompt: str = "a picture of ", max_tokens: int = 40):
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.max_tokens = max_tokens

    def __call__(self, batch: List[tuple]) -> Dict[str, torch.Tensor]:
        images, captions = [b[0] for b in batch], [b[1] for b in batch]
        input_ids, attention_mask = tokenize(self.tokenizer, [self.prompt + c for c in captions], self.max_tokens,
                                             dynamic=True)
        return {"pixel_values": torch.stack(images), "input_ids": input_ids, "attention_mask": attention_mask}


class ImageSetCollator:
    """``[(images [K,3,H,W], text, target, index), ...]`` (a text and its K candidate images, e.g.
    ImageCoDe's 10) -> dict of ``pixel_values`` ``[B,K,3,H,W]``, ``input_ids`` / ``attention_mask``
    ``[B,T]``, ``target`` ``[B]`` (-1: unknown) and ``index`` ``[B]`` (dataset indices)."""

    def __init__(self, tokenizer, max_tokens: int = 35, dynamic_padding: bool = True):
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.dynamic_padding = dynamic_padding

    def __call__(self, batch: List[tuple]) -> Dict[str, torch.Tensor]:
        images, texts, target, index = zip(*batch)
        input_ids, attention_mask = tokenize(self.tokenizer, texts, self.max_tokens, self.dynamic_padding)
        return {"pixel_values": torch.stack(images), "input_ids": input_ids, "attention_mask": attention_mask,
                "target": torch.as_tensor(target, dtype=torch.long), "index": torch.as_tensor(index, dtype=torch.long)}
