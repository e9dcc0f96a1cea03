"""Compare a multimodal LLM (GPT-4V in the ContextBLIP paper) with our model on ImageCoDe items.

    python -m analysis.mllm sample --ann_root DATA/imagecode/data --image_root DATA/imagecode/image-sets \\
        --out outputs/mllm/sample                        # 50 static + 50 video valid descriptions, seeded
    OPENAI_API_KEY=... python -m analysis.mllm ask --sample outputs/mllm/sample --variant 4 \\
        --base_url https://api.openai.com/v1 --model gpt-4o --answers outputs/mllm/gpt4o_4.jsonl
    python -m analysis.mllm compare --sample outputs/mllm/sample --answers outputs/mllm/gpt4o_4.jsonl \\
        --predictions outputs/stage2/predictions.json --variant 4 --out outputs/mllm/compare_4

`sample` writes ``sample.json`` and copies every sampled set's images under ``images/<set>/``, so
the folder alone is enough to ask a remote model. Each item has the 10 candidates and the 4-image
variant around the target (docs/CONTEXTBLIP.md: targets 0/1 -> images 0-3, target 9 -> 6-9, else
target-2 .. target+1). `ask` appends one json line per item to a resumable answers file;
`compare` scores it and our ``predictions.json`` on the same items (ours on the 4-image variant:
the best-scored of those 4 candidates).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from analysis.chat_client import ChatClient, ChatError, image_message, parse_image_number
from data.utils import read_json

logger = logging.getLogger("analysis.mllm")

SAMPLE_FILE = "sample.json"
WINDOW = 4
DEFAULT_PROMPT = ("Here are {n} images, numbered {first} to {last}, and a description that matches exactly one "
                  "of them. The images are very similar, so look at small details.\n"
                  "Description: {description}\n"
                  "Which image does the description match? Answer with the image number only.")


def window(target: int, num_candidates: int = 10, size: int = WINDOW) -> Tuple[int, int]:
    """``[start, end)`` of the ``size`` candidates around ``target`` (two before it, one after)."""
    start = min(max(target - 2, 0), num_candidates - size)
    return start, start + size


# ----------------------------------------------------------------------------- sample

def sample_items(ann_root: Path, image_root: Path, out: Path, n_static: int = 50, n_video: int = 50,
                 seed: int = 0, split: str = "valid") -> dict:
    """Draw ``n_static`` + ``n_video`` labelled descriptions (seeded) and write them with their images."""
    from data.imagecode import SPLIT_FILES, read_imagecode  # torch: only `sample` needs it

    ann_file = Path(ann_root) / SPLIT_FILES[split]
    items = read_imagecode(ann_file, image_root, labelled=True)
    rng = random.Random(f"mllm-sample/{seed}")
    chosen = []
    for kind, n in (("static", n_static), ("video", n_video)):
        pool = [i for i, it in enumerate(items) if it.video == (kind == "video")]
        if n > len(pool):
            logger.warning("%s: only %d %s descriptions, taking all of them", ann_file, len(pool), kind)
        chosen += sorted(rng.sample(pool, min(n, len(pool))))  # file order within each kind
    records = []
    for k, i in enumerate(chosen):
        it = items[i]
        start, end = window(it.target, len(it.candidates))
        records.append({"id": k, "set": it.set_name, "description": it.description, "video": it.video,
                        "target": it.target, "images": [f"images/{it.set_name}/{c}" for c in it.candidates],
                        "window": [start, end], "target_in_window": it.target - start})
        dest = out / "images" / it.set_name
        dest.mkdir(parents=True, exist_ok=True)
        for c in it.candidates:
            if not (dest / c).is_file():
                shutil.copyfile(Path(image_root) / it.set_name / c, dest / c)
    doc = {"source": {"ann_file": str(ann_file), "image_root": str(image_root), "split": split},
           "seed": seed, "n_static": sum(not r["video"] for r in records),
           "n_video": sum(r["video"] for r in records), "items": records}
    (out / SAMPLE_FILE).write_text(json.dumps(doc, indent=1) + "\n")
    logger.info("wrote %d items (%d static, %d video) to %s", len(records), doc["n_static"], doc["n_video"], out)
    return doc


def load_sample(path: Path) -> Tuple[Path, dict]:
    """``(folder, sample doc)`` from a sample folder or its sample.json."""
    path = Path(path)
    file = path / SAMPLE_FILE if path.is_dir() else path
    doc = read_json(file)
    if not isinstance(doc, dict) or not isinstance(doc.get("items"), list):
        raise ValueError(f"{file}: not a sample file written by `python -m analysis.mllm sample`")
    return file.parent, doc


def candidates(item: dict, variant: int) -> Tuple[List[str], int]:
    """The images shown for ``variant`` (10 or 4) and the position of the first one among the 10."""
    if variant == WINDOW:
        start, end = item["window"]
        return item["images"][start:end], start
    return item["images"], 0


# ----------------------------------------------------------------------------- ask

def read_answers(path: Path) -> List[dict]:
    """The json lines of an answers file; a line cut off by a kill is dropped (and re-asked)."""
    if not path.is_file():
        return []
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if n != len(lines):
                raise ValueError(f"{path}: line {n} is not json: {line[:80]!r}") from None
            logger.warning("%s: dropping a cut-off last line", path)
    return out


def _append(path: Path, record: dict) -> None:
    data = path.read_bytes() if path.is_file() else b""
    if data and not data.endswith(b"\n"):  # a partial line from a kill: cut it off first
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def ask(sample: Path, answers: Path, client: ChatClient, variant: int = 10, prompt: str = DEFAULT_PROMPT,
        index_base: int = 1, limit: Optional[int] = None) -> Dict[str, int]:
    """Ask ``client`` about every sample item not yet in ``answers``; returns counts."""
    folder, doc = load_sample(sample)
    previous = read_answers(answers)
    others = sorted({str(a.get("model")) for a in previous} - {client.model})
    if others:
        raise ValueError(f"{answers} holds answers of model {', '.join(others)}, not {client.model}: "
                         "use one answers file per model")
    done = {(a.get("id"), a.get("variant")) for a in previous}
    todo = [it for it in doc["items"] if (it["id"], variant) not in done]
    logger.info("%d of %d items left to ask (answers in %s)", len(todo), len(doc["items"]), answers)
    todo = todo[:limit]
    answers.parent.mkdir(parents=True, exist_ok=True)
    unparsed = 0
    for item in todo:
        shown, start = candidates(item, variant)
        first, last = index_base, index_base + len(shown) - 1
        text = prompt.format(n=len(shown), first=first, last=last, description=item["description"])
        labels = [(f"Image {first + j}:", folder / rel) for j, rel in enumerate(shown)]
        answer = client.complete(image_message(text, labels))
        number = parse_image_number(answer, first, last)
        pred = None if number is None else start + number - first  # position among the 10
        unparsed += pred is None
        _append(answers, {"id": item["id"], "set": item["set"], "description": item["description"],
                          "variant": variant, "model": client.model, "answer": answer, "number": number,
                          "pred": pred, "target": item["target"], "correct": pred == item["target"]})
    return {"asked": len(todo), "unparsed": unparsed, "retries": client.retries}


# ----------------------------------------------------------------------------- compare

def _key(rec: dict) -> Tuple[str, str]:
    return rec["set"], rec["description"]


def _their_pred(answer: dict, item: dict, variant: int, index_base: int) -> Optional[int]:
    """An answer's position among the 10: its ``pred``, else its raw ``answer`` text parsed."""
    if "pred" in answer:
        return answer["pred"]
    shown, start = candidates(item, variant)
    number = parse_image_number(str(answer.get("answer", "")), index_base, index_base + len(shown) - 1)
    return None if number is None else start + number - index_base


