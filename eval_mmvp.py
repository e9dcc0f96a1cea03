"""MMVP-VLM evaluation: nine visual patterns, 135 pairs of images and statements (docs/FORMATS.md section 4).

    python eval_mmvp.py --config configs/mmvp.yaml --opts data_root=data/MMVP_VLM
    python eval_mmvp.py --config configs/mmvp.yaml --opts model_type=finetuned pretrained=stage2/checkpoint_best.pth
    python eval_mmvp.py --config configs/demo/mmvp.yaml        # the synthetic MMVP-style part

Reads ``data_root`` (``Questions.csv`` + ``MLLM_VLM Images/``) exactly as distributed and applies
the official protocol (``data/mmvp.py``); the CSV and every image are checked before the model is
built. A ``Type`` outside the release's nine is an error unless listed in ``extra_patterns`` (a
custom benchmark's own patterns, reported under their own names). The two images of a pair form a
2-candidate set and each statement is a description of it, scored like ImageCoDe candidates:

- ``model_type: zero_shot``: a BLIP checkpoint (or a ContextBLIP pretraining one, with its adapter),
  ``score: itm | itc | itm+itc`` as in ``zero_shot.py``;
- ``model_type: finetuned``: a ``finetune_imagecode.py`` stage-1/2 checkpoint (its stored config
  decides the model, resolution and text length), its logits over the 2 candidates with no
  candidate position embedding (docs/CONTEXTBLIP.md).

Writes to ``output_dir``: ``mmvp_results.json`` (pattern -> pair accuracy in %, and ``Average``),
``mmvp_results.md`` (table with the published CLIP rows), ``mmvp_results.png`` (bar chart),
``mmvp_pairs.json`` (every pair's scores and choices) and ``config.yaml``.
"""
from __future__ import annotations

import utils  # noqa: F401  (first: one clear line on an unsupported Python)

import json
import logging
from pathlib import Path
from typing import Callable, List, Literal, Sequence, Tuple

import numpy as np
import torch
from pydantic import model_validator

from data.collate import tokenize
from data.mmvp import TYPE_FOLDERS, MMVPPair, bar_chart, evaluate_pairs, markdown_table, prompts_for, read_mmvp
from data.preflight import log_unk_rate
from data.transforms import build_test_transform
from data.utils import load_image, pre_caption
from models.contextblip import ContextBLIPArch
from models.factory import create_model, model_from_checkpoint
from tasks.imagecode import model_scores, zero_shot_scorer
from utils.cli import NOT_TRAINING
from utils.config import PosInt, parse_config
from utils.dist import resolve_device
from utils.precision import autocast
from utils.rundir import commit_run, run_entry, start_run
from utils.settings import RunSettings, TextSettings, WeightsSettings

logger = logging.getLogger("eval_mmvp")


class MMVPConfig(ContextBLIPArch, TextSettings, WeightsSettings, RunSettings):
    """MMVP-VLM evaluation: nine visual patterns, pairs of images and statements."""
    data_root: str = 'data/mmvp'                # holds Questions.csv and 'MLLM_VLM Images/'
    model_type: Literal['zero_shot', 'finetuned'] = 'zero_shot'  # zero_shot: a BLIP or ContextBLIP
                                                # pretraining checkpoint, scored with `score`; finetuned: a
                                                # finetune_imagecode.py stage-1/2 checkpoint (its own config)
    score: Literal['itm', 'itc', 'itm+itc'] = 'itm'  # itm: softmax(itm_head)[:, 1]; itc: cosine;
                                                # itm+itc: ITM logit[:, 1] + cosine (BLIP's rerank score)
    prompt_prefix: str = 'a photo of '          # the official prompt: prefix + statement
    clean_text: bool = True                     # BLIP's pre_caption on the prompt (lowercase, no . ! ...)
    pairs_per_pattern: PosInt = 15              # pattern of pair p = PATTERNS[p // pairs_per_pattern]
    extra_patterns: List[str] = []              # Types beyond the nine (a custom benchmark): each its own pattern
    batch_size: PosInt = 16                     # pairs per forward pass (4 image-text matches each)

    @model_validator(mode='after')
    def _extra_patterns(self):
        known = [p for p in self.extra_patterns if p in TYPE_FOLDERS]
        if known:
            raise ValueError(f'extra_patterns: {known} are among the nine MMVP Types already '
                             f'({", ".join(TYPE_FOLDERS)})')
        return self


