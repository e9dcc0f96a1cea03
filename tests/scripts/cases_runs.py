"""Bad-input cases of the entry scripts' runs (``tests/scripts/bad_inputs.py``): training,
evaluation, resume and checkpoint inputs of train_retrieval.py, train_caption.py, pretrain_blip.py
(DLIP, streamed shards), pretrain.py --export, zero_shot.py, eval_mmvp.py and finetune_imagecode.py.
"""
from __future__ import annotations

from tests.scripts.campaign_runs import REPO, Case, Run, refused
from tests.scripts.campaign_world import (CAPTION, DLIP, OFFICIAL, _caption_train, _copy, _dlip, _prev_run,
                                          _train)
from tests.scripts.tiny import tiny_values, write_yaml


def _r1(w, tmp):
    out = tmp / "eval"
    return Run(_train(w, out, "--evaluate", "--opts", f"pretrained={w.wide}"), 1,
               ["pretrained", str(w.wide), "does not fit the BLIP retrieval model", "other shapes",
                "vit (width"], absent=[out])


def _r3(w, tmp):
    run = _prev_run(w, tmp)
    return Run(_train(w, run, "--resume", "auto", "--opts", "max_epoch=2",
                      "vit={width: 48, depth: 1, heads: 2, patch_size: 16}"), 1,
               ["--resume", "does not fit this run's model", "other shapes", "vit.width 32 -> 48"], watch=[run])


def _r4(w, tmp):
    run = _prev_run(w, tmp)
    out = tmp / "eval"
    return Run(["train_retrieval.py", "--config", str(run / "config.yaml"), "--output_dir", str(out), "--evaluate",
                "--no_progress", "--opts", f"pretrained={run / 'checkpoint_last.pth'}",
                "vit={width: 48, depth: 1, heads: 2, patch_size: 16}"], 1,
               ["pretrained", "does not fit the BLIP retrieval model", "vit (width"], watch=[run], absent=[out])


def _r5(w, tmp):
    import torch
    from utils.checkpoint import save_safetensors_checkpoint
    run = _prev_run(w, tmp)
    ckpt = torch.load(run / "checkpoint_last.pth", weights_only=True)
    weights = save_safetensors_checkpoint(ckpt, tmp / "weights" / "checkpoint_last.safetensors")
    for state in weights.parent.glob("*.state.pth"):
        state.unlink()
    return Run(_train(w, run, "--resume", str(weights), "--opts", "max_epoch=2"), 1,
               ["holds weights only", "state file", "not resumed"], watch=[run, weights.parent])


def _r16(w, tmp):
    out = tmp / "stream"
    return Run(["pretrain_blip.py", "--config", str(w.stream_cfg), "--output_dir", str(out), "--no_progress"], 1,
               ["train_file entry", "were bad", "max_bad_fraction 0.2"], shows=[out])


def _r18(w, tmp):
    ann = _copy(w.data / "retrieval" / "annotation", tmp / "ann")
    text = (ann / "synthetic_train.json").read_text()
    (ann / "synthetic_train.json").write_text(text[:text.index('"caption"') + 14])
    out = tmp / "run"
    return Run(_train(w, out, "--opts", f"ann_root={ann}"), 1,
               ["synthetic_train.json", "malformed JSON: unterminated string starting at line"], absent=[out])


def _o5(w, tmp):
    run = _prev_run(w, tmp)
    return Run(_train(w, run, "--overwrite", "--opts", f"pretrained={w.wide}"), 1, ["does not fit"], watch=[run])


def _o6(w, tmp):
    run = _prev_run(w, tmp)
    return Run(_train(w, run, "--resume", "auto", "--opts", "max_epoch=2", "queue_size=48"), 1,
               ["does not fit this run's model", "queue_size 64 -> 48"], watch=[run])


