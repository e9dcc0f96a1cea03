"""VQA evaluation speed: our ``BLIPVQA.rank`` / ``generate_ids`` vs. the release's loops.

Same random VQA model (``models/vqa.py``, seed 0; its Linear/Embedding weights redrawn from
N(0, ``--init_std`` 0.2), since with BERT's 0.02 every question gets the same answer and the
equality check below would check nothing; the JSON's ``distinct_answers`` shows it does not),
same random image tensors, same questions and candidate answers; BLIP's evaluation settings
(``configs/vqa.yaml``: batches of ``batch_size_test`` 32 questions, ``k_test`` 128; generate: 3
beams, max 10 tokens, min 1):

- **rank**, ours (``BLIPVQA.rank``): the question states' cross-attention keys/values are projected
  once per question and indexed for its ``k`` candidates, and the LM head (the vocabulary
  projection) and the cross-entropy run only at the positions that have a target (not the last
  position, not padding);
  **release** (:func:`release_rank`, written here from BLIP's ``BLIP_VQA.rank_answer``): one
  decoder call on ``[DEC]`` with the question states and mask, softmax, ``index_select`` at the
  candidates' first tokens, top ``k``; the ``k`` candidates' ids gathered per question, the
  question states and masks *tiled* ``k`` times (BLIP's ``tile``: ``repeat`` + ``index_select``),
  one decoder forward on the tiled states (so the cross-attention keys/values are recomputed for
  every candidate), labels with pad -> -100, ``reduction='none'`` -> ``-(summed smoothed losses)``,
  argmax;
- **generate**, ours (``generate_ids(use_cache=True)``): the question's cross-attention keys/values
  projected once per question, a self-attention cache in every layer;
  **release** (``generate_ids(use_cache=False)``): the question states ``repeat_interleave``-d per
  beam, an all-ones question mask (as the release passes; ours keeps that default), the whole
  prefix and the cross-attention keys/values recomputed at every step.

Every question's answer must be the same for both (rank: the same candidate index; generate: the
same token ids); this is checked on the first (warm-up) run, before anything is timed, and the
script exits 1 if any differs (the JSON still records it; it also records whether the top-k
candidates are the same and the largest difference of their scores). Each path is then timed
``--repeats`` times, ours and the release's interleaved (a, b, a, b, ...: a busy spell of a shared
machine slows both), median reported. Timed: the answering over all ``--questions`` (in batches), on question
states computed beforehand; "end to end" adds the question encoding (ViT + question encoder,
shared by both, timed on its own).

Data: ``--questions`` questions of 3-14 words drawn from a vocabulary of 200 words, tokenised per
batch as the collator does (padded to the batch's longest: the padding differs between questions);
``--candidates`` distinct candidate answers of 1-4 words (BLIP's ``answer_list.json`` has 3,128),
tokenised as ``train_vqa`` does (padded to the longest, ``[DEC]`` first). The tokenizer is a
BERT-layout vocabulary of ``--vocab`` tokens (30,522 as ``bert-base-uncased`` at demo/mid, so the
LM head runs over BLIP's 30,524 with ``[DEC]``/``[ENC]``), written to a temporary folder. Sizes
(the other benchmarks' names):

- tiny: ViT 64 x 2 at 32 px (4 patches), text 64 x 2, vocabulary 1,000 (smoke test);
- demo: ViT 64 x 2 at 64 px (16 patches), text 64 x 2;
- mid:  ViT 384 x 6 at 224 px (196 patches), text 384 x 6 (heads of 64).

    python -m bench.bench_vqa --device cpu [--size mid --questions 32 --candidates 3128 --k_test 128 --repeats 3]
    python -m bench.bench_vqa --device cuda [--questions 256] [--precision bf16]
    python -m bench.bench_vqa --size tiny --questions 8 --candidates 40 --k_test 16 --repeats 1   # smoke

Cost at mid on CPU: both ranks score 32 x 128 candidates of 6 tokens through the LM head over
30,524 tokens (logits of 3 GB in fp32; peak RSS ~9 GB), ~5 min for ``--repeats 1`` on 2 busy cores.
On a busy machine use ``--threads 1``: 2 OpenMP threads under load wait on each other (the 32
questions' cached beam search took 11.3 s with 2 threads, 1.4 s alone with 1).

Prints a markdown table (one row per inference, the rows for docs/PERFORMANCE.md) and the JSON, and
writes the JSON to ``--out`` (default ``bench/results/bench_vqa_<device>_<size>[_<precision>].json``;
``--out ''``: none). Peak memory (CUDA only) is ``torch.cuda.max_memory_allocated`` per method.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Tuple

import torch
import torch.nn.functional as F

from bench.bench_caption import sync, timed, write_vocab
from data.vqa import tokenize_questions
from models.tokenizer import build_tokenizer
from models.vqa import MAX_QUESTION_TOKENS, VQAArch, VQASettings, build_vqa, tokenize_candidates
from utils.precision import autocast

REPO = Path(__file__).resolve().parents[1]

SIZES = {  # ViT and text width, depth, image size, default vocabulary
    "tiny": (64, 2, 32, 1000),
    "demo": (64, 2, 64, 30522),
    "mid": (384, 6, 224, 30522),
}
QUESTION_WORDS = 200    # the questions' vocabulary: w0 .. w199
ANSWER_WORDS = 400      # the candidates' words: w200 .. w599 (fewer in a small vocabulary)


# ---------------------------------------------------------------------------------------- model, data
def build(size: str, vocab: int, tmp: Path):
    """(random VQA model in eval mode, tokenizer, image size); the tokenizer folder lives in ``tmp``."""
    width, depth, image_size, _ = SIZES[size]
    heads = max(1, width // 64)
    write_vocab(tmp / "tokenizer", vocab)
    tokenizer = build_tokenizer(str(tmp / "tokenizer"))
    med = tmp / "med.json"
    med.write_text(json.dumps({"vocab_size": None, "hidden_size": width, "num_hidden_layers": depth,
                               "num_attention_heads": heads, "intermediate_size": 4 * width,
                               "encoder_width": width, "add_cross_attention": True}))
    arch = VQAArch(vit={"width": width, "depth": depth, "heads": heads, "patch_size": 16},
                   image_size=image_size, med_config=str(med))
    return build_vqa(arch, tokenizer).eval(), tokenizer, image_size


def redraw_weights(model, std: float) -> None:
    """Every ``nn.Linear`` / ``nn.Embedding`` weight redrawn from N(0, ``std``) (biases, LayerNorms,
    the ViT's patch convolution and position embedding kept). With BERT's initialisation (std 0.02)
    the decoder barely reads the question: every question gets the same answer, and an equality
    check of the answers would check nothing. The shapes, so the cost, are unchanged."""
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            m.weight.data.normal_(0.0, std)


def filler_words(vocab: int) -> int:
    """How many ``w<i>`` filler words ``write_vocab`` puts in a vocabulary of ``vocab`` tokens."""
    return vocab - 107   # [PAD], 99 x [unused], [UNK], [CLS], [SEP], [MASK], 'a', 'picture', 'of'


def random_questions(n: int, g: torch.Generator) -> List[str]:
    """``n`` questions of 3-14 words from a vocabulary of ``QUESTION_WORDS`` words."""
    lengths = torch.randint(3, 15, (n,), generator=g).tolist()
    return [" ".join(f"w{i}" for i in torch.randint(0, QUESTION_WORDS, (L,), generator=g).tolist()) for L in lengths]


def random_candidates(n: int, vocab: int, g: torch.Generator) -> List[str]:
    """``n`` distinct answers of 1-4 words (70% one word, 20% two, 8% three, 2% four, roughly as VQA's)."""
    first = QUESTION_WORDS
    words = min(ANSWER_WORDS, filler_words(vocab) - first)
    if words < 2:
        raise SystemExit(f"--vocab {vocab} is too small for the candidate words")
    seen, out = set(), []
    weights = torch.tensor([0.70, 0.20, 0.08, 0.02])
    for _ in range(100 * n):
        if len(out) == n:
            break
        L = int(torch.multinomial(weights, 1, generator=g)) + 1
        a = " ".join(f"w{first + i}" for i in torch.randint(0, words, (L,), generator=g).tolist())
        if a not in seen:
            seen.add(a)
            out.append(a)
    if len(out) < n:
        raise SystemExit(f"could not draw {n} distinct candidate answers from {words} words")
    return out


# ---------------------------------------------------------------------------------------- the release
def tile(x: torch.Tensor, dim: int, n_tile: int) -> torch.Tensor:
    """BLIP's ``tile`` (``models/blip_vqa.py``): ``repeat`` then ``index_select`` into the order
    ``0,0,..,1,1,..`` (each row ``n_tile`` times in a row: ``repeat_interleave``)."""
    init_dim = x.size(dim)
    repeat_idx = [1] * x.dim()
    repeat_idx[dim] = n_tile
    x = x.repeat(*repeat_idx)
    order = torch.cat([init_dim * torch.arange(n_tile) + i for i in range(init_dim)])
    return torch.index_select(x, dim, order.to(x.device))


def release_decoder(model, input_ids, attention_mask, states, states_mask) -> torch.Tensor:
    """The release's ``text_decoder(...)`` logits: BERT in decoder mode on ``encoder_hidden_states``
    (each layer projects its cross-attention keys/values from them) + the LM head."""
    out = model.text_decoder.bert(input_ids, attention_mask, mode="decoder", encoder_hidden_states=states,
                                  encoder_attention_mask=states_mask)
    return model.text_decoder.cls.predictions(out.last_hidden_state)


@torch.no_grad()
def release_rank(model, question_states, question_atts, answer_ids, answer_atts, k: int):
    """BLIP's ``BLIP_VQA.rank_answer``, step by step -> (max_ids [B], topk_ids [B, k], scores [B, k])."""
    num_ques = question_states.size(0)
    start_ids = answer_ids[0, 0].repeat(num_ques, 1)  # bos token
    logits = release_decoder(model, start_ids, None, question_states, question_atts)[:, 0, :]
    answer_first_token = answer_ids[:, 1]
    prob_first_token = F.softmax(logits, dim=1).index_select(dim=1, index=answer_first_token)
    topk_probs, topk_ids = prob_first_token.topk(k, dim=1)
    input_ids, input_atts = [], []
    for topk_id in topk_ids:
        input_ids.append(answer_ids.index_select(dim=0, index=topk_id))
        input_atts.append(answer_atts.index_select(dim=0, index=topk_id))
    input_ids = torch.cat(input_ids, dim=0)
    input_atts = torch.cat(input_atts, dim=0)
    targets_ids = input_ids.masked_fill(input_ids == model.pad_token_id, -100)
    question_states = tile(question_states, 0, k)
    question_atts = tile(question_atts, 0, k)
    prediction_scores = release_decoder(model, input_ids, input_atts, question_states, question_atts)
    # BertLMHeadModel with labels, reduction='none': shifted, label smoothing 0.1, summed per row
    shifted = prediction_scores[:, :-1, :].contiguous()
    labels = targets_ids[:, 1:].contiguous()
    loss_fct = torch.nn.CrossEntropyLoss(reduction="none", label_smoothing=0.1)
    lm_loss = loss_fct(shifted.view(-1, shifted.shape[-1]), labels.view(-1))
    lm_loss = lm_loss.view(prediction_scores.size(0), -1).sum(1)
    log_probs_sum = (-lm_loss).view(num_ques, k)
    max_topk_ids = log_probs_sum.argmax(dim=1)
    max_ids = topk_ids[max_topk_ids >= 0, max_topk_ids]
    return max_ids, topk_ids, log_probs_sum


# ---------------------------------------------------------------------------------------- comparison
Batches = List[Tuple[torch.Tensor, torch.Tensor]]


def answer_lengths(ids: torch.Tensor, eos: int) -> torch.Tensor:
    """Generated tokens per row after ``[DEC]``, up to (not counting) the first eos."""
    body = ids[:, 1:]
    is_eos = body == eos
    return torch.where(is_eos.any(1), is_eos.int().argmax(1), body.shape[1])


def rank_fns(model, batches: Batches, cand_ids, cand_mask, k: int, device, precision: str):
    def ours():
        outs = []
        for states, mask in batches:
            with autocast(device, precision):
                o = model.rank(states, mask, cand_ids, cand_mask, k)
            outs.append((o.answer_ids, o.topk_ids, o.scores))
        return outs

    def release():
        outs = []
        for states, mask in batches:
            with autocast(device, precision):
                outs.append(release_rank(model, states, mask, cand_ids, cand_mask, k))
        return outs
    return {"ours": ours, "release": release}


def generate_fns(model, batches: Batches, device, precision: str):
    settings = VQASettings().answer_generation()

    def runner(use_cache: bool):
        def run():
            outs = []
            for states, mask in batches:
                with autocast(device, precision):
                    outs.append(model.generate_ids(states, mask, settings, use_cache=use_cache))
            return outs
        return run
    return {"ours": runner(True), "release": runner(False)}, settings


def check_rank(ours, release) -> dict:
    a = torch.cat([o[0] for o in ours]).cpu()
    b = torch.cat([r[0] for r in release]).cpu()
    topk_same = all(torch.equal(o[1], r[1]) for o, r in zip(ours, release))
    diff = max((o[2].float() - r[2].float()).abs().max().item() for o, r in zip(ours, release))
    differ = (a != b).nonzero().flatten().tolist()
    return {"identical_answers": not differ, "questions_differing": differ[:20], "n_differing": len(differ),
            "identical_topk": bool(topk_same), "max_abs_score_diff": diff}


def check_generate(ours, release) -> dict:
    differ, offset = [], 0
    for o, r in zip(ours, release):
        if o.shape != r.shape:
            differ += list(range(offset, offset + o.shape[0]))
        else:
            differ += [offset + i for i in (o != r).any(1).nonzero().flatten().tolist()]
        offset += o.shape[0]
    return {"identical_answers": not differ, "questions_differing": differ[:20], "n_differing": len(differ)}


def compare(name: str, fns, check, n: int, encode_s: float, args, device) -> Tuple[dict, object]:
    """Checks ours against the release's on one run of each, then times both (interleaved)."""
    first = {key: fn() for key, fn in fns.items()}   # the first warm-up run, and the check
    sync(device)
    res = {"inference": name, **check(first["ours"], first["release"])}
    if not res["identical_answers"]:
        return res, first["ours"]
    runs = timed(fns, device, args.repeats, max(0, args.warmup - 1))
    again = check(runs["ours"][2], runs["release"][2])
    if not again["identical_answers"] or not check(first["ours"], runs["ours"][2])["identical_answers"]:
        res.update(identical_answers=False, note="the timed runs gave other answers than the checked run")
        return res, first["ours"]
    for key, (med, times, _, peak) in runs.items():
        res[f"{key}_s"] = round(med, 4)
        res[f"{key}_questions_per_s"] = round(n / med, 2)
        res[f"{key}_end_to_end_questions_per_s"] = round(n / (med + encode_s), 2)
        res[f"{key}_times_s"] = [round(t, 4) for t in times]
        if peak is not None:
            res[f"{key}_peak_memory_gib"] = round(peak, 3)
    res["speedup"] = round(res["release_s"] / res["ours_s"], 2)
    res["end_to_end_speedup"] = round((res["release_s"] + encode_s) / (res["ours_s"] + encode_s), 2)
    return res, runs["ours"][2]


def table(result: dict) -> str:
    s = result["setup"]
    machine = (f"CPU, {s['threads']} thread{'s' if s['threads'] > 1 else ''}" if s["device"] == "cpu"
               else s["device_name"])
    lines = ["| machine | size | inference | precision | questions / candidates / k | ours, questions/s | "
             "release, questions/s | **speed-up** | end to end (incl. encoding): ours / release / speed-up | "
             "same answers (distinct) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        what = (f"{s['questions']} / {s['candidates']} / {s['k_test']}" if r["inference"] == "rank"
                else f"{s['questions']} / - / beam {r['num_beams']}, max {r['max_length']}")
        if "speedup" not in r:
            lines.append(f"| {machine} | {s['size']} | {r['inference']} | {s['precision']} | {what} | - | - | - | - | "
                         f"**NO** ({r['n_differing']} differ) |")
            continue
        lines.append(
            f"| {machine} | {s['size']} | {r['inference']} | {s['precision']} | {what} | "
            f"{r['ours_questions_per_s']} ({r['ours_s']} s) | {r['release_questions_per_s']} ({r['release_s']} s) | "
            f"**{r['speedup']}x** | {r['ours_end_to_end_questions_per_s']} / {r['release_end_to_end_questions_per_s']}"
            f" / {r['end_to_end_speedup']}x | yes ({r['distinct_answers']}) |")
    return "\n".join(lines)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="mid", choices=list(SIZES))
    p.add_argument("--questions", type=int, default=None,
                   help="questions answered (default: 32 on CPU, one BLIP test batch; 256 on CUDA; tiny: 8)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="questions per batch (default 32, BLIP's batch_size_test; tiny: 4)")
    p.add_argument("--candidates", type=int, default=None,
                   help="candidate answers for rank (default 3128, the size of BLIP's answer_list.json; tiny: 40)")
    p.add_argument("--k_test", type=int, default=None, help="candidates re-scored per question (default 128; tiny: 16)")
    p.add_argument("--inference", default="both", choices=["both", "rank", "generate"])
    p.add_argument("--vocab", type=int, default=None, help="tokenizer vocabulary (default 30522; tiny: 1000)")
    p.add_argument("--init_std", type=float, default=0.2,
                   help="redraw the Linear/Embedding weights from N(0, std) so that answers depend on the "
                        "question (0: the model's own init, BERT's std 0.02, which answers every question alike)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each path (at least the checked one)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast of both paths")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", default=None,
                   help="JSON path (default bench/results/bench_vqa_<device>_<size>[_<precision>].json; '': none)")
    args = p.parse_args()
    tiny = args.size == "tiny"
    args.questions = args.questions or (8 if tiny else 32 if args.device == "cpu" else 256)
    args.candidates = args.candidates or (40 if tiny else 3128)
    args.k_test = args.k_test or (16 if tiny else 128)
    args.vocab = args.vocab or SIZES[args.size][3]
    args.batch_size = min(args.batch_size or (4 if tiny else 32), args.questions)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.out is None:
        suffix = "" if args.precision == "fp32" else f"_{args.precision}"
        args.out = str(REPO / "bench" / "results" / f"bench_vqa_{device.type}_{args.size}{suffix}.json")

    t_start = time.perf_counter()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, image_size = build(args.size, args.vocab, Path(tmp))
    if args.init_std > 0:
        redraw_weights(model, args.init_std)
    model = model.to(device)
    g = torch.Generator().manual_seed(0)
    questions = random_questions(args.questions, g)
    candidates = random_candidates(args.candidates, args.vocab, g)
    pixels = torch.randn(args.questions, 3, image_size, image_size, generator=g)
    k = min(args.k_test, len(candidates))
    cand_ids, cand_mask = (t.to(device) for t in tokenize_candidates(tokenizer, candidates))
    inputs = []
    for s in range(0, args.questions, args.batch_size):
        ids, mask = tokenize_questions(tokenizer, questions[s:s + args.batch_size], MAX_QUESTION_TOKENS)
        inputs.append((pixels[s:s + args.batch_size].to(device), ids.to(device), mask.to(device)))

    def encode():
        out = []
        for px, ids, mask in inputs:
            with autocast(device, args.precision):
                out.append((model.encode_questions(px, ids, mask), mask))
        return out
    encode_s, _, batches, _ = timed({"encode": encode}, device, args.repeats, args.warmup)["encode"]

    q_tokens = torch.cat([m.sum(1) for _, _, m in inputs]).float()
    result = {"setup": {
        "device": device.type, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "precision": args.precision,
        "size": args.size, "width": SIZES[args.size][0], "depth": SIZES[args.size][1], "image_size": image_size,
        "vocab": len(tokenizer), "questions": args.questions, "batch_size": args.batch_size,
        "question_tokens_mean": round(q_tokens.mean().item(), 2),
        "question_tokens_min_max": [int(q_tokens.min()), int(q_tokens.max())],
        "padded_question_tokens": [int(m.shape[1]) for _, _, m in inputs],
        "candidates": len(candidates), "candidate_tokens": int(cand_ids.shape[1]), "k_test": k,
        "init_std": args.init_std, "repeats": args.repeats, "warmup": args.warmup,
        "encode_s": round(encode_s, 4)}, "runs": []}

    failed = False
    if args.inference in ("both", "rank"):
        fns = rank_fns(model, batches, cand_ids, cand_mask, k, device, args.precision)
        res, ours = compare("rank", fns, check_rank, args.questions, encode_s, args, device)
        answers = torch.cat([o[0] for o in ours]).tolist()
        res["distinct_answers"] = len(set(answers))
        res["example_answers"] = [candidates[i] for i in answers[:3]]
        result["runs"].append(res)
        failed |= not res["identical_answers"]
    if args.inference in ("both", "generate"):
        fns, settings = generate_fns(model, batches, device, args.precision)
        res, ours = compare("generate", fns, check_generate, args.questions, encode_s, args, device)
        ids = torch.cat([torch.nn.functional.pad(o, (0, settings.max_length - o.shape[1])) for o in ours]).cpu()
        lengths = answer_lengths(ids, model.eos_token_id).float()
        res.update(num_beams=settings.num_beams, max_length=settings.max_length, min_length=settings.min_length,
                   mean_answer_tokens=round(lengths.mean().item(), 2),
                   share_at_max_length=round((lengths + 1 >= settings.max_length).float().mean().item(), 3),
                   distinct_answers=len({tuple(r) for r in ids.tolist()}), example_answers=model.decode(ids[:3]))
        result["runs"].append(res)
        failed |= not res["identical_answers"]
    result["setup"]["wall_s"] = round(time.perf_counter() - t_start, 1)
    result["identical_answers"] = not failed
    text = table(result)
    result["table"] = text
    print(text)
    print(json.dumps(result, indent=1))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    if failed:
        for r in result["runs"]:
            if not r["identical_answers"]:
                print(f"{r['inference']}: ours and the release's answers DIFFER for {r['n_differing']} questions "
                      f"(first: {r['questions_differing']})", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
