"""VQA runs as users run them: 2-rank evaluation equal to one process, exact resume after SIGKILL,
training with val accuracy choosing the best epoch, --dry_run, initialisation from BLIP's other
layouts (pretraining, retrieval) and the refusals (bad files before the model, wrong layouts)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "blip_vqa_tiny"
TINY_VIT = "{width: 64, depth: 2, heads: 4, patch_size: 16}"


def _fixture_opts(**overrides):
    values = {"ann_root": FIX, "vqa_root": FIX, "pretrained": FIX / "checkpoint.pth", "vit": TINY_VIT,
              "image_size": 64, "med_config": FIX / "med_config.json", "tokenizer": FIX / "tokenizer",
              "num_workers": 0, "device": "cpu", "k_test": 4}
    values.update(overrides)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def ref():
    return torch.load(FIX / "reference.pt", weights_only=True)


@pytest.mark.dist
def test_two_rank_evaluation_writes_the_same_result_as_one_process(tmp_path, run_script, run_torchrun, ref):
    one, two = tmp_path / "one", tmp_path / "two"
    for out, run in ((one, lambda a: run_script("train_vqa.py", a)), (two, lambda a: run_torchrun("train_vqa.py", a))):
        run(["--config", REPO / "configs" / "vqa.yaml", "--evaluate", "--output_dir", out, "--no_progress",
             "--opts", *_fixture_opts(batch_size_test=3)])
    assert (two / "vqa_result.json").read_bytes() == (one / "vqa_result.json").read_bytes()
    assert [r["answer"] for r in json.loads((two / "vqa_result.json").read_text())] == ref["rank_k4_answers"]


# ---------------------------------------------------------------------- training on synthetic questions

@pytest.fixture(scope="module")
def vqa_data(tmp_path_factory) -> Path:
    from data.synthetic import generate
    out = tmp_path_factory.mktemp("synthetic_vqa")
    generate(out, seed=0, parts="vqa", n_train_images=30, n_val_images=6, n_test_images=6, image_size=32)
    return out


def _train_config(tmp_path: Path, data: Path, **overrides) -> Path:
    from tests.scripts.tiny import TINY_MED, write_yaml
    med = tmp_path / "med_tiny.json"
    med.write_text(TINY_MED)
    values = {"vqa_root": data / "vqa", "ann_root": data / "vqa" / "annotation", "train_files": "[vqa_train]",
              "val_file": "null", "test_file": "vqa_test", "tokenizer": data / "tokenizer", "med_config": med,
              "pretrained": "''", "vit": "{width: 32, depth: 1, heads: 2, patch_size: 16}", "image_size": 32,
              "vit_drop_path_rate": 0.1, "k_test": 4, "batch_size_train": 8, "batch_size_test": 8, "init_lr": 1e-3,
              "min_lr": 1e-4, "max_epoch": 2, "num_workers": 0, "device": "cpu", "seed": 3, "log_every": 1000,
              "train_resize_only": True, "deterministic": "true"}
    values.update(overrides)
    return write_yaml(tmp_path / "vqa.yaml", {k: v for k, v in values.items() if v is not None})


@pytest.fixture(scope="module")
def vqa_cli(run_script):
    def run(cfg, out, *extra, check=True):
        return run_script("train_vqa.py", ["--config", cfg, "--output_dir", out, "--no_progress", *extra], check=check)
    return run


def _records(out):
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


@pytest.mark.slow
def test_vqa_training_resumes_exactly_after_sigkill(tmp_path, vqa_data, vqa_cli, kill_at_step):
    cfg = _train_config(tmp_path, vqa_data, ckpt_every_steps=3)
    straight = tmp_path / "straight"
    vqa_cli(cfg, straight)
    killed = tmp_path / "killed"
    ckpt = killed / "checkpoint_last.pth"
    kill_at_step([sys.executable, REPO / "train_vqa.py", "--config", cfg, "--output_dir", killed, "--no_progress"],
                 ckpt, 6)  # inside epoch 0 (15 steps)
    assert torch.load(ckpt, weights_only=True)["loop"]["batch_in_epoch"] > 0
    vqa_cli(cfg, killed, "--resume", "auto")
    assert _records(straight) == _records(killed)
    a = torch.load(straight / "checkpoint_last.pth", weights_only=True)
    b = torch.load(killed / "checkpoint_last.pth", weights_only=True)
    assert a["format"] == "blip-vqa" and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert (straight / "vqa_result.json").read_bytes() == (killed / "vqa_result.json").read_bytes()


@pytest.mark.slow
def test_vqa_training_picks_the_best_epoch_by_val_accuracy(tmp_path, vqa_data, vqa_cli):
    cfg = _train_config(tmp_path, vqa_data, val_file="vqa_val", init_lr=3e-3)
    out = tmp_path / "run"
    vqa_cli(cfg, out)
    records = _records(out)
    assert len(records) == 2 and all({"train_loss", "train_lr", "val_acc", "val_acc_yes/no"} <= set(r) for r in records)
    best = max(range(2), key=lambda e: records[e]["val_acc"])
    assert records[-1]["best_epoch"] == best and "test_acc" in records[best]
    results = json.loads((out / "vqa_result.json").read_text())
    test = json.loads((vqa_data / "vqa" / "annotation" / "vqa_test.json").read_text())
    assert [r["question_id"] for r in results] == [e["question_id"] for e in test]
    # The saved model answers the same again through --evaluate (strictly loaded), by generation too.
    ev = tmp_path / "ev"
    vqa_cli(cfg, ev, "--evaluate", "--opts", f"pretrained={out / 'checkpoint_best.pth'}", "strict_load=true",
            "val_file=null")
    assert (ev / "vqa_result.json").read_bytes() == (out / "vqa_result.json").read_bytes()
    assert json.loads((ev / "evaluate.txt").read_text())["test_acc"] == records[best]["test_acc"]


def test_dry_run_is_the_vqa_loss_of_one_eval_forward(tmp_path, vqa_data, run_script):
    import train_vqa
    from utils.errors import UserError
    cfg = _train_config(tmp_path, vqa_data)
    rec = train_vqa.main(["--config", str(cfg), "--output_dir", str(tmp_path / "dry"), "--no_progress", "--dry_run"])
    assert set(rec["losses"]) == {"loss"} and rec["batch_size"] == 8 and rec["loss"] > 0
    assert not list((tmp_path / "dry").glob("checkpoint_*")) and not (tmp_path / "dry" / "log.txt").exists()
    with pytest.raises(UserError, match="--dry_run .* cannot be combined with --evaluate"):
        train_vqa.main(["--config", str(cfg), "--output_dir", str(tmp_path / "x"), "--dry_run", "--evaluate"])


def test_bad_vqa_files_stop_before_the_model_naming_entry_and_field(tmp_path, run_script):
    entries = json.loads((FIX / "vqa_train.json").read_text())[:3]
    del entries[2]["answer"]
    (tmp_path / "vqa_train.json").write_text(json.dumps(entries))
    (tmp_path / "vqa_test.json").write_text((FIX / "vqa_test.json").read_text())
    (tmp_path / "answer_list.json").write_text(json.dumps(["yes", "no", "yes"]))
    base = ["--config", REPO / "configs" / "vqa.yaml", "--output_dir", tmp_path / "out", "--opts",
            *_fixture_opts(ann_root=tmp_path, pretrained="/nonexistent.pth")]
    proc = run_script("train_vqa.py", base, check=False)
    assert proc.returncode != 0 and "nonexistent" not in proc.stderr
    assert "entry 2 of" in proc.stderr and "vqa_train.json" in proc.stderr and "'answer'" in proc.stderr
    proc = run_script("train_vqa.py", [*base[:4], "--evaluate", *base[4:]], check=False)
    assert proc.returncode != 0 and "answer_list.json, entry 2" in proc.stderr and "distinct" in proc.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- other layouts

def _tiny_vqa(vit_width: int):
    from models.tokenizer import build_tokenizer
    from models.vqa import VQAArch, build_vqa
    tok = build_tokenizer(str(FIX / "tokenizer"))
    arch = VQAArch(vit={"width": vit_width, "depth": 2, "heads": 4, "patch_size": 16}, image_size=64,
                   med_config=str(FIX / "med_config.json"))
    return arch, tok, build_vqa(arch, tok)


def test_a_pretraining_file_initialises_all_three_towers_as_blip_does(tmp_path):
    """model_base.pth's layout (BLIP pretraining): ViT, text encoder and decoder loaded, the rest
    reported; a ViT wider than the text leaves the decoder's cross-attention key/value weights new
    (they attended to image tokens; BLIP's loader drops them), which training allows and evaluation refuses."""
    from models.blip import BlipArch, ITCSettings
    from models.blip_pretrain import build_blip_pretrain
    from models.factory import load_weights
    from utils.errors import CheckpointMismatchError
    arch, tok, vqa = _tiny_vqa(64)
    pre = build_blip_pretrain(BlipArch(vit=arch.vit, image_size=64, med_config=arch.med_config, embed_dim=16),
                              tok, itc=ITCSettings(queue_size=32))
    path = tmp_path / "model_base.pth"
    torch.save({"model": pre.state_dict()}, path)
    result = load_weights(vqa, str(path), purpose="train")
    report = result.blip
    assert result.format == "blip"
    assert sorted(report.new) == [f"text_decoder.bert.encoder.layer.{i}.crossattention.self.{p}.weight"
                                  for i in range(2) for p in ("key", "value")]
    assert not report.missing and not report.unexpected and not report.mismatched
    assert any(k.startswith("vision_proj.") for k in report.expected_extra)
    state = pre.state_dict()
    own = vqa.state_dict()
    for k in ("visual_encoder.blocks.0.attn.qkv.weight", "text_encoder.encoder.layer.1.crossattention.self.key.weight",
              "text_decoder.bert.encoder.layer.0.attention.self.query.weight",
              "text_decoder.bert.encoder.layer.0.crossattention.self.key.bias"):
        assert torch.equal(own[k], state[k]), k
    with pytest.raises(CheckpointMismatchError, match="evaluation needs every weight"):
        load_weights(_tiny_vqa(64)[2], str(path), purpose="eval")


def test_layouts_a_vqa_model_refuses_and_a_vqa_file_is_refused_by(tmp_path):
    from models.factory import load_weights
    from models.caption import CaptionArch, build_captioner
    from utils.errors import CheckpointError
    arch, tok, vqa = _tiny_vqa(64)
    cap = build_captioner(CaptionArch(vit=arch.vit, image_size=64, med_config=arch.med_config), tok)
    with pytest.raises(CheckpointError, match="is a 'blip-vqa' checkpoint; a captioner loads"):
        load_weights(cap, str(FIX / "checkpoint.pth"))
    # A retrieval-style file (no decoder) starts the decoder afresh for training only.
    state = {k: v for k, v in torch.load(FIX / "checkpoint.pth", weights_only=True)["model"].items()
             if not k.startswith("text_decoder.")}
    state["itm_head.weight"] = torch.zeros(2, 32)
    state["itm_head.bias"] = torch.zeros(2)
    torch.save({"model": state}, tmp_path / "retrieval.pth")
    report = load_weights(vqa, str(tmp_path / "retrieval.pth"), purpose="train").blip
    assert report.new and all(k.startswith("text_decoder.") for k in report.new)
