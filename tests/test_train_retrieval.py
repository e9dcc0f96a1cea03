"""Retrieval fine-tuning through the entry point: learning, exact resume, kill-and-resume,
distributed equivalence, non-finite loss handling, --dry_run."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]



@pytest.mark.dist
def test_itc_loss_and_gradients_two_ranks_equal_one_process_on_the_double_batch(tmp_path, run_torchrun):
    from tests.scripts.itc_case import itc_case
    loss, grads = itc_case(0, 1)
    out = tmp_path / "dist.pt"
    run_torchrun("tests/scripts/dist_itc.py", [out])
    dist = torch.load(out, weights_only=True)
    assert abs(dist["loss"].item() - loss.item()) < 1e-5
    for name, g in grads.items():
        assert torch.allclose(dist["grads"][name], g, atol=1e-6, rtol=1e-4), name




@pytest.fixture(scope="module")
def train_cli(run_script):
    """``train_cli(cfg, out, *extra)``: ``python train_retrieval.py`` as a user runs it."""
    def run(cfg, out, *extra, check=True):
        return run_script("train_retrieval.py", ["--config", cfg, "--output_dir", out, "--no_progress", *extra],
                          check=check)
    return run


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, synthetic_small, tiny_train_config, train_cli):
    """One uninterrupted 2-epoch run (config, output dir), shared by the resume tests. Checkpoints
    every 4 steps change nothing in training, and let the SIGKILL test stop mid-epoch."""
    tmp = tmp_path_factory.mktemp("baseline")
    cfg = tiny_train_config(tmp, synthetic_small, ckpt_every_steps=4)
    train_cli(cfg, tmp / "straight")
    return cfg, tmp / "straight"


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def _losses(out):
    return [{k: v for k, v in json.loads(l).items() if k.startswith("train_")}
            for l in (out / "log.txt").read_text().splitlines()]


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path, baseline, train_cli):
    """The straight run writes .pth files; the split one safetensors (weights + a state file), keeps
    an epoch copy per epoch (only the newest: keep_checkpoints 1) and reports to TensorBoard. None
    of that changes training: the weights are bit-identical."""
    from tests.scripts.tensorboard_events import read_tensorboard
    from utils.checkpoint import load_checkpoint
    cfg, straight = baseline
    split = tmp_path / "split"
    opts = ["save_format=safetensors", "save_every=1", "keep_checkpoints=1", "report_to=tensorboard", "log_every=4"]
    # Epoch 0's cosine lr does not depend on max_epoch, so a 1-epoch run is the first half.
    train_cli(cfg, split, "--opts", "max_epoch=1", *opts)
    assert (split / "checkpoint_epoch000.safetensors").is_file()
    train_cli(cfg, split, "--resume", "auto", "--opts", *opts)
    assert _losses(straight) == _losses(split)
    assert len(_losses(split)) == 2
    last = split / "checkpoint_last.safetensors"
    assert not (split / "checkpoint_last.pth").exists()
    ckpt = load_checkpoint(last, with_state=True)
    wa = _weights(straight / "checkpoint_last.pth")
    assert wa.keys() == ckpt["model"].keys() and all(torch.equal(wa[k], ckpt["model"][k]) for k in wa)
    assert {"model", "format", "optimizer", "scaler", "loop", "config", "rng", "generator", "epoch",
            "step"} <= set(ckpt) and ckpt["format"] == "blip"
    assert ckpt["epoch"] == 2 and ckpt["step"] == 2 * (96 * 3 // 16)
    # One state file per checkpoint (older ones removed); epoch 0's copy gave way to epoch 1's.
    names = sorted(p.name for p in split.iterdir() if "checkpoint" in p.name)
    assert [n for n in names if n.endswith(".safetensors")] == [
        "checkpoint_best.safetensors", "checkpoint_epoch001.safetensors", "checkpoint_last.safetensors"]
    assert len([n for n in names if n.endswith(".state.pth")]) == 3
    assert torch.equal(load_checkpoint(split / "checkpoint_epoch001.safetensors")["model"]["temp"], ckpt["model"]["temp"])
    # TensorBoard: every log.txt scalar per epoch, losses / lr / samples/s per log step, one event
    # file per attempt, read back as TensorBoard reads them.
    scalars, _ = read_tensorboard(split / "tensorboard")
    log = [json.loads(l) for l in (split / "log.txt").read_text().splitlines()]
    steps = [18, 36]
    for key in ("train_loss_ita", "train_loss_itm", "train_lr", "val_r_mean", "best_epoch"):
        assert [s for s, _ in scalars[f"epoch/{key}"]] == steps, key
        assert [v for _, v in scalars[f"epoch/{key}"]] == pytest.approx([r[key] for r in log], rel=1e-6), key
    for key in ("loss_ita", "loss_itm", "lr", "samples_per_s"):
        # (a slow machine may add heartbeat lines)
        assert {4, 8, 12, 16, 22, 26, 30, 34} <= {s for s, _ in scalars[f"train/{key}"]}, key


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path, baseline, train_cli, kill_at_step):
    cfg, straight = baseline
    killed = tmp_path / "killed"
    ckpt = killed / "checkpoint_last.pth"
    kill_at_step([sys.executable, REPO / "train_retrieval.py", "--config", cfg, "--output_dir", killed, "--no_progress"],
                 ckpt, 8)  # well inside epoch 0 (18 steps per epoch)
    assert torch.load(ckpt, weights_only=True)["loop"]["batch_in_epoch"] > 0  # a mid-epoch checkpoint
    # A kill that lands inside the next save leaves that save's temp file (the checkpoint itself is
    # whole: it is replaced by rename); the resumed run removes it before it writes anything.
    train_cli(cfg, killed, "--resume", "auto")
    assert not list(killed.glob(".*.tmp")), "a temp file of the killed run was left after the resume"
    assert _losses(straight) == _losses(killed)
    _assert_same_weights(straight / "checkpoint_last.pth", killed / "checkpoint_last.pth")


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, synthetic_small, monkeypatch, tiny_train_config):
    import train_retrieval
    import tasks.retrieval as rt
    from utils.errors import NonFiniteLossError

    original = rt.retrieval_loss

    def poisoned(cfg):
        fn = original(cfg)

        def loss_fn(model, batch, ctx):
            losses = fn(model, batch, ctx)
            if ctx["epoch"] == 1 and ctx["batch_index"] == 2:
                losses["loss_ita"] = losses["loss_ita"] * float("nan")
            return losses
        return loss_fn

    monkeypatch.setattr(rt, "retrieval_loss", poisoned)
    out = tmp_path / "nan"
    cfg = tiny_train_config(tmp_path, synthetic_small)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at epoch 1, batch 2, step 20"):
        train_retrieval.main(["--config", str(cfg), "--output_dir", str(out), "--no_progress"])
    kept = torch.load(out / "checkpoint_last.pth", weights_only=True)
    assert kept["epoch"] == 1 and kept["loop"]["step"] == 18
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())



@pytest.mark.dist
def test_compile_true_with_gradient_checkpointing_trains_and_resumes_like_eager(tmp_path, baseline, train_cli):
    """``compile: true`` through the entry point, with ViT gradient checkpointing: one epoch, resume,
    the second; the losses are the eager straight run's (within 1e-5) and the checkpoint keys the
    same. The aot_eager backend traces the blocks as inductor does (dynamo, AOT autograd) without
    generating code, so this takes seconds; inductor's numerics are test_compile.py's."""
    cfg, straight = baseline
    out = tmp_path / "compiled"
    opts = ["compile=true", "compile_backend=aot_eager", "vit_grad_ckpt=true"]
    first = train_cli(cfg, out, "--opts", "max_epoch=1", *opts)
    assert "compile: 4 blocks (Block, MedLayer) compiled" in first.stdout + first.stderr
    train_cli(cfg, out, "--resume", "auto", "--opts", *opts)
    eager, compiled = _losses(straight), _losses(out)
    assert len(compiled) == len(eager) == 2
    for e, c in zip(eager, compiled):
        assert e.keys() == c.keys()
        for k in e:
            assert abs(e[k] - c[k]) <= 1e-5 * max(1.0, abs(e[k])), (k, e[k], c[k])
    assert _weights(out / "checkpoint_last.pth").keys() == _weights(straight / "checkpoint_last.pth").keys()


@pytest.mark.dist
def test_torchrun_compile_bf16_and_feature_cached_accumulation(tmp_path, synthetic_small, run_torchrun,
                                                               tiny_train_config):
    """``compile: true`` under torchrun (2 ranks) with bf16 autocast and ``accum_freq: 2``: the
    epoch trains with finite losses and its checkpoint has the eager model's key names."""
    cfg = tiny_train_config(tmp_path, synthetic_small, max_epoch=1, compile="true", compile_backend="aot_eager",
                            precision="bf16", accum_freq=2)
    out = tmp_path / "ddp_compiled"
    run_torchrun("train_retrieval.py", ["--config", cfg, "--output_dir", out, "--no_progress"])
    row = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert all(math.isfinite(row[k]) for k in ("train_loss_ita", "train_loss_itm"))
    state = _weights(out / "checkpoint_last.pth")
    assert not any("_orig_mod" in k for k in state) and "visual_encoder.blocks.0.attn.qkv.weight" in state


