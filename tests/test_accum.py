"""Feature-cached accumulation (models/accum.py, ``accum_freq``): k micro-batches of B give the
losses and gradients of one batch of kB (every parameter, fp32, <= 1e-5), with the queue on and
off, with the same ITM negatives drawn; after an optimiser step the momentum encoders and the queues
equal the large-batch run's. The naive accumulation (``grad_accum_steps``) does not."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from models.accum import feature_cached_step

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "blip_official_tiny"
K, B = 4, 3


def _model(tmp_path, queue_size=24):
    from models.blip import build_blip_retrieval
    from models.tokenizer import build_tokenizer
    from tasks.retrieval import RetrievalConfig
    med = tmp_path / "med.json"
    # No dropout: a batch of kB and k batches of B cannot draw the same masks.
    med.write_text(json.dumps({"vocab_size": None, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                               "intermediate_size": 64, "max_position_embeddings": 40, "encoder_width": 32,
                               "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}))
    cfg = RetrievalConfig(vit={"width": 32, "depth": 2, "heads": 2, "patch_size": 16}, image_size=32,
                          med_config=str(med), tokenizer=str(FIXTURE / "tokenizer"), embed_dim=16,
                          queue_size=queue_size)
    torch.manual_seed(0)
    model = build_blip_retrieval(cfg, build_tokenizer(cfg.tokenizer), itc=cfg)
    return model.train()


def _data():
    g = torch.Generator().manual_seed(1)
    n = K * B
    pixels = torch.randn(n, 3, 32, 32, generator=g)
    lengths = torch.randint(4, 12, (n,), generator=g)
    ids = torch.randint(8, 46, (n, 12), generator=g)  # the fixture tokenizer's 48 words
    ids[:, 0] = 5  # [CLS]
    mask = (torch.arange(12)[None] < lengths[:, None]).long()
    ids = ids * mask
    idx = torch.arange(n) // 2  # two captions per image id, as in COCO's train list
    micro = []
    for m in range(K):
        rows = slice(m * B, (m + 1) * B)
        T = int(lengths[rows].max())  # each micro-batch padded to its own longest, as the collator does
        micro.append({"pixel_values": pixels[rows], "input_ids": ids[rows, :T], "attention_mask": mask[rows, :T],
                      "idx": idx[rows]})
    T = int(lengths.max())
    big = {"pixel_values": pixels, "input_ids": ids[:, :T], "attention_mask": mask[:, :T], "idx": idx}
    return big, micro


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _big_step(model, big, use_queue, seed=7):
    losses = model.contrastive_and_matching(big["pixel_values"], big["input_ids"], big["attention_mask"], big["idx"],
                                            alpha=0.4, use_queue=use_queue,
                                            generator=torch.Generator().manual_seed(seed))[0]
    sum(losses.values()).backward()
    return {k: v.detach() for k, v in losses.items()}


def _cached_step(model, micro, use_queue, seed=7):
    return feature_cached_step(model, micro, 0.4, torch.Generator().manual_seed(seed), lambda loss: loss.backward(),
                               use_queue=use_queue)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("use_queue,grad_ckpt", [(True, False), (False, False), (True, True)])
def test_k_micro_batches_give_the_losses_and_gradients_of_one_large_batch(tmp_path, use_queue, grad_ckpt):
    big, micro = _data()
    a = _model(tmp_path)
    b = copy.deepcopy(a)
    b.visual_encoder.ckpt_layer = 2 if grad_ckpt else 0  # gradient checkpointing in the accumulated model
    la = _big_step(a, big, use_queue)
    lb = _cached_step(b, micro, use_queue)
    for k in ("loss_ita", "loss_itm"):
        assert lb[k].item() == pytest.approx(la[k].item(), abs=1e-6)
    ga, gb = _grads(a), _grads(b)
    assert len(ga) > 40 and "temp" in ga and "itm_head.weight" in ga
    diff = _max_diff(ga, gb)
    print(f"feature-cached vs one batch of {K * B} (queue {'on' if use_queue else 'off'}, ViT gradient checkpointing "
          f"{'on' if grad_ckpt else 'off'}): max |grad diff| {diff:.3g}")
    assert diff <= 1e-5


def test_one_optimiser_step_leaves_the_same_weights_momentum_encoders_and_queues(tmp_path):
    big, micro = _data()
    a = _model(tmp_path)
    b = copy.deepcopy(a)
    opt_a = torch.optim.SGD([p for p in a.parameters() if p.requires_grad], lr=0.5)
    opt_b = torch.optim.SGD([p for p in b.parameters() if p.requires_grad], lr=0.5)
    for step in range(2):  # the second forward's momentum update reads the stepped weights
        _big_step(a, big, True, seed=step)
        _cached_step(b, micro, True, seed=step)
        opt_a.step(), opt_b.step()
        opt_a.zero_grad(), opt_b.zero_grad()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    diff = {k: (sa[k].float() - sb[k].float()).abs().max().item() for k in sa}
    assert max(diff.values()) <= 1e-5, sorted(diff.items(), key=lambda kv: -kv[1])[:5]
    assert a._ptr == b._ptr == 2 * K * B % 24
    assert any(k.endswith("_m.cls_token") or "visual_encoder_m" in k for k in diff)


def test_naive_accumulation_is_not_the_large_batch(tmp_path):
    """grad_accum_steps' way: k forwards of B, each with its own ITC over B (fewer negatives), its
    own momentum update and enqueue, losses / k. Its gradients differ from the large batch's by
    orders of magnitude more than the feature-cached ones, and after a step its momentum encoders
    have moved k EMA steps (0.995^k) instead of one."""
    big, micro = _data()
    a = _model(tmp_path)
    c = copy.deepcopy(a)
    opt_a = torch.optim.SGD([p for p in a.parameters() if p.requires_grad], lr=0.5)
    opt_c = torch.optim.SGD([p for p in c.parameters() if p.requires_grad], lr=0.5)
    for step in range(2):
        _big_step(a, big, True, seed=step)
        gen = torch.Generator().manual_seed(step)
        for m in micro:
            losses = c.contrastive_and_matching(m["pixel_values"], m["input_ids"], m["attention_mask"], m["idx"],
                                                alpha=0.4, generator=gen)[0]
            (sum(losses.values()) / K).backward()
        if step == 0:
            naive = _max_diff(_grads(a), _grads(c))
        opt_a.step(), opt_c.step()
        opt_a.zero_grad(), opt_c.zero_grad()
    assert naive > 1e-3  # vs <= 1e-5 for the feature-cached step
    ema = max((p - q).abs().max().item() for p, q in zip(a.visual_encoder_m.parameters(),
                                                          c.visual_encoder_m.parameters()))
    assert ema > 1e-4
    print(f"naive accumulation: max |grad diff| {naive:.3g} at step 0; momentum encoder diff after 2 steps {ema:.3g}")


def _no_dropout_config(make, tmp_path, data, **overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = make(tmp_path, data, val_file=None, max_epoch=1, log_every=1, **overrides)
    med = json.loads((tmp_path / "med_tiny.json").read_text())
    med.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (tmp_path / "med_tiny.json").write_text(json.dumps(med))
    return cfg


@pytest.mark.slow
def test_train_retrieval_with_accum_freq_follows_the_large_batch_run(tmp_path, synthetic_small, tiny_train_config,
                                                                    run_script):
    """train_retrieval.py, batch 4 x accum_freq 4 against batch 16 (no dropout, same seed): the same
    data, alpha ramp, negatives and steps, so the same epoch losses up to float rounding."""
    runs = {}
    for name, batch, k in (("big", 16, 1), ("accum", 4, 4)):
        cfg = _no_dropout_config(tiny_train_config, tmp_path / name, synthetic_small, batch_size_train=batch,
                                 accum_freq=k, deterministic="false")
        run_script("train_retrieval.py", ["--config", cfg, "--output_dir", tmp_path / name / "out", "--no_progress"])
        runs[name] = json.loads((tmp_path / name / "out" / "log.txt").read_text())
    for key in ("train_loss_ita", "train_loss_itm"):
        assert runs["accum"][key] == pytest.approx(runs["big"][key], rel=1e-4, abs=1e-5)


@pytest.mark.slow
@pytest.mark.dist
def test_accum_freq_under_torchrun(tmp_path, synthetic_small, tiny_train_config, run_torchrun):
    """2 ranks x accum_freq 2 x batch 4 (a virtual batch of 16): trains, rank 0 checkpoints, and the
    ranks hold the same weights (gradients averaged once per virtual batch, no DDP wrapper)."""
    cfg = tiny_train_config(tmp_path, synthetic_small, val_file=None, max_epoch=1, batch_size_train=4, accum_freq=2)
    run_torchrun("train_retrieval.py", ["--config", cfg, "--output_dir", tmp_path / "out", "--no_progress"])
    record = json.loads((tmp_path / "out" / "log.txt").read_text())
    assert record["train_loss_ita"] > 0 and "test_r_mean" in record


@pytest.mark.slow
def test_bf16_training_on_cpu(tmp_path, synthetic_small, tiny_train_config, run_script):
    """precision: bf16 trains on CPU (autocast on CPU): retrieval plainly and with accum_freq, BLIP
    pretraining with accum_freq."""
    for name, k, epochs in (("plain", 1, 2), ("accum", 2, 1)):
        (tmp_path / name).mkdir()
        cfg = tiny_train_config(tmp_path / name, synthetic_small, val_file=None, max_epoch=epochs, batch_size_train=8,
                                precision="bf16", accum_freq=k, init_lr=2e-3)
        run_script("train_retrieval.py", ["--config", cfg, "--output_dir", tmp_path / name / "out", "--no_progress"])
        records = [json.loads(line) for line in (tmp_path / name / "out" / "log.txt").read_text().splitlines()]
        assert all(r["train_loss_ita"] == r["train_loss_ita"] for r in records)  # finite (not NaN)
        assert len(records) == 1 or records[1]["train_loss_ita"] < records[0]["train_loss_ita"]  # it learns
    # BLIP pretraining, accum_freq 2, bf16.
    train = synthetic_small / "retrieval" / "annotation" / "synthetic_train.json"
    cfg = tiny_train_config(tmp_path, synthetic_small, dataset=None, ann_root=None, val_file=None, test_file=None,
                            k_test=None, batch_size_test=None, train_file=f"[{train}]", max_epoch=1,
                            batch_size_train=8, precision="bf16", accum_freq=2)
    run_script("pretrain_blip.py", ["--config", cfg, "--output_dir", tmp_path / "pre", "--no_progress"])
    record = json.loads((tmp_path / "pre" / "log.txt").read_text())
    assert {"train_loss_ita", "train_loss_itm", "train_loss_lm"} <= set(record)
    assert all(v == v for k, v in record.items() if k.startswith("train_loss"))


def test_blip_pretraining_itc_itm_lm_accumulate_to_the_large_batch(tmp_path):
    """BLIP pretraining (ITC + ITM + LM with the tied decoder; each pair its own class): the LM
    term is a mean over the virtual batch's tokens, so 4 micro-batches give the batch of 12."""
    from models.blip_pretrain import build_blip_pretrain
    from models.tokenizer import build_tokenizer
    from tasks.blip_pretrain import BlipPretrainConfig
    _model(tmp_path)  # writes med.json
    cfg = BlipPretrainConfig(vit={"width": 32, "depth": 2, "heads": 2, "patch_size": 16}, image_size=32,
                             med_config=str(tmp_path / "med.json"), tokenizer=str(FIXTURE / "tokenizer"),
                             embed_dim=16, queue_size=24, train_file="x.json")
    torch.manual_seed(0)
    a = build_blip_pretrain(cfg, build_tokenizer(cfg.tokenizer), itc=cfg).train()
    b = copy.deepcopy(a)
    big, micro = _data()
    big["idx"] = torch.arange(K * B)
    for m, batch in enumerate(micro):
        batch["idx"] = torch.arange(m * B, (m + 1) * B)
    la = a(big["pixel_values"], big["input_ids"], big["attention_mask"], big["idx"], alpha=0.4,
           generator=torch.Generator().manual_seed(3))
    sum(la.values()).backward()
    lb = b.accumulated(micro, 0.4, torch.Generator().manual_seed(3), lambda loss: loss.backward())
    assert set(lb) == {"loss_ita", "loss_itm", "loss_lm"}
    for k in lb:
        assert lb[k].item() == pytest.approx(la[k].item(), abs=1e-6)
    ga, gb = _grads(a), _grads(b)
    assert any(n.startswith("text_decoder.") for n in ga)
    assert _max_diff(ga, gb) <= 1e-5