class PairScorer:
    """``scores[k, t, i]`` of statement ``t`` of pair ``k`` against its image ``i``.

    ``fn(batch) -> [2n, 2]`` is an ImageCoDe-style scorer: ``batch`` holds ``pixel_values``
    ``[n, 2, 3, H, W]`` (each pair a 2-candidate set), the statements' ``input_ids`` /
    ``attention_mask`` ``[2n, T]`` (pair-major), ``set_index`` ``[2n]`` and ``video`` ``[2n]`` (all False).
    """

    def __init__(self, fn: Callable[[dict], torch.Tensor], tokenizer, image_size: int, max_tokens: int,
                 max_words: int, clean_text: bool, precision: str, device: torch.device):
        self.fn, self.tokenizer, self.device, self.precision = fn, tokenizer, device, precision
        self.transform = build_test_transform(image_size)
        self.max_tokens, self.max_words, self.clean_text = max_tokens, max_words, clean_text

    @torch.no_grad()
    def __call__(self, pairs: Sequence[MMVPPair], prompts: Sequence[Tuple[str, str]]) -> np.ndarray:
        n, dev = len(pairs), self.device
        images = torch.stack([torch.stack([self.transform(load_image(it.image, context=f"Question ID {it.qid}"))
                                           for it in p.items]) for p in pairs])  # [n, 2, 3, H, W]
        texts = [pre_caption(t, self.max_words) if self.clean_text else t for pr in prompts for t in pr]
        ids, mask = tokenize(self.tokenizer, texts, self.max_tokens)
        batch = {"pixel_values": images, "input_ids": ids, "attention_mask": mask,
                 "set_index": torch.arange(n).repeat_interleave(2), "video": torch.zeros(2 * n, dtype=torch.bool)}
        batch = {k: v.to(dev) for k, v in batch.items()}
        with autocast(dev, self.precision):
            scores = self.fn(batch)
        return scores.float().view(n, 2, 2).cpu().numpy()


def build_scorer(cfg: MMVPConfig, device: torch.device) -> Tuple[PairScorer, bool]:
    """The pair scorer, and whether the adapter is used (a plain BLIP checkpoint: no)."""
    if cfg.model_type == "finetuned":
        if not cfg.pretrained:
            raise SystemExit("model_type finetuned needs `pretrained`: a finetune_imagecode.py checkpoint")
        model, tokenizer, stored = model_from_checkpoint(cfg.pretrained, device, strict=cfg.strict_load)
        if getattr(model, "all_pos", False):
            logger.info("MMVP pairs get no candidate position embedding: all_pos of the checkpoint is ignored")
            model.all_pos = False
        logger.info("stage-%d ImageCoDe model from %s (image_size %d, max_tokens %d, its own config)",
                    stored["stage"], cfg.pretrained, stored["image_size"], stored["max_tokens"])
        return PairScorer(lambda batch: model_scores(model, batch), tokenizer, stored["image_size"],
                          stored["max_tokens"], stored["max_words"], cfg.clean_text, cfg.precision,
                          device), cfg.use_adapter
    model, tokenizer = create_model(cfg, "zero_shot", device, purpose="eval")  # the model zero-shot ImageCoDe scores with
    return PairScorer(zero_shot_scorer(model, cfg.score), tokenizer, cfg.image_size, cfg.max_tokens, cfg.max_words,
                      cfg.clean_text, cfg.precision, device), model.use_adapter


def write_outputs(result, output_dir: Path, name: str) -> dict:
    accuracy = {k: round(v, 4) for k, v in result.accuracy.items()}
    (output_dir / "mmvp_results.json").write_text(json.dumps(accuracy, indent=1) + "\n")
    (output_dir / "mmvp_pairs.json").write_text(json.dumps(result.records, indent=1) + "\n")
    (output_dir / "mmvp_results.md").write_text(f"# MMVP-VLM\n\n{markdown_table(result.accuracy, name)}")
    bar_chart(result.accuracy, output_dir / "mmvp_results.png", title=f"MMVP-VLM: {name}")
    return accuracy


def _extra_args(parser) -> None:
    parser.add_argument("--name", default=None, help="row label in the table and chart (default: from the config)")


def main(argv=None) -> dict:
    args, cfg, doc = parse_config(MMVPConfig, argv, description=__doc__.splitlines()[0], extra_args=_extra_args,
                                  unused_keys=lambda _: NOT_TRAINING)
    _, output_dir = start_run(cfg, doc, args, trains=False)
    # The CSV and every image checked before the model loads.
    pairs = read_mmvp(cfg.data_root, cfg.pairs_per_pattern, extra_patterns=cfg.extra_patterns)
    logger.info("%d pairs from %s", len(pairs), cfg.data_root)
    scorer, doc["use_adapter"] = build_scorer(cfg, resolve_device(cfg.device))  # off for a plain BLIP file
    log_unk_rate(scorer.tokenizer, [t for p in pairs for t in prompts_for(p, cfg.prompt_prefix)], "the prompts",
                 clean=lambda t: pre_caption(t, scorer.max_words) if cfg.clean_text else t)
    commit_run(doc)  # checked and loaded: the run's files are written from here on
    result = evaluate_pairs(pairs, scorer, cfg.batch_size, cfg.prompt_prefix)
    kind = "ImageCoDe fine-tuned" if cfg.model_type == "finetuned" else f"zero-shot {cfg.score}"
    name = args.name or f"{kind}" + (f" ({Path(cfg.pretrained).name})" if cfg.pretrained else "")
    accuracy = write_outputs(result, output_dir, name)
    logger.info("MMVP-VLM pair accuracy: %s", {k: round(v, 1) for k, v in accuracy.items()})
    return accuracy


if __name__ == "__main__":
    run_entry(main, logger)
