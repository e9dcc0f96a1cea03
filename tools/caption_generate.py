"""The computation of ``tools caption`` (``tools/caption.py``): the captioner (and the ``--filter``
ITM model), the captions of each image (sampling seeded per image), the batches of images loaded
for both models, and one shard of records at a time (resumable).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from data.preflight import log_unk_rate
from data.utils import BadImageError, load_image, pre_caption
from models.factory import create_model
from models.generation import GenerationSettings
from tasks.caption import CaptionConfig
from tasks.retrieval import RetrievalConfig
from tools.caption_inputs import Inputs
from tools.common import JsonlShard, batches_of, inference_model
from tools.score_pairs import score_batch
from utils.precision import autocast
from utils.logging import Heartbeat

logger = logging.getLogger("tools.caption")


# ----------------------------------------------------------------------------- generation

def image_seed(seed: int, index: int) -> int:
    """The seed of image ``index``'s generator: a 63-bit function of ``(seed, index)``, stable across
    processes (``hash`` of a tuple of ints is not randomised; as ``utils.sampling`` seeds samples)."""
    return hash((seed, index)) & 0x7FFF_FFFF_FFFF_FFFF


def generate(model, pixel_values: torch.Tensor, images: Sequence[int], settings: GenerationSettings, seed: int,
             precision: str) -> List[List[str]]:
    """The captions of each image (``settings.num_return_sequences`` each); ``images``: their indices."""
    device = pixel_values.device
    with autocast(device, precision):
        if settings.sample:
            generators = [torch.Generator(device=device).manual_seed(image_seed(seed, i)) for i in images]
            ids = model.generate_ids(pixel_values, settings, generator=generators)
        else:
            ids = model.generate_ids(pixel_values, settings)
    texts = model.decode(ids)
    n = settings.num_return_sequences
    return [texts[k * n:(k + 1) * n] for k in range(len(images))]


class ImageBatches(Dataset):
    """Item ``b``: the images of ``batches[b]`` (image indices), loaded once and transformed by each
    of ``transforms`` ({name: transform}): ``{"rows", "ok" (the rows that loaded), "pixels": {name:
    [len(ok), 3, H, W] or None}, "errors": {row: message}}``. ``bad_images`` {load path: message}:
    known bad (pre-flight), not tried."""

    def __init__(self, inputs: Inputs, batches: Sequence[Sequence[int]], transforms: dict, bad_images: dict):
        self.inputs, self.batches = inputs, [list(b) for b in batches]
        self.transforms, self.bad = transforms, bad_images

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int) -> dict:
        rows = self.batches[b]
        pixels = {name: [] for name in self.transforms}
        ok, errors = [], {}
        for i in rows:
            path = self.inputs.load[i]
            if path in self.bad:
                errors[i] = f"image {i}: {self.bad[path]}"
                continue
            try:
                image = load_image(path, context=self.inputs.where(i))
            except (FileNotFoundError, BadImageError) as exc:
                errors[i] = f"image {i}: {exc}"
                continue
            for name, transform in self.transforms.items():
                pixels[name].append(transform(image))
            ok.append(i)
        return {"rows": rows, "ok": ok, "errors": errors,
                "pixels": {name: torch.stack(p) if p else None for name, p in pixels.items()}}


@dataclass
class Models:
    captioner: torch.nn.Module
    cfg: CaptionConfig
    settings: GenerationSettings
    filter: Optional[torch.nn.Module] = None
    filter_tokenizer: object = None
    filter_cfg: Optional[RetrievalConfig] = None


@torch.no_grad()
def caption_batch(batch: dict, inputs: Inputs, m: Models, device) -> Dict[int, dict]:
    """{image row: shard record} of one ``ImageBatches`` item: generated captions and, with a
    filter, the ITM probability of each generated and each original caption of the image."""
    records = {i: {"row": i, "image": inputs.path(i), "captions": []} for i in batch["rows"]}
    for i, message in batch["errors"].items():
        records[i]["error"] = message
        logger.warning("not captioned: %s", message)
        if m.filter is not None:
            records[i].update(itm=[], original_itm=[None] * len(inputs.originals(i)))
    ok = batch["ok"]
    if not ok:
        return records
    captions = generate(m.captioner, batch["pixels"]["caption"].to(device), ok, m.settings, m.cfg.seed,
                        m.cfg.precision)
    for i, caps in zip(ok, captions):
        records[i]["captions"] = caps
    if m.filter is not None:
        texts, image_index, owners = [], [], []
        for k, (i, caps) in enumerate(zip(ok, captions)):
            originals = [inputs.table.caption[r] for r in inputs.originals(i)]
            for j, text in enumerate(caps + originals):
                texts.append(pre_caption(text, m.filter_cfg.max_words))
                image_index.append(k)
                owners.append((i, j < len(caps)))
        scores = score_batch(m.filter, m.filter_tokenizer,
                             {"captions": texts, "image_index": torch.tensor(image_index, dtype=torch.long),
                              "pixel_values": batch["pixels"].get("filter", batch["pixels"]["caption"])},
                             ("itm",), m.filter_cfg, device)["itm"]
        for i in ok:
            records[i].update(itm=[], original_itm=[])
        for (i, generated), score in zip(owners, scores):
            records[i]["itm" if generated else "original_itm"].append(score)
    return records


def caption_shard(shard: JsonlShard, rows: range, inputs: Inputs, m: Models, transforms: dict, bad_images: dict,
                  device, progress: Heartbeat) -> None:
    """Caption (and score) the images of one shard into ``shard``. The batches are those of the
    whole shard, also on a restart: a batch with an image still to write is computed whole (only the
    missing records are written), so a restart computes exactly what the first run would have."""
    done = shard.done_rows()
    if done:
        logger.info("%s: resuming, %d of %d images already captioned", shard.partial.name, len(done), len(rows))
    progress.update(len(done))
    todo = [b for b in batches_of(list(rows), m.cfg.batch_size_test) if any(i not in done for i in b)]
    loader = DataLoader(ImageBatches(inputs, todo, transforms, bad_images), batch_size=None,
                        num_workers=m.cfg.num_workers)
    with shard.open_append() as f:
        for batch in loader:
            records = caption_batch(batch, inputs, m, device)
            new = [i for i in batch["rows"] if i not in done]
            for i in new:
                f.write(json.dumps(records[i], ensure_ascii=False) + "\n")
            f.flush()  # a kill now loses at most the batch being captioned
            progress.update(len(new))
    shard.finish()


def build_models(cfg: CaptionConfig, settings: GenerationSettings, fcfg: Optional[RetrievalConfig], inputs: Inputs,
                 device) -> Models:
    torch.manual_seed(cfg.seed)  # a captioner without `pretrained` is the same random model on every rank
    captioner, _ = create_model(cfg, "caption", device, purpose="eval")
    m = Models(captioner.eval(), cfg, settings)
    if fcfg is not None:
        m.filter, m.filter_tokenizer = inference_model(fcfg, device)
        m.filter_cfg = fcfg
        originals = [inputs.table.caption[r] for r in range(len(inputs.table)) if inputs.table.caption[r].strip()]
        if originals:
            log_unk_rate(m.filter_tokenizer, originals, "the original captions",
                         clean=lambda c: pre_caption(c, fcfg.max_words))
    return m
