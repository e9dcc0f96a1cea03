"""DLIP distillation: each term against a direct computation of its formula (docs/DLIP.md), the
released code's numbers on the dlip_tiny fixture (student + teacher saved by the release, the
losses of one forward as it computes them), 2 ranks = 1 process, and the teacher's checks."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from models import distill as D

REPO = Path(__file__).resolve().parents[1]
DLIP = REPO / "tests" / "fixtures" / "dlip_tiny"


# ---------------------------------------------------------------------- each term vs its formula

def _kl_rows(p_logits, q_logits):
    """sum over rows of KL(softmax(q) || softmax(p)), written out, divided by the row count."""
    total, rows = 0.0, 0
    for s_row, t_row in zip(p_logits.reshape(-1, p_logits.shape[-1]).double(),
                            q_logits.reshape(-1, q_logits.shape[-1]).double()):
        ps = [math.exp(v) for v in s_row.tolist()]
        pt = [math.exp(v) for v in t_row.tolist()]
        zs, zt = sum(ps), sum(pt)
        total += sum(b / zt * (math.log(b / zt) - math.log(a / zs)) for a, b in zip(ps, pt))
        rows += 1
    return total / rows


def test_cosine_term_is_one_minus_cosine():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    direct = sum(1 - float(a @ b) / (float(a.norm()) * float(b.norm())) for a, b in zip(s, t)) / 5
    assert D.cosine_distill(s, t).item() == pytest.approx(direct, abs=1e-6)
    # The release's nn.CosineEmbeddingLoss(margin=0.25) with target +1 is the same number.
    ref = torch.nn.CosineEmbeddingLoss(0.25)(s, t, torch.ones(5))
    assert D.cosine_distill(s, t).item() == pytest.approx(ref.item(), abs=1e-6)


@pytest.mark.parametrize("offset", [0, 3])
def test_soft_itc_term_matches_the_formula(offset):
    g = torch.Generator().manual_seed(1)
    B, K, E, alpha, temp = 3, 9, 4, 0.4, torch.tensor(0.07)
    n = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    img_s, txt_s = n(torch.randn(B, E, generator=g)), n(torch.randn(B, E, generator=g))
    img_t, txt_t = n(torch.randn(B, E, generator=g)), n(torch.randn(B, E, generator=g))
    img_k, txt_k = n(torch.randn(K, E, generator=g)), n(torch.randn(K, E, generator=g))

    def direction(q_s, q_t, keys):
        loss = 0.0
        for i in range(B):
            logits_t = [float(q_t[i] @ keys[j]) / 0.07 for j in range(K)]
            logits_s = [float(q_s[i] @ keys[j]) / 0.07 for j in range(K)]
            zt = sum(math.exp(v) for v in logits_t)
            zs = math.log(sum(math.exp(v) for v in logits_s))
            for j in range(K):
                target = alpha * math.exp(logits_t[j]) / zt + (1 - alpha) * (j == offset + i)
                loss -= target * (logits_s[j] - zs)
        return loss / B

    direct = (direction(img_s, img_t, txt_k) + direction(txt_s, txt_t, img_k)) / 2
    got = D.soft_itc_distill(img_s, txt_s, img_k, txt_k, img_t, txt_t, temp, alpha, offset=offset)
    assert got.item() == pytest.approx(direct, rel=1e-5)


def test_logit_kl_covers_every_shifted_position():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    direct = _kl_rows(s[:, :-1], t[:, :-1])        # 2 x 4 rows: the last position predicts nothing
    assert D.logit_kl(s, t, 1.0).item() == pytest.approx(direct, rel=1e-5)
    direct_t2 = _kl_rows(s[:, :-1] / 2, t[:, :-1] / 2)
    assert D.logit_kl(s, t, 2.0).item() == pytest.approx(direct_t2, rel=1e-5)


def test_attention_kl_rows_and_temperature():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 3, 4, 6, generator=g).softmax(-1)
    t = torch.randn(2, 3, 4, 6, generator=g).softmax(-1)
    # Rows: every (batch, head, query); the probabilities themselves are the logits, over 0.05.
    direct = _kl_rows(s / 0.05, t / 0.05)
    assert D.attention_kl(s, t, 0.05).item() == pytest.approx(direct, rel=1e-5)
    # The release's formula, as released (view(-1, keys) + KLDivLoss(sum) / rows).
    ref = torch.nn.KLDivLoss(reduction="sum")(torch.log_softmax(s.view(-1, 6) / 0.05, 1),
                                             torch.softmax(t.view(-1, 6) / 0.05, 1)) / s.view(-1, 6).shape[0]
    assert D.attention_kl(s, t, 0.05).item() == pytest.approx(ref.item(), rel=1e-6)


def test_attention_kl_with_different_head_counts_compares_head_averaged_maps():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(2, 2, 4, 6, generator=g).softmax(-1)   # student: 2 heads
    t = torch.randn(2, 6, 4, 6, generator=g).softmax(-1)   # teacher: 6 heads
    direct = _kl_rows(s.mean(1) / 0.05, t.mean(1) / 0.05)  # rows: (batch, query)
    assert D.attention_kl(s, t, 0.05).item() == pytest.approx(direct, rel=1e-5)
    with pytest.raises(ValueError, match="same queries and keys"):
        D.attention_kl(s, t[..., :5], 0.05)


# ---------------------------------------------------------------------- the released numbers

def _fixture_opts(**extra):
    F = DLIP
    opts = [f"pretrained={F / 'student.pth'}", f"teacher={F / 'teacher.pth'}", f"train_file=[{F / 'batch.json'}]",
            f"image_root={F}", "image_size=224", "batch_size_train=8",
            "vit={width: 64, depth: 2, heads: 4, patch_size: 16}", f"med_config={F / 'med_config_student.json'}",
            "teacher_vit={width: 96, depth: 2, heads: 4, patch_size: 16}",
            f"teacher_med_config={F / 'med_config_teacher.json'}", f"tokenizer={F / 'tokenizer'}", "embed_dim=32",
            "queue_size=16", "alpha=0.4", "num_workers=0"]
    return opts + [f"{k}={v}" for k, v in extra.items()]


def _assert_release_numbers(got: dict, ref: dict, names) -> None:
    for name in names:
        want = float(ref[name])
        tol = 0.01 * abs(want) if abs(want) < 1e-3 else 1e-5   # below 1e-3, fp32 noise dominates
        assert abs(got[name] - want) <= tol, f"{name}: ours {got[name]:.8g}, release {want:.8g}"


def test_dry_run_reproduces_the_released_losses(tmp_path, run_script):
    ref = torch.load(DLIP / "reference.pt", weights_only=True)
    out = tmp_path / "dry"
    run_script("pretrain_blip.py", ["--config", REPO / "configs" / "dlip_pretrain.yaml", "--dry_run",
                                    "--output_dir", out, "--opts", *_fixture_opts()])
    got = json.loads((out / "dry_run.json").read_text())
    _assert_release_numbers(got, ref, ("loss_ita", "loss_lm") + D.TERMS)
    assert sum(got[t] for t in D.TERMS) == pytest.approx(float(ref["loss_dist"]), abs=1e-5)
    assert set(got["losses"]) == {"loss_ita", "loss_itm", "loss_lm", *D.TERMS}
    assert not list(out.glob("checkpoint_*.pth"))  # a dry run trains nothing


def test_release_forward_in_process_queue_and_pixels(tmp_path):
    """The same forward called directly: the test transform gives the fixture's pixel values, the
    enqueue leaves the release's queue, and a training step moves the student only."""
    from models.factory import create_model, create_teacher
    from tasks.blip_pretrain import BlipPretrainConfig, build_dataset
    from data.collate import RetrievalCollator
    from utils.config import load_config

    ref = torch.load(DLIP / "reference.pt", weights_only=True)
    opts = _fixture_opts(output_dir=tmp_path)
    cfg, _ = load_config(REPO / "configs" / "dlip_pretrain.yaml", BlipPretrainConfig, opts)
    dataset = build_dataset(cfg, dry_run=True)
    student, tokenizer = create_model(cfg, "blip_pretrain")
    teacher = create_teacher(cfg, tokenizer)
    batch = RetrievalCollator(tokenizer, 30, dynamic_padding=False)([dataset[i] for i in range(8)])
    assert torch.allclose(batch["pixel_values"], ref["pixel_values"], atol=1e-6)
    assert batch["input_ids"].shape == (8, 30)

    student.eval()
    losses = student(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], torch.arange(8), alpha=0.4,
                     teacher=teacher, distill=cfg)
    _assert_release_numbers({k: v.item() for k, v in losses.items()}, ref, ("loss_ita", "loss_lm") + D.TERMS)
    assert torch.allclose(student.image_queue[:, 8:16], ref["image_queue_head"], atol=1e-6)
    assert int(student.queue_ptr) == int(ref["queue_ptr"]) == 0

    # The teacher is frozen and outside the student's module tree: a step changes the student only.
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert not any(k.startswith("teacher") for k in student.state_dict())
    before_t = {k: v.clone() for k, v in teacher.state_dict().items()}
    before_s = student.text_proj.weight.detach().clone()
    student.train()
    losses = student(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], torch.arange(8), alpha=0.4,
                     teacher=teacher, distill=cfg)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    torch.optim.SGD(student.parameters(), lr=0.1).step()
    assert not torch.equal(before_s, student.text_proj.weight)
    assert all(torch.equal(before_t[k], v) for k, v in teacher.state_dict().items())


