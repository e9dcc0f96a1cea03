"""BLIP captioning: the official captioner fixture reproduced (loss, logits, beam and greedy captions
token for token, through train_caption.py as a user runs it), metrics equal to pycocoevalcap by
hand, checkpoint layouts, 2-rank evaluation, exact resume after SIGKILL, --dry_run."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "blip_caption_tiny"
TINY_VIT = "{width: 64, depth: 2, heads: 4, patch_size: 16}"
SETTINGS = {"beam3_max20_min5": (3, 20, 5), "greedy_max20_min5": (1, 20, 5), "beam3_max30_min10": (3, 30, 10)}


@pytest.fixture(scope="module")
def ref():
    return torch.load(FIX / "reference.pt", weights_only=True)


@pytest.fixture(scope="module")
def captioner():
    from models.caption import CaptionArch, build_captioner
    from models.factory import load_weights
    from models.tokenizer import build_tokenizer
    tok = build_tokenizer(str(FIX / "tokenizer"))
    arch = CaptionArch(vit={"width": 64, "depth": 2, "heads": 4, "patch_size": 16}, image_size=64,
                       med_config=str(FIX / "med_config.json"))
    model = build_captioner(arch, tok).eval()
    result = load_weights(model, str(FIX / "checkpoint.pth"), strict=True)
    assert result.format == "blip-caption" and result.blip.is_clean and result.blip.num_loaded == 94
    return model


def test_lm_loss_and_logits_match_the_original(captioner, ref):
    with torch.no_grad():
        loss = captioner(ref["pixel_values"], ref["input_ids"], ref["attention_mask"])["loss_lm"]
        logits = captioner.logits(ref["pixel_values"][:2], ref["input_ids"][:2], ref["attention_mask"][:2])
    assert abs(loss.item() - ref["loss_lm"].item()) <= 1e-5
    assert (logits - ref["logits_first2"]).abs().max().item() <= 1e-4
    # The prompt 'a picture of ' is [DEC] + 3 tokens; the first id becomes [DEC] (48).
    assert captioner.prompt_length == 4 and captioner.prompt_input_ids[0].item() == 48


def test_loss_ignores_prompt_and_padding(captioner, ref):
    ids, mask = ref["input_ids"].clone(), ref["attention_mask"].clone()
    mask[1, -3:] = 0  # a shorter caption: its last 3 positions are padding
    ids[1, -3:] = 0
    dec, targets = captioner.decoder_inputs(ids, mask)
    assert (dec[:, 0] == 48).all()
    assert (targets[:, :4] == -100).all()
    assert (targets[mask == 0] == -100).all() and (targets[:, 4:][mask[:, 4:] == 1] != -100).all()
    # A padded position's id changes nothing (causal attention never sees padding).
    changed = ids.clone()
    changed[1, -3:] = 7
    with torch.no_grad():
        a = captioner(ref["pixel_values"], ids, mask)["loss_lm"]
        b = captioner(ref["pixel_values"], changed, mask)["loss_lm"]
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_generation_is_token_identical_with_and_without_the_cache(captioner, ref, name):
    from models.generation import GenerationSettings
    nb, mx, mn = SETTINGS[name]
    s = GenerationSettings(num_beams=nb, max_length=mx, min_length=mn)
    cached = captioner.generate_ids(ref["pixel_values"], s, use_cache=True)
    recomputed = captioner.generate_ids(ref["pixel_values"], s, use_cache=False)
    assert torch.equal(cached, ref[f"{name}_ids"])
    assert torch.equal(recomputed, ref[f"{name}_ids"])
    assert captioner.decode(cached) == ref[name]


def test_batched_generation_equals_one_image_at_a_time(captioner, ref):
    from models.generation import GenerationSettings
    s = GenerationSettings(num_beams=3, max_length=20, min_length=5)
    one = [captioner.decode(captioner.generate_ids(ref["pixel_values"][i:i + 1], s))[0] for i in range(3)]
    assert one == ref["beam3_max20_min5"][:3]


def test_sampling_is_seeded_and_follows_top_p(captioner, ref):
    images = ref["pixel_values"][:2]

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return captioner.generate(images, sample=True, top_p=0.9, repetition_penalty=1.1, max_length=20,
                                  min_length=5, num_return_sequences=3, generator=g)
    a, b = draw(0), draw(0)
    assert a == b and len(a) == 6
    assert any(draw(s) != a for s in (1, 2, 3))
    # top_p -> 0 keeps only the most likely token: sampling becomes greedy.
    g = torch.Generator().manual_seed(0)
    near_greedy = captioner.generate(images, sample=True, top_p=1e-6, max_length=20, min_length=5, generator=g)
    assert near_greedy == ref["greedy_max20_min5"][:2]


def test_num_return_sequences_of_beam_search_are_the_best_beams(captioner, ref):
    out = captioner.generate(ref["pixel_values"][:2], num_beams=3, max_length=20, min_length=5,
                             num_return_sequences=2)
    assert len(out) == 4 and out[0] == ref["beam3_max20_min5"][0] and out[2] == ref["beam3_max20_min5"][1]


def test_pretraining_layout_loads_text_decoder_key_for_key(captioner, tmp_path):
    """A model_base.pth-style state dict (built from shapes: encoder, momentum copies, queues,
    queue_ptr, and the decoder) loads every text_decoder.* key; the rest are expected extras."""
    from models.factory import load_weights
    from models.formats import checkpoint_format
    own = captioner.state_dict()
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone() for k, v in own.items()}
    # Tied in BLIP (as in BERT): the checkpoint holds each tied tensor under both names.
    state["text_decoder.cls.predictions.decoder.weight"] = state["text_decoder.bert.embeddings.word_embeddings.weight"]
    state["text_decoder.cls.predictions.decoder.bias"] = state["text_decoder.cls.predictions.bias"]
    extras = {}
    for k, v in own.items():
        if k.startswith("text_decoder.bert."):
            extras["text_encoder." + k[len("text_decoder.bert."):]] = torch.zeros_like(v)
            extras["text_encoder_m." + k[len("text_decoder.bert."):]] = torch.zeros_like(v)
        if k.startswith("visual_encoder."):
            extras["visual_encoder_m." + k[len("visual_encoder."):]] = torch.zeros_like(v)
    extras.update({"vision_proj.weight": torch.zeros(256, 64), "text_proj.weight": torch.zeros(256, 64),
                   "itm_head.weight": torch.zeros(2, 64), "temp": torch.tensor(0.07),
                   "image_queue": torch.zeros(256, 8), "text_queue": torch.zeros(256, 8),
                   "queue_ptr": torch.zeros(1, dtype=torch.long)})
    ckpt = {"model": {**state, **extras}}
    assert checkpoint_format(ckpt) == "blip"
    import copy
    model = copy.deepcopy(captioner)
    report = load_weights(model, ckpt, strict=True).blip
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert set(report.expected_extra) == set(extras)
    loaded = model.state_dict()
    for k in own:
        if k.startswith("text_decoder."):
            assert torch.equal(loaded[k], state[k]), k


def test_a_caption_checkpoint_is_refused_by_a_retrieval_model():
    from models.blip import BlipArch, build_blip_retrieval
    from models.factory import load_weights
    from models.tokenizer import build_tokenizer
    from utils.errors import CheckpointError
    tok = build_tokenizer(str(FIX / "tokenizer"))
    arch = BlipArch(vit={"width": 64, "depth": 2, "heads": 4, "patch_size": 16}, image_size=64,
                    med_config=str(FIX / "med_config.json"))
    with pytest.raises(CheckpointError, match="captioning checkpoint"):
        load_weights(build_blip_retrieval(arch, tok), str(FIX / "checkpoint.pth"))


# ---------------------------------------------------------------------- through train_caption.py

def _fixture_opts(**extra):
    opts = {"dataset": "custom", "image_root": FIX, "ann_root": FIX, "test_file": "test.json",
            "pretrained": FIX / "checkpoint.pth", "vit": TINY_VIT, "image_size": 64,
            "med_config": FIX / "med_config.json", "tokenizer": FIX / "tokenizer", "num_beams": 3,
            "max_length": 20, "min_length": 5, "num_workers": 0, "device": "cpu", "batch_size": 3}
    opts.update(extra)
    return [f"{k}={v}" for k, v in opts.items()]


def _evaluate(run, out, **extra):
    args = ["--config", str(REPO / "configs" / "caption_coco.yaml"), "--evaluate", "--output_dir", str(out),
            "--opts", *_fixture_opts(**extra)]
    return run("train_caption.py", args)


@pytest.mark.slow
def test_train_caption_evaluate_reproduces_the_original_and_pycocoevalcap(tmp_path, run_script, ref):
    out = tmp_path / "eval"
    _evaluate(run_script, out, spice="false")
    results = json.loads((out / "captions_test.json").read_text())
    entries = json.loads((FIX / "test.json").read_text())
    assert [r["image_id"] for r in results] == [e["image"] for e in entries]  # custom data: the path as written
    assert [r["caption"] for r in results] == ref["beam3_max20_min5"]
    lines = (out / "evaluate.txt").read_text().splitlines()
    assert len(lines) == 1
    ours = json.loads(lines[0])
    expected = _pycocoevalcap(out / "captions_test.json", FIX / "test.json")
    assert set(ours) == {f"test_{k}" for k in expected}
    for k, v in expected.items():
        assert ours[f"test_{k}"] == v, k
    # BLIP's *_gt.json references (coco_gt_root: <annotation stem>_gt.json) give the same scores.
    gt_root = tmp_path / "gt"
    gt_root.mkdir()
    (out / "gt_by_hand.json").rename(gt_root / "test_gt.json")
    _evaluate(run_script, tmp_path / "with_gt", spice="false", coco_gt_root=gt_root)
    assert json.loads((tmp_path / "with_gt" / "evaluate.txt").read_text()) == ours


def _pycocoevalcap(results_file: Path, annotation: Path) -> dict:
    """pycocoevalcap run by hand as captioning papers do: COCO gt file (built from the annotation
    json), ``coco.loadRes``, ``COCOEvalCap`` with its own scorers except SPICE (offline here)."""
    from pycocotools.coco import COCO
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    entries = json.loads(annotation.read_text())
    gt = {"images": [{"id": e["image"]} for e in entries],
          "annotations": [{"image_id": e["image"], "id": i * 10 + j, "caption": c}
                          for i, e in enumerate(entries) for j, c in enumerate(e["caption"])],
          "type": "captions", "info": {}, "licenses": []}
    gt_file = results_file.parent / "gt_by_hand.json"
    gt_file.write_text(json.dumps(gt))
    coco = COCO(str(gt_file))
    res = coco.loadRes(str(results_file))
    ids = res.getImgIds()
    gts = {i: coco.imgToAnns[i] for i in ids}
    rs = {i: res.imgToAnns[i] for i in ids}
    tok = PTBTokenizer()
    gts, rs = tok.tokenize(gts), tok.tokenize(rs)
    scores = {}
    meteor = Meteor()
    try:
        for scorer, names in [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]), (meteor, ["METEOR"]),
                              (Rouge(), ["ROUGE_L"]), (Cider(), ["CIDEr"])]:
            score, _ = scorer.compute_score(gts, rs)
            scores.update(zip(names, score) if len(names) > 1 else {names[0]: score})
    finally:
        with meteor.lock:
            meteor.meteor_p.stdin.close()
            meteor.meteor_p.kill()
            meteor.meteor_p.wait()
    return scores


@pytest.mark.slow
@pytest.mark.parametrize("name", ["greedy_max20_min5", "beam3_max30_min10"])
def test_train_caption_evaluate_other_generation_settings(tmp_path, run_script, ref, name):
    nb, mx, mn = SETTINGS[name]
    out = tmp_path / name
    _evaluate(run_script, out, eval_metrics="false", num_beams=nb, max_length=mx, min_length=mn)
    results = json.loads((out / "captions_test.json").read_text())
    assert [r["caption"] for r in results] == ref[name]


@pytest.mark.dist
def test_two_rank_evaluation_writes_the_same_captions_as_one_process(tmp_path, run_script, run_torchrun, ref):
    one, two = tmp_path / "one", tmp_path / "two"
    _evaluate(run_script, one, eval_metrics="false", batch_size=2)
    args = ["--config", str(REPO / "configs" / "caption_coco.yaml"), "--evaluate", "--output_dir", str(two),
            "--opts", *_fixture_opts(eval_metrics="false", batch_size=2)]
    run_torchrun("train_caption.py", args)
    assert (two / "captions_test.json").read_bytes() == (one / "captions_test.json").read_bytes()
    assert [r["caption"] for r in json.loads((two / "captions_test.json").read_text())] == ref["beam3_max20_min5"]


# ---------------------------------------------------------------------- training

def _train_config(make, tmp_path: Path, data: Path, **overrides) -> Path:
    """The tiny retrieval run of conftest, made a caption run: no retrieval keys, no eval splits."""
    settings = dict(embed_dim=None, queue_size=None, k_test=None, val_file="null", test_file="null",
                    spice="false", max_length=12, min_length=3)
    settings.update(overrides)
    return make(tmp_path, data, **settings)


@pytest.fixture(scope="module")
def caption_cli(run_script):
    def run(cfg, out, *extra, check=True):
        return run_script("train_caption.py", ["--config", cfg, "--output_dir", out, "--no_progress", *extra],
                          check=check)
    return run


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def _train_records(out):
    return [{k: v for k, v in json.loads(l).items() if k.startswith("train_")}
            for l in (out / "log.txt").read_text().splitlines()]


@pytest.mark.slow
def test_caption_training_resumes_exactly_after_sigkill(tmp_path, synthetic_small, caption_cli, tiny_train_config,
                                                        kill_at_step):
    cfg = _train_config(tiny_train_config, tmp_path, synthetic_small, ckpt_every_steps=4)
    straight = tmp_path / "straight"
    caption_cli(cfg, straight)
    killed = tmp_path / "killed"
    ckpt = killed / "checkpoint_last.pth"
    kill_at_step([sys.executable, REPO / "train_caption.py", "--config", cfg, "--output_dir", killed, "--no_progress"],
                 ckpt, 8)  # inside epoch 0 (18 steps)
    assert torch.load(ckpt, weights_only=True)["loop"]["batch_in_epoch"] > 0
    caption_cli(cfg, killed, "--resume", "auto")
    assert _train_records(straight) == _train_records(killed)
    assert set(_train_records(straight)[0]) == {"train_lr", "train_loss"}  # BLIP's key names
    a, b = _weights(straight / "checkpoint_last.pth"), _weights(killed / "checkpoint_last.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.load(straight / "checkpoint_last.pth", weights_only=True)["format"] == "blip-caption"


@pytest.mark.slow
def test_caption_training_evaluates_val_picks_best_by_cider_and_tests_it(tmp_path, synthetic_small, caption_cli,
                                                                       tiny_train_config):
    cfg = _train_config(tiny_train_config, tmp_path, synthetic_small, val_file="synthetic_val.json", test_file="synthetic_test.json",
                        max_epoch=2, init_lr=2e-3)
    out = tmp_path / "run"
    caption_cli(cfg, out)
    records = [json.loads(l) for l in (out / "log.txt").read_text().splitlines()]
    assert len(records) == 2
    for r in records:
        assert {"train_loss", "val_Bleu_4", "val_METEOR", "val_ROUGE_L", "val_CIDEr"} <= set(r)
    best = max(range(2), key=lambda e: records[e]["val_CIDEr"])
    assert records[-1]["best_epoch"] == best
    assert "test_CIDEr" in records[best] and "test_Bleu_4" in records[best]
    results = json.loads((out / "captions_test.json").read_text())
    test_entries = json.loads((synthetic_small / "retrieval" / "annotation" / "synthetic_test.json").read_text())
    assert [r["image_id"] for r in results] == [e["image"] for e in test_entries]
    assert all(isinstance(r["caption"], str) for r in results)
    # The run's checkpoint is a caption checkpoint that train_caption.py --evaluate loads strictly.
    ev = tmp_path / "ev"
    caption_cli(cfg, ev, "--evaluate", "--opts", f"pretrained={out / 'checkpoint_best.pth'}", "strict_load=true",
                "val_file=null", "eval_metrics=false")
    # The best epoch's test captions (the last written) again, from the saved checkpoint.
    assert (ev / "captions_test.json").read_bytes() == (out / "captions_test.json").read_bytes()


def test_dry_run_is_the_lm_loss_of_one_eval_forward_of_the_first_batch(tmp_path, run_script, captioner):
    """``--dry_run`` on the captioner fixture (its 16 captions as the train split, RandAugment on):
    ``dry_run.json`` holds the LM loss under the task's name (``loss``, logged as BLIP's
    ``train_loss``), equal to an eval-mode forward of the first 4 pairs in file order with the test
    transform computed here, and the same again in-process; no checkpoint or log.txt is written
    and ``--evaluate`` with it is refused."""
    import train_caption
    from data.collate import CaptionCollator
    from data.retrieval import build_retrieval_datasets
    from data.transforms import build_test_transform
    from models.tokenizer import build_tokenizer
    from tasks.caption import CaptionConfig
    from utils.config import load_config
    from utils.errors import UserError

    config = REPO / "configs" / "caption_coco.yaml"
    opts = _fixture_opts(train_file="test.json", batch_size=4, train_randaug="true")
    first_dir, again_dir = tmp_path / "dry", tmp_path / "again"
    run_script("train_caption.py", ["--config", config, "--output_dir", first_dir, "--no_progress", "--dry_run",
                                    "--opts", *opts])
    first = json.loads((first_dir / "dry_run.json").read_text())
    assert set(first["losses"]) == {"loss"} and first["batch_size"] == 4
    assert torch.isfinite(torch.tensor(first["loss"])) and first["loss"] == first["losses"]["loss"] > 0
    record = train_caption.main(["--config", str(config), "--output_dir", str(again_dir), "--no_progress",
                                 "--dry_run", "--opts", *opts])
    assert record["losses"] == first["losses"]
    for out in (first_dir, again_dir):
        assert not list(out.glob("checkpoint_*")) and not (out / "log.txt").exists()

    cfg, _ = load_config(config, CaptionConfig, opts)
    train = build_retrieval_datasets(cfg, splits=("train",), train_transform=build_test_transform(64))["train"]
    batch = CaptionCollator(build_tokenizer(str(FIX / "tokenizer")), cfg.prompt, cfg.max_tokens)(
        [train[i] for i in range(4)])
    with torch.no_grad():
        direct = captioner(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])["loss_lm"]
    assert direct.item() == pytest.approx(first["loss"], rel=1e-6)

    with pytest.raises(UserError, match="--dry_run .* cannot be combined with --evaluate"):
        train_caption.main(["--config", str(config), "--output_dir", str(tmp_path / "x"), "--dry_run", "--evaluate",
                            "--opts", *opts])


def test_bad_caption_annotation_stops_before_the_model_naming_entry_and_field(tmp_path, run_script):
    (tmp_path / "test.json").write_text(json.dumps([{"image": "images/img0.png", "caption": ["a b"]},
                                                     {"image": "images/img1.png", "caption": []}]))
    args = ["--config", str(REPO / "configs" / "caption_coco.yaml"), "--evaluate", "--output_dir",
            str(tmp_path / "out"), "--opts", *_fixture_opts(ann_root=tmp_path, pretrained="/nonexistent.pth")]
    proc = run_script("train_caption.py", args, check=False)
    assert proc.returncode != 0
    err = proc.stderr
    assert "entry 1" in err and "caption" in err and "test.json" in err
    assert "nonexistent" not in err  # stopped before the checkpoint was opened


# ---------------------------------------------------------------------- eval_nocaps.py

def _nocaps_root(tmp_path: Path) -> Path:
    """BLIP's nocaps_{val,test}.json over the fixture's images ({"image", "img_id"}, no captions)."""
    entries = json.loads((FIX / "test.json").read_text())
    root = tmp_path / "nocaps_ann"
    root.mkdir()
    for split, part in (("val", entries[:2]), ("test", entries)):
        (root / f"nocaps_{split}.json").write_text(json.dumps(
            [{"image": e["image"], "img_id": 100 + i} for i, e in enumerate(part)]))
    return root


def _nocaps_opts(root: Path, **extra):
    opts = {"image_root": FIX, "ann_root": root, "pretrained": FIX / "checkpoint.pth", "vit": TINY_VIT,
            "image_size": 64, "med_config": FIX / "med_config.json", "tokenizer": FIX / "tokenizer",
            "num_workers": 0, "device": "cpu", "batch_size": 3}
    opts.update(extra)
    return [f"{k}={v}" for k, v in opts.items()]


def test_eval_nocaps_writes_the_server_files_with_blips_decoding(tmp_path, run_script, ref):
    from tasks.caption import NocapsConfig
    from utils.config import load_config
    cfg, _ = load_config(REPO / "configs" / "nocaps.yaml", NocapsConfig)
    assert cfg.repetition_penalty == 1.1 and not cfg.eval_metrics and cfg.dataset == "nocaps"  # BLIP's eval_nocaps
    root = _nocaps_root(tmp_path)
    out = tmp_path / "nocaps"
    # repetition_penalty 1.0: the fixture's reference captions were decoded with the release's defaults.
    run_script("eval_nocaps.py", ["--config", REPO / "configs" / "nocaps.yaml", "--output_dir", out,
                                  "--opts", *_nocaps_opts(root, repetition_penalty=1.0)])
    test = json.loads((out / "captions_test.json").read_text())
    assert [r["image_id"] for r in test] == list(range(100, 100 + len(test)))
    assert [r["caption"] for r in test] == ref["beam3_max20_min5"]
    assert [r["caption"] for r in json.loads((out / "captions_val.json").read_text())] == ref["beam3_max20_min5"][:2]
    assert not (out / "evaluate.txt").exists()  # nothing scored: the references are the server's

    dry = tmp_path / "dry"
    run_script("eval_nocaps.py", ["--config", REPO / "configs" / "nocaps.yaml", "--output_dir", dry, "--dry_run",
                                  "--opts", *_nocaps_opts(root)])
    record = json.loads((dry / "dry_run.json").read_text())
    assert record["split"] == "val" and record["batch"] == 2
    from utils.rundir import LOCK_NAME
    assert sorted(p.name for p in dry.iterdir()) == [LOCK_NAME, "config.yaml", "dry_run.json", "run.log"]  # no captions
    assert "versions: python 3." in (dry / "run.log").read_text()  # with torch, torchvision, timm, transformers


def test_nocaps_refuses_scoring_and_an_entry_without_img_id(tmp_path, run_script):
    from tasks.caption import NocapsConfig
    from utils.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="eval_metrics"):
        load_config(REPO / "configs" / "nocaps.yaml", NocapsConfig, ["eval_metrics=true"])
    root = _nocaps_root(tmp_path)
    (root / "nocaps_val.json").write_text(json.dumps([{"image": "images/img0.png"}]))
    out = tmp_path / "bad"
    proc = run_script("eval_nocaps.py", ["--config", REPO / "configs" / "nocaps.yaml", "--output_dir", out,
                                         "--opts", *_nocaps_opts(root)], check=False)
    assert proc.returncode != 0 and "field 'img_id'" in proc.stderr and "nocaps_val.json" in proc.stderr
    assert not out.exists()
