"""Caption images with a BLIP captioner; with --filter, keep the captions a BLIP ITM model matches (CapFilt).

    python -m tools caption --config configs/caption_coco.yaml --images my_photos/ --output_dir outputs/captions
    torchrun --nproc_per_node 8 -m tools caption --config configs/caption_coco.yaml \\
        --opts pretrained=model_large_caption.pth sample=true top_p=0.9 repetition_penalty=1.1 \\
        --num_captions 5 --img2dataset data/cc3m_download --filter --filter_config configs/retrieval_coco.yaml \\
        --filter_pretrained model_large_retrieval_coco.pth --output_dir outputs/cc3m_capfilt

Inputs (one kind per run; each distinct image is captioned once, in first-seen order):

- ``--input FILE ...``: pair files (BLIP-json, pretraining json, CSV/TSV; ``--image_col`` ...), as for
  ``tools score``; their captions are the images' *original* captions;
- ``--images PATH ...``: folders (every image file below them, recursively, sorted by path; hidden
  files and folders skipped) and lists of images: a CSV/TSV (``--image_col``, ``--image_dir_col``),
  a ``.txt`` (one path a line) or a json list (of paths, or of objects with ``image``); no original
  captions;
- ``--img2dataset DIR ...``: img2dataset output folders (``00000/000000001.jpg`` with its caption
  in ``000000001.txt``; the ``.json``/``.parquet`` files are not read): the ``.txt`` is the image's
  original caption (an image without one, or with an empty one, has none).

Paths in list and pair files are joined to the config's ``image_root`` (as everywhere); folder
paths are used as given (relative to the working directory, or absolute). Outputs keep every path
as its input wrote it: a file's paths as written, a folder's images as ``DIR/relative/path``.

Generation: the config's keys (``tasks.caption.CaptionConfig``): beam search (``num_beams``,
``max_length``, ``min_length``, ``repetition_penalty``; ``--num_captions N``: the N best beams) or
nucleus sampling (``sample: true``, ``top_p``, ``top_k``, ``repetition_penalty``; BLIP's CapFilt:
``sample=true top_p=0.9 repetition_penalty=1.1``; ``--num_captions N``: N samples). Sampling is
seeded per image: image ``i`` (its first-seen index) draws from its own ``torch.Generator`` seeded
from ``(seed, i)``, so its captions do not depend on the batch it is in, the shard size, the number
of ranks or a restart (up to floating-point effects of the batch size on the logits, which change a
draw only when it lies within rounding of a boundary); they are the captions the model's own
``generate_ids`` draws for that image alone with that generator.

``--filter``: a BLIP retrieval model (``--filter_config`` a retrieval yaml, ``--filter_opts``,
``--filter_pretrained``) scores every (image, original caption) and (image, generated caption) pair
with ITM (softmax match probability, ``tools score``'s ``score_batch``). A caption is kept when its
``itm > --threshold`` (default 0.5: BLIP's filter keeps a text when the ITM head predicts "match").
The threshold is applied when the outputs are merged: re-running a finished run with another
``--threshold`` computes nothing again.

Outputs (``output_dir``):

- ``captions.jsonl``: one record per image, in image order: ``row`` (the image's index), ``image``,
  ``source`` (its first pair's file label, the ``--source_key`` value, or the list / folder name),
  ``captions`` (generated); with ``--filter`` also ``itm`` and ``kept`` (per generated caption) and
  ``originals`` (``caption``, ``image`` as its file wrote it, ``source``, ``itm``, ``kept``, per original
  pair of the image, in input order); ``error``
  for an image that could not be read (no captions; with ``--opts skip_bad_images=true``);
- ``pairs.json``: BLIP's pretraining json ``[{"image", "caption"}, ...]``, one entry per caption:
  without ``--filter`` every non-empty generated caption; with it, per image, its kept original
  pairs (each with its own path as written) and then its kept generated captions;
- ``caption_report.json`` (and the log): images, errors, generated captions, and with ``--filter``
  kept / dropped / not scored overall, for original and generated captions and per source.

Sharding and resume as ``tools score``: ``--shard_size`` images per shard in ``parts/``, dealt to
the ranks; a restart skips finished shards and, in an unfinished one, the images already written
(the batches are re-formed as in the first run, so a restart computes what the first run would
have). A changed input, model, generation or filter setting is refused (``plan.json``) unless
``--overwrite``, which deletes this tool's previous outputs first. Every image is checked before a
model is built: a missing or unreadable one stops the command naming its row, unless ``--opts
skip_bad_images=true``. Progress is logged at least every 30 s.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data.columns import FLAGS, Columns
from data.pairs import PairTable
from data.preflight import check_images, log_unk_rate
from data.retrieval import _join, _require_dict, _require_image, _where
from data.transforms import build_test_transform
from data.utils import BadImageError, load_image, pre_caption, read_csv, read_json, read_text
from models.caption import check_prompt
from models.factory import create_model
from models.generation import GenerationSettings
from models.tokenizer import build_tokenizer
from tasks.caption import CaptionConfig
from tasks.retrieval import RetrievalConfig
from tools.common import (JsonlShard, ShardPlan, add_pair_args, batches_of, check_run_plan, inference_model,
                          model_signature, read_jsonl, read_pair_args, split_pending, start, write_lines_atomic)
from tools.score_pairs import score_batch
from utils import dist as du
from utils.config import ConfigError, config_text, load_config
from utils.cli import NOT_TRAINING
from utils.rundir import add_run_file, commit_run, delete_at_commit
from utils.precision import autocast
from utils.logging import Heartbeat

logger = logging.getLogger("tools.caption")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# The captioner's config keys that decide what it computes (a restart must not mix two models).
CAPTION_MODEL_KEYS = ("vit", "image_size", "med_config", "tokenizer", "pretrained", "prompt", "precision")
OUTPUTS = ("captions.jsonl", "pairs.json", "caption_report.json", "plan.json")


def _extra_args(parser) -> None:
    add_pair_args(parser, required=False)
    g = parser.add_argument_group("images")
    g.add_argument("--images", nargs="+", metavar="PATH",
                   help="image folders (recursive) and image lists (CSV/TSV with --image_col, .txt one path "
                        "a line, json list of paths or of {'image': ...}); no original captions")
    g.add_argument("--img2dataset", nargs="+", metavar="DIR",
                   help="img2dataset output folders (NNNNN/KEY.jpg + KEY.txt caption)")
    g = parser.add_argument_group("captions")
    g.add_argument("--num_captions", type=int, default=1,
                   help="captions per image: the N best beams (beam search) or N samples (sample=true)")
    g.add_argument("--shard_size", type=int, default=10000, help="images per shard (unit of resume)")
    g = parser.add_argument_group("filter")
    g.add_argument("--filter", action="store_true",
                   help="score original and generated captions with ITM and keep those above --threshold")
    g.add_argument("--filter_config", metavar="YAML", help="retrieval config of the filter model")
    g.add_argument("--filter_opts", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="overrides of the filter config")
    g.add_argument("--filter_pretrained", metavar="PATH", help="the filter's checkpoint (overrides its pretrained)")
    g.add_argument("--threshold", type=float, default=0.5,
                   help="keep a caption when its ITM match probability is above this (BLIP: 0.5)")


# ----------------------------------------------------------------------------- inputs

@dataclass
class Inputs:
    """The pairs (or bare images, caption ``""``) of every input, and their distinct images.

    ``table`` rows are pairs in input order; ``roots[f]`` is the folder file ``f``'s paths are joined
    to (None: as written). Image ``i`` is the ``i``-th distinct file (normalised joined path) in
    first-seen order: ``first_row[i]`` its first pair, ``load[i]`` the file read; its original
    captions are its pairs with a non-empty caption, in input order (``originals(i)``)."""
    kind: str                       # 'pairs' | 'images' | 'img2dataset'
    table: PairTable
    roots: List[Optional[str]]
    folders: List[bool]             # per file: a folder (its entries are files found in it)
    first_row: List[int]
    load: List[str]
    image_of_row: np.ndarray

    def __post_init__(self):
        order = np.argsort(self.image_of_row, kind="stable")
        self._order = order
        self._starts = np.searchsorted(self.image_of_row[order], np.arange(len(self.first_row) + 1))

    def __len__(self) -> int:
        return len(self.first_row)

    def path(self, i: int) -> str:
        return self.table.image[self.first_row[i]]

    def source(self, i: int) -> str:
        return self.table.source[self.first_row[i]]

    def originals(self, i: int) -> List[int]:
        rows = self._order[self._starts[i]:self._starts[i + 1]].tolist()
        return [r for r in rows if self.table.caption[r].strip()]

    def where(self, i: int) -> str:
        """How a message names image ``i``: its first pair's entry (or row and line) and field."""
        r = self.first_row[i]
        f = self.table.file_index[r]
        if self.folders[f]:
            return f"file {self.table.entry[r]} of folder {self.table.files[f]}"
        return f"{self.table.where(r)}, field {self.table.image_fields[f]!r}"

    def fingerprint(self) -> str:
        return self.table.fingerprint()