def test_zero_weight_terms_are_skipped_and_teacher_mismatch_is_refused(tmp_path):
    from models.factory import create_model, create_teacher
    from tasks.blip_pretrain import BlipPretrainConfig
    from utils.config import load_config

    cfg = load_config(REPO / "configs" / "dlip_pretrain.yaml", BlipPretrainConfig,
                      _fixture_opts(output_dir=tmp_path, weight_kl=0, weight_Xattn=0))[0]
    assert cfg.distill_weights()["loss_kl"] == 0
    student, tokenizer = create_model(cfg, "blip_pretrain")
    teacher = create_teacher(cfg, tokenizer)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 40, (4, 12), generator=g)
    ids[:, 0] = tokenizer.cls_token_id
    losses = student.eval()(torch.randn(4, 3, 224, 224, generator=g), ids, torch.ones_like(ids), torch.arange(4),
                            alpha=0.4, teacher=teacher, distill=cfg)
    assert "loss_kl" not in losses and "loss_Xattn" not in losses and "loss_Sattn" in losses

    # A teacher of another embed_dim cannot be compared: refused in one message before any step.
    other = load_config(REPO / "configs" / "dlip_pretrain.yaml", BlipPretrainConfig,
                        _fixture_opts(output_dir=tmp_path, embed_dim=16))[0]
    small, tok = create_model(other, "blip_pretrain", load=False)
    with pytest.raises(ValueError, match="embed_dim: student 16, teacher 32"):
        D.check_teacher(small, teacher, other)
    # A checkpoint without a decoder is not a teacher.
    sd = {k: v for k, v in torch.load(DLIP / "teacher.pth", weights_only=True)["model"].items()
          if not k.startswith("text_decoder.")}
    torch.save({"model": sd}, tmp_path / "no_decoder.pth")
    bad = load_config(REPO / "configs" / "dlip_pretrain.yaml", BlipPretrainConfig,
                      _fixture_opts(output_dir=tmp_path, teacher=tmp_path / "no_decoder.pth"))[0]
    with pytest.raises(Exception, match="needs a text encoder and a decoder"):
        create_teacher(bad, tokenizer)


