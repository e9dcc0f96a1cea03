"""A BERT WordPiece tokenizer folder built from the generated captions (no network).

The layout is what `BertTokenizer.from_pretrained(folder)` reads: `vocab.txt` (one token a line,
the id is the line number) and `tokenizer_config.json`. The special tokens come first in the
order of `bert-base-uncased` (as in the official-layout fixture), so [PAD] is 0 and [CLS]/[SEP]
keep BERT's relative order; the model appends [DEC] and [ENC] after the last line.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Iterable

SPECIAL_TOKENS = ("[PAD]", "[unused0]", "[unused1]", "[unused2]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Common English suffix pieces: a user's query like 'circles' or 'colored' still tokenizes into
# known pieces even when the whole word never appeared in a caption.
SUFFIX_PIECES = ("##s", "##es", "##ed", "##ing", "##er", "##est", "##ly")
# Everything BERT's basic tokenizer splits off as its own token that a caption may hold, before
# or after pre_caption (which removes . ! " ( ) * # : ; ~ but keeps the rest).
PUNCTUATION = (".", ",", "!", "?", "'", '"', "(", ")", "*", "#", ":", ";", "~", "-", "/")
# Single characters as a last resort, so that no lowercase ASCII word or number is ever [UNK].
CHAR_PIECES = tuple(string.ascii_lowercase + string.digits)

TOKENIZER_CONFIG = {"do_lower_case": True, "model_max_length": 512, "tokenizer_class": "BertTokenizer"}
# [DEC] (bos) and [ENC] are added by the model's tokenizer setup after the vocab file.
N_ADDED_TOKENS = 2


def basic_tokenize(text: str) -> list[str]:
    """Lowercase, split on whitespace, split every non-alphanumeric ASCII character off
    (what BERT's BasicTokenizer does for ASCII text)."""
    tokens: list[str] = []
    for chunk in text.lower().split():
        word = ""
        for ch in chunk:
            if ch.isalnum():
                word += ch
            else:
                if word:
                    tokens.append(word)
                word = ""
                tokens.append(ch)
        if word:
            tokens.append(word)
    return tokens


def build_vocab(captions: Iterable[str]) -> list[str]:
    """Deterministic token list: specials, sorted caption words, suffixes, punctuation, chars."""
    words: set[str] = set()
    symbols: set[str] = set()
    for text in captions:
        for tok in basic_tokenize(text):
            (words if tok.isalnum() else symbols).add(tok)
    unknown = symbols - set(PUNCTUATION)
    if unknown:
        raise ValueError(f"captions use punctuation the vocab does not list: {sorted(unknown)}")
    vocab = list(SPECIAL_TOKENS)
    seen = set(vocab)
    for tok in [*sorted(words), *SUFFIX_PIECES, *PUNCTUATION, *CHAR_PIECES, *("##" + c for c in CHAR_PIECES)]:
        if tok not in seen:
            seen.add(tok)
            vocab.append(tok)
    return vocab


def write_tokenizer(folder: Path, captions: Iterable[str]) -> int:
    """Write `vocab.txt` and `tokenizer_config.json` into `folder`; return the number of tokens."""
    vocab = build_vocab(captions)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("".join(tok + "\n" for tok in vocab), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG), encoding="utf-8")
    return len(vocab)
