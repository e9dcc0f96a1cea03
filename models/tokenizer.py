"""BLIP's tokenizer: BERT uncased WordPiece plus ``[DEC]`` (bos) and ``[ENC]``.

The two added tokens get the ids right after the vocabulary (30522 and 30523 for
``bert-base-uncased``), which is what official checkpoints' word embeddings expect.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from utils.errors import UserError

logger = logging.getLogger(__name__)


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is meant as a local folder."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


TOKENIZER_FILES = ["vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def build_tokenizer(name_or_path: str):
    """Load a BERT WordPiece tokenizer from a local folder (with ``vocab.txt``) or a hub id, and add
    BLIP's special tokens. Sets ``tokenizer.enc_token_id`` and ``tokenizer.bos_token_id``.

    Offline with no cached copy raises ``OSError`` that says how to fix it: the local cache is tried
    first, and the hub only if the cache misses, with bounded timeouts.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        folder = path
    elif path.exists() or _looks_like_path(name_or_path):
        raise FileNotFoundError(f"tokenizer: no such folder {path} (config key 'tokenizer' takes a local "
                                "folder with vocab.txt or a hub id such as 'bert-base-uncased')")
    else:
        folder = _hub_folder(name_or_path)
    tok = _load_folder(folder)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tok.enc_token_id = tok.convert_tokens_to_ids("[ENC]")
    return tok


def _load_folder(folder: Path):
    from transformers import BertTokenizerFast

    vocab = folder / "vocab.txt"
    if not vocab.is_file():
        raise FileNotFoundError(f"tokenizer folder {folder} has no vocab.txt")
    tok = BertTokenizerFast.from_pretrained(str(folder))
    # Recent transformers build an empty tokenizer rather than fail when files are not found:
    # check that the vocabulary really is the file's.
    expected = sum(1 for line in vocab.open(encoding="utf-8") if line.strip())
    if tok.vocab_size != expected:
        raise UserError(f"tokenizer from {folder}: loaded {tok.vocab_size} tokens but vocab.txt has {expected}")
    return tok


def _hub_folder(repo_id: str) -> Path:
    """The local snapshot folder of a hub tokenizer: the cache if it has it, else a download."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=TOKENIZER_FILES, local_files_only=True))
    except Exception:  # not cached: fall through to the network
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise OSError(_offline_message(repo_id, "HF_HUB_OFFLINE is set and it is not in the local cache"))
    # Bound the hub's connection waits so an unreachable hub fails in seconds, never hangs.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=TOKENIZER_FILES))
    except Exception as e:  # network errors come in many types; all mean the same to the user
        first = str(e).splitlines()[0] if str(e) else ""
        raise OSError(_offline_message(repo_id, f"{type(e).__name__}: {first}")) from None


def _offline_message(repo_id: str, why: str) -> str:
    return (f"could not load tokenizer {repo_id!r} ({why}). It is not in the local Hugging Face cache and "
            "the hub could not be reached. On a machine with internet run "
            f"`huggingface-cli download {repo_id}` (or copy its vocab.txt into a folder) and set the "
            "config key 'tokenizer' to that folder.")
