"""NLVR2 runs as users run them, on the tiny model the original code trained
(tests/fixtures/blip_nlvr_tiny): --evaluate gives the release's predictions and the accuracy they
imply, 2 ranks write the same prediction files as one process, a run killed mid-epoch resumes to the
straight run's records, weights and predictions, the best epoch is the one of the highest dev
accuracy, --dry_run is the release's loss of one batch, and bad files stop before the model."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "blip_nlvr_tiny"
TINY_VIT = "{width: 48, depth: 2, heads: 4, patch_size: 16}"
# One thread per process, as torchrun's ranks get: on 2 shared cores, OpenMP threads that wait on
# each other make a step of this tiny model 10-50x slower.
ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def ref():
    return torch.load(FIX / "reference.pt", weights_only=True)


def _ann(folder: Path, train=None, dev=None, test=None) -> Path:
    """An ann_root of BLIP's three split files: by default 32 training pairs and 8 dev pairs from the
    fixture's training pairs, and the fixture's 8 test pairs."""
    pairs = json.loads((FIX / "nlvr_train.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    for name, entries in (("nlvr_train", pairs[:32] if train is None else train),
                          ("nlvr_dev", pairs[32:40] if dev is None else dev),
                          ("nlvr_test", json.loads((FIX / "nlvr_test.json").read_text()) if test is None else test)):
        (folder / f"{name}.json").write_text(json.dumps(entries))
    return folder


def _opts(ann: Path, **overrides):
    values = {"image_root": FIX, "ann_root": ann, "pretrained": FIX / "checkpoint.pth", "vit": TINY_VIT,
              "image_size": 48, "med_config": FIX / "med_config.json", "tokenizer": FIX / "tokenizer",
              "num_workers": 0, "device": "cpu", "batch_size_test": 4, "deterministic": "true"}
    values.update(overrides)
    return [f"{k}={v}" for k, v in values.items()]


def _args(out: Path, ann: Path, *flags, **overrides):
    return ["--config", REPO / "configs" / "nlvr.yaml", "--output_dir", out, "--no_progress", *flags,
            "--opts", *_opts(ann, **overrides)]


def _main(*args):
    """``train_nlvr.py args`` in this process, on one thread like the subprocesses (the bits of a
    float reduction depend on the thread count); its record."""
    import train_nlvr
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_nlvr.main([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)


def _results(path: Path):
    return json.loads(path.read_text())


@pytest.mark.dist
def test_evaluate_gives_the_releases_predictions_and_two_ranks_write_the_same_files(tmp_path, run_torchrun, ref):
    ann = _ann(tmp_path / "ann")
    one, two = tmp_path / "one", tmp_path / "two"
    _main(*_args(one, ann, "--evaluate", deterministic="false"))
    run_torchrun("train_nlvr.py", _args(two, ann, "--evaluate"))
    for split in ("val", "test"):
        name = f"nlvr_result_{split}.json"
        assert (two / name).read_bytes() == (one / name).read_bytes(), split
    test = _results(one / "nlvr_result_test.json")
    fixture = json.loads((FIX / "nlvr_test.json").read_text())
    assert [r["index"] for r in test] == list(range(8))
    assert [(r["images"], r["sentence"]) for r in test] == [(e["images"], e["sentence"]) for e in fixture]
    assert [r["label"] for r in test] == ref["labels"].tolist()
    assert [r["prediction"] for r in test] == ref["predictions"].tolist()   # the release's, unswapped
    assert torch.allclose(torch.tensor([r["logits"] for r in test]), ref["logits"], atol=1e-5, rtol=0)
    evaluated = json.loads((one / "evaluate.txt").read_text())
    assert evaluated["test_acc"] == pytest.approx(100 * (ref["predictions"] == ref["labels"]).float().mean().item())
    val = _results(one / "nlvr_result_val.json")
    assert evaluated["val_acc"] == pytest.approx(100 * sum(r["prediction"] == r["label"] for r in val) / len(val))
    assert json.loads((two / "evaluate.txt").read_text()) == evaluated


# ---------------------------------------------------------------------- training from the fixture

def _train_opts(**overrides):
    values = {"batch_size_train": 4, "max_epoch": 2, "init_lr": 3e-4, "min_lr": 1e-5, "seed": 3,
              "log_every": 1000}
    values.update(overrides)
    return values


@pytest.fixture(scope="module")
def straight(tmp_path_factory, run_script):
    """A 2-epoch run from the fixture checkpoint (8 steps per epoch, checkpoint_last every 3 steps)."""
    root = tmp_path_factory.mktemp("nlvr_train")
    ann = _ann(root / "ann")
    out = root / "straight"
    run_script("train_nlvr.py", _args(out, ann, **_train_opts(ckpt_every_steps=3)), env=ENV)
    return ann, out


def _records(out):
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


@pytest.mark.slow
def test_training_resumes_exactly_after_sigkill(tmp_path, straight, run_script, kill_at_step, monkeypatch):
    ann, ref_out = straight
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    killed = tmp_path / "killed"
    ckpt = killed / "checkpoint_last.pth"
    kill_at_step([sys.executable, REPO / "train_nlvr.py", *_args(killed, ann, **_train_opts(ckpt_every_steps=3))],
                 ckpt, 3)  # inside epoch 0 (8 steps)
    assert 0 < torch.load(ckpt, weights_only=True)["loop"]["batch_in_epoch"] < 8
    run_script("train_nlvr.py", _args(killed, ann, "--resume", "auto", **_train_opts(ckpt_every_steps=3)), env=ENV)
    assert _records(ref_out) == _records(killed)
    a = torch.load(ref_out / "checkpoint_last.pth", weights_only=True)
    b = torch.load(killed / "checkpoint_last.pth", weights_only=True)
    assert a["format"] == "blip-nlvr" and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for name in ("nlvr_result_val.json", "nlvr_result_test.json"):
        assert (ref_out / name).read_bytes() == (killed / name).read_bytes()


@pytest.mark.slow
def test_training_picks_the_best_epoch_by_dev_accuracy(tmp_path, straight):
    ann, out = straight
    records = _records(out)
    assert len(records) == 2 and all({"train_loss", "train_lr", "val_acc"} <= set(r) for r in records)
    best = max(range(2), key=lambda e: records[e]["val_acc"])  # the first of equal accuracies, as the release
    assert records[-1]["best_epoch"] == best and "test_acc" in records[best]
    assert all(r["train_lr"] == pytest.approx(1e-5 + (3e-4 - 1e-5) * (1 + (1 if e == 0 else 0)) / 2)
               for e, r in enumerate(records))  # BLIP's cosine over max_epoch 2: init_lr, then the midpoint
    test = _results(out / "nlvr_result_test.json")
    assert records[best]["test_acc"] == pytest.approx(100 * sum(r["prediction"] == r["label"] for r in test) / 8)
    # The best checkpoint predicts the same again through --evaluate (every weight from the file).
    ev = tmp_path / "ev"
    _main(*_args(ev, ann, "--evaluate", pretrained=out / "checkpoint_best.pth", strict_load="true", val_file="null",
                 deterministic="false"))
    assert (ev / "nlvr_result_test.json").read_bytes() == (out / "nlvr_result_test.json").read_bytes()
    assert json.loads((ev / "evaluate.txt").read_text())["test_acc"] == records[best]["test_acc"]


def test_dry_run_is_the_releases_loss_of_the_first_batch(tmp_path, ref):
    from utils.errors import UserError
    test = json.loads((FIX / "nlvr_test.json").read_text())
    ann = _ann(tmp_path / "ann", train=test)   # the reference batch: the 8 test pairs, as annotated
    out = tmp_path / "dry"
    rec = _main(*_args(out, ann, "--dry_run", batch_size_train=8, deterministic="false"))
    assert set(rec["losses"]) == {"loss"} and rec["batch_size"] == 8
    assert rec["loss"] == pytest.approx(ref["train_loss"].item(), abs=1e-5)  # eval mode, test transform, no swap
    assert (out / "dry_run.json").is_file() and not (out / "log.txt").exists() and not list(out.glob("checkpoint_*"))
    with pytest.raises(UserError, match="--dry_run .* cannot be combined with --evaluate"):
        _main(*_args(tmp_path / "x", ann, "--dry_run", "--evaluate"))


@pytest.mark.parametrize("split,index,change,message", [
    ("train", 5, lambda e: e["images"].__setitem__(1, "images/missing.png"),
     "entry 5 of {ann}/nlvr_train.json, field 'images[1]': image file missing"),
    ("dev", 2, lambda e: e.__setitem__("label", "yes"), "entry 2 of {ann}/nlvr_dev.json, field 'label'"),
    ("test", 7, lambda e: e["images"].pop(), "entry 7 of {ann}/nlvr_test.json, field 'images': expected a list of "
                                             "exactly 2 image paths (left, right), got 1"),
], ids=["second-image-missing", "label-yes", "one-image"])
def test_bad_files_stop_before_the_model_naming_file_entry_and_field(tmp_path, split, index, change, message,
                                                                      monkeypatch, capsys):
    from tests.scripts.campaign_runs import run_inprocess
    ann = _ann(tmp_path / "ann")
    entries = json.loads((ann / f"nlvr_{split}.json").read_text())
    change(entries[index])
    (ann / f"nlvr_{split}.json").write_text(json.dumps(entries))
    out = tmp_path / "out"
    for flags in ((), ("--evaluate",)) if split != "train" else ((),):
        # `pretrained` does not exist: a run that got as far as the model would fail on it instead.
        code, _, err = run_inprocess(monkeypatch, capsys, "train_nlvr.py",
                                     *_args(out, ann, *flags, pretrained="/nonexistent.pth", deterministic="false"))
        assert code == 1 and message.format(ann=ann) in err and "nonexistent" not in err, err
        assert not out.exists()