def test_dlip_distillation_accumulates_to_the_large_batch(tmp_path):
    """DLIP distillation (every term, weight 1, release ITC targets, a 2-head teacher for a 2-head
    student): the weighted total of 4 micro-batches has the gradients of the batch of 12."""
    from models.blip_pretrain import build_blip_pretrain
    from models.tokenizer import build_tokenizer
    from tasks.blip_pretrain import BlipPretrainConfig, pretrain_loss
    _model(tmp_path)
    cfg = BlipPretrainConfig(vit={"width": 32, "depth": 2, "heads": 2, "patch_size": 16}, image_size=32,
                             med_config=str(tmp_path / "med.json"), tokenizer=str(FIXTURE / "tokenizer"),
                             embed_dim=16, queue_size=24, train_file="x.json", max_tokens=12, alpha_ramp_epochs=0)
    tok = build_tokenizer(cfg.tokenizer)
    torch.manual_seed(1)
    teacher = build_blip_pretrain(cfg, tok).eval().requires_grad_(False)
    torch.manual_seed(0)
    a = build_blip_pretrain(cfg, tok, itc=cfg).train()
    b = copy.deepcopy(a)
    big, micro = _data()
    # Distillation pads every caption to max_tokens (as the collator does then).
    for d in [big] + micro:
        d["input_ids"] = torch.nn.functional.pad(d["input_ids"], (0, 12 - d["input_ids"].shape[1]))
        d["attention_mask"] = torch.nn.functional.pad(d["attention_mask"], (0, 12 - d["attention_mask"].shape[1]))
    loss_fn = pretrain_loss(cfg, teacher)
    ctx = {"epoch": 0, "batch_index": 0, "batches_per_epoch": 1}
    la = loss_fn(a, big, {**ctx, "generator": torch.Generator().manual_seed(3)})
    sum(la.values()).backward()
    lb = loss_fn.accumulated(b, micro, {**ctx, "generator": torch.Generator().manual_seed(3)},
                             lambda loss: loss.backward())
    assert set(lb) == set(la) and len(la) == 12  # ita, itm, lm + the nine terms
    for k in la:
        assert lb[k].item() == pytest.approx(la[k].item(), rel=1e-5, abs=1e-6), k
    ga, gb = _grads(a), _grads(b)
    diff = _max_diff(ga, gb)
    print(f"DLIP distillation, feature-cached vs one batch of {K * B}: max |grad diff| {diff:.3g}")
    # 1e-5, relative where a gradient is above 1: temp's is ~59 here (float32's step there is 3.8e-6).
    for k in ga:
        assert (ga[k] - gb[k]).abs().max().item() <= 1e-5 * max(1.0, ga[k].abs().max().item()), k
