"""ContextBLIP adapter pretraining: ITM + text-guided masked image modelling on a frozen BLIP.

    python pretrain.py --config configs/pretrain.yaml --output_dir outputs/pretrain
    torchrun --nproc_per_node 4 pretrain.py --config configs/pretrain.yaml     # the released setup
    bash run.sh pretrain configs/pretrain.yaml --opts mask_rate=0.5           # NPROC processes
    python pretrain.py --config configs/pretrain.yaml --resume auto           # continue exactly
    python pretrain.py --config configs/pretrain.yaml --dry_run               # check a config: dry_run.json

Base weights come from ``pretrained`` (BLIP's ``model_base.pth`` layout: its ``text_decoder.*``,
momentum encoders and queues are reported as expected extras and ignored). Pairs are docs/FORMATS.md 2
json lists (``train_file``: one file or a list; paths absolute or relative to ``image_root``).

Outputs in ``output_dir``: ``config.yaml``, ``log.txt`` (one JSON line per epoch), ``run.log``,
``checkpoint_last.pth`` every epoch (written atomically; the adapter + TMIM decoder, optimiser,
RNG and the full config, whose ``pretrained`` names the base BLIP), and ``masks/epoch_NN.png``:
images with their caption, the [guide] token and the masked patches in red.

On demand:

    python pretrain.py --config CFG --visualize [--resume CKPT]    # -> output_dir/masks/ondemand.png
    python pretrain.py --export outputs/pretrain/checkpoint_last.pth [--export_to merged.pth]

``--export`` writes a full merged checkpoint (``blip.*``, ``adapter.*``, ``decoder.*`` and the
config; default ``contextblip_merged.pth`` next to the input) that ``models.factory.load_weights``
reads with no base BLIP at hand: the starting point of the ImageCoDe and MMVP stages. The training
wiring (config, loss, mask pictures) is ``tasks/contextblip_pretrain.py``.
"""
from __future__ import annotations

import utils  # noqa: F401  (first: one clear line on an unsupported Python)

import logging
from pathlib import Path

from models.factory import create_model, load_weights
from tasks.contextblip_pretrain import PretrainConfig, build_dataset, collator, draw_masks, train, visual_batch
from utils import dist as du
from utils.checkpoint import load_checkpoint, save_checkpoint_atomic
from utils.checkpoint_files import find_checkpoint
from utils.config import config_to_dict, load_config, parse_config
from utils.cli import NOT_TRAINING
from utils.dry_run import add_dry_run_arg, refuse_dry_run_with
from utils.rundir import commit_run, run_entry, start_run
from utils.outputs import refuse_existing
from utils.logging import setup_logging

logger = logging.getLogger("pretrain")


def _extra_args(parser) -> None:
    parser.add_argument("--resume", default=None, help="'auto' (checkpoint_last.pth in output_dir) or a path")
    parser.add_argument("--no_progress", action="store_true", help="disable progress bars")
    parser.add_argument("--visualize", action="store_true",
                        help="only draw the mask grid (of --resume's checkpoint, else of output_dir's last)")
    parser.add_argument("--export", metavar="CKPT", default=None,
                        help="write a full merged checkpoint from pretraining checkpoint CKPT and exit")
    parser.add_argument("--export_to", metavar="PATH", default=None,
                        help="where --export writes (default: contextblip_merged.pth next to CKPT)")
    add_dry_run_arg(parser)


def export_merged(source: str, target: str | None = None, overwrite: bool = False) -> Path:
    """Pretraining checkpoint -> one file with every weight and the config it was trained with
    (an existing ``target`` is replaced only with ``overwrite``)."""
    target = Path(target) if target else Path(source).with_name("contextblip_merged.pth")
    refuse_existing([target], overwrite, "--export_to", inputs=[source])
    ckpt = load_checkpoint(source)
    cfg, _ = load_config(None, PretrainConfig, defaults_from=ckpt.get("config") or {}, unused_keys=NOT_TRAINING)
    model, _ = create_model(cfg, "contextblip_pretrain", load=False)
    load_weights(model, ckpt, strict=True, source_name=str(source))
    model.set_blip_frozen(False)  # the merged file holds BLIP too
    save_checkpoint_atomic({"model": model.checkpoint_state_dict(), "format": model.checkpoint_format,
                            "config": config_to_dict(cfg), "epoch": ckpt.get("epoch")}, target)
    logger.info("exported merged ContextBLIP (epoch %s) to %s", ckpt.get("epoch"), target)
    return target


def visualize(args, cfg, model, tokenizer, dataset, output_dir: Path) -> Path:
    source = args.resume if args.resume not in (None, "auto") else find_checkpoint(output_dir, "checkpoint_last")
    if Path(source).is_file():
        load_weights(model, source, base=None, role="--resume" if args.resume else "checkpoint")  # BLIP itself came from `pretrained`
    else:
        logger.warning("no checkpoint %s: drawing the masks of the untrained adapter", source)
    collate = collator(cfg, tokenizer)
    batch = visual_batch(dataset, max(1, cfg.visualize_samples), cfg.image_size, collate)
    return draw_masks(model, tokenizer, batch, output_dir / "masks" / "ondemand.png",
                      f"{Path(source).name}: {cfg.mask_strategy} mask, rate {cfg.mask_rate}", cfg.precision)


def main(argv=None) -> dict:
    args, cfg, doc = parse_config(PretrainConfig, argv, description=__doc__.splitlines()[0],
                                  extra_args=_extra_args, default_config="configs/pretrain.yaml")
    refuse_dry_run_with(args, "--visualize", "--export")
    if args.export:
        setup_logging()
        return {"export": str(export_merged(args.export, args.export_to, args.overwrite))}
    info, output_dir = start_run(cfg, doc, args, trains=not (args.visualize or args.dry_run))
    try:
        dataset = build_dataset(cfg, dry_run=args.dry_run)  # parsed and checked before the model is built
        model, tokenizer = create_model(cfg, "contextblip_pretrain", info.device)
        if args.visualize:
            commit_run()
            return {"picture": str(visualize(args, cfg, model, tokenizer, dataset, output_dir))} if info.is_main else {}
        return train(cfg, model, tokenizer, info, dataset, resume=args.resume, progress=not args.no_progress,
                     dry_run=args.dry_run)
    finally:
        du.cleanup()


if __name__ == "__main__":
    run_entry(main, logger)
