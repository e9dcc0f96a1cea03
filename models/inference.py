"""The Python inference API: one call loads any BLIP captioning, retrieval or pretraining checkpoint
with its image transform and tokenizer (what users of LAVIS ``load_model_and_preprocess`` and of
Hugging Face processors expect)::

    from models.inference import load_blip
    blip = load_blip("model_base_caption_capfilt_large.pth", device="cuda")  # path, URL or our run's checkpoint
    blip.caption(images, num_beams=3, max_length=20, min_length=5)            # -> list[str]
    blip.caption(images, sample=True, top_p=0.9, num_return_sequences=3, seed=0)
    blip.image_features(images)   # [B, E] L2-normalised ITC features (retrieval / pretraining files)
    blip.text_features(texts)     # [B, E]
    blip.itm(images, texts)       # [B] match probability of pair i: softmax(ITM logits)[:, 1]
    blip.answer(images, questions, inference="generate")                  # VQA files -> list[str]
    blip.answer(images, questions, inference="rank", answer_list=["yes", "no", "2"])
    blip.transform, blip.tokenizer, blip.model, blip.config

``images``: PIL images, file paths, or a ``[B, 3, H, W]`` tensor already transformed (``blip.transform``).
What a checkpoint serves follows from its layout (``models.formats.checkpoint_format``):

| file | builds | serves |
|---|---|---|
| ``blip-caption`` (``model_*_caption*.pth``, train_caption.py runs) | captioner | ``caption`` |
| ``blip`` with ``text_encoder.*`` (``model_*_retrieval_*.pth``, train_retrieval.py runs) | retrieval model without momentum encoders | ``image_features``, ``text_features``, ``itm`` |
| ``blip`` with ``text_encoder.*`` and ``text_decoder.*`` (``model_base.pth``, ``model_large.pth``) | both | ``caption``, features, ``itm`` |
| ``blip-vqa`` (``model_*_vqa*.pth``, train_vqa.py runs) | VQA model | ``answer`` |

The architecture: our own checkpoints carry the run's config and it is used; official files carry
little, so the ViT is read off the state dict's shapes, the text side is bert-base
(``models/checkpoint_arch.py`` resolves it). Every setting can be overridden by keyword. Models are
built and loaded through ``models.factory`` only.

Outputs of ``image_features`` / ``text_features`` / ``itm`` are float32 CPU tensors (gallery-sized
results never pile up in GPU memory); the models themselves run on ``device``.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from data.collate import tokenize
from data.transforms import build_test_transform
from data.utils import load_image, pre_caption
from models.blip import BLIPRetrieval, BlipArch
from models.caption import BLIPCaptioner, CaptionArch
from models.checkpoint_arch import _arch, _arch_values
from models.factory import build_model, load_weights, read_source
from models.formats import Format, checkpoint_format
from models.tokenizer import build_tokenizer
from models.vqa import MAX_QUESTION_TOKENS, BLIPVQA, VQAArch, VQASettings
from utils.errors import CheckpointError, CheckpointMismatchError
from utils.state_dict import extract_state_dict

logger = logging.getLogger(__name__)

MAX_TEXT_TOKENS = 35                             # BLIP's truncation of retrieval texts
MAX_WORDS = 30                                   # BLIP's pre_caption word limit

ImageInput = Union[torch.Tensor, Image.Image, str, os.PathLike, np.ndarray,
                   Sequence[Union[Image.Image, str, os.PathLike, np.ndarray, torch.Tensor]]]
TextInput = Union[str, Sequence[str]]


class CheckpointKindError(CheckpointError):
    """The loaded checkpoint has no part that serves the method called (e.g. ITM on a captioner),
    or it is of a kind this API does not load."""


# ---------------------------------------------------------------------- the loaded model

class BLIP:
    """A loaded BLIP checkpoint: its models in eval mode, transform and tokenizer. Made by
    :func:`load_blip`.

    ``captioner`` (:class:`BLIPCaptioner`) and ``retrieval`` (:class:`BLIPRetrieval`, no momentum
    encoders) are the models the file holds (None where it has no such part); ``model`` is the one
    model, the retrieval model for a pretraining file. ``kind``: ``'caption'``, ``'retrieval'`` or
    ``'pretrain'``. ``config``: the resolved settings it was built with.
    """

    def __init__(self, captioner: Optional[BLIPCaptioner], retrieval: Optional[BLIPRetrieval], tokenizer,
                 config: Dict[str, Any], device: torch.device, load_reports: Dict[str, Any],
                 vqa: Optional[BLIPVQA] = None):
        self.captioner = captioner
        self.retrieval = retrieval
        self.vqa = vqa
        self.tokenizer = tokenizer
        self.config = config
        self.device = device
        self.load_reports = load_reports
        self.image_size = config["image_size"]
        self.transform = build_test_transform(self.image_size)
        self.kind = "vqa" if vqa is not None else "pretrain" if captioner is not None and retrieval is not None else \
            "caption" if captioner is not None else "retrieval"

    @property
    def model(self) -> nn.Module:
        return self.vqa or (self.retrieval if self.retrieval is not None else self.captioner)

    def __repr__(self) -> str:
        vit = self.config["vit"]
        vit = vit if isinstance(vit, str) else f"{vit['width']}x{vit['depth']}/{vit['patch_size']}"
        return (f"BLIP(kind={self.kind!r}, source={self.config['source']!r}, vit={vit}, "
                f"image_size={self.image_size}, device={str(self.device)!r})")

    # ------------------------------------------------------------------ inputs
    def _need_captioner(self) -> BLIPCaptioner:
        if self.vqa is not None:
            raise CheckpointKindError(f"this is a VQA checkpoint ({self.config['source']}): it answers questions "
                                      "(blip.answer); load a captioning or pretraining checkpoint to caption")
        if self.captioner is None:
            raise CheckpointKindError(
                f"this is a retrieval checkpoint ({self.config['source']}): it has no text decoder to write "
                "captions; load a captioning checkpoint (model_base_caption_capfilt_large.pth, ...) or a "
                "pretraining checkpoint (model_base.pth)")
        return self.captioner.eval()

    def _need_retrieval(self, what: str) -> BLIPRetrieval:
        if self.vqa is not None:
            raise CheckpointKindError(f"this is a VQA checkpoint ({self.config['source']}): it has no {what} "
                                      "(blip.answer answers questions); load a retrieval or pretraining checkpoint")
        if self.retrieval is None:
            raise CheckpointKindError(
                f"this is a captioning checkpoint ({self.config['source']}): it has no {what}; load a "
                "retrieval (model_base_retrieval_coco.pth, ...) or pretraining checkpoint (model_base.pth)")
        return self.retrieval.eval()

    def _image_list(self, images: ImageInput) -> Union[torch.Tensor, List[Any]]:
        if isinstance(images, torch.Tensor):
            if images.dim() == 3:
                images = images.unsqueeze(0)
            if images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"an image tensor must be [B, 3, H, W] (already transformed), got "
                                 f"{tuple(images.shape)}")
            if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
                raise ValueError(f"the image tensor is {images.shape[-2]}x{images.shape[-1]} but this model takes "
                                 f"{self.image_size}x{self.image_size}: pass PIL images or paths (transformed "
                                 "here), or apply blip.transform first")
            return images
        if isinstance(images, (Image.Image, str, os.PathLike)) or \
                (isinstance(images, np.ndarray) and images.ndim == 3):
            return [images]
        return list(images)

    def _to_tensor(self, image: Any) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            if tuple(image.shape) != (3, self.image_size, self.image_size):
                raise ValueError(f"an image tensor in a list must be [3, {self.image_size}, {self.image_size}] "
                                 f"(already transformed), got {tuple(image.shape)}")
            return image
        if isinstance(image, (str, os.PathLike)):
            image = load_image(image, context="load_blip input")
        elif isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise TypeError(f"images: expected PIL images, file paths, HxWx3 uint8 arrays or a [B, 3, H, W] "
                            f"tensor, got {type(image).__name__}")
        return self.transform(image.convert("RGB"))

    def _image_batches(self, images: ImageInput, batch_size: int) -> Iterator[torch.Tensor]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        items = self._image_list(images)
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            batch = chunk if isinstance(chunk, torch.Tensor) else torch.stack([self._to_tensor(x) for x in chunk])
            yield batch.to(self.device, torch.float32)

    @staticmethod
    def _text_list(texts: TextInput) -> List[str]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise TypeError(f"texts: expected strings, got {bad[0]}")
        return texts

    def _tokenize(self, texts: Sequence[str]):
        # BLIP's evaluation text: pre_caption (lowercase, punctuation off, 30 words), 35 tokens.
        ids, mask = tokenize(self.tokenizer, [pre_caption(t, MAX_WORDS) for t in texts], MAX_TEXT_TOKENS,
                             dynamic=True)
        return ids.to(self.device), mask.to(self.device)

    # ------------------------------------------------------------------ captioning
    @torch.no_grad()
    def caption(self, images: ImageInput, *, num_beams: int = 3, max_length: int = 20, min_length: int = 5,
                sample: bool = False, top_p: float = 0.9, top_k: int = 50, repetition_penalty: float = 1.0,
                num_return_sequences: int = 1, seed: Optional[int] = None, batch_size: int = 16,
                use_cache: bool = True) -> List[str]:
        """Captions of ``images`` (prompt removed), ``len(images) * num_return_sequences`` strings,
        those of image ``i`` together. Defaults: BLIP's caption evaluation (3 beams, max 20, min 5
        tokens, prompt included). ``sample=True``: nucleus sampling (``top_p``, ``top_k``);
        ``seed`` makes it repeatable (a ``torch.Generator`` on the model's device, shared by the
        batches, so the result depends on ``batch_size`` too)."""
        model = self._need_captioner()
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(seed))
        out: List[str] = []
        for pixels in self._image_batches(images, batch_size):
            out += model.generate(pixels, sample=sample, num_beams=num_beams, max_length=max_length,
                                  min_length=min_length, top_p=top_p, top_k=top_k,
                                  repetition_penalty=repetition_penalty, num_return_sequences=num_return_sequences,
                                  generator=generator, use_cache=use_cache)
        return out

    # ------------------------------------------------------------------ retrieval
    @torch.no_grad()
    def image_features(self, images: ImageInput, batch_size: int = 64) -> torch.Tensor:
        """``[B, embed_dim]`` L2-normalised ITC image features (float32, CPU)."""
        model = self._need_retrieval("image-text projection heads for features")
        feats = [model.encode_image(pixels)[1].float().cpu() for pixels in self._image_batches(images, batch_size)]
        return torch.cat(feats) if feats else torch.empty(0, model.embed_dim)

    @torch.no_grad()
    def text_features(self, texts: TextInput, batch_size: int = 256) -> torch.Tensor:
        """``[B, embed_dim]`` L2-normalised ITC text features (float32, CPU); texts are cleaned as
        BLIP's evaluation does (``pre_caption``) and truncated to 35 tokens."""
        model = self._need_retrieval("text encoder for features")
        texts = self._text_list(texts)
        feats = []
        for start in range(0, len(texts), batch_size):
            ids, mask = self._tokenize(texts[start:start + batch_size])
            feats.append(model.encode_text(ids, mask)[1].float().cpu())
        return torch.cat(feats) if feats else torch.empty(0, model.embed_dim)

    @torch.no_grad()
    def itm(self, images: ImageInput, texts: TextInput, batch_size: int = 32,
            return_logits: bool = False) -> torch.Tensor:
        """Match probability of each pair (image ``i``, text ``i``): ``softmax(ITM logits)[:, 1]``,
        ``[B]`` float32 on CPU (``return_logits``: the logits ``[B, 2]``). One image with several
        texts (or one text with several images) scores it against each."""
        model = self._need_retrieval("ITM head")
        texts = self._text_list(texts)
        items = self._image_list(images)
        n_img, n_txt = len(items), len(texts)
        if n_img != n_txt and 1 not in (n_img, n_txt):
            raise ValueError(f"itm scores pairs: got {n_img} images and {n_txt} texts (give as many of each, "
                             "or one image / one text to score against all)")
        n = max(n_img, n_txt)
        single_image = None
        if n_img == 1 and n > 1:
            single_image = model.visual_encoder(next(self._image_batches(items, 1)))
        if n_txt == 1 and n > 1:
            texts = texts * n
        logits = []
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            if single_image is not None:
                tokens = single_image.expand(stop - start, -1, -1)
            else:
                tokens = model.visual_encoder(next(self._image_batches(items[start:stop], stop - start)))
            ids, mask = self._tokenize(texts[start:stop])
            logits.append(model.itm_logits(ids, mask, image_tokens=tokens).float().cpu())
        logits = torch.cat(logits) if logits else torch.empty(0, 2)
        return logits if return_logits else logits.softmax(-1)[:, 1]


    # ------------------------------------------------------------------ question answering
    @torch.no_grad()
    def answer(self, images: ImageInput, questions: TextInput, *, inference: str = "generate",
               answer_list: Optional[Sequence[str]] = None, k_test: int = 128, batch_size: int = 16,
               mask_question_padding: bool = False) -> List[str]:
        """One answer per (image ``i``, question ``i``) (one image with several questions: each
        about it). ``inference='generate'``: the release's beam search (3 beams, at most 10 tokens;
        unmasked question padding unless ``mask_question_padding``, so an answer can depend on the
        batch); ``'rank'``: the best of the ``k_test`` candidates of ``answer_list`` with the highest
        first-token probability, re-scored whole. Questions get BLIP's ``pre_question``."""
        from data.vqa import pre_question, tokenize_questions
        from models.vqa import tokenize_candidates
        if self.vqa is None:
            raise CheckpointKindError(f"{self.config['source']} is not a VQA checkpoint: it has no question encoder "
                                      "and answer decoder; load model_base_vqa_capfilt_large.pth or a train_vqa.py run")
        if inference not in ("generate", "rank"):
            raise ValueError(f"inference {inference!r}: 'generate' or 'rank'")
        if inference == "rank" and not answer_list:
            raise ValueError("inference='rank' needs answer_list (the candidate answers, BLIP's answer_list.json)")
        questions = self._text_list(questions)
        items = self._image_list(images)
        if len(items) == 1 and len(questions) > 1:
            items = items.expand(len(questions), -1, -1, -1) if isinstance(items, torch.Tensor) else items * len(questions)
        if len(items) != len(questions):
            raise ValueError(f"answer takes one question per image: got {len(items)} images and {len(questions)} "
                             "questions (or one image with several questions)")
        model = self.vqa.eval()
        candidates = None
        if inference == "rank":
            candidates = [c.to(self.device) for c in tokenize_candidates(self.tokenizer, list(answer_list))]
        settings = VQASettings().answer_generation()
        out: List[str] = []
        for start, pixels in zip(range(0, len(questions), batch_size), self._image_batches(items, batch_size)):
            ids, mask = (t.to(self.device) for t in tokenize_questions(
                self.tokenizer, [pre_question(q) for q in questions[start:start + batch_size]], MAX_QUESTION_TOKENS))
            out += model.answer(pixels, ids, mask, inference=inference, candidates=answer_list,
                                candidate_ids=candidates[0] if candidates else None,
                                candidate_mask=candidates[1] if candidates else None, k_test=k_test,
                                settings=settings, mask_question_padding=mask_question_padding)
        return out