@pytest.mark.dist
def test_two_ranks_equal_one_process_for_the_itc_terms(tmp_path, run_script, run_torchrun):
    """With every rank's keys (``itc_all_rank_keys``) the mean over 2 ranks x 4 pairs equals one
    process on 8 for loss_ita and loss_ita_dist (and every other term but ITM, whose negatives are
    drawn at random, and the LM loss, a mean over tokens). This holds with the queues on too: both runs start from the same queues and
    enqueue the same 8 gathered features before the distillation keys are read (only their column
    order may differ, which a softmax does not see), so it is the stronger check."""
    opts = _fixture_opts(itc_all_rank_keys="true")
    one, two = tmp_path / "one", tmp_path / "two"
    run_script("pretrain_blip.py", ["--config", REPO / "configs" / "dlip_pretrain.yaml", "--dry_run",
                                    "--output_dir", one, "--opts", *opts])
    per_rank = [o for o in opts if not o.startswith("batch_size_train=")] + ["batch_size_train=4"]
    run_torchrun("pretrain_blip.py", ["--config", REPO / "configs" / "dlip_pretrain.yaml", "--dry_run",
                                      "--output_dir", two, "--opts", *per_rank])
    a = json.loads((one / "dry_run.json").read_text())
    b = json.loads((two / "dry_run.json").read_text())
    assert b["world_size"] == 2 and b["batch_size"] == 4
    # (loss_lm is a mean over each rank's kept tokens, whose counts differ: not compared.)
    for name in ("loss_ita", "loss_ita_dist", "loss_img_dist", "loss_text_dist", "loss_kl", "loss_Sattn"):
        assert b[name] == pytest.approx(a[name], abs=1e-5), name


