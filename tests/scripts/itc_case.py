"""One ITC step of a tiny BLIP on a fixed global batch of 8 (queue and alpha off): this rank's
share of the loss and gradients. Shared by the single-process and torchrun sides of the test."""
import json
import tempfile
from pathlib import Path

import torch

from models.blip import build_blip_retrieval
from tasks.retrieval import RetrievalConfig

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "blip_official_tiny"


def itc_case(rank: int, world: int):
    from models.tokenizer import build_tokenizer
    tok = build_tokenizer(str(FIXTURE / "tokenizer"))
    with tempfile.TemporaryDirectory() as tmp:
        med = Path(tmp) / "med.json"
        med.write_text(json.dumps({"vocab_size": None, "hidden_size": 32, "num_hidden_layers": 2,
                                   "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 40,
                                   "encoder_width": 32}))
        cfg = RetrievalConfig(vit={"width": 32, "depth": 2, "heads": 4, "patch_size": 8}, image_size=32,
                              med_config=str(med), embed_dim=16, queue_size=64)
        torch.manual_seed(0)
        model = build_blip_retrieval(cfg, tok, itc=cfg).eval()  # eval: no dropout, so both sides are deterministic
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(8, 3, 32, 32, generator=g)
    ids = torch.randint(8, 48, (8, 12), generator=g)
    ids[:, 0] = 5
    mask = torch.ones(8, 12, dtype=torch.long)
    mask[::2, 9:] = 0
    idx = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])
    share = slice(rank * 8 // world, (rank + 1) * 8 // world)
    losses = model(pixels[share], ids[share], mask[share], idx[share], alpha=0.0, use_queue=False,
                   generator=torch.Generator().manual_seed(rank))
    losses["loss_ita"].backward()
    names = ["visual_encoder.blocks.0.attn.qkv.weight", "text_encoder.encoder.layer.1.output.dense.weight",
             "vision_proj.weight", "text_proj.weight", "temp"]
    params = dict(model.named_parameters())
    return losses["loss_ita"], {n: params[n].grad.clone() for n in names}
