"""Caption variants: a new caption column made from existing ones (BLIP's cleaning, or a template).

    # BLIP's pre_caption (lowercase, punctuation out, at most --max_words words) as a new column
    python -m tools captions --input products.csv --caption_col title --clean --new_col title_clean \\
        --output products_v2.csv
    # a prompt / template over any columns ({{ and }} are literal braces)
    python -m tools captions --input products_v2.csv --template "a photo of {title}, by {brand}" \\
        --new_col title_prompt --output products_v3.csv
    # BLIP json: a new field in every entry (a caption list gives a list); to a .csv: a row per caption
    python -m tools captions --input test.json --template "a photo of {caption}" --new_col prompt --output out.json
    python -m tools captions --input test.json --clean --new_col caption_clean --output test.csv

The new column is the template filled from the row (``{name}``: the value of column ``name``; json:
field ``name``, where ``{caption}``, or the ``--caption_col`` field, is each caption of a caption
list in turn), or, without ``--template``, the ``--caption_col`` column itself; ``--clean`` then
applies ``pre_caption`` (``data/utils.py``, docs/FORMATS.md section 1) with ``--max_words``. Every
other column, and every row, is written unchanged, in order, to ``--output`` (a CSV's delimiter
follows the output's extension: ``.tsv`` tab). A json input written to a ``.csv`` / ``.tsv`` output
becomes one row per caption: ``image``, the caption, the new column, then the entries' other scalar
fields (``image_id``, ...), the layout ``dataset: custom`` and ``tools sweep`` read. The training
and evaluation configs then read the new column with ``caption_col``, and ``tools sweep
--caption_cols`` compares it with the others.

Errors, all before anything is written: an unknown column (named with the file's columns), a
template placeholder that is not a column, a placeholder with a format spec or without a name, an
unbalanced brace, a new column that exists already (``--replace`` overwrites it), an output that is
the input, and a row whose new caption is empty (naming its row and line).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import string
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from data.entries import _where
from data.utils import csv_delimiter, pre_caption, read_csv, read_json, short_repr
from utils.errors import DataError, UserError

logger = logging.getLogger("tools.captions")

Template = List[Tuple[str, Optional[str]]]  # (literal text, placeholder name or None)


def _args(argv, prog):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--input", required=True, help="a CSV/TSV file with a header row, or a BLIP json list")
    p.add_argument("--output", required=True, help="the file to write (same format; not the input)")
    p.add_argument("--new_col", required=True, help="the new column (json: field) to write")
    p.add_argument("--caption_col", default="caption",
                   help="the caption column (json: field) the new one is made from without --template; json: the "
                        "caption (list) field")
    p.add_argument("--template", default=None,
                   help="the new caption as a template over the row's columns: 'a photo of {title}'")
    p.add_argument("--clean", action="store_true", help="apply BLIP's pre_caption (after the template)")
    p.add_argument("--max_words", type=int, default=30, help="--clean keeps the first N words (BLIP: 30)")
    p.add_argument("--replace", action="store_true", help="overwrite --new_col when the file has it already")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--format", default="auto", choices=("auto", "json", "csv"),
                   help="input format (auto: by extension)")
    args = p.parse_args(argv)
    if args.template is None and not args.clean:
        p.error("give --clean, --template TEMPLATE or both")
    if args.max_words < 1:
        p.error(f"--max_words must be >= 1, got {args.max_words}")
    return args


def parse_template(template: str) -> Template:
    """The pieces of a ``str.format``-style template with named placeholders only (no format specs,
    conversions or positional ``{}``); ``{{`` / ``}}`` are literal braces."""
    pieces: Template = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise UserError(f"--template {template!r}: {err}; write a literal brace as {{{{ or }}}}") from None
    for literal, name, spec, conversion in parsed:
        if name is not None:
            if not name.strip():
                raise UserError(f"--template {template!r}: a placeholder needs a column name, as in {{title}}")
            if spec or conversion:
                raise UserError(f"--template {template!r}: placeholder {{{name}{'!' + conversion if conversion else ''}"
                                f"{':' + spec if spec else ''}}} has a format spec or conversion; only {{column}} "
                                "is supported")
        pieces.append((literal, name))
    return pieces


def placeholders(pieces: Template) -> List[str]:
    return list(dict.fromkeys(name for _, name in pieces if name is not None))


def fill(pieces: Template, values: Dict[str, Any]) -> str:
    return "".join(literal + ("" if name is None else str(values[name])) for literal, name in pieces)


def _new_caption(args, pieces: Optional[Template], values: Dict[str, Any], where: str) -> str:
    text = fill(pieces, values) if pieces is not None else str(values[args.caption_col])
    if args.clean:
        text = pre_caption(text, args.max_words)
    if not text.strip():
        source = f"template {args.template!r}" if pieces is not None else f"column {args.caption_col!r}"
        raise DataError(f"{where}: the new caption ({args.new_col!r}, from the {source}"
                        f"{' and --clean' if args.clean else ''}) is empty; fix the row or drop it")
    return text


def _csv(args, pieces: Optional[Template]) -> Tuple[List[str], List[List[str]], List[str]]:
    """(header, rows with the new column, the first new captions) of a CSV input."""
    header, rows = read_csv(args.input)
    needed = placeholders(pieces) if pieces is not None else [args.caption_col]
    missing = [c for c in needed if c not in header]
    if missing:
        what = (f"template placeholder{'s' if len(missing) > 1 else ''}" if pieces is not None else "--caption_col")
        raise DataError(f"{args.input}: no column {', '.join(repr(c) for c in missing)} ({what}) (columns: {header})")
    if args.new_col in header and not args.replace:
        raise UserError(f"{args.input} has a column {args.new_col!r} already: choose another --new_col, or pass "
                        "--replace to overwrite it")
    position = header.index(args.new_col) if args.new_col in header else len(header)
    out_header = header if position < len(header) else header + [args.new_col]
    out_rows, examples = [], []
    for row in rows:
        values = dict(zip(header, row.fields))
        new = _new_caption(args, pieces, values, row.where(args.input))
        fields = list(row.fields)
        if position < len(fields):
            fields[position] = new
        else:
            fields.append(new)
        out_rows.append(fields)
        if len(examples) < 3:
            examples.append(new)
    return out_header, out_rows, examples


def _json(args, pieces: Optional[Template]) -> Tuple[list, List[str]]:
    """(entries with the new field, the first new captions) of a BLIP json list: a caption list gives
    a list."""
    entries = read_json(args.input)
    if not isinstance(entries, list):
        raise DataError(f"{args.input}: expected a json list of entries, got {type(entries).__name__}")
    needed = placeholders(pieces) if pieces is not None else [args.caption_col]
    out, examples = [], []
    for k, entry in enumerate(entries):
        where = _where(args.input, k)
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
        missing = [c for c in needed if c not in entry]
        if missing:
            what = "template placeholder" if pieces is not None else "--caption_col"
            raise DataError(f"{where}: no field {', '.join(repr(c) for c in missing)} ({what}) "
                            f"(fields: {sorted(entry)})")
        if args.new_col in entry and not args.replace:
            raise UserError(f"{where} has a field {args.new_col!r} already: choose another --new_col, or pass "
                            "--replace to overwrite it")
        for name in needed:
            value = entry[name]
            ok = isinstance(value, (str, int, float)) and not isinstance(value, bool) or (
                name == args.caption_col and isinstance(value, list) and value
                and all(isinstance(v, str) for v in value))
            if not ok:
                raise DataError(f"{where}: invalid field {name!r}: expected a string or a number"
                                f"{' (or a list of captions)' if name == args.caption_col else ''}, "
                                f"got {short_repr(value)}")
        captions = entry.get(args.caption_col)
        if isinstance(captions, list):  # one new caption per caption of the list
            new: Any = [_new_caption(args, pieces, {**entry, args.caption_col: c}, f"{where} (caption {j})")
                        for j, c in enumerate(captions)]
        else:
            new = _new_caption(args, pieces, entry, where)
        out.append({**entry, args.new_col: new})
        if len(examples) < 3:
            examples.append(new[0] if isinstance(new, list) else new)
    if not out:
        raise DataError(f"{args.input}: no entries (an empty json list)")
    return out, examples


def json_rows(entries: list, caption_col: str, new_col: str) -> Tuple[List[str], List[List[str]]]:
    """BLIP json entries (with ``new_col``) as CSV rows, one per caption: the columns ``image``, the
    caption and the new column first, then every other scalar field in first-seen order (a caption
    list gives one row per caption, with its own new caption)."""
    header = ["image", caption_col, new_col]
    for entry in entries:
        header += [k for k, v in entry.items() if k not in header and not isinstance(v, (list, dict))]
    rows = []
    for entry in entries:
        captions, new = entry.get(caption_col), entry[new_col]
        pairs = zip(captions, new) if isinstance(captions, list) else [(captions, new)]
        for caption, value in pairs:
            row = {**entry, caption_col: caption, new_col: value}
            rows.append(["" if row.get(k) is None else str(row[k]) for k in header])
    return header, rows


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def main(argv=None, prog: str = "python -m tools captions") -> dict:
    args = _args(argv, prog)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    src, dest = Path(args.input), Path(args.output)
    if dest.exists() and src.exists() and os.path.samefile(src, dest):
        raise UserError(f"--output {dest} is the input file: write the new column to another file")
    if dest.exists() and not args.overwrite:
        raise UserError(f"--output {dest} exists already; pass --overwrite to replace it, or write elsewhere")
    pieces = parse_template(args.template) if args.template is not None else None
    is_csv = args.format == "csv" or (args.format == "auto" and str(src).lower().endswith((".csv", ".tsv")))
    to_csv = str(dest).lower().endswith((".csv", ".tsv"))
    if is_csv and not to_csv:
        raise UserError(f"--output {dest}: a CSV/TSV input is written as CSV/TSV (.csv or .tsv)")
    if not is_csv and to_csv:  # BLIP json -> a CSV, one row per caption
        header, rows = json_rows(*_json(args, pieces)[:1], args.caption_col, args.new_col)
        examples = [row[header.index(args.new_col)] for row in rows[:3]]
        is_csv = True
    elif is_csv:
        header, rows, examples = _csv(args, pieces)
    if is_csv:
        buf = io.StringIO(newline="")
        writer = csv.writer(buf, delimiter=csv_delimiter(dest), lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        _write(dest, buf.getvalue().encode("utf-8"))
        n = len(rows)
    else:
        entries, examples = _json(args, pieces)
        _write(dest, json.dumps(entries, ensure_ascii=False, indent=1).encode("utf-8"))
        n = len(entries)
    how = " then ".join(([f"template {args.template!r}"] if pieces is not None else [f"column {args.caption_col!r}"])
                        + ([f"pre_caption (max_words {args.max_words})"] if args.clean else []))
    print(f"wrote {dest}: {n} {'rows' if is_csv else 'entries'}, new {'column' if is_csv else 'field'} "
          f"{args.new_col!r} = {how}")
    for k, new in enumerate(examples):
        print(f"  {'row' if is_csv else 'entry'} {k}: {new!r}")
    return {"output": str(dest), "rows": n, "new_col": args.new_col, "rule": how}


if __name__ == "__main__":
    main()