# ---------------------------------------------------------------------- loading

def load_blip(path: Union[str, os.PathLike], device: Any = None, image_size: Optional[int] = None,
              vit: Any = None, med_config: Optional[str] = None, tokenizer: Optional[str] = None,
              prompt: Optional[str] = None, strict: bool = True, vit_heads: Optional[int] = None) -> BLIP:
    """Load a BLIP captioning, retrieval, pretraining or VQA checkpoint (a path, an http(s) URL, or a
    checkpoint of train_caption.py / train_retrieval.py, a HuggingFace BLIP folder or hub id) with its
    transform and tokenizer.

    ``device``: default CUDA when available, else CPU. ``image_size``: the input resolution (the
    position embeddings are resized to it when it differs from the file's). ``vit``: ``'base'``,
    ``'large'`` or ``{width, depth, heads, patch_size, mlp_ratio}``; ``vit_heads``: the head count
    alone. ``med_config`` / ``tokenizer``: the text side (defaults: the run's, or bert-base and
    ``bert-base-uncased`` for official files). ``prompt``: the captioning prefix. ``strict``: every
    weight the model has must be in the file, shape for shape.
    """
    name = str(path)
    ckpt = read_source(path)  # a file, a URL, or a HuggingFace folder / hub id
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{name} holds a {type(ckpt).__name__}, not a checkpoint dict")
    fmt = checkpoint_format(ckpt)
    state = extract_state_dict(ckpt)
    has_encoder = any(k.startswith("text_encoder.") for k in state)
    has_decoder = any(k.startswith("text_decoder.") for k in state)
    if fmt == Format.CAPTION:
        parts = ("caption",)
    elif fmt == Format.VQA:
        parts = ("vqa",)
    elif fmt == Format.BLIP and has_encoder:
        parts = ("retrieval", "caption") if has_decoder else ("retrieval",)
    elif fmt == Format.BLIP:
        raise CheckpointKindError(f"{name} has neither text_encoder.* nor text_decoder.* weights: not a BLIP "
                                  "captioning, retrieval or pretraining checkpoint")
    else:
        raise CheckpointKindError(
            f"{name} is a {fmt!r} checkpoint; load_blip loads BLIP captioning, retrieval, pretraining and VQA "
            "checkpoints (official files, train_caption.py / train_retrieval.py runs). ContextBLIP and "
            "ImageCoDe checkpoints load through models.factory (create_model / model_from_checkpoint)")

    values = _arch_values(ckpt, state, image_size=image_size, vit=vit, vit_heads=vit_heads,
                          med_config=med_config, tokenizer=tokenizer, prompt=prompt)
    tok = build_tokenizer(values["tokenizer"])
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))

    models: Dict[str, nn.Module] = {}
    reports: Dict[str, Any] = {}
    for part in parts:
        group, kind = {"retrieval": (BlipArch, "blip_inference"), "caption": (CaptionArch, "caption"),
                       "vqa": (VQAArch, "vqa")}[part]
        model = build_model(_arch(group, values), kind, tok)
        try:
            reports[part] = load_weights(model, ckpt, strict=strict, source_name=name).blip
        except CheckpointMismatchError as e:
            vit_desc = values["vit"] if isinstance(values["vit"], str) else values["vit"].model_dump()
            raise CheckpointMismatchError(
                f"{name} does not fit the {part} model built with vit={vit_desc}, med_config="
                f"{values['med_config']!r}, tokenizer={values['tokenizer']!r}: pass load_blip the vit=, "
                f"vit_heads=, med_config= or tokenizer= it was trained with (or strict=False to load what "
                f"fits).\n{e}") from None
        models[part] = model.to(dev).eval()
    del ckpt, state

    vit_value = values["vit"] if isinstance(values["vit"], str) else values["vit"].model_dump()
    config = {**values, "vit": vit_value, "source": name, "format": fmt, "kind": None}
    if "retrieval" not in models:
        config["embed_dim"] = None  # a captioner or VQA model has no ITC projection
    blip = BLIP(models.get("caption"), models.get("retrieval"), tok, config, dev, reports, vqa=models.get("vqa"))
    blip.config["kind"] = blip.kind
    logger.info("loaded %r", blip)
    return blip
