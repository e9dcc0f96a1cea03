"""HuggingFace interop of BLIP's VQA model: the official ``BLIP_VQA`` layout (``models/vqa.py``) <->
transformers' ``BlipForQuestionAnswering`` (the hooks of ``models/hf.py`` and ``models/hf_keys.py`` call
these; docs/BLIP.md, "VQA <-> BlipForQuestionAnswering").

Keys: as for the other two classes (``models/hf_keys.py``): ``visual_encoder.*`` -> ``vision_model.*``
with HF's ViT renames; the question encoder ``text_encoder.*`` and the answer decoder
``text_decoder.{bert,cls}.*`` keep their names. Not stored by HF (rebuilt on the way back): the two
``position_ids`` buffers and the LM head's ``decoder.weight`` / ``decoder.bias`` (tied to the
decoder's word embeddings and ``predictions.bias``). An official VQA file thus needs nothing in
``blip_extras.safetensors`` but its key order and top-level entries.

**What HF can hold.** ``BlipForQuestionAnswering`` builds its answer decoder from the same
``text_config`` as the question encoder, so the decoder's cross-attention keys/values read inputs of
``text_config.encoder_hidden_size``, the ViT width; BLIP's answer decoder attends to the question
states, of the text hidden size. Only models whose ViT width equals the text hidden size (every
released BLIP: 768 and 768) are representable: :func:`check_widths` refuses the others, both ways.

**Question tokens.** BLIP's question encoder reads ``[ENC]`` first (``BLIPVQA.encode_questions``
overwrites the tokenizer's ``[CLS]``); HF's model feeds ``input_ids`` to its encoder as given, and
HF's own conversion (``Salesforce/blip-vqa-*``) tokenizes with plain ``bert-base-uncased``, i.e.
``[CLS]`` first. The folder written here carries a tokenizer whose first token *is* ``[ENC]``
(:func:`question_tokenizer`: ``cls_token`` ``[ENC]``), so ``processor(images, questions)`` ->
``generate`` answers as BLIP does.

**Generation.** HF's ``generate`` hands the decoder an all-ones question mask (the question's
padding states are attended to), as BLIP's release does: it matches ``mask_question_padding:
false`` (our default). HF's ``forward`` passes the question mask instead (ours: ``rank``/training).
"""
from __future__ import annotations

import copy
from typing import Mapping, Optional

from torch import Tensor

from utils.errors import CheckpointError

ENC_TOKEN = "[ENC]"
_CROSS_KEY = "encoder.layer.0.crossattention.self.key.weight"


def width_problem(vit_width: int, text_width: int, name: str, lead: str) -> Optional[str]:
    """The one-line reason a VQA model of these widths has no ``BlipForQuestionAnswering`` form
    (None: it has one), after ``name: lead``."""
    if vit_width == text_width:
        return None
    return (f"{name}: {lead}: its ViT width is {vit_width} but its text hidden size is {text_width}; "
            f"transformers builds the answer decoder from the question encoder's text_config, so the decoder's "
            f"cross-attention reads inputs of text_config.encoder_hidden_size = the ViT width ({vit_width}), while "
            f"BLIP's answer decoder attends to the question states (width {text_width}); only models whose ViT "
            f"width equals the text hidden size (every released BLIP: 768 and 768) convert")


def check_widths(state: Mapping[str, Tensor], name: str, hf_names: bool) -> None:
    """Refuse (CheckpointError, one line) a VQA state whose ViT width differs from the text hidden
    size, or whose answer decoder does not attend to inputs of the text hidden size. ``state``:
    ours/official names (``hf_names`` False: a model to export) or HF's (True: a folder read)."""
    cls = state.get("vision_model.embeddings.class_embedding" if hf_names else "visual_encoder.cls_token")
    emb = state.get("text_decoder.bert.embeddings.word_embeddings.weight")
    if cls is None or emb is None:
        return  # official_from_hf names what is missing
    vit, text = int(cls.shape[-1]), int(emb.shape[1])
    lead = ("this BlipForQuestionAnswering folder has no BLIP VQA form" if hf_names else
            "--to hf refused: BlipForQuestionAnswering cannot represent this VQA model")
    problem = width_problem(vit, text, name, lead)
    if problem:
        raise CheckpointError(problem)
    key = state.get("text_decoder.bert." + _CROSS_KEY)
    if key is not None and int(key.shape[1]) != text:
        raise CheckpointError(f"{name}: the answer decoder's cross-attention reads inputs of width "
                              f"{int(key.shape[1])}, not the question states' {text}: not a BLIP VQA answer decoder")


def question_tokenizer(tokenizer):
    """A copy of ``tokenizer`` that puts ``[ENC]`` first (``cls_token`` ``[ENC]``, the template
    ``[ENC] $A [SEP]``): the question input BLIP's encoder reads, for the HF folder's processor.
    The vocabulary, the special tokens (``[CLS]`` stays one), ``[DEC]`` (bos), ``[SEP]`` and
    decoding are unchanged."""
    from tokenizers import processors
    enc_id = tokenizer.convert_tokens_to_ids(ENC_TOKEN)
    if enc_id is None or enc_id == tokenizer.unk_token_id:
        raise CheckpointError(f"the tokenizer has no {ENC_TOKEN} token (models/tokenizer.py adds it)")
    tok = copy.deepcopy(tokenizer)
    cls = str(tok.cls_token)
    tok.cls_token = ENC_TOKEN
    if cls != ENC_TOKEN:  # still special: skipped in decoding, never split, as in BLIP's tokenizer
        tok.add_special_tokens({"additional_special_tokens": [ENC_TOKEN, cls]})
    sep, sep_id = str(tok.sep_token), tok.sep_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{ENC_TOKEN}:0 $A:0 {sep}:0", pair=f"{ENC_TOKEN}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(ENC_TOKEN, enc_id), (sep, sep_id)])
    first = tok("a")["input_ids"][0]
    if first != enc_id:
        raise CheckpointError(f"could not make the tokenizer put {ENC_TOKEN} first (it gives id {first})")
    return tok
