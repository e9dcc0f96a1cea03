"""Bad-input cases of train_vqa.py (``V*``) and train_nlvr.py (``N*``) (``tests/scripts/bad_inputs.py``):
their annotation files, answer lists and checkpoints, over the VQA and NLVR fixtures.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import List, Optional

from tests.scripts.campaign_runs import REPO, Case, Run, refused
from tests.scripts.campaign_world import NLVR, OFFICIAL, VQA, _prev_run


def _vqa(out: Path, *opts, evaluate: bool = True) -> List[str]:
    """train_vqa.py with BLIP's configs/vqa.yaml over the VQA fixture, as the fixture test runs it."""
    return ["train_vqa.py", "--config", str(REPO / "configs" / "vqa.yaml"), "--output_dir", str(out),
            "--no_progress", *(["--evaluate"] if evaluate else []), "--opts", f"ann_root={VQA}", f"vqa_root={VQA}",
            f"pretrained={VQA / 'checkpoint.pth'}", "vit={width: 64, depth: 2, heads: 4, patch_size: 16}",
            "image_size=64", f"med_config={VQA / 'med_config.json'}", f"tokenizer={VQA / 'tokenizer'}",
            "num_workers=0", "device=cpu", "k_test=4", *opts]


def _vqa_files(tmp: Path, train=None, answer_list=None) -> Path:
    """A copy of the fixture's annotation files (images stay in the fixture), some replaced."""
    ann = tmp / "ann"
    ann.mkdir(parents=True, exist_ok=True)
    for name in ("vqa_train.json", "vqa_test.json", "answer_list.json"):
        shutil.copy(VQA / name, ann / name)
    if train is not None:
        (ann / "vqa_train.json").write_text(json.dumps(train))
    if answer_list is not None:
        (ann / "answer_list.json").write_text(json.dumps(answer_list))
    return ann


def _v1(w, tmp):
    entries = json.loads((VQA / "vqa_train.json").read_text())[:4]
    del entries[3]["answer"]
    out = tmp / "vqa"
    return Run(_vqa(out, f"ann_root={_vqa_files(tmp, train=entries)}", "pretrained=/nonexistent.pth",
                    evaluate=False), 1, ["entry 3 of", "vqa_train.json", "missing field 'answer'"], absent=[out])


def _v2(w, tmp):
    out = tmp / "vqa"
    return Run(_vqa(out, f"ann_root={_vqa_files(tmp, answer_list=['yes', 'no', 'yes'])}"), 1,
               ["answer_list.json, entry 2", "'yes' is also entry 0", "distinct"], absent=[out])


def _v3(w, tmp):
    import torch
    state = {k: v for k, v in torch.load(VQA / "checkpoint.pth", weights_only=True)["model"].items()
             if not k.startswith("text_decoder.")}
    path = tmp / "no_decoder.pth"
    torch.save({"model": state}, path)
    out = tmp / "vqa"
    return Run(_vqa(out, f"pretrained={path}"), 1,
               ["pretrained", "does not fit the VQA model", "evaluation needs every weight", "text_decoder"],
               absent=[out])


def _nlvr(out: Path, ann: Path, *opts, evaluate: bool = True, flags=()) -> List[str]:
    """train_nlvr.py with BLIP's configs/nlvr.yaml over the NLVR fixture (its images and checkpoint)."""
    return ["train_nlvr.py", "--config", str(REPO / "configs" / "nlvr.yaml"), "--output_dir", str(out),
            "--no_progress", *(["--evaluate"] if evaluate else []), *flags, "--opts", f"image_root={NLVR}",
            f"ann_root={ann}", f"pretrained={NLVR / 'checkpoint.pth'}",
            "vit={width: 48, depth: 2, heads: 4, patch_size: 16}", "image_size=48",
            f"med_config={NLVR / 'med_config.json'}", f"tokenizer={NLVR / 'tokenizer'}", "num_workers=0",
            "device=cpu", *opts]


def _nlvr_files(tmp: Path, split: Optional[str] = None, index: int = 0, change=None) -> Path:
    """BLIP's three NLVR split files (16 training and 8 dev pairs of the fixture's training pairs, its
    8 test pairs; images stay in the fixture), entry ``index`` of ``split`` changed by ``change``."""
    pairs = json.loads((NLVR / "nlvr_train.json").read_text())
    files = {"train": pairs[:16], "dev": pairs[16:24], "test": json.loads((NLVR / "nlvr_test.json").read_text())}
    if split is not None:
        change(files[split][index])
    ann = tmp / "ann"
    ann.mkdir(parents=True, exist_ok=True)
    for name, entries in files.items():
        (ann / f"nlvr_{name}.json").write_text(json.dumps(entries))
    return ann


