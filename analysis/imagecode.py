"""ImageCoDe analysis of ``predictions.json`` files (written by zero_shot.py / finetune_imagecode.py).

    python -m analysis.imagecode report ZS.json S1.json S2.json --names zero-shot,stage1,stage2 \\
        --tags DATA/analysis/manual_annotation_valid.yaml --out DIR
    python -m analysis.imagecode compare ZS.json S2.json --names zero-shot,stage2 --tags TAGS --out DIR

``report``: accuracy of each file overall, video vs static, per description-length bucket (words)
and per phenomenon tag of the annotation file (docs/FORMATS.md section 3; an item's tags are all the
codes of its annotation, an empty annotation counts as "other"; items absent from the file are not
in the tag rows) -> ``DIR/report.md`` (Markdown table), ``DIR/report.png`` (bar charts),
``DIR/report.json``.
``compare``: on the same items, which each file gets right (both / only A / only B / neither) per
category -> ``DIR/compare.md`` and ``DIR/compare.json`` (with the items only one of them gets right).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from utils.errors import json_error

TAG_NAMES = {
    "s": "spatial", "col": "colour", "q": "quantity", "n": "nuance", "con": "context", "img": "image quality",
    "neg": "negation", "v": "visibility", "cor": "co-reference", "t": "temporal",
    "cmp": "comparative; the synthetic benchmark's code", "other": "no code in the annotation",
}
REQUIRED = ("set", "description", "target", "pred", "video")
DEFAULT_EDGES = (10, 20, 30)
Key = Tuple[str, str, int]  # (set, description, occurrence): identical descriptions in a set stay apart


# ----------------------------------------------------------------------------- reading

def load_predictions(path) -> Dict[Key, dict]:
    """``predictions.json`` -> {key: entry}, labelled entries only; errors name file, entry and field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"predictions file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: {json_error(e)}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of predictions, got {type(data).__name__}")
    out: Dict[Key, dict] = {}
    seen: Counter = Counter()
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}, entry {i}: expected an object, got {type(entry).__name__}")
        missing = [f for f in REQUIRED if f not in entry]
        if missing:
            raise ValueError(f"{path}, entry {i}: missing field(s) {missing}")
        if entry["target"] is None:
            continue  # unlabelled (test): nothing to score
        for field in ("target", "pred"):
            if not isinstance(entry[field], int) or isinstance(entry[field], bool):
                raise ValueError(f"{path}, entry {i}: field '{field}' must be an integer, got {entry[field]!r}")
        base = (entry["set"], entry["description"])
        out[(*base, seen[base])] = entry
        seen[base] += 1
    if not out:
        raise ValueError(f"{path}: no labelled predictions (is it the unlabelled test split?)")
    return out