@pytest.mark.slow
@pytest.mark.dist
def test_torchrun_two_processes_train_and_evaluate(tmp_path, synthetic_small, run_torchrun, tiny_train_config):
    """2 ranks (gloo, CPU), hard negatives mined across ranks: training runs, val and test are
    evaluated, checkpoints and TensorBoard events are written once (by rank 0) and resume works under
    torchrun too."""
    # Global batch 2 x 16 = 32; queue 64 is a multiple of it.
    cfg = tiny_train_config(tmp_path, synthetic_small, negative_all_rank=True, max_epoch=1, report_to="tensorboard",
                            save_every=1)
    out = tmp_path / "ddp"
    run_torchrun("train_retrieval.py", ["--config", cfg, "--output_dir", out, "--no_progress"])
    rows = [json.loads(l) for l in (out / "log.txt").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["epoch"] == 0
    assert all(torch.isfinite(torch.tensor(rows[0][k])) for k in ("train_loss_ita", "train_loss_itm"))
    assert {"val_txt_r1", "val_img_r1", "test_txt_r1", "test_img_r1", "test_r_mean"} <= set(rows[0])
    ckpt = torch.load(out / "checkpoint_last.pth", weights_only=True)
    # 288 captions / (2 ranks x 16) = 9 steps per epoch: each rank saw half of the data.
    assert ckpt["step"] == 96 * 3 // 32
    run_torchrun("train_retrieval.py", ["--config", cfg, "--output_dir", out, "--no_progress", "--resume", "auto",
                                        "--opts", "max_epoch=2"])
    rows = [json.loads(l) for l in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert torch.load(out / "checkpoint_last.pth", weights_only=True)["step"] == 2 * (96 * 3 // 32)
    # Rank 0 alone writes TensorBoard events (one file per attempt) and the epoch copies.
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert sorted(p.name for p in out.glob("checkpoint_epoch*")) == ["checkpoint_epoch000.pth", "checkpoint_epoch001.pth"]


@pytest.mark.slow
def test_training_from_scratch_learns_far_above_chance(tmp_path, run_script):
    """The demo config through the entry point for 336 steps (6 epochs of 56) on a 600-image synthetic
    benchmark: R@1 on its 50 test images (chance 2%) must be far above chance. Measured 24 / 24."""
    from data.synthetic import generate
    data = tmp_path / "data"
    generate(data, seed=1, n_train=600, n_val=50, n_test=50, image_size=64)
    out = tmp_path / "run"
    run_script("train_retrieval.py", [
        "--config", REPO / "configs" / "demo" / "retrieval.yaml", "--output_dir", out, "--no_progress", "--opts",
        f"image_root={data / 'retrieval' / 'images'}", f"ann_root={data / 'retrieval' / 'annotation'}",
        f"tokenizer={data / 'tokenizer'}", "max_epoch=6", "eval_every=6", "warmup_steps=100", "seed=1",
        "queue_size=256", "device=cpu"])
    last = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert last["epoch"] == 5
    assert last["test_img_r1"] >= 10.0 and last["test_txt_r1"] >= 10.0, last
    first = json.loads((out / "log.txt").read_text().splitlines()[0])
    assert last["train_loss_ita"] < first["train_loss_ita"] - 1.0


def test_dry_run_is_one_eval_forward_of_the_first_batch_and_writes_no_checkpoint(tmp_path, fixture_config,
                                                                                  fixture_model, run_script):
    """``--dry_run`` on the official-layout fixture (its 12 captions as the train split): the loss
    terms of ``dry_run.json`` are those of one eval-mode forward of the first 8 pairs in file order
    (test transform, ``alpha`` unramped) computed here directly; a second dry run (in-process, the
    first ran as a user runs it) gives the same numbers; a previous run's checkpoint in
    ``output_dir`` is neither refused nor touched, and none is written."""
    import train_retrieval
    from data.collate import RetrievalCollator
    from data.retrieval import build_retrieval_datasets
    from data.transforms import build_test_transform
    from tasks.retrieval import RetrievalConfig
    from utils.config import load_config
    from utils.sampling import _mix

    path = fixture_config(tmp_path, train_file="test.json", batch_size_train=8, train_hflip="true",
                          train_randaug="true")
    out = tmp_path / "dry"
    out.mkdir()
    (out / "checkpoint_last.pth").write_bytes(b"a previous run")
    run_script("train_retrieval.py", ["--config", path, "--output_dir", out, "--no_progress", "--dry_run"])
    first = json.loads((out / "dry_run.json").read_text())
    assert (out / "checkpoint_last.pth").read_bytes() == b"a previous run"
    assert sorted(p.name for p in out.glob("checkpoint_*")) == ["checkpoint_last.pth"]
    assert set(first["losses"]) == {"loss_ita", "loss_itm"} and first["batch_size"] == 8
    assert all(math.isfinite(v) and first[k] == v for k, v in first["losses"].items())
    assert first["total"] == pytest.approx(sum(first["losses"].values()))

    again = tmp_path / "again"
    record = train_retrieval.main(["--config", str(path), "--output_dir", str(again), "--no_progress", "--dry_run"])
    assert record["losses"] == first["losses"] and not list(again.glob("checkpoint_*"))

    cfg, _ = load_config(path, RetrievalConfig)
    model, tokenizer, _ = fixture_model()
    train = build_retrieval_datasets(cfg, splits=("train",), train_transform=build_test_transform(64))["train"]
    batch = RetrievalCollator(tokenizer, cfg.max_tokens)([train[i] for i in range(8)])
    generator = torch.Generator().manual_seed(_mix(cfg.seed, 0, 7))  # the Trainer's (rank 0)
    with torch.no_grad():
        direct = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["idx"],
                       alpha=cfg.alpha, generator=generator)
    assert {k: v.item() for k, v in direct.items()} == pytest.approx(first["losses"], rel=1e-6, abs=1e-7)


def test_dry_run_with_evaluate_is_refused_in_one_line(tmp_path, fixture_config, capsys):
    import train_retrieval
    from utils.rundir import run_entry

    out = tmp_path / "out"
    argv = ["--config", str(fixture_config(tmp_path)), "--output_dir", str(out), "--dry_run", "--evaluate"]
    with pytest.raises(SystemExit) as exit_:
        run_entry(lambda: train_retrieval.main(argv))
    assert exit_.value.code == 1 and not out.exists()
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --dry_run checks a training run (one forward of its first batch); it cannot be combined with "
        "--evaluate: drop one of the two"]
