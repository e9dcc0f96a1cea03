"""The official BLIP checkpoints by name: ``pretrained: blip/model_base`` instead of a path or URL.

    resolve_checkpoint("blip/model_base")   # -> <cache>/<hash>_model_base.pth, downloaded once
    python -m tools models                  # the table: name, task, ViT, image size, URL

Every file the release lists (its README's two checkpoint tables and its ``configs/*.yaml``) is an
entry named ``blip/<file stem>``; the name becomes the release URL (``$BLIP_ZOO_URL`` replaces the
base, e.g. a mirror or a test server) and then goes through ``utils.download.resolve_checkpoint``'s
download and cache unchanged. Each entry records the ViT size the file needs (``check_vit``: a
contradicting ``vit`` is refused before anything is downloaded) and the image size the release uses
it at (informative only: BLIP fine-tunes the 224-pixel pretraining files at 384 by resizing the
position embeddings, as we do). Facts: docs/BLIP.md, "Official checkpoints by name".
"""
from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from utils.errors import UserError

logger = logging.getLogger(__name__)

PREFIX = "blip/"
BASE_URL = "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/"
URL_ENV = "BLIP_ZOO_URL"


class ZooError(UserError, ValueError):
    """An unknown checkpoint name, or a config whose ViT contradicts the named checkpoint."""


@dataclass(frozen=True)
class ZooEntry:
    file: str          # the release's file stem (model_base -> model_base.pth)
    task: str          # pretrain | retrieval | caption | vqa | nlvr
    vit: str           # base | large
    image_size: int    # the resolution the release uses the file at
    about: str         # what it is for, one line

    @property
    def name(self) -> str:
        return PREFIX + self.file

    def url(self, base: Optional[str] = None) -> str:
        """The file's URL under ``base`` (default: ``$BLIP_ZOO_URL``, else the release's)."""
        base = base or os.environ.get(URL_ENV) or BASE_URL
        return base.rstrip("/") + "/" + self.file + ".pth"


# From the release's README (tables "Pre-trained checkpoints", "Finetuned checkpoints") and its
# configs (pretrain.yaml: 224; retrieval_*, caption_coco, nocaps, nlvr: 384; vqa: 480; ViT-L is
# configured by commented `vit: 'large'` blocks that keep image_size).
ENTRIES = (
    ZooEntry("model_base", "pretrain", "base", 224,
             "BLIP w/ ViT-B pretrained on 129M images; BLIP's start for retrieval and NLVR2 fine-tuning"),
    ZooEntry("model_base_14M", "pretrain", "base", 224, "BLIP w/ ViT-B pretrained on 14M images"),
    ZooEntry("model_base_capfilt_large", "pretrain", "base", 224,
             "BLIP w/ ViT-B and CapFilt-L, 129M images; BLIP's start for captioning and VQA fine-tuning"),
    ZooEntry("model_large", "pretrain", "large", 224, "BLIP w/ ViT-L pretrained on 129M images"),
    ZooEntry("model_base_retrieval_coco", "retrieval", "base", 384,
             "image-text retrieval on COCO (configs/retrieval_coco.yaml; also zero-shot MSRVTT video)"),
    ZooEntry("model_large_retrieval_coco", "retrieval", "large", 384, "image-text retrieval on COCO, ViT-L"),
    ZooEntry("model_base_retrieval_flickr", "retrieval", "base", 384,
             "image-text retrieval on Flickr30k (configs/retrieval_flickr.yaml)"),
    ZooEntry("model_large_retrieval_flickr", "retrieval", "large", 384, "image-text retrieval on Flickr30k, ViT-L"),
    ZooEntry("model_base_caption_capfilt_large", "caption", "base", 384,
             "COCO captioning, ViT-B and CapFilt-L (configs/caption_coco.yaml; also NoCaps)"),
    ZooEntry("model_large_caption", "caption", "large", 384, "COCO captioning, ViT-L"),
    ZooEntry("model_vqa", "vqa", "base", 480, "VQA v2, BLIP w/ ViT-B"),
    ZooEntry("model_base_vqa_capfilt_large", "vqa", "base", 480,
             "VQA v2, ViT-B and CapFilt-L (configs/vqa.yaml)"),
    ZooEntry("model_base_nlvr", "nlvr", "base", 384, "NLVR2, BLIP w/ ViT-B (configs/nlvr.yaml)"),
)
BY_NAME = {e.name: e for e in ENTRIES}


def is_zoo_name(source) -> bool:
    """``blip/<name>`` that is not an existing local path (a folder ``blip/`` of one's own wins)."""
    return isinstance(source, str) and source.startswith(PREFIX) and not Path(source).exists()


def lookup(name: str) -> ZooEntry:
    """The entry of ``name``; an unknown one is a one-line ``ZooError`` listing the known names,
    the closest first."""
    entry = BY_NAME.get(name)
    if entry is not None:
        return entry
    close = difflib.get_close_matches(name, list(BY_NAME), n=3, cutoff=0.6)
    ordered = close + [n for n in BY_NAME if n not in close]
    hint = f"did you mean {close[0]}? " if close else ""
    raise ZooError(f"unknown checkpoint name {name!r} (and no such local file): {hint}known names: "
                   f"{', '.join(ordered)} (`python -m tools models` describes them)")


def zoo_url(name: str) -> str:
    """The URL ``name`` stands for (``$BLIP_ZOO_URL`` replaces the release's base)."""
    return lookup(name).url()


def check_vit(name: str, vit: Optional[str], key: str = "vit", role: str = "pretrained") -> None:
    """Refuse a config whose ViT preset contradicts the one checkpoint ``name`` needs, in one line
    naming both (``key``: the config key, ``role``: the key naming the file). ``vit`` is the preset
    name of the config's ``vit`` (a mapping equal to a preset counts as that preset); None (a custom
    mapping) is not judged here: the loading policy judges its shapes."""
    entry = lookup(name)
    if vit is None:
        logger.info("%s is a ViT-%s checkpoint; the config's custom `%s` mapping is checked by shape when it "
                    "loads", name, entry.vit, key)
        return
    if vit != entry.vit:
        same = [e.name for e in ENTRIES if e.vit == vit and e.task == entry.task]
        other = f", or a ViT-{vit} {entry.task} checkpoint ({', '.join(same)})" if same else ""
        raise ZooError(f"`{key}: {vit}` contradicts `{role}: {name}`, a ViT-{entry.vit} checkpoint: "
                       f"set {key}: {entry.vit}{other}")