@pytest.mark.slow
def test_distillation_trains_logs_every_term_and_saves_the_student_only(tmp_path, run_script):
    """Two epochs of distillation on the fixture's 8 pairs: log.txt has each term, weights apply,
    the checkpoint is the student alone (it loads back strictly), and the teacher file is unchanged."""
    out = tmp_path / "run"
    teacher_before = torch.load(DLIP / "teacher.pth", weights_only=True)["model"]
    run_script("pretrain_blip.py", ["--config", REPO / "configs" / "dlip_pretrain.yaml", "--output_dir", out,
                                    "--no_progress", "--opts", *_fixture_opts(), "max_epoch=2", "warmup_steps=1",
                                    "init_lr=1e-3", "weight_kl=2.0", "log_every=1"])
    records = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert len(records) == 2
    assert {f"train_{t}" for t in ("loss_ita", "loss_itm", "loss_lm") + D.TERMS} <= set(records[0])
    ckpt = torch.load(out / "checkpoint_last.pth", weights_only=True)
    assert ckpt["format"] == "blip" and not any(k.startswith("teacher") for k in ckpt["model"])
    assert ckpt["model"]["visual_encoder.pos_embed"].shape[-1] == 64   # the student's width
    assert ckpt["config"]["weight_kl"] == 2.0
    teacher_after = torch.load(DLIP / "teacher.pth", weights_only=True)["model"]
    assert all(torch.equal(teacher_before[k], teacher_after[k]) for k in teacher_before)

    from models.factory import create_model
    from tasks.blip_pretrain import BlipPretrainConfig
    from utils.config import load_config
    cfg = load_config(REPO / "configs" / "dlip_pretrain.yaml", BlipPretrainConfig,
                      _fixture_opts(output_dir=tmp_path / "x", pretrained=out / "checkpoint_last.pth",
                                    strict_load="true"))[0]
    create_model(cfg, "blip_pretrain")   # strict: every key of the student, nothing missing


