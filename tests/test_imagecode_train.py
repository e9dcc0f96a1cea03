"""ImageCoDe models and entry points: zero_shot.py (plain BLIP and ContextBLIP checkpoints, three
scores, test submission), finetune_imagecode.py stage 1 / stage 2 (exact resume, evaluation,
torchrun on CPU equal to one process), the stage-2 model reused on 2-candidate sets, and --dry_run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


FIELDS = {"set", "description", "target", "pred", "candidates", "scores", "video"}


@pytest.fixture(scope="module")
def ic(tmp_path_factory) -> dict:
    """Tiny synthetic ImageCoDe data, a tiny model config and a plain BLIP checkpoint for it."""
    from data.synthetic import generate
    from models.blip import build_blip_retrieval
    from models.tokenizer import build_tokenizer
    from tasks.imagecode import ImageCodeConfig
    from utils.config import load_config

    root = tmp_path_factory.mktemp("imagecode")
    data = generate(root / "data", seed=1, parts="imagecode", n_train_sets=14, n_valid_sets=5, n_test_sets=3,
                    image_size=32)
    med = root / "med.json"
    med.write_text('{"vocab_size": null, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,'
                   ' "intermediate_size": 64, "max_position_embeddings": 40, "encoder_width": 32,'
                   ' "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}')
    cfg = {"image_root": data["imagecode"]["image_root"], "ann_root": data["imagecode"]["ann_root"],
           "tokenizer": data["tokenizer"], "med_config": str(med), "pretrained": "''",
           "vit": "{width: 32, depth: 2, heads: 2, patch_size: 16}", "image_size": 32, "embed_dim": 16,
           "max_tokens": 32, "context_heads": 2, "context_dropout": 0.0,
           "batch_size_train": 4, "batch_size_test": 3, "init_lr": 1e-3, "head_lr": 1e-2, "max_epoch": 2,
           "num_workers": 0, "device": "cpu", "seed": 5, "log_every": 1000, "train_resize_only": True}
    path = root / "ic.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in cfg.items()))
    model_cfg, _ = load_config(path, ImageCodeConfig)
    torch.manual_seed(0)
    blip = build_blip_retrieval(model_cfg, build_tokenizer(model_cfg.tokenizer))
    torch.save({"model": blip.state_dict()}, root / "blip.pth")
    return {"root": root, "cfg": path, "blip": root / "blip.pth", "data": data}


def _valid_count(ic) -> int:
    return sum(len(v) for v in json.loads(Path(ic["data"]["imagecode"]["valid_file"]).read_text()).values())


def _zero_shot(ic, out, *opts, score=None):
    import zero_shot
    argv = ["--config", str(ic["cfg"]), "--output_dir", str(out), "--no_progress", "--opts", *opts]
    return zero_shot.main(argv + (["--score", score] if score else []))


@pytest.mark.slow
@pytest.mark.parametrize("score", ["itm", "itc", "itm+itc"])
def test_zero_shot_with_a_plain_blip_checkpoint(ic, tmp_path, score):
    # The released taps (3, 6, 9, 12) do not fit this 2-block ViT; a plain BLIP is scored without
    # the adapter, so they are unused and no error.
    record = _zero_shot(ic, tmp_path, f"pretrained={ic['blip']}", "adapter_taps=[3, 6, 9, 12]", score=score)
    preds = json.loads((tmp_path / "predictions.json").read_text())
    assert len(preds) == _valid_count(ic) == record["valid_n"]
    for p in preds:
        assert set(p) == FIELDS and len(p["scores"]) == len(p["candidates"]) == 10
        assert p["pred"] == max(range(10), key=lambda i: p["scores"][i])
        assert p["video"] == ("open-images" not in p["set"]) and isinstance(p["target"], int)
    hits = [p["pred"] == p["target"] for p in preds]
    assert record["valid_acc"] == pytest.approx(100 * sum(hits) / len(hits))
    assert record["score"] == score
    logged = json.loads((tmp_path / "evaluate.txt").read_text().splitlines()[-1])
    assert logged["valid_acc_video"] == record["valid_acc_video"]
    # A plain BLIP checkpoint is scored as BLIP itself: no adapter.
    assert "use_adapter: false" in (tmp_path / "config.yaml").read_text()
    if score == "itm":
        assert all(0.0 <= s <= 1.0 for p in preds for s in p["scores"])


@pytest.mark.slow
def test_zero_shot_with_a_contextblip_checkpoint_and_the_test_submission(ic, tmp_path):
    from models.contextblip import build_contextblip
    from models.tokenizer import build_tokenizer
    from tasks.imagecode import ImageCodeConfig
    from utils.config import load_config

    cfg, _ = load_config(ic["cfg"], ImageCodeConfig)
    torch.manual_seed(1)
    model = build_contextblip(cfg, build_tokenizer(cfg.tokenizer))
    torch.save({"model": model.state_dict()}, tmp_path / "merged.pth")  # blip.* + adapter.*: a merged export
    _zero_shot(ic, tmp_path / "zs", f"pretrained={tmp_path / 'merged.pth'}", "split=test")
    assert "use_adapter: true" in (tmp_path / "zs" / "config.yaml").read_text()
    test = json.loads(Path(ic["data"]["imagecode"]["test_file"]).read_text())
    sub = json.loads((tmp_path / "zs" / "submission.json").read_text())
    assert list(sub) == list(test) and all(len(sub[s]) == len(test[s]) for s in test)
    assert all(isinstance(p, int) and 0 <= p <= 9 for v in sub.values() for p in v)
    preds = json.loads((tmp_path / "zs" / "predictions.json").read_text())
    assert [p["target"] for p in preds] == [None] * sum(map(len, test.values()))
    assert [sub[p["set"]] for p in preds][0][0] == preds[0]["pred"]


def test_stage2_heads_freeze_stage1_and_use_positions_only_for_video(ic):
    from models.imagecode import build_imagecode_model
    from models.tokenizer import build_tokenizer
    from tasks.imagecode import ImageCodeConfig
    from utils.config import load_config

    cfg, _ = load_config(ic["cfg"], ImageCodeConfig, ["stage=2"])
    torch.manual_seed(0)
    model = build_imagecode_model(cfg, build_tokenizer(cfg.tokenizer)).eval()
    feats = torch.nn.functional.normalize(torch.randn(2, 10, 32), dim=-1)
    # context_zero_init (default): stage 2 starts exactly at stage 1's logits, video or not.
    stage1 = model.stage1(features=feats)
    assert torch.equal(model(features=feats, video=torch.tensor([True, False])), stage1)
    cfg.context_zero_init = False
    model = build_imagecode_model(cfg, build_tokenizer(cfg.tokenizer))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("context.") for n in trainable)
    assert "context.position.weight" in trainable
    model.train()
    assert not model.stage1.training and model.context.training
    model.eval()
    video = model(features=feats, video=torch.tensor([True, True]))
    static = model(features=feats, video=torch.tensor([False, False]))
    assert video.shape == (2, 10) and not torch.allclose(video, static)
    model.all_pos = True
    assert torch.allclose(model(features=feats, video=torch.tensor([False, False])), video)
    model.all_pos = False
    ids, mask = torch.randint(5, 20, (3, 6)), torch.ones(3, 6, dtype=torch.long)
    logits = model(ids, mask, pixel_values=torch.randn(3, 10, 3, 32, 32), video=torch.tensor([True, False, True]))
    logits.logsumexp(dim=1).sum().backward()
    assert all(p.grad is None for p in model.stage1.parameters())
    assert model.context.position.weight.grad is not None


def _finetune(ic, out, *extra, opts=()):
    import finetune_imagecode
    return finetune_imagecode.main(["--config", str(ic["cfg"]), "--output_dir", str(out), "--no_progress",
                                    *extra, "--opts", f"pretrained={ic['blip']}", *opts])


def _log(out):
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


@pytest.mark.slow
def test_finetune_stage1_resume_stage2_evaluate_and_reuse(ic, tmp_path):
    from models.factory import model_from_checkpoint
    from models.imagecode import score_candidates

    straight, split = tmp_path / "straight", tmp_path / "split"
    _finetune(ic, straight)
    _finetune(ic, split, opts=["max_epoch=1"])  # the step schedule does not depend on max_epoch
    _finetune(ic, split, "--resume", "auto")
    assert [r["train_loss"] for r in _log(straight)] == [r["train_loss"] for r in _log(split)]
    a, b = (torch.load(d / "checkpoint_last.pth", weights_only=True)["model"] for d in (straight, split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = _log(straight)
    assert len(log) == 2 and {"valid_acc", "valid_acc_video", "valid_acc_static", "train_lr"} <= set(log[0])
    assert log[1]["train_lr"] == pytest.approx(1e-3 * 0.95)
    best = max(log, key=lambda r: r["valid_acc"])
    preds = json.loads((straight / "predictions.json").read_text())
    assert len(preds) == _valid_count(ic)
    assert 100 * sum(p["pred"] == p["target"] for p in preds) / len(preds) == pytest.approx(best["valid_acc"])

    s2 = tmp_path / "stage2"
    import finetune_imagecode
    common = ["--config", str(ic["cfg"]), "--output_dir", str(s2), "--no_progress"]
    finetune_imagecode.main(common + ["--opts", "stage=2", f"pretrained={straight / 'checkpoint_best.pth'}",
                                      "max_epoch=1", "cache_features=true"])
    ckpt = torch.load(s2 / "checkpoint_last.pth", weights_only=True)
    stage1 = torch.load(straight / "checkpoint_best.pth", weights_only=True)["model"]
    assert all(torch.equal(ckpt["model"][f"stage1.{k}"], v) for k, v in stage1.items())  # stage 1 stayed frozen
    record = finetune_imagecode.main(common + ["--evaluate", "--opts", "stage=2", "split=test"])
    assert record["split"] == "test" and (s2 / "submission.json").is_file()

    ckpt = torch.load(s2 / "checkpoint_best.pth", weights_only=True)
    assert ckpt["format"] == "imagecode" and ckpt["config"]["stage"] == 2
    model, tokenizer, stored = model_from_checkpoint(s2 / "checkpoint_best.pth")
    assert stored["stage"] == 2 and not model.training
    enc = tokenizer(["a red circle"], return_tensors="pt")
    scores = score_candidates(model, torch.randn(2, 3, 32, 32), enc["input_ids"], enc["attention_mask"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_dry_run_writes_the_loss_of_the_first_batch_deterministically_and_no_checkpoint(ic, tmp_path, run_script):
    """``--dry_run`` of stage 1 (as a user runs it, with augmentation on, then again in-process
    without): the same finite cross-entropy ``loss`` both times (eval mode, test transform, file
    order), no checkpoint, log.txt or predictions. Stage 2 with ``cache_features`` gives the loss
    of the same batch without caching (stage 1 is frozen and in eval mode either way).
    ``--evaluate`` with it is refused."""
    import finetune_imagecode
    from models.factory import create_model
    from tasks.imagecode import ImageCodeConfig
    from utils.config import config_to_dict, load_config
    from utils.errors import UserError

    first_dir, again_dir = tmp_path / "dry", tmp_path / "again"
    run_script("finetune_imagecode.py", ["--config", ic["cfg"], "--output_dir", first_dir, "--no_progress", "--dry_run",
                                         "--opts", f"pretrained={ic['blip']}", "train_resize_only=false",
                                         "train_randaug=true", "train_hflip=true"])
    first = json.loads((first_dir / "dry_run.json").read_text())
    assert set(first["losses"]) == {"loss"} and first["batch_size"] == 4 and first["stage"] == 1
    assert torch.isfinite(torch.tensor(first["loss"])) and first["loss"] == first["losses"]["loss"] > 0
    assert _finetune(ic, again_dir, "--dry_run")["losses"] == first["losses"]
    for out in (first_dir, again_dir):
        assert not list(out.glob("checkpoint_*")) and not list(out.glob("*.txt")) and not list(out.glob("pred*"))

    cfg, _ = load_config(ic["cfg"], ImageCodeConfig)
    torch.manual_seed(1)
    stage1, _ = create_model(cfg, "imagecode", load=False)
    torch.save({"model": stage1.state_dict(), "format": stage1.checkpoint_format, "config": config_to_dict(cfg)},
               tmp_path / "stage1.pth")
    stage2 = [_finetune(ic, tmp_path / f"stage2_{cache}", "--dry_run",
                        opts=["stage=2", f"pretrained={tmp_path / 'stage1.pth'}", f"cache_features={cache}"])
              for cache in ("true", "false")]
    assert stage2[0]["stage"] == 2 and stage2[0]["losses"] == stage2[1]["losses"]
    assert torch.isfinite(torch.tensor(stage2[0]["loss"]))
    with pytest.raises(UserError, match="--dry_run .* cannot be combined with --evaluate"):
        _finetune(ic, tmp_path / "x", "--dry_run", "--evaluate")


@pytest.mark.slow
@pytest.mark.dist
def test_torchrun_two_processes_equal_one_process(ic, tmp_path, run_torchrun):
    opts = [f"pretrained={ic['blip']}", "max_epoch=1", "batch_size_train=5"]  # 23 descriptions: 2 steps either way
    run_torchrun("finetune_imagecode.py", ["--config", ic["cfg"], "--output_dir", tmp_path / "dist", "--no_progress",
                                           "--opts", *opts])
    _finetune(ic, tmp_path / "one", opts=["max_epoch=1", "batch_size_train=10"])
    dist, one = _log(tmp_path / "dist")[0], _log(tmp_path / "one")[0]
    assert dist["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
    assert dist["valid_acc"] == one["valid_acc"] and dist["valid_n"] == one["valid_n"]
    ca, cb = (torch.load(tmp_path / d / "checkpoint_last.pth", weights_only=True) for d in ("dist", "one"))
    assert ca["step"] == cb["step"] == 2
    a, b = ca["model"], cb["model"]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k


def test_head_init_itm_starts_stage1_at_the_itm_direction(ic):
    from models.imagecode import build_imagecode_model
    from models.tokenizer import build_tokenizer
    from tasks.imagecode import ImageCodeConfig
    from utils.config import load_config

    cfg, _ = load_config(ic["cfg"], ImageCodeConfig)
    model = build_imagecode_model(cfg, build_tokenizer(cfg.tokenizer))
    model.init_prediction_from_itm()
    head = model.backbone.blip.itm_head.weight
    cos = torch.nn.functional.cosine_similarity(model.prediction.weight[0], head[1] - head[0], dim=0)
    assert cos.item() == pytest.approx(1.0, abs=1e-6) and model.prediction.bias.item() == 0.0