def load_tags(path) -> Dict[Tuple[str, int], List[str]]:
    """The phenomenon annotation file -> {(set, position): [code, ...]} ("other" if empty)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    path = Path(path)
    try:
        doc = YAML(typ="safe").load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"tag file not found: {path}") from None
    except YAMLError as e:
        raise ValueError(f"cannot parse tag file {path}: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected {{set_name: {{position: {{annotation: ...}}}}}}, got {type(doc).__name__}")
    tags = {}
    for set_name, by_pos in doc.items():
        if not isinstance(by_pos, dict):
            raise ValueError(f"{path}, set {set_name!r}: expected a mapping of positions, got {type(by_pos).__name__}")
        for pos, entry in by_pos.items():
            where = f"{path}, set {set_name!r}, position {pos!r}"
            if not isinstance(entry, dict) or "annotation" not in entry:
                raise ValueError(f"{where}: expected a mapping with an 'annotation' field")
            try:
                position = int(str(pos))
            except ValueError:
                raise ValueError(f"{where}: position is not an integer") from None
            codes = [c.strip().lower() for c in str(entry["annotation"] or "").split(",") if c.strip()]
            tags[(str(set_name), position)] = codes or ["other"]
    return tags


# ----------------------------------------------------------------------------- grouping

def length_bucket(description: str, edges: Sequence[int] = DEFAULT_EDGES) -> str:
    n = len(description.split())
    low = 1
    for edge in edges:
        if n <= edge:
            return f"{low}-{edge} words"
        low = edge + 1
    return f">{edges[-1]} words"


def categories(entry: dict, tags: Optional[dict], edges: Sequence[int]) -> List[Tuple[str, str]]:
    """(group, category) pairs an item counts in."""
    out = [("all", "all"), ("type", "video" if entry["video"] else "static"),
           ("length", length_bucket(entry["description"], edges))]
    if tags is not None and (entry["set"], entry["target"]) in tags:
        out += [("tag", code) for code in tags[(entry["set"], entry["target"])]]
    return out


def _order(cats: Iterable[Tuple[str, str]], edges: Sequence[int]) -> List[Tuple[str, str]]:
    lengths = [f"{lo}-{hi} words" for lo, hi in zip((1, *[e + 1 for e in edges[:-1]]), edges)] + [f">{edges[-1]} words"]
    rank = {"all": 0, "type": 1, "length": 2, "tag": 3}
    return sorted(set(cats), key=lambda c: (rank[c[0]], lengths.index(c[1]) if c[0] == "length" else 0,
                                            ["video", "static"].index(c[1]) if c[0] == "type" else 0, c[1]))


def _common_keys(runs: Sequence[Dict[Key, dict]], names: Sequence[str]) -> List[Key]:
    keys = set(runs[0])
    for run, name in zip(runs[1:], names[1:]):
        if set(run) != keys:
            diff = sorted(set(run) ^ keys)[:3]
            raise ValueError(f"prediction files cover different items ({names[0]} vs {name}), e.g. {diff}")
    return sorted(keys)


def accuracy_table(runs: Sequence[Dict[Key, dict]], names: Sequence[str], tags: Optional[dict],
                   edges: Sequence[int] = DEFAULT_EDGES) -> List[dict]:
    """Rows ``{group, category, n, <name>: accuracy %}`` over the items all runs share."""
    keys = _common_keys(runs, names)
    counts: Counter = Counter()
    hits = {name: Counter() for name in names}
    for key in keys:
        for cat in categories(runs[0][key], tags, edges):
            counts[cat] += 1
            for run, name in zip(runs, names):
                hits[name][cat] += run[key]["pred"] == run[key]["target"]
    return [{"group": g, "category": c, "n": counts[(g, c)],
             **{name: 100.0 * hits[name][(g, c)] / counts[(g, c)] for name in names}}
            for g, c in _order(counts, edges)]


def compare_table(a: Dict[Key, dict], b: Dict[Key, dict], names: Sequence[str], tags: Optional[dict],
                  edges: Sequence[int] = DEFAULT_EDGES) -> Tuple[List[dict], Dict[str, List[dict]]]:
    """Per category: both right / only A / only B / neither; plus the items only one gets right."""
    keys = _common_keys([a, b], names)
    table: Dict[Tuple[str, str], Counter] = {}
    only: Dict[str, List[dict]] = {f"only_{names[0]}": [], f"only_{names[1]}": []}
    for key in keys:
        ra, rb = a[key]["pred"] == a[key]["target"], b[key]["pred"] == b[key]["target"]
        outcome = "both" if ra and rb else f"only_{names[0]}" if ra else f"only_{names[1]}" if rb else "neither"
        for cat in categories(a[key], tags, edges):
            table.setdefault(cat, Counter())[outcome] += 1
        if outcome.startswith("only_"):
            only[outcome].append({"set": key[0], "description": key[1], "target": a[key]["target"],
                                  f"pred_{names[0]}": a[key]["pred"], f"pred_{names[1]}": b[key]["pred"],
                                  "video": a[key]["video"]})
    rows = [{"group": g, "category": c, "n": sum(table[(g, c)].values()),
             **{o: table[(g, c)][o] for o in ("both", f"only_{names[0]}", f"only_{names[1]}", "neither")}}
            for g, c in _order(table, edges)]
    return rows, only


# ----------------------------------------------------------------------------- output

def _label(row: dict) -> str:
    if row["group"] == "tag":
        return f"tag {row['category']} ({TAG_NAMES.get(row['category'], 'unknown code')})"
    return row["category"] if row["group"] != "all" else "all"


def markdown(rows: List[dict], columns: Sequence[str], fmt: str = "{:.1f}") -> str:
    lines = ["| category | n | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]
    for r in rows:
        cells = [fmt.format(r[c]) if isinstance(r[c], float) else str(r[c]) for c in columns]
        lines.append(f"| {_label(r)} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(rows: List[dict], names: Sequence[str], path: Path, title: str = "ImageCoDe accuracy") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = [g for g in ("type", "length", "tag") if any(r["group"] == g for r in rows)]
    overall = next(r for r in rows if r["group"] == "all")
    fig, axes = plt.subplots(1, len(groups), figsize=(4 + 2.2 * sum(r["group"] in groups for r in rows) / 2, 4),
                             squeeze=False, gridspec_kw={"width_ratios": [sum(r["group"] == g for r in rows) for g in groups]})
    width = 0.8 / len(names)
    for ax, group in zip(axes[0], groups):
        sub = [r for r in rows if r["group"] == group]
        x = np.arange(len(sub))
        for i, name in enumerate(names):
            ax.bar(x + (i - (len(names) - 1) / 2) * width, [r[name] for r in sub], width,
                   label=f"{name} (all {overall[name]:.1f})")
        ax.set_xticks(x)
        ax.set_xticklabels([f"{r['category']}\n(n={r['n']})" for r in sub], fontsize=8)
        ax.set_title({"type": "video vs static", "length": "description length", "tag": "phenomenon tag"}[group])
        ax.set_ylim(0, 100)
        ax.axhline(10, color="grey", lw=0.8, ls="--")  # chance: 1 of 10
    axes[0][0].set_ylabel("top-1 accuracy (%)")
    axes[0][-1].legend(fontsize=8, loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(paths: Sequence[str], names: Sequence[str], tag_file: Optional[str], out_dir: Path,
           edges: Sequence[int] = DEFAULT_EDGES) -> List[dict]:
    runs = [load_predictions(p) for p in paths]
    tags = load_tags(tag_file) if tag_file else None
    rows = accuracy_table(runs, names, tags, edges)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = "# ImageCoDe accuracy (%)\n\n" + "".join(f"- {n}: `{p}`\n" for n, p in zip(names, paths))
    text += f"- tags: `{tag_file}`\n" if tag_file else "- tags: none given\n"
    text += "\n" + markdown(rows, names)
    (out_dir / "report.md").write_text(text)
    (out_dir / "report.json").write_text(json.dumps(rows, indent=1) + "\n")
    bar_chart(rows, names, out_dir / "report.png")
    return rows


def compare(path_a: str, path_b: str, names: Sequence[str], tag_file: Optional[str], out_dir: Path,
            edges: Sequence[int] = DEFAULT_EDGES) -> List[dict]:
    rows, only = compare_table(load_predictions(path_a), load_predictions(path_b), names,
                               load_tags(tag_file) if tag_file else None, edges)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = ["both", f"only_{names[0]}", f"only_{names[1]}", "neither"]
    text = f"# {names[0]} vs {names[1]}: items each gets right\n\n- {names[0]}: `{path_a}`\n- {names[1]}: `{path_b}`\n\n"
    (out_dir / "compare.md").write_text(text + markdown(rows, columns))
    (out_dir / "compare.json").write_text(json.dumps({"rows": rows, **only}, indent=1) + "\n")
    return rows


def _names(arg: Optional[str], paths: Sequence[str]) -> List[str]:
    names = [n.strip() for n in arg.split(",")] if arg else [Path(p).parent.name or Path(p).stem for p in paths]
    if len(names) != len(paths) or len(set(names)) != len(names):
        raise SystemExit(f"--names needs {len(paths)} distinct comma-separated names, got {names}")
    return names


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m analysis.imagecode", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for cmd, nargs in (("report", "+"), ("compare", 2)):
        p = sub.add_parser(cmd)
        p.add_argument("predictions", nargs=nargs, help="predictions.json file(s)")
        p.add_argument("--names", help="comma-separated labels (default: each file's folder name)")
        p.add_argument("--tags", help="phenomenon tag file (manual_annotation_valid.yaml)")
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--length_edges", default=",".join(map(str, DEFAULT_EDGES)),
                       help="word-count bucket edges (default 10,20,30)")
    args = ap.parse_args(argv)
    edges = tuple(int(e) for e in args.length_edges.split(","))
    names = _names(args.names, args.predictions)
    try:
        if args.cmd == "report":
            rows = report(args.predictions, names, args.tags, Path(args.out), edges)
            print(markdown(rows, names))
        else:
            rows = compare(*args.predictions, names, args.tags, Path(args.out), edges)
            print(markdown(rows, ["both", f"only_{names[0]}", f"only_{names[1]}", "neither"]))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