def compare(sample: Path, answers: Path, predictions: Path, variant: int = 10, index_base: int = 1) -> dict:
    """Accuracy of the external answers and of our predictions on the items both cover.

    ``answers``: json lines (or a json list) of ``{"set", "description", "pred"}`` (position among
    the 10, null when unparseable) as ``ask`` writes them, or with a raw ``"answer"`` text instead of
    ``pred``, parsed here (``index_base``: the number of the first image the model was shown)."""
    _, doc = load_sample(sample)
    raw = read_json(answers) if answers.suffix == ".json" else read_answers(answers)
    theirs = {_key(a): a for a in raw if a.get("variant", variant) == variant}
    ours_list = read_json(predictions)
    if not isinstance(ours_list, list):
        raise ValueError(f"{predictions}: expected a list of predictions.json entries")
    ours = {_key(p): p for p in ours_list}
    rows, missing = [], {"answers": 0, "predictions": 0}
    for item in doc["items"]:
        a, p = theirs.get(_key(item)), ours.get(_key(item))
        missing["answers"] += a is None
        missing["predictions"] += p is None
        if a is None or p is None:
            continue
        if variant == WINDOW:
            start, end = item["window"]
            scores = p.get("scores")
            if not scores:
                raise ValueError(f"{predictions}: entry for {_key(item)} has no 'scores' for the 4-image variant")
            our_pred = start + max(range(end - start), key=lambda j: scores[start + j])
        else:
            our_pred = p["pred"]
        rows.append({"id": item["id"], "video": item["video"], "target": item["target"],
                     "theirs": _their_pred(a, item, variant, index_base), "ours": our_pred, "answer": a.get("answer")})
    return {"variant": variant, "missing": missing, "items": rows, "summary": _summary(rows)}


