"""Write the image and text embeddings of a dataset (with their ids) to ``.npy`` or ``.safetensors`` shards.

    python -m tools embed --config outputs/coco_ft/config.yaml --input data/coco/annotation/coco_karpathy_test.json \\
        --output_dir outputs/coco_test_embeds [--array_format safetensors] [--shard_size 50000]
    torchrun --nproc_per_node 8 -m tools embed --config ... --input gallery.csv --output_dir ...

Images: every distinct image path of the inputs, in first-seen order; texts: every caption (pair),
in input order. ``output_dir`` holds, per kind and shard, ``<kind>_<shard>.npy`` (float32 ``[n, E]``,
L2-normalised ITC features; in ``.safetensors`` the tensor is ``embeds``) and ``<kind>_<shard>.json``
with ``ids`` (one record per embedded row: ``id``, ``image``, ``caption`` for texts, ``image_id``
= the image's id, ``row`` = its first pair, ``key`` = the ``--id_col`` value) and ``errors``
(images that could not be read, skipped). ``--what image`` needs no caption column (a gallery of
test data). ``manifest.json`` describes the whole set. Shards are written atomically: a restart skips
finished ones. Read them back with ``load_embeddings``. Every image is checked before the model is
built (a bad one stops the command naming its row, unless ``--opts skip_bad_images=true``: then it
is listed in ``errors``), and progress is logged at least every 30 s.
"""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader

from data.collate import tokenize
from data.pairs import PairBatches, PairTable
from data.preflight import log_unk_rate
from data.transforms import build_test_transform
from data.utils import pre_caption
from tools.common import (ShardPlan, add_pair_args, batches_of, check_pair_images, check_run_plan, inference_model,
                          model_signature, read_pair_args, split_pending, start)
from utils import dist as du
from utils.atomic import atomic_write
from utils.errors import DataError, UserError, json_error
from utils.rundir import commit_run, delete_at_commit
from utils.precision import autocast
from utils.logging import Heartbeat
from tasks.retrieval_eval import embed_texts

logger = logging.getLogger("tools.embed")
KINDS = ("image", "text")


def _extra_args(parser) -> None:
    add_pair_args(parser)
    parser.add_argument("--array_format", default="npy", choices=("npy", "safetensors"),
                        help="embedding file format")
    parser.add_argument("--what", default="both", choices=("both", "image", "text"), help="which embeddings")
    parser.add_argument("--shard_size", type=int, default=50000, help="rows per shard file")
    parser.add_argument("--id_col", default=None,
                        help="CSV column (json field) of each item's id, stored as 'key' in the id records: a "
                             "`tools search --submission` names the gallery items by it (default: the image path)")


# ----------------------------------------------------------------------------- files

def _array_bytes(array: np.ndarray, fmt: str) -> bytes:
    if fmt == "safetensors":
        from safetensors.numpy import save
        return save({"embeds": np.ascontiguousarray(array)})
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _read_array(path: Path) -> np.ndarray:
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file
        return load_file(str(path))["embeds"]
    return np.load(path)


def shard_paths(folder: Path, kind: str, shard: int, fmt: str) -> Tuple[Path, Path]:
    """(array file, ids json); the json is written last and marks the shard complete."""
    stem = folder / f"{kind}_{shard:06d}"
    return stem.with_suffix(".npy" if fmt == "npy" else ".safetensors"), stem.with_suffix(".json")


def write_shard(folder: Path, kind: str, shard: int, fmt: str, embeds: np.ndarray, ids: list, errors: list) -> None:
    array_path, ids_path = shard_paths(folder, kind, shard, fmt)
    atomic_write(array_path, lambda f: f.write(_array_bytes(embeds.astype(np.float32), fmt)))
    atomic_write(ids_path, lambda f: f.write(json.dumps({"ids": ids, "errors": errors}, ensure_ascii=False).encode()))