def test_distillation_losses_release_and_teacher_itc_variants():
    """``distillation_losses`` wires each term to the right views: release ITC targets use the
    student's temperature and [teacher batch ; student queue] keys; the ``teacher`` variant uses the
    teacher's temperature and the teacher's batch only. Heads differ here (2 vs 4): averaged maps."""
    from types import SimpleNamespace
    g = torch.Generator().manual_seed(5)
    n = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    B, E, T, N, V = 3, 8, 5, 7, 11

    def views(heads, width):
        return D.Views(n(torch.randn(B, E, generator=g)), n(torch.randn(B, E, generator=g)),
                       torch.randn(B, width, generator=g),
                       (torch.randn(B, heads, T, T, generator=g).softmax(-1),
                        torch.randn(B, heads, T, N, generator=g).softmax(-1)),
                       torch.randn(B, width, generator=g), torch.randn(B, T, V, generator=g),
                       torch.randn(B, heads, T, T, generator=g).softmax(-1))

    s, t = views(2, 6), views(4, 10)
    student = SimpleNamespace(temp=torch.tensor(0.07), text_proj=torch.nn.Linear(6, E), itc_all_rank_keys=False)
    teacher = SimpleNamespace(temp=torch.tensor(0.05), text_proj=torch.nn.Linear(10, E))
    qi, qt = n(torch.randn(4, E, generator=g)), n(torch.randn(4, E, generator=g))
    release = D.distillation_losses(student, teacher, s, t, qi, qt, 0.4, D.DistillSettings())
    assert set(release) == set(D.TERMS)
    want = D.soft_itc_distill(s.image_feat, s.text_feat, torch.cat([t.image_feat, qi]), torch.cat([t.text_feat, qt]),
                              t.image_feat, t.text_feat, torch.tensor(0.07), 0.4)
    assert release["loss_ita_dist"].item() == pytest.approx(want.item(), rel=1e-6)
    assert release["loss_vl_dist"].item() == pytest.approx(
        D.cosine_distill(student.text_proj(s.vl_state), teacher.text_proj(t.vl_state)).item(), rel=1e-6)
    assert release["loss_Xattn"].item() == pytest.approx(
        D.row_kl(s.mm_attentions[1].mean(1), t.mm_attentions[1].mean(1), 0.05).item(), rel=1e-6)
    clean = D.distillation_losses(student, teacher, s, t, qi, qt, 0.4,
                                  D.DistillSettings(distill_itc_targets="teacher"))
    want = D.soft_itc_distill(s.image_feat, s.text_feat, t.image_feat, t.text_feat, t.image_feat, t.text_feat,
                              torch.tensor(0.07), 0.4, temp_t=torch.tensor(0.05))
    assert clean["loss_ita_dist"].item() == pytest.approx(want.item(), rel=1e-6)
    assert clean["loss_ita_dist"].item() != pytest.approx(release["loss_ita_dist"].item(), rel=1e-3)


@pytest.mark.dist
@pytest.mark.parametrize("batch", ["batch_size_train=4", "batch_size_train=2 accum_freq=2"])
def test_distillation_trains_under_torchrun(tmp_path, run_torchrun, batch):
    """2 ranks x 4 pairs: DDP carries the student, the teacher rides along as a forward argument;
    or 2 ranks x 2 micro-batches of 2 (feature-cached accumulation, no DDP wrapper)."""
    out = tmp_path / "ddp"
    opts = [o for o in _fixture_opts() if not o.startswith("batch_size_train=")]
    run_torchrun("pretrain_blip.py", ["--config", REPO / "configs" / "dlip_pretrain.yaml", "--output_dir", out,
                                      "--no_progress", "--opts", *opts, *batch.split(), "max_epoch=1",
                                      "warmup_steps=1"])
    record = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert all(math.isfinite(record[f"train_{t}"]) for t in D.TERMS)
    ckpt = torch.load(out / "checkpoint_last.pth", weights_only=True)
    assert ckpt["step"] == 1 and not any(k.startswith("teacher") for k in ckpt["model"])


def test_unknown_teacher_vit_is_a_config_error():
    from tasks.blip_pretrain import BlipPretrainConfig
    from utils.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="teacher_vit.*got 'huge'"):
        load_config(REPO / "configs" / "dlip_pretrain.yaml", BlipPretrainConfig, ["teacher_vit=huge"])