def _summary(rows: Sequence[dict]) -> Dict[str, dict]:
    out = {}
    for name, keep in (("all", lambda r: True), ("static", lambda r: not r["video"]), ("video", lambda r: r["video"])):
        sel = [r for r in rows if keep(r)]
        t = [r["theirs"] == r["target"] for r in sel]
        o = [r["ours"] == r["target"] for r in sel]
        pct = lambda hits: 100.0 * sum(hits) / len(hits) if hits else float("nan")  # noqa: E731
        out[name] = {"n": len(sel), "theirs": pct(t), "ours": pct(o),
                     "unparsed": sum(r["theirs"] is None for r in sel),
                     "both": sum(a and b for a, b in zip(t, o)), "only_theirs": sum(a and not b for a, b in zip(t, o)),
                     "only_ours": sum(b and not a for a, b in zip(t, o)), "neither": sum(not (a or b) for a, b in zip(t, o))}
    return out


def compare_table(result: dict, theirs: str = "MLLM", ours: str = "ours") -> str:
    lines = [f"| items ({result['variant']} images) | n | {theirs} | {ours} | {theirs} unparsed | both right | "
             f"only {theirs} | only {ours} | neither |", "|---" * 9 + "|"]
    for name, s in result["summary"].items():
        lines.append(f"| {name} | {s['n']} | {s['theirs']:.1f} | {s['ours']:.1f} | {s['unparsed']} | {s['both']} | "
                     f"{s['only_theirs']} | {s['only_ours']} | {s['neither']} |")
    m = result["missing"]
    lines += ["", f"Accuracy in %; unparsed answers count as wrong. Sample items without an answer: "
                  f"{m['answers']}, without a prediction: {m['predictions']} (left out)."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m analysis.mllm", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample", help="draw the seeded subset and copy its images")
    s.add_argument("--ann_root", required=True, help="folder with valid_data.json (docs/FORMATS.md section 3)")
    s.add_argument("--image_root", required=True, help="the image-sets folder")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--split", default="valid", choices=["train", "valid"])
    s.add_argument("--n_static", type=int, default=50)
    s.add_argument("--n_video", type=int, default=50)
    s.add_argument("--seed", type=int, default=0)
    a = sub.add_parser("ask", help="ask an OpenAI-compatible chat endpoint about every sample item")
    a.add_argument("--sample", required=True, type=Path, help="sample folder (or its sample.json)")
    a.add_argument("--answers", required=True, type=Path, help="answers file (json lines); resumed if present")
    a.add_argument("--base_url", required=True, help="e.g. https://api.openai.com/v1 or http://localhost:8000/v1")
    a.add_argument("--model", required=True)
    a.add_argument("--api_key_env", default="OPENAI_API_KEY",
                   help="environment variable holding the key ('' for none); the key is never written")
    a.add_argument("--variant", type=int, choices=[10, WINDOW], default=10, help="10 candidates or the 4 around the target")
    a.add_argument("--prompt", default=DEFAULT_PROMPT, help="template with {n} {first} {last} {description}")
    a.add_argument("--prompt_file", type=Path, help="read the prompt template from a file instead")
    a.add_argument("--index_base", type=int, choices=[0, 1], default=1, help="number of the first image shown")
    a.add_argument("--rate", type=float, default=1.0, help="at most this many requests per second")
    a.add_argument("--max_retries", type=int, default=5)
    a.add_argument("--backoff", type=float, default=2.0, help="first retry delay (s), doubled each retry")
    a.add_argument("--timeout", type=float, default=120.0)
    a.add_argument("--max_tokens", type=int, default=50)
    a.add_argument("--limit", type=int, help="ask at most this many items this run")
    c = sub.add_parser("compare", help="score external answers and our predictions.json side by side")
    c.add_argument("--sample", required=True, type=Path)
    c.add_argument("--answers", required=True, type=Path)
    c.add_argument("--predictions", required=True, type=Path, help="our predictions.json (same split)")
    c.add_argument("--variant", type=int, choices=[10, WINDOW], default=10)
    c.add_argument("--index_base", type=int, choices=[0, 1], default=1,
                   help="for answers given as raw text only: the number of the first image shown")
    c.add_argument("--names", default="MLLM,ours", help="column names: theirs,ours")
    c.add_argument("--out", type=Path, help="folder for compare.json and compare.md")
    return ap