def load_embeddings(folder, kind: str) -> Tuple[np.ndarray, List[dict]]:
    """All shards of ``kind`` ('image' | 'text') of an ``embed`` output: (``[n, E]`` float32, id records).
    A missing or damaged shard, or one of another width than the manifest's ``embed_dim``, is a
    DataError naming the file."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if kind not in manifest["kinds"]:
        raise DataError(f"{folder} has no {kind} embeddings (it has {', '.join(manifest['kinds']) or 'none'}): "
                        f"embed them with `tools embed --what {kind}` (or both)")
    arrays, ids = [], []
    for shard in range(manifest["kinds"][kind]["shards"]):
        array_path, ids_path = shard_paths(folder, kind, shard, manifest["format"])
        try:
            array = _read_array(array_path)
            shard_ids = json.loads(ids_path.read_text(encoding="utf-8"))["ids"]
        except FileNotFoundError as err:
            raise DataError(f"{folder}: shard file {Path(err.filename).name} is missing (an unfinished `tools embed` "
                            "run? run it again to complete it)") from None
        except Exception as err:  # noqa: BLE001 - a damaged .npy / safetensors / json, in many types
            raise DataError(f"{folder}: cannot read shard {array_path.name} / {ids_path.name} ({type(err).__name__}: "
                            f"{err}); embed the folder again") from None
        if array.ndim != 2 or array.shape[1] != manifest["embed_dim"]:
            raise DataError(f"{array_path}: embeddings of shape {tuple(array.shape)}, but manifest.json says embed_dim "
                            f"{manifest['embed_dim']}: the folder mixes two runs; embed it again")
        arrays.append(array)
        ids.extend(shard_ids)
    embeds = np.concatenate(arrays) if arrays else np.zeros((0, manifest["embed_dim"]), np.float32)
    if embeds.shape[0] != len(ids):
        raise DataError(f"{folder}: {embeds.shape[0]} {kind} embeddings but {len(ids)} ids")
    return embeds, ids


def previous_outputs(folder: Path) -> List[str]:
    """The files of an earlier ``embed`` run in ``folder`` (what ``--overwrite`` deletes)."""
    names = [p.name for k in KINDS for p in folder.glob(f"{k}_*") if p.suffix in (".npy", ".safetensors", ".json")]
    return names + [n for n in ("manifest.json",) if (folder / n).exists()]


MANIFEST_FIELDS = {"format": str, "embed_dim": int, "kinds": dict, "model": dict}


def read_manifest(folder) -> dict:
    """``manifest.json`` of an ``embed`` output, checked (a DataError naming the file and field)."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {folder} an `embed` output folder (finished)?")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: {json_error(err)}; embed the folder again") from None
    for key, kind in MANIFEST_FIELDS.items():
        if not isinstance(manifest, dict) or not isinstance(manifest.get(key), kind):
            raise DataError(f"{path}: field {key!r} is missing or not {kind.__name__}: not a `tools embed` manifest")
    return manifest


def check_embed_dim(manifest: dict, folder, cfg, what: str = "the gallery") -> None:
    """Embeddings are compared with the features of ``cfg``'s model: their width must be its
    ``embed_dim`` (else the search multiplies vectors of two models)."""
    if manifest["embed_dim"] != cfg.embed_dim:
        raise UserError(f"{what} {folder} was embedded with embed_dim {manifest['embed_dim']} (its manifest.json; "
                        f"pretrained {manifest['model'].get('pretrained') or 'none'}), but the config's model has "
                        f"embed_dim {cfg.embed_dim}: search with the config it was embedded with, or embed it "
                        "again with this one")


# ----------------------------------------------------------------------------- computing

@torch.no_grad()
def embed_image_rows(model, table: PairTable, rows: List[int], image_root, transform, cfg, device,
                     bad_images: Optional[dict] = None, progress: Optional[Heartbeat] = None):
    """Features ``[m, E]`` of the images of ``rows`` that load, their rows, and error messages
    (``bad_images``: known bad, not tried; see ``PairBatches``)."""
    loader = DataLoader(PairBatches(table, batches_of(rows, cfg.batch_size_test), image_root, transform,
                                    cfg.max_words, bad_images), batch_size=None, num_workers=cfg.num_workers)
    feats, kept, errors = [], [], []
    for batch in loader:
        errors.extend(batch["errors"][r] for r in batch["rows"] if r in batch["errors"])
        if progress is not None:
            progress.update(len(batch["rows"]))
        if batch["pixel_values"] is None:
            continue
        with autocast(device, cfg.precision):
            _, f = model.encode_image(batch["pixel_values"].to(device))
        index = batch["image_index"]
        ok = (index >= 0).nonzero().squeeze(1)
        feats.append(f.float()[index[ok].to(device)].cpu())
        kept.extend(batch["rows"][i] for i in ok.tolist())
    return (torch.cat(feats).numpy() if feats else np.zeros((0, model.embed_dim), np.float32)), kept, errors


