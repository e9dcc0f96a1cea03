"""``compile: true`` (utils/compile.py): the ViT blocks and text layers compiled in place with
inductor give the eager losses and gradients (fp32 within 1e-5, with gradient checkpointing and
across caption lengths, which the text layers' dynamic shapes serve), bf16 too, every block
compiled (none past dynamo's recompile limit, which would run it eager), and the state-dict keys
do not change. The entry-point runs (resume, torchrun) are in test_train_retrieval.py."""
from __future__ import annotations

import json

import pytest
import torch

from models.blip import BlipArch, ITCSettings, build_blip_retrieval
from utils.compile import RECOMPILE_LIMIT, compile_regions
from utils.precision import autocast

VOCAB = 1000


class _Tok(list):
    """What building the model asks of a tokenizer: its size and the [ENC] id."""
    enc_token_id = VOCAB - 1


def _model(tmp_path):
    med = tmp_path / "med.json"
    med.write_text(json.dumps({"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2,
                               "num_attention_heads": 2, "intermediate_size": 256, "encoder_width": 64}))
    arch = BlipArch(vit={"width": 64, "depth": 2, "heads": 2, "patch_size": 16}, image_size=64,
                    med_config=str(med), embed_dim=32)
    torch.manual_seed(0)
    model = build_blip_retrieval(arch, _Tok(range(VOCAB)), itc=ITCSettings(queue_size=32)).train()
    for m in model.modules():  # no dropout: eager and compiled must see the same function
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if hasattr(m, "dropout_p"):
            m.dropout_p = 0.0
    model.visual_encoder.ckpt_layer = 1  # the last block under gradient checkpointing
    return model


def _captions(n: int, g: torch.Generator):
    """[CLS] + 6-22 random ids + [SEP], padded to 35."""
    ids, mask = torch.zeros(n, 35, dtype=torch.long), torch.zeros(n, 35, dtype=torch.long)
    for i, L in enumerate(torch.randint(8, 25, (n,), generator=g).tolist()):
        ids[i, 0], ids[i, L - 1] = 101, 102
        ids[i, 1:L - 1] = torch.randint(200, VOCAB - 2, (L - 2,), generator=g)
        mask[i, :L] = 1
    return ids, mask


def _batches():
    g = torch.Generator().manual_seed(1)
    out = []
    for length in (35, 21):  # two caption lengths: the text layers' dynamic shapes serve both
        ids, mask = _captions(8, g)
        out.append((torch.randn(8, 3, 64, 64, generator=g), ids[:, :length], mask[:, :length]))
    return out


def _run(model, precision):
    records = []
    for i, (pixels, ids, mask) in enumerate(_batches()):
        with autocast(torch.device("cpu"), precision):
            losses = model(pixels, ids, mask, torch.arange(8), alpha=0.4, generator=torch.Generator().manual_seed(i))
        (losses["loss_ita"] + losses["loss_itm"]).backward()
        records.append(({k: v.item() for k, v in losses.items()},
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad(set_to_none=True)
    return records


@pytest.mark.slow  # torch.compile with inductor: a minute on one CPU thread
def test_compiled_blocks_give_the_eager_losses_and_gradients(tmp_path):
    model = _model(tmp_path)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def fresh_run(precision):  # each run moves the momentum encoders and the queue: start from `state`
        model.load_state_dict(state)
        return _run(model, precision)
    eager = {p: fresh_run(p) for p in ("fp32", "bf16")}
    keys = list(model.state_dict())
    assert compile_regions(model) == 2 * (2 + 2)  # ViT blocks + text layers, online and momentum
    assert list(model.state_dict()) == keys
    assert torch._dynamo.config.recompile_limit >= RECOMPILE_LIMIT
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # a block run eager: an error
        compiled = {p: fresh_run(p) for p in ("fp32", "bf16")}
    for (e_loss, e_grad), (c_loss, c_grad) in zip(eager["fp32"], compiled["fp32"]):
        assert e_loss.keys() == c_loss.keys()
        for k in e_loss:
            assert abs(e_loss[k] - c_loss[k]) <= 1e-5, (k, e_loss[k], c_loss[k])
        assert e_grad.keys() == c_grad.keys()
        for n in e_grad:
            assert torch.allclose(e_grad[n], c_grad[n], atol=1e-5, rtol=1e-4), n
    for (e_loss, _), (c_loss, _) in zip(eager["bf16"], compiled["bf16"]):
        for k in e_loss:  # bf16 rounds differently once ops are fused; same loss to bf16 precision
            assert abs(e_loss[k] - c_loss[k]) <= 2e-2 * max(1.0, abs(e_loss[k])), (k, e_loss[k], c_loss[k])
