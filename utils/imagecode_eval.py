"""ImageCoDe evaluation, shared by ``zero_shot.py`` and ``finetune_imagecode.py``.

Each image set is embedded once for all of its descriptions (1-3 in ImageCoDe); under torchrun
every rank takes a contiguous share of the sets and the results are gathered in dataset order.
Metric: top-1 accuracy over the candidates, per description, overall / video / static (percent).

Outputs (``write_outputs``): ``predictions.json``, a list with one entry per description
``{"set", "description", "target" (position or null), "pred", "candidates" (file names in position
order), "scores" (one per candidate), "video"}``, and on the unlabelled test file the leaderboard
submission ``submission.json`` = ``{set: [predicted position of description 0, ...]}``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Subset

from data.imagecode import ImageCodeDataset, ImageCodeItem, ImageCodeSetCollator, ImageCodeSets
from utils import dist as du
from utils.engine import autocast

logger = logging.getLogger(__name__)


@torch.no_grad()
def map_over_sets(fn: Callable[[dict], torch.Tensor], dataset: ImageCodeDataset, tokenizer, max_tokens: int,
                  out_shape: Sequence[int], batch_size: int, device: torch.device, num_workers: int = 0,
                  precision: str = "fp32", progress: bool = False) -> torch.Tensor:
    """``fn(batch) -> [D, *out_shape]`` for every description, batches of ``batch_size`` image sets
    (see ``ImageCodeSetCollator``); returns ``[len(dataset), *out_shape]`` (float32, CPU) on every rank."""
    sets = ImageCodeSets(dataset)
    loader = DataLoader(Subset(sets, list(du.shard_range(len(sets)))), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=ImageCodeSetCollator(dataset, tokenizer, max_tokens))
    if progress and du.is_main_process():
        from tqdm import tqdm
        loader = tqdm(loader, desc="imagecode sets", dynamic_ncols=True, leave=False)
    outs, index = [], []
    for batch in loader:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast(device, precision):
            outs.append(fn(batch).float())
        index.append(batch["index"])
    local = torch.cat(outs) if outs else torch.zeros(0, *out_shape, device=device)
    local_index = torch.cat(index) if index else torch.zeros(0, dtype=torch.long, device=device)
    gathered, gathered_index = du.gather_variable(local), du.gather_variable(local_index)
    result = torch.zeros(len(dataset), *out_shape)
    result[gathered_index.cpu()] = gathered.cpu()
    return result


def accuracy(items: Sequence[ImageCodeItem], preds: Sequence[int]) -> Dict[str, float]:
    """``acc`` / ``acc_video`` / ``acc_static`` (percent) and their counts, over labelled items."""
    out: Dict[str, float] = {}
    for name, keep in (("", lambda it: True), ("_video", lambda it: it.video), ("_static", lambda it: not it.video)):
        hits = [p == it.target for it, p in zip(items, preds) if it.target is not None and keep(it)]
        out[f"n{name}"] = len(hits)
        out[f"acc{name}"] = 100.0 * sum(hits) / len(hits) if hits else float("nan")
    return out


def predictions(items: Sequence[ImageCodeItem], scores: torch.Tensor) -> List[dict]:
    """One ``predictions.json`` entry per description (see the module doc)."""
    preds = scores.argmax(dim=1).tolist()
    return [{"set": it.set_name, "description": it.description, "target": it.target, "pred": p,
             "candidates": list(it.candidates), "scores": [round(float(s), 6) for s in row], "video": it.video}
            for it, p, row in zip(items, preds, scores.tolist())]


def submission(items: Sequence[ImageCodeItem], preds: Sequence[int]) -> Dict[str, List[int]]:
    """The leaderboard file: each set's predicted positions, in the order of its descriptions."""
    out: Dict[str, List[int]] = {}
    for it, p in zip(items, preds):
        out.setdefault(it.set_name, []).append(int(p))
    return out


def write_outputs(output_dir: Path, dataset: ImageCodeDataset, scores: torch.Tensor,
                  name: str = "predictions.json") -> Dict[str, float]:
    """Write ``predictions.json`` (and ``submission.json`` for an unlabelled file) from rank 0;
    return the accuracies (empty for an unlabelled file)."""
    preds = scores.argmax(dim=1).tolist()
    metrics = accuracy(dataset.items, preds) if dataset.labelled else {}
    if du.is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / name).write_text(json.dumps(predictions(dataset.items, scores), indent=1) + "\n")
        if not dataset.labelled:
            (output_dir / "submission.json").write_text(json.dumps(submission(dataset.items, preds), indent=1) + "\n")
            logger.info("wrote the leaderboard submission %s", output_dir / "submission.json")
    return metrics


def format_accuracy(metrics: Dict[str, float], label: str = "") -> str:
    if not metrics:
        return f"{label}unlabelled (no accuracy)"
    return (f"{label}accuracy {metrics['acc']:.2f} (n={metrics['n']}) | video {metrics['acc_video']:.2f} "
            f"(n={metrics['n_video']}) | static {metrics['acc_static']:.2f} (n={metrics['n_static']})")


def model_scores(model, batch: dict) -> torch.Tensor:
    """A fine-tuned scorer's logits ``[D, K]`` for a batch of image sets (each set embedded once)."""
    image_embeds = model.embed_candidates(batch["pixel_values"])[batch["set_index"]]
    return model(batch["input_ids"], batch["attention_mask"], image_embeds=image_embeds, video=batch["video"])


def evaluate_model(model, dataset: ImageCodeDataset, tokenizer, cfg, device, progress: bool = False,
                   features: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Scores ``[N, K]`` of a stage-1/2 model; ``features`` ``[N, K, D]``: precomputed stage-1
    features (stage 2 with cached features)."""
    model.eval()
    if features is not None:
        video = torch.tensor([it.video for it in dataset.items])
        with torch.no_grad():
            return torch.cat([model(features=features[s:s + 256].to(device), video=video[s:s + 256].to(device)).float().cpu()
                              for s in range(0, len(dataset), 256)])
    k = len(dataset.items[0].candidates) if len(dataset) else 10
    return map_over_sets(lambda b: model_scores(model, b), dataset, tokenizer, cfg.max_tokens, (k,),
                         cfg.batch_size_test, device, cfg.num_workers, cfg.precision, progress)
