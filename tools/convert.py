"""Convert checkpoints: official BLIP ``.pth`` <-> HuggingFace folder (``models/hf.py``).

    # BLIP checkpoint (the config's `pretrained`, built with its architecture) -> HF folder
    python -m tools convert --to hf --config configs/retrieval_coco.yaml --output_dir hf/blip-coco \\
        --opts pretrained=model_base_retrieval_coco.pth
    python -m tools convert --to hf --config configs/caption_coco.yaml --output_dir hf/blip-caption
    python -m tools convert --to hf --config configs/vqa.yaml --output_dir hf/blip-vqa
    # HF folder or hub id -> the official layout ({'model': state_dict, ...})
    python -m tools convert --to blip --input hf/blip-coco --output model_base_retrieval_coco.pth
    python -m tools convert --to blip --input Salesforce/blip-itm-base-coco --output blip_itm_coco.pth

``--to hf``: a retrieval config (train_retrieval.py's; the model kind ``blip``) writes a
``BlipForImageTextRetrieval`` folder, a caption config (train_caption.py's; kind ``caption``) a
``BlipForConditionalGeneration`` one, a VQA config (train_vqa.py's; kind ``vqa``) a
``BlipForQuestionAnswering`` one (``--task``: which, when a config would validate as several; by
default the checkpoint's layout decides). A VQA model converts only when its ViT width equals its
text hidden size (HF's answer decoder cross-attends inputs of the ViT width; ``models/hf_vqa.py``);
its folder's tokenizer puts ``[ENC]`` first, as BLIP's question encoder reads. The model is built
from the config's architecture and the checkpoint loaded as training would (``strict_load``;
position embeddings resized to ``image_size``), and the HF weights are that model's. The folder
also gets the tokenizer (``[DEC]`` bos, ``[ENC]``), the image processor (``image_size``, bicubic,
BLIP's mean/std) and ``blip_extras.safetensors`` (what HF has no place for: momentum encoders,
queues, ``temp``, another part's weights, ``epoch`` / ``config``, the key order), which makes the
way back exact; the round trip is checked before the command ends.

``--to blip``: an HF folder (or a hub id from the local HF cache; downloaded when not cached unless
``HF_HUB_OFFLINE`` is set) -> ``.pth``. With the extras file the original file comes back bit for
bit; without it momentum copies, queues (``--queue_size``, seed 0), ``temp`` 0.07 and the
``position_ids`` buffers are synthesised as BLIP's ``__init__`` would (logged).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path

from utils.cli import NOT_TRAINING
from utils.config import ConfigError, load_config
from utils.errors import CheckpointError, UserError
from utils.logging import set_debug, setup_logging

logger = logging.getLogger("tools")

TASKS = ("auto", "retrieval", "caption", "vqa")


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--to", required=True, choices=("hf", "blip"), help="hf: BLIP checkpoint -> HF folder; "
                   "blip: HF folder / hub id -> official .pth")
    g = p.add_argument_group("--to hf")
    g.add_argument("--config", metavar="FILE",
                   help="retrieval, caption or VQA YAML config (its `pretrained` is converted)")
    g.add_argument("--output_dir", metavar="DIR", help="the HF folder to write")
    g.add_argument("--opts", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. --opts pretrained=model.pth image_size=384")
    g.add_argument("--task", default="auto", choices=TASKS,
                   help="retrieval (BlipForImageTextRetrieval), caption (BlipForConditionalGeneration) or vqa "
                        "(BlipForQuestionAnswering); auto: the checkpoint's layout decides")
    g = p.add_argument_group("--to blip")
    g.add_argument("--input", metavar="FOLDER_OR_HUB_ID", help="HF folder or hub id (owner/name)")
    g.add_argument("--output", metavar="FILE", help="the .pth to write")
    g.add_argument("--queue_size", type=int, default=None,
                   help="size of synthesised queues (no extras file; default 57600, BLIP's)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output file / a non-empty --output_dir (otherwise refused)")
    p.add_argument("--debug", action="store_true", help="full tracebacks on errors")
    return p


def main(argv=None, prog: str = "python -m tools convert"):
    parser = _parser(prog)
    args = parser.parse_args(argv)
    set_debug(args.debug)
    setup_logging(None)
    if args.to == "hf":
        if not args.config or not args.output_dir:
            parser.error("--to hf needs --config and --output_dir")
        out = Path(args.output_dir)
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
            raise UserError(f"--output_dir {out} {'is not a folder' if not out.is_dir() else 'is not empty'}; pass "
                            "--overwrite to replace it with the HF folder, or choose another --output_dir")
        return to_hf(args, parser)
    if not args.input or not args.output:
        parser.error("--to blip needs --input and --output")
    out = Path(args.output)
    if out.is_dir():
        raise UserError(f"--output {out} is a folder; give the .pth file to write")
    if out.exists() and not args.overwrite:
        raise UserError(f"--output {out} exists already; pass --overwrite to replace it, or choose another path")
    if args.queue_size is not None and args.queue_size < 1:
        raise UserError(f"--queue_size {args.queue_size}: must be >= 1")
    return to_blip(args.input, args.output, args.queue_size)


def _load_task_config(args, parser):
    """{task: cfg}: the config validated as a retrieval, a caption and/or a VQA config."""
    from tasks.caption import CaptionConfig
    from tasks.retrieval import RetrievalConfig
    from tasks.vqa import VQAConfig
    schemas = {"retrieval": RetrievalConfig, "caption": CaptionConfig, "vqa": VQAConfig}
    tried = [args.task] if args.task != "auto" else list(schemas)
    found, errors = {}, {}
    for task in tried:
        try:
            found[task] = load_config(args.config, schemas[task], args.opts, unused_keys=NOT_TRAINING)[0]
        except ConfigError as err:
            errors[task] = str(err)
    if not found:
        if len(tried) == 1:
            parser.error(errors[tried[0]])
        parser.error(f"{args.config} is neither a retrieval config ({errors['retrieval']}), nor a caption "
                     f"config ({errors['caption']}), nor a VQA config ({errors['vqa']})")
    return found


def to_hf(args, parser) -> Path:
    from models import hf, hf_keys
    from models.factory import read_source, create_model, load_weights
    from models.formats import Format, checkpoint_format
    from models.med import med_config_for
    found = _load_task_config(args, parser)
    cfg = next(iter(found.values()))
    if not cfg.pretrained:
        raise ConfigError(f"{args.config}: `pretrained` is empty: nothing to convert (--opts pretrained=FILE)")
    source = cfg.pretrained
    ckpt = read_source(source, cfg)
    fmt = checkpoint_format(ckpt)
    if fmt not in (Format.BLIP, Format.CAPTION, Format.VQA):
        raise CheckpointError(f"{source} is a {fmt!r} checkpoint; --to hf converts BLIP retrieval, pretraining, "
                              "caption and VQA checkpoints")
    if len(found) > 1:  # a config that fits several: the checkpoint's layout decides
        task = {Format.CAPTION: "caption", Format.VQA: "vqa"}.get(fmt, "retrieval")
        task = task if task in found else next(iter(found))
        cfg = found[task]
    else:
        task = next(iter(found))
    if task in ("retrieval", "vqa") and fmt == Format.CAPTION:
        raise CheckpointError(f"{source} is a caption checkpoint (no text encoder): convert it with a caption "
                              "config (--task caption)")
    if task != "vqa" and fmt == Format.VQA:
        raise CheckpointError(f"{source} is a BLIP VQA checkpoint (question encoder + answer decoder): convert it "
                              "with a VQA config (train_vqa.py's, --task vqa)")
    kind, layout = {"retrieval": ("blip", hf_keys.RETRIEVAL), "caption": ("caption", hf_keys.CAPTION),
                    "vqa": ("vqa", hf_keys.VQA)}[task]
    model, tokenizer = create_model(cfg, kind, load=False)
    load_weights(model, ckpt, strict=cfg.strict_load, source_name=str(source), purpose="eval")
    med = med_config_for(cfg.med_config, tokenizer, model.visual_encoder.width)
    final = Path(args.output_dir)
    # Written next to its place and moved there only once complete and checked: a failure leaves
    # no half folder, and an --overwrite'n folder is replaced whole.
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hf.export_hf(model, layout, cfg, med, tokenizer, ckpt, tmp, str(source),
                     embed_dim=getattr(cfg, "embed_dim", None) if layout == hf_keys.RETRIEVAL else None)
        _usual_permissions(tmp)
        back = hf.load_official(tmp, copy=False)
        diffs = hf.same_checkpoint(ckpt, back)
        if diffs:
            raise CheckpointError(f"{final}: the round trip to {source} is not exact ({len(diffs)} differences: "
                                  f"{diffs[:5]}); please report this")
        old = final.with_name(f".{final.name}.{os.getpid()}.old")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("round trip checked: %s -> %s -> BLIP layout is bit-identical", source, final)
    return final


def _usual_permissions(folder: Path) -> None:
    """The files as the umask makes them (transformers writes model.safetensors through a private
    temp file: 0600, where every other file of the folder is 0644)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


def to_blip(source: str, output: str, queue_size=None) -> Path:
    from models import hf
    from utils.checkpoint import save_checkpoint_atomic
    from utils.state_dict import extract_state_dict
    ckpt = hf.load_official(source, queue_size=queue_size, copy=True)
    path = save_checkpoint_atomic(ckpt, output)
    logger.info("wrote %s (%d tensors)", path, len(extract_state_dict(ckpt)))
    return path


if __name__ == "__main__":
    main()