def _n1(w, tmp):
    run = _prev_run(w, tmp)
    ann = _nlvr_files(tmp, "train", 3, lambda e: e["images"].__setitem__(1, "images/missing.png"))
    return Run(_nlvr(run, ann, "pretrained=/nonexistent.pth", evaluate=False, flags=["--overwrite"]), 1,
               ["entry 3 of", "nlvr_train.json", "field 'images[1]'", "image file missing"], watch=[run])


def _n2(w, tmp):
    out = tmp / "nlvr"
    ann = _nlvr_files(tmp, "dev", 2, lambda e: e.__setitem__("label", "yes"))
    return Run(_nlvr(out, ann), 1, ["entry 2 of", "nlvr_dev.json", "field 'label'", "got 'yes'"], absent=[out])


def _n3(w, tmp):
    out = tmp / "nlvr"
    ann = _nlvr_files(tmp, "test", 7, lambda e: e["images"].pop())
    return Run(_nlvr(out, ann), 1, ["entry 7 of", "nlvr_test.json", "field 'images'", "exactly 2 image paths", "got 1"],
               absent=[out])


def _n4(w, tmp):
    out = tmp / "nlvr"
    ann = _nlvr_files(tmp, "train", 0, lambda e: e.__setitem__("label", "true"))
    return Run(_nlvr(out, ann, "pretrained=/nonexistent.pth", evaluate=False), 1,
               ["entry 0 of", "nlvr_train.json", "field 'label'", "got 'true'"], absent=[out])


def _n5(w, tmp):
    out = tmp / "nlvr"
    return Run(_nlvr(out, _nlvr_files(tmp), "test_file=nlvr_test_p"), 1, ["json file not found", "nlvr_test_p.json"],
               absent=[out])


CASES = [
    Case("V1", "train_vqa.py, a training question without answers", _v1),
    Case("V2", "train_vqa.py --evaluate, answer_list.json with a repeated answer", _v2),
    Case("V3", "train_vqa.py --evaluate with a checkpoint without answer decoder", _v3),
    Case("V4", "train_vqa.py --evaluate with a checkpoint of another width",
         refused(lambda w, out: _vqa(out, f"pretrained={OFFICIAL / 'checkpoint.pth'}"),
                 1, ["pretrained", "does not fit the VQA model", "other shapes", "med_config (vocab_size, hidden_size"], "vqa")),
    Case("V5", "train_vqa.py, answer_min_length above answer_max_length",
         refused(lambda w, out: _vqa(out, "inference=generate", "answer_min_length=12"),
                 2, ["answer_min_length", "12 is above answer_max_length 10"], "vqa")),
    Case("V6", "train_vqa.py, inference: beam",
         refused(lambda w, out: _vqa(out, "inference=beam"), 2, ["inference", "rank", "generate"], "vqa")),
    Case("V7", "train_vqa.py, a val_file without answers",
         refused(lambda w, out: _vqa(out, "val_file=vqa_test", "train_files=[vqa_train]", evaluate=False),
                 1, ["val_file vqa_test", "needs its annotators' answers"], "vqa")),
    Case("N1", "train_nlvr.py --overwrite of a previous run, a pair's second image missing", _n1),
    Case("N2", "train_nlvr.py --evaluate, a dev label 'yes'", _n2),
    Case("N3", "train_nlvr.py --evaluate, a test pair with one image", _n3),
    Case("N4", "train_nlvr.py, a train label 'true' (BLIP would read it as False)", _n4),
    Case("N5", "train_nlvr.py --evaluate, test_file naming no file", _n5),
    Case("N6", "train_nlvr.py --evaluate of a pretraining checkpoint (no merge layers, no head)",
         refused(lambda w, out: _nlvr(out, _nlvr_files(out.parent), f"pretrained={NLVR / 'pretrain_checkpoint.pth'}"),
                 1, ["pretrained", "evaluation needs every weight", "cls_head"], "nlvr")),
    Case("N7", "train_nlvr.py --evaluate of a VQA checkpoint",
         refused(lambda w, out: _nlvr(out, _nlvr_files(out.parent), f"pretrained={VQA / 'checkpoint.pth'}"),
                 1, ["pretrained", "'blip-vqa' checkpoint"], "nlvr")),
]