def _o7(w, tmp):
    run = _prev_run(w, tmp)
    data = (run / "checkpoint_last.pth").read_bytes()
    (run / "checkpoint_last.pth").write_bytes(data[:len(data) // 2])
    return Run(_train(w, run, "--resume", "auto", "--opts", "max_epoch=2"), 1, ["truncated or damaged"], watch=[run])


def _o8(w, tmp):
    run = _prev_run(w, tmp)
    return Run(_train(w, run, "--resume", str(tmp / "nope.pth"), "--opts", "max_epoch=2"), 1,
               ["no checkpoint file", "nope.pth"], watch=[run])


def _o9(w, tmp):
    run = _prev_run(w, tmp)
    images = _copy(w.data / "retrieval" / "images", tmp / "images")
    next(p for p in sorted((images / "train").rglob("*")) if p.is_file()).unlink()
    return Run(_train(w, run, "--dry_run", "--opts", f"image_root={images}"), 1,
               ["entry 0 of", "field 'image': image file missing"], watch=[run])


def _o13(w, tmp):
    out = tmp / "ft"
    return Run(_train(w, out, "--opts", f"med_config={tmp / 'no_med.json'}"), 1, ["med_config", "no_med.json"],
               absent=[out])


def _o14(w, tmp):
    bad = tmp / "med.json"
    bad.write_text('{"vocab_size": null, "hidden_size": 32, ')
    out = tmp / "ft"
    return Run(_train(w, out, "--opts", f"med_config={bad}"), 1, ["med_config", "malformed JSON", "line 1"],
               absent=[out])


def _o15(w, tmp):
    page = tmp / "model_base.pth"
    page.write_text("<!DOCTYPE html><html>Access denied</html>")
    run = _prev_run(w, tmp)
    return Run(_train(w, run, "--overwrite", "--opts", f"pretrained={page}"), 1, ["is not a checkpoint", "text file"],
               watch=[run])


def _o16(w, tmp):
    out = tmp / "eval"
    return Run(_train(w, out, "--evaluate", "--opts", f"pretrained={w.wide}", "strict_load=false"), 0,
               ["strict_load: false", "let through"])


def _o18(w, tmp):
    out = tmp / "cap"
    return Run(_caption_train(w, out, f"pretrained={w.run / 'checkpoint_last.pth'}", "--dry_run"), 0,
               ["new, initialised here", "text_decoder"])


def _o23(w, tmp):
    out = tmp / "dlip"
    return Run(_dlip(out, teacher=tmp / "teacher_missing.pth"), 1, ["checkpoint not found", "teacher_missing.pth"],
               absent=[out])


def _o25(w, tmp):
    out = tmp / "dlip"
    return Run(_dlip(out, train_file=f"['{tmp}/none/{{00000..00003}}.tar']"), 1,
               ["train_file entry", "4 of its 4 shards do not exist"],
               absent=[out])


def _o51(w, tmp):
    target = tmp / "merged.pth"
    target.write_bytes(b"a previous export")
    return Run(["pretrain.py", "--config", str(REPO / "configs" / "demo" / "pretrain.yaml"), "--export",
                str(w.contextblip), "--export_to", str(target)], 1,
               ["--export_to", "exist(s) already"], watch=[target])


def _o56(w, tmp):
    folder = tmp / "not_a_checkpoint"
    folder.mkdir()
    out = tmp / "eval"
    return Run(_train(w, out, "--evaluate", "--opts", f"pretrained={folder}"), 1, ["is a directory"], absent=[out])


def _o57(w, tmp):
    run = _prev_run(w, tmp)
    return Run(_train(w, run, "--resume", "auto", "--opts", "max_epoch=2",
                      f"med_config={REPO / 'configs' / 'demo' / 'med_config_tiny.json'}"), 1,
               ["does not fit this run's model", "med_config"], watch=[run])


def _o58(w, tmp):
    run = _prev_run(w, tmp)
    return Run(_train(w, run, "--resume", "auto", "--opts", "max_epoch=2", "init_lr=0.002", "log_every=1"), 0,
               ["resuming", "with changed config keys", "init_lr 0.001 -> 0.002"])


def _o59(w, tmp):
    run = _prev_run(w, tmp)
    kept = [run / n for n in ("config.yaml", "checkpoint_last.pth", "checkpoint_best.pth", "log.txt")]
    return Run(_train(w, run, "--dry_run"), 0, ["dry run:", "dry_run.json"], watch=kept)


def _o60(w, tmp):
    run = _prev_run(w, tmp)
    kept = [run / n for n in ("config.yaml", "checkpoint_last.pth", "checkpoint_best.pth", "log.txt")]
    return Run(_train(w, run, "--evaluate", "--opts", f"pretrained={run / 'checkpoint_best.pth'}"), 0,
               ["config_evaluate.yaml"], watch=kept)


def _o61(w, tmp):
    out = tmp / "ft"
    return Run(_train(w, out, "--dry_run", "--opts", f"pretrained={w.run / 'checkpoint_last.pth'}", "queue_size=32"),
               0, ["queue_size 32", "queues hold 64", "start afresh"])


def _o62(w, tmp):
    out = tmp / "pre"
    cfg = write_yaml(tmp / "pre.yaml", tiny_values(
        w.data, w.med, dataset=None, ann_root=None, val_file=None, test_file=None, k_test=None, batch_size_test=None,
        train_file=f"[{w.data / 'retrieval' / 'annotation' / 'synthetic_train.json'}]",
        pretrained=w.run / "checkpoint_last.pth"))
    return Run(["pretrain_blip.py", "--config", str(cfg), "--output_dir", str(out), "--no_progress", "--dry_run"],
               0, ["new, initialised here", "text_decoder"])


CASES = [
    Case("R1", "train_retrieval.py --evaluate, `pretrained` of another width", _r1),
    Case("R3", "--resume auto with another architecture", _r3),
    Case("R4", "--evaluate with the run's config.yaml and another architecture", _r4),
    Case("R5", "--resume a .safetensors without its state file", _r5),
    Case("R6", "DLIP teacher whose dims disagree with teacher_vit",
         refused(lambda w, out: _dlip(out, teacher_vit="{width: 64, depth: 2, heads: 4, patch_size: 16}"),
                 1, ["teacher", "teacher.pth", "does not fit", "teacher_vit (width"], "dlip")),
    Case("R7", "caption min_length > max_length",
         refused(lambda w, out: _caption_train(w, out, "min_length=15", "max_length=10"),
                 2, ["min_length", "15 is above max_length 10"], "cap")),
    Case("R8", "caption prompt longer than max_length",
         refused(lambda w, out: _caption_train(w, out, "prompt='a picture of a red square with a blue circle'",
                                 "max_length=8", "min_length=1"),
                 1, ["prompt", "tokens", "max_length is 8", "no caption token could be generated"], "cap")),
    Case("R14", "max_epoch: 0",
         refused(lambda w, out: _train(w, out, "--opts", "max_epoch=0"),
                 2, ["max_epoch", "0 trains nothing"], "run0")),
    Case("R16", "streamed source half unreadable (small source)", _r16),
    Case("R18", "malformed JSON annotation (message ends cleanly)", _r18),
    Case("O1", "--evaluate with `pretrained: ''` (a random model)",
         refused(lambda w, out: _train(w, out, "--evaluate"),
                 1, ["`pretrained` is empty", "no checkpoint to evaluate"], "eval")),
    Case("O2", "--evaluate, checkpoint with more ViT blocks",
         refused(lambda w, out: _train(w, out, "--evaluate", "--opts", f"pretrained={w.deep}"),
                 1, ["have no place in the model", "visual_encoder.blocks.1", "vit (depth)"], "eval")),
    Case("O3", "fine-tune from a checkpoint of another width",
         refused(lambda w, out: _train(w, out, "--opts", f"pretrained={w.wide}"),
                 1, ["does not fit", "vit (width"], "ft")),
    Case("O4", "retrieval from a caption checkpoint",
         refused(lambda w, out: _train(w, out, "--opts", f"pretrained={CAPTION / 'checkpoint.pth'}"),
                 1, ["BLIP captioning checkpoint", "no text encoder"], "ft")),
    Case("O5", "--overwrite with a bad `pretrained` (previous run kept)", _o5),
    Case("O6", "--resume auto with another queue_size", _o6),
    Case("O7", "--resume auto of a truncated checkpoint_last.pth", _o7),
    Case("O8", "--resume of a missing file", _o8),
    Case("O9", "--dry_run in a run's folder, an image missing", _o9),
    Case("O10", "queue_size not a multiple of the batch",
         refused(lambda w, out: _train(w, out, "--opts", "queue_size=24"), 1, ["queue"], "ft")),
    Case("O11", "--eval_splits val without a val_file",
         refused(lambda w, out: _train(w, out, "--evaluate", "--eval_splits", "val", "--opts", "val_file=null",
                                 f"pretrained={w.run / 'checkpoint_last.pth'}"),
                 1, ["--eval_splits", "no val split"], "eval")),
    Case("O12", "image_size not a multiple of patch_size",
         refused(lambda w, out: _train(w, out, "--opts", "image_size=40"),
                 2, ["image_size", "multiple of patch_size 16"], "ft")),
    Case("O13", "med_config file missing", _o13),
    Case("O14", "med_config malformed JSON", _o14),
    Case("O15", "`pretrained` an HTML error page, with --overwrite", _o15),
    Case("O16", "strict_load: false over another width (escape hatch, warned)", _o16),
    Case("O17", "caption --evaluate of a retrieval checkpoint (no decoder)",
         refused(lambda w, out: ["train_caption.py", "--config", str(w.caption_cfg), "--output_dir", str(out),
                                 "--evaluate", "--no_progress", "--opts",
                                 f"pretrained={OFFICIAL / 'checkpoint.pth'}"],
                 1, ["lacks", "text_decoder", "evaluation needs every weight"], "cap")),
    Case("O18", "caption training from a retrieval checkpoint (fresh decoder listed)", _o18),
    Case("O19", "num_beams: 0",
         refused(lambda w, out: _caption_train(w, out, "num_beams=0"),
                 2, ["num_beams", "greater than or equal to 1"], "cap")),
    Case("O20", "sample with top_p 0",
         refused(lambda w, out: _caption_train(w, out, "sample=true", "top_p=0"),
                 2, ["top_p", "greater than 0"], "cap")),
    Case("O21", "prompt as long as max_tokens (training)",
         refused(lambda w, out: _caption_train(w, out, "prompt='a picture of a red square and'",
                                 "max_tokens=6", "max_length=20"),
                 1, ["prompt", "max_tokens is 6", "no caption token would be left"], "cap")),
    Case("O22", "DLIP teacher without a text encoder",
         refused(lambda w, out: _dlip(out, teacher=CAPTION / "checkpoint.pth"),
                 1, ["teacher", "needs a text encoder"], "dlip")),
    Case("O23", "DLIP teacher file missing", _o23),
    Case("O24", "DLIP teacher_med_config of another width",
         refused(lambda w, out: _dlip(out, teacher_med_config=DLIP / "med_config_student.json"),
                 1, ["teacher", "does not fit", "teacher_med_config"], "dlip")),
    Case("O25", "train_file shard pattern matching no file", _o25),
    Case("O26", "pretrain_blip.py max_epoch 0",
         refused(lambda w, out: _dlip(out, max_epoch=0), 2, ["max_epoch", "trains nothing"], "dlip")),
    Case("O51", "pretrain.py --export over an existing file", _o51),
    Case("O52", "zero_shot.py with a checkpoint of another width",
         refused(lambda w, out: ["zero_shot.py", "--config", str(w.ic_cfg), "--output_dir", str(out),
                                 "--no_progress", "--opts", f"pretrained={w.wide}"],
                 1, ["pretrained", "does not fit", "vit (width"], "zs")),
    Case("O53", "eval_mmvp.py with a checkpoint of another width",
         refused(lambda w, out: ["eval_mmvp.py", "--config", str(w.mmvp_cfg), "--output_dir", str(out),
                                 "--opts", f"pretrained={w.wide}"],
                 1, ["pretrained", "does not fit", "vit (width"], "mmvp")),
    Case("O54", "finetune_imagecode.py stage 1 from a checkpoint with fewer blocks",
         refused(lambda w, out: ["finetune_imagecode.py", "--config", str(w.ic_cfg), "--output_dir", str(out),
                                 "--no_progress", "--opts", f"pretrained={w.run / 'checkpoint_last.pth'}"],
                 1, ["pretrained", "does not fit", "lacks", "vit (depth)"], "ic")),
    Case("O55", "finetune_imagecode.py --evaluate without a checkpoint",
         refused(lambda w, out: ["finetune_imagecode.py", "--config", str(w.ic_cfg), "--output_dir", str(out),
                                 "--evaluate", "--no_progress"],
                 1, ["checkpoint not found", "checkpoint_best.pth"], "ic")),
    Case("O56", "`pretrained` a folder that is no HF folder", _o56),
    Case("O57", "--resume auto with another med_config", _o57),
    Case("O58", "--resume auto with a changed init_lr (odd but valid: logged)", _o58),
    Case("O59", "--dry_run in a finished run's folder (its config.yaml kept)", _o59),
    Case("O60", "--evaluate into the run's own folder (its config.yaml kept)", _o60),
    Case("O61", "fine-tune with another queue_size (odd but valid: queues start afresh)", _o61),
    Case("O62", "BLIP pretraining from a retrieval checkpoint (odd but valid: a fresh decoder, listed)", _o62),
]