def main(argv: Optional[List[str]] = None) -> dict:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.cmd == "sample":
        args.out.mkdir(parents=True, exist_ok=True)
        return sample_items(Path(args.ann_root), Path(args.image_root), args.out, args.n_static, args.n_video,
                            args.seed, args.split)
    if args.cmd == "ask":
        key = None
        if args.api_key_env:
            key = os.environ.get(args.api_key_env)
            if not key:
                raise SystemExit(f"environment variable {args.api_key_env} is not set (pass --api_key_env '' "
                                 "for an endpoint without a key)")
        prompt = args.prompt_file.read_text(encoding="utf-8") if args.prompt_file else args.prompt
        client = ChatClient(args.base_url, args.model, key, timeout=args.timeout, max_retries=args.max_retries,
                            backoff=args.backoff, min_interval=1.0 / args.rate if args.rate > 0 else 0.0,
                            max_tokens=args.max_tokens)
        try:
            counts = ask(args.sample, args.answers, client, args.variant, prompt, args.index_base, args.limit)
        except ChatError as err:
            raise SystemExit(f"stopped: {err}. Answers so far are in {args.answers}; run again to resume.")
        except (ValueError, FileNotFoundError) as err:  # a bad sample or answers file
            raise SystemExit(str(err))
        print(f"asked {counts['asked']} items ({counts['unparsed']} unparseable answers, "
              f"{counts['retries']} retries); answers in {args.answers}")
        return counts
    result = compare(args.sample, args.answers, args.predictions, args.variant, args.index_base)
    theirs, ours = (args.names.split(",") + ["ours"])[:2]
    table = compare_table(result, theirs, ours)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compare.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "compare.md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