def embed_captions(model, tokenizer, captions: List[str], cfg, device,
                   progress: Optional[Heartbeat] = None) -> np.ndarray:
    """Normalised text features ``[n, E]`` of raw captions (``pre_caption`` applied), in chunks of
    16 batches (a progress step each)."""
    step = 16 * cfg.batch_size_test
    feats = [np.zeros((0, model.embed_dim), np.float32)]
    for s in range(0, len(captions), step):
        chunk = captions[s:s + step]
        ids, mask = tokenize(tokenizer, [pre_caption(c, cfg.max_words) for c in chunk], cfg.max_tokens)
        feats.append(embed_texts(model, ids, mask, cfg.batch_size_test, device, cfg.precision).cpu().numpy())
        if progress is not None:
            progress.update(len(chunk))
    return np.concatenate(feats)


def _key(table: PairTable, row: int) -> dict:
    """``{"key": id}`` of a row with an ``--id_col`` value, else nothing."""
    return {} if table.key[row] is None else {"key": table.key[row]}


def _image_ids(table: PairTable) -> Tuple[List[int], dict]:
    first_rows = table.first_rows_of_images()
    return first_rows, {table.image[r]: i for i, r in enumerate(first_rows)}


def main(argv=None, prog: str = "python -m tools embed") -> dict:
    run = start(argv, prog, __doc__.splitlines()[0], _extra_args)
    args, cfg, info = run.args, run.cfg, run.info
    try:
        # A gallery of images needs no caption column (test data without ground truth).
        table = read_pair_args(args, id_col=args.id_col, need_caption=args.what != "image")
        bad_images = check_pair_images(table, cfg)
        first_rows, image_id = _image_ids(table)
        kinds = KINDS if args.what == "both" else (args.what,)
        plans = {"image": ShardPlan(len(first_rows), args.shard_size), "text": ShardPlan(len(table), args.shard_size)}
        check_run_plan(run.output_dir, {"inputs": table.files, "pairs": len(table), "fingerprint": table.fingerprint(),
                                        "shard_size": args.shard_size, "kinds": list(kinds), "format": args.array_format,
                                        "image_root": cfg.image_root, "model": model_signature(cfg),
                                        **({"id_col": args.id_col} if args.id_col else {})}, info.is_main,
                       fresh=args.overwrite)
        jobs = [(k, s) for k in kinds for s in range(plans[k].n_shards)]
        logger.info("%d images, %d texts", len(first_rows), len(table))
        mine = split_pending(jobs, lambda j: not args.overwrite and shard_paths(run.output_dir, *j,
                                                                                 args.array_format)[1].exists(), info)
        if mine:
            model, tokenizer = inference_model(cfg, info.device)
            if "text" in kinds:
                log_unk_rate(tokenizer, table.caption, "the captions", clean=lambda c: pre_caption(c, cfg.max_words))
            transform = build_test_transform(cfg.image_size)
            progress = Heartbeat("embed (this rank)", sum(len(plans[k].rows(s)) for k, s in mine), "rows", logger)
        if args.overwrite:
            delete_at_commit(previous_outputs(run.output_dir))
        commit_run()  # inputs, plan and model checked: files are written from here on
        du.barrier()
        for kind, s in mine:
            rows = plans[kind].rows(s)
            if kind == "image":
                feats, kept, errors = embed_image_rows(model, table, [first_rows[i] for i in rows],
                                                       cfg.image_root or None, transform, cfg, info.device,
                                                       bad_images, progress)
                for e in errors:
                    logger.warning("not embedded: %s", e)
                ids = [{"id": image_id[table.image[r]], "image": table.image[r], "row": r, **_key(table, r)}
                       for r in kept]
            else:
                feats = embed_captions(model, tokenizer, [table.caption[r] for r in rows], cfg, info.device, progress)
                errors = []
                ids = [{"id": r, "caption": table.caption[r], "image": table.image[r],
                        "image_id": image_id[table.image[r]], "row": r, **_key(table, r)} for r in rows]
            write_shard(run.output_dir, kind, s, args.array_format, feats, ids, errors)
        du.barrier()
        manifest = {}
        if info.is_main:
            manifest = {"format": args.array_format, "embed_dim": cfg.embed_dim, "inputs": table.files,
                        "id_col": args.id_col,
                        "image_root": cfg.image_root, "model": model_signature(cfg),
                        "kinds": {k: {"shards": plans[k].n_shards, "rows": plans[k].n_rows} for k in kinds}}
            atomic_write(run.output_dir / "manifest.json", lambda f: f.write(json.dumps(manifest, indent=1).encode()))
            logger.info("wrote %s", run.output_dir / "manifest.json")
        return manifest
    finally:
        du.cleanup()


if __name__ == "__main__":
    main()