def _labels(paths: Sequence[str]) -> List[str]:
    # As data/pairs.py labels sources: the name, unless two inputs share it.
    names = [Path(p).name or str(p) for p in paths]
    return [n if names.count(n) == 1 else str(p) for n, p in zip(names, paths)]


def _image_files(folder: str) -> List[str]:
    """Image files below ``folder`` (recursively, hidden ones skipped), sorted by relative path,
    as ``folder/relative/path``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(os.path.relpath(os.path.join(dirpath, n), folder) for n in filenames
                     if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS))
    if not found:
        raise ValueError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in it or below it")
    return [os.path.join(folder, rel) for rel in sorted(found, key=lambda p: Path(p).parts)]


def _read_image_list(table: PairTable, path: str, f: int, label: str, columns: Columns) -> None:
    """Bare image paths of a CSV/TSV (``columns``: ``--image_col``, ``--image_dir_col``), ``.txt`` or
    json list into ``table``."""
    lower = path.lower()
    if lower.endswith((".csv", ".tsv")):
        header, rows = read_csv(path)
        col = columns.require(header, path, ("image",))
        for row in rows:
            table._add(columns.image_of(row.fields, col, row.where(path)), "", label, f, row.index, -1, row.line)
    elif lower.endswith(".txt"):
        n = 0
        for line, text in enumerate(read_text(path).splitlines(), start=1):
            if text.strip():
                table._add(text.strip(), "", label, f, n, -1, line)
                n += 1
    else:
        entries = read_json(path)
        if not isinstance(entries, list):
            raise ValueError(f"{path}: expected a json list of image paths or of {{'image': ...}} objects, "
                             f"got {type(entries).__name__}")
        for k, entry in enumerate(entries):
            where = _where(path, k)
            if isinstance(entry, str):
                if not entry.strip():
                    raise ValueError(f"{where}: empty image path")
                image = entry
            else:
                _require_dict(entry, where)
                image = _require_image(entry, where)
            table._add(image, "", label, f, k, -1, -1)


def _read_img2dataset(table: PairTable, folder: str, f: int, label: str) -> int:
    """The images of an img2dataset output folder with their ``.txt`` captions; returns how many
    have no (or an empty) caption."""
    without = 0
    for k, image in enumerate(_image_files(folder)):
        txt = os.path.splitext(image)[0] + ".txt"
        caption = read_text(txt).strip() if os.path.isfile(txt) else ""
        without += not caption
        table._add(image, caption, label, f, k, -1, -1)
    return without


def read_inputs(args, cfg) -> Inputs:
    """The pairs or images of exactly one of ``--input`` / ``--images`` / ``--img2dataset``; a bad
    file ends the command with its message (file, entry or row and line, field)."""
    given = [name for name in ("input", "images", "img2dataset") if getattr(args, name)]
    if len(given) != 1:
        raise SystemExit("error: give exactly one of --input (pair files), --images (folders or image lists), "
                         "--img2dataset (img2dataset folders)")
    root = cfg.image_root or None
    kind = {"input": "pairs", "images": "images", "img2dataset": "img2dataset"}[given[0]]
    if kind == "pairs":
        table = read_pair_args(args)
        roots, folders = [root] * len(table.files), [False] * len(table.files)
    else:
        paths = [str(p) for p in getattr(args, given[0])]
        columns = Columns(image=args.image_col, image_dir=getattr(args, "image_dir_col", None), named_by=FLAGS)
        folders = [os.path.isdir(p) for p in paths]
        table = PairTable(files=paths, formats=["csv" if p.lower().endswith((".csv", ".tsv", ".txt")) and not d
                                                else "json" for p, d in zip(paths, folders)],
                          image_fields=[columns.image_field if p.lower().endswith((".csv", ".tsv")) else "image"
                                        for p in paths])
        roots = [None if d else root for d in folders]
        try:
            for f, (path, label, folder) in enumerate(zip(paths, _labels(paths), folders)):
                before = len(table)
                if kind == "img2dataset":
                    if not folder:
                        raise ValueError(f"{path}: not a folder (--img2dataset takes img2dataset output folders)")
                    without = _read_img2dataset(table, path, f, label)
                    if without:
                        logger.warning("%s: %d of %d images have no .txt caption (or an empty one): they get "
                                       "generated captions only", path, without, len(table) - before)
                elif folder:
                    for k, image in enumerate(_image_files(path)):
                        table._add(image, "", label, f, k, -1, -1)
                else:
                    _read_image_list(table, path, f, label, columns)
                if len(table) == before:
                    raise ValueError(f"{path}: no images")
        except (ValueError, FileNotFoundError) as err:
            raise SystemExit(f"error: {err}") from None
    seen: Dict[str, int] = {}
    first_row, load = [], []
    image_of_row = np.empty(len(table), dtype=np.int64)
    for r, image in enumerate(table.image):
        path = _join(roots[table.file_index[r]], image)
        key = os.path.normpath(path)
        i = seen.get(key)
        if i is None:
            i = seen[key] = len(first_row)
            first_row.append(r)
            load.append(path)
        image_of_row[r] = i
    return Inputs(kind, table, roots, folders, first_row, load, image_of_row)


def check_input_images(inputs: Inputs, cfg) -> Dict[str, str]:
    """Pre-flight check of every image (a collective), before any model is built: a bad one ends the
    command naming its row, unless ``skip_bad_images`` (then ``{load path: message}``)."""
    try:
        bad = check_images(inputs.load, inputs.where, "the inputs", cfg.skip_bad_images,
                           hint="pass --opts skip_bad_images=true to report them as not captioned")
    except (FileNotFoundError, BadImageError) as err:
        raise SystemExit(f"error: {err}") from None
    if bad and du.is_main_process():
        logger.warning("%d of %d images are missing or unreadable (skip_bad_images): reported, not captioned",
                       len(bad), len(inputs))
    return {path: b.message for path, b in bad.items()}


# ----------------------------------------------------------------------------- settings

def generation_settings(cfg: CaptionConfig, num_captions: int) -> GenerationSettings:
    settings = cfg.generation_settings(num_return_sequences=num_captions)
    try:
        settings.check()
    except ValueError as err:
        hint = " (--num_captions N needs num_beams >= N, or sample=true)" if not cfg.sample else ""
        raise SystemExit(f"error: --num_captions {num_captions}: {err}{hint}") from None
    return settings


def generation_plan(settings: GenerationSettings, seed: int) -> dict:
    """The settings that decide the captions (and nothing else), for ``plan.json``."""
    keys = ["max_length", "min_length", "repetition_penalty", "num_return_sequences"]
    keys += ["top_p", "top_k"] if settings.sample else ["num_beams", "length_penalty"]
    plan = {"mode": "sample" if settings.sample else ("beam" if settings.num_beams > 1 else "greedy")}
    plan.update({k: getattr(settings, k) for k in keys})
    if settings.sample:
        plan["seed"] = seed
    return plan


def load_filter_config(args, output_dir: Path, main: bool) -> Optional[RetrievalConfig]:
    """The filter model's retrieval config (``--filter_config`` + ``--filter_opts``, with
    ``--filter_pretrained``), saved as ``filter_config.yaml``; None without ``--filter``."""
    if not args.filter:
        if args.filter_config or args.filter_opts or args.filter_pretrained:
            raise SystemExit("error: --filter_config / --filter_opts / --filter_pretrained need --filter")
        return None
    if not args.filter_config:
        raise SystemExit("error: --filter needs --filter_config (a retrieval config naming the filter model)")
    if not 0.0 <= args.threshold < 1.0:
        raise SystemExit(f"error: --threshold {args.threshold}: an ITM probability threshold is in [0, 1)")
    try:
        fcfg, doc = load_config(args.filter_config, RetrievalConfig, list(args.filter_opts), unused_keys=NOT_TRAINING)
    except ConfigError as err:
        raise SystemExit(f"error: --filter_config: {err}") from None
    if args.filter_pretrained:
        fcfg = fcfg.model_copy(update={"pretrained": args.filter_pretrained})
        doc["pretrained"] = args.filter_pretrained
    if main:  # written with the run's config at the commit
        add_run_file("filter_config.yaml", config_text(doc).encode("utf-8"))
    return fcfg


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


# ----------------------------------------------------------------------------- merge and report

def merged_records(parts: Path, plan: ShardPlan, inputs: Inputs, threshold: Optional[float]) -> Iterator[dict]:
    """The final ``captions.jsonl`` records, in image order (``threshold`` None: no filter)."""
    missing = [s for s in range(plan.n_shards) if not JsonlShard(parts, s).complete]
    if missing:
        raise RuntimeError(f"cannot merge: shards {missing[:10]} of {plan.n_shards} are not complete in {parts}")
    expected = 0
    for s in range(plan.n_shards):
        for rec in read_jsonl(JsonlShard(parts, s).final):
            i = rec["row"]
            if i != expected or rec["image"] != inputs.path(i):  # the shards must tile the images, in order
                raise RuntimeError(f"shard {s}: found image {i} ({rec['image']}), expected {expected}")
            expected += 1
            out = {"row": i, "image": rec["image"], "source": inputs.source(i), "captions": rec["captions"]}
            if threshold is not None:
                out["itm"] = rec["itm"]
                out["kept"] = [bool(c.strip()) and x > threshold for c, x in zip(rec["captions"], rec["itm"])]
                out["originals"] = [
                    {"caption": inputs.table.caption[r], "source": inputs.table.source[r], "itm": x,
                     "kept": x is not None and x > threshold, "image": inputs.table.image[r]}
                    for r, x in zip(inputs.originals(i), rec["original_itm"])]
            if "error" in rec:
                out["error"] = rec["error"]
            yield out
    if expected != len(inputs):
        raise RuntimeError(f"cannot merge: the shards hold {expected} of {len(inputs)} images")


def _counts(filtering: bool) -> dict:
    if filtering:
        return {"images": 0, "errors": 0, "original": {"kept": 0, "dropped": 0, "not_scored": 0},
                "generated": {"kept": 0, "dropped": 0, "empty": 0}}
    return {"images": 0, "errors": 0, "generated": {"captions": 0, "written": 0, "empty": 0}}


def write_outputs(output_dir: Path, parts: Path, plan: ShardPlan, inputs: Inputs, threshold: Optional[float]) -> dict:
    """``captions.jsonl``, ``pairs.json`` and the report (rank 0)."""
    filtering = threshold is not None
    total, per_source = _counts(filtering), {}
    itm = {"original": [], "generated": []}
    errors: List[str] = []

    def jsonl_lines():
        for rec in merged_records(parts, plan, inputs, threshold):
            for c in (total, per_source.setdefault(rec["source"], _counts(filtering))):
                c["images"] += 1
                c["errors"] += "error" in rec
                g = c["generated"]
                if filtering:
                    for kept, caption in zip(rec["kept"], rec["captions"]):
                        g["kept" if kept else "dropped"] += 1
                        g["empty"] += not caption.strip()
                else:
                    g["captions"] += len(rec["captions"])
                    g["empty"] += sum(not caption.strip() for caption in rec["captions"])
                    g["written"] = g["captions"] - g["empty"]
            if filtering:
                for o in rec["originals"]:
                    for c in (total, per_source.setdefault(o["source"], _counts(filtering))):
                        c["original"]["not_scored" if o["itm"] is None else "kept" if o["kept"] else "dropped"] += 1
                    if o["itm"] is not None:
                        itm["original"].append(o["itm"])
                itm["generated"].extend(rec["itm"])
            if "error" in rec:
                errors.append(rec["error"])
            yield json.dumps(rec, ensure_ascii=False) + "\n"

    write_lines_atomic(output_dir / "captions.jsonl", jsonl_lines())

    def pair_lines():
        first = True
        yield "["
        for rec in merged_records(parts, plan, inputs, threshold):
            pairs = []
            if filtering:
                pairs += [(o["image"], o["caption"]) for o in rec["originals"] if o["kept"]]
                pairs += [(rec["image"], c) for c, kept in zip(rec["captions"], rec["kept"]) if kept]
            else:
                pairs += [(rec["image"], c) for c in rec["captions"] if c.strip()]
            for image, caption in pairs:
                yield ("\n" if first else ",\n") + json.dumps({"image": image, "caption": caption}, ensure_ascii=False)
                first = False
        yield "\n]\n"

    write_lines_atomic(output_dir / "pairs.json", pair_lines())
    report = {"images": total["images"], "errors": total["errors"], "per_source": per_source,
              "first_errors": errors[:20]}
    if filtering:
        o, g = total["original"], total["generated"]
        report.update(threshold=threshold, rule=f"itm > {threshold:g}", original=o, generated=g,
                      kept=o["kept"] + g["kept"], dropped=o["dropped"] + g["dropped"], not_scored=o["not_scored"],
                      mean_itm={k: float(np.mean(v)) if v else None for k, v in itm.items()})
        report["pairs"] = report["kept"]
    else:
        report.update(generated=total["generated"], pairs=total["generated"]["written"])
    return report


def _log_report(report: dict, output_dir: Path) -> None:
    if "threshold" in report:
        o, g = report["original"], report["generated"]
        logger.info("%s: kept %d of %d original captions (%d not scored) and %d of %d generated ones; wrote %s "
                    "(%d pairs)", report["rule"], o["kept"], o["kept"] + o["dropped"], o["not_scored"], g["kept"],
                    g["kept"] + g["dropped"], output_dir / "pairs.json", report["pairs"])
        for source, c in report["per_source"].items():
            logger.info("  %s: %d images (%d not captioned); original kept %d / dropped %d / not scored %d; "
                        "generated kept %d / dropped %d", source, c["images"], c["errors"], c["original"]["kept"],
                        c["original"]["dropped"], c["original"]["not_scored"], c["generated"]["kept"],
                        c["generated"]["dropped"])
    else:
        g = report["generated"]
        logger.info("captioned %d of %d images (%d generated captions, %d empty); wrote %s and %s (%d pairs)",
                    report["images"] - report["errors"], report["images"], g["captions"], g["empty"],
                    output_dir / "captions.jsonl", output_dir / "pairs.json", report["pairs"])


def main(argv=None, prog: str = "python -m tools caption") -> dict:
    run = start(argv, prog, __doc__.splitlines()[0], _extra_args, schema=CaptionConfig)
    args, cfg, info = run.args, run.cfg, run.info
    try:
        if args.num_captions < 1:
            raise SystemExit(f"error: --num_captions {args.num_captions}: must be >= 1")
        settings = generation_settings(cfg, args.num_captions)
        fcfg = load_filter_config(args, run.output_dir, info.is_main)
        inputs = read_inputs(args, cfg)
        bad_images = check_input_images(inputs, cfg)
        check_prompt(build_tokenizer(cfg.tokenizer), cfg.prompt, cfg.max_length, where=str(args.config))
        plan = ShardPlan(len(inputs), args.shard_size)
        parts = run.output_dir / "parts"
        check_run_plan(run.output_dir, {
            "inputs": inputs.table.files, "kind": inputs.kind, "images": len(inputs),
            "fingerprint": inputs.fingerprint(), "shard_size": args.shard_size,
            "image_root": cfg.image_root if inputs.kind != "img2dataset" else None,
            "generation": generation_plan(settings, cfg.seed),
            "model": {k: str(getattr(cfg, k)) for k in CAPTION_MODEL_KEYS},
            "filter": model_signature(fcfg) if fcfg is not None else None}, info.is_main, fresh=args.overwrite)
        logger.info("%d images (%d pairs) from %d inputs in shards of %d; %s, %d caption(s) per image%s", len(inputs),
                    len(inputs.table), len(inputs.table.files), args.shard_size,
                    generation_plan(settings, cfg.seed)["mode"], args.num_captions,
                    f"; filter: itm > {args.threshold:g}" if fcfg is not None else "")
        todo = split_pending(list(range(plan.n_shards)), lambda s: not args.overwrite and JsonlShard(parts, s).complete,
                             info)
        if todo:
            m = build_models(cfg, settings, fcfg, inputs, info.device)
            transforms = {"caption": build_test_transform(cfg.image_size)}
            if fcfg is not None and fcfg.image_size != cfg.image_size:  # else the filter reads the same tensors
                transforms["filter"] = build_test_transform(fcfg.image_size)
            progress = Heartbeat("caption (this rank)", sum(len(plan.rows(s)) for s in todo), "images", logger)
        if args.overwrite:
            delete_at_commit(list(OUTPUTS) + ["parts"])  # the previous run's outputs, once this one has loaded
        commit_run()  # inputs, plan and models checked: files are written from here on
        du.barrier()
        if todo:
            for s in todo:
                caption_shard(JsonlShard(parts, s), plan.rows(s), inputs, m, transforms, bad_images, info.device,
                              progress)
        du.barrier()
        report = {}
        if info.is_main:
            report = write_outputs(run.output_dir, parts, plan, inputs, args.threshold if fcfg is not None else None)
            (run.output_dir / "caption_report.json").write_text(json.dumps(report, indent=1))
            _log_report(report, run.output_dir)
        return report
    finally:
        du.cleanup()


if __name__ == "__main__":
    main()
