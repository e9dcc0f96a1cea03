"""The official BLIP checkpoints by name (``pretrained: blip/<name>``): name, task, ViT, image size, URL.

    python -m tools models              # a table, one checkpoint a row
    python -m tools models --format tsv # tab-separated, with a header row (for scripts)

A name stands for its URL (``$BLIP_ZOO_URL`` replaces the release's base) and is downloaded once
into the checkpoint cache (``$CONTEXTBLIP_CACHE``, default ``~/.cache/contextblip/checkpoints``).
The image size is the one the release uses the file at; another one works too (the position
embeddings are resized when it loads). docs/BLIP.md, "Official checkpoints by name".
"""
from __future__ import annotations

import argparse

from utils.zoo import ENTRIES

COLUMNS = ("name", "task", "vit", "image_size", "about", "url")


def _args(argv, prog):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--format", choices=("table", "tsv"), default="table",
                   help="an aligned table (default) or tab-separated values with a header")
    return p.parse_args(argv)


def rows() -> list:
    """One tuple of COLUMNS per checkpoint, in the registry's order."""
    return [(e.name, e.task, e.vit, str(e.image_size), e.about, e.url()) for e in ENTRIES]


def main(argv=None, prog: str = "python -m tools models") -> list:
    args = _args(argv, prog)
    table = rows()
    if args.format == "tsv":
        print("\n".join("\t".join(row) for row in [COLUMNS, *table]))
        return table
    # Aligned columns but the last two (the description and the URL, which go on a line of their own).
    widths = [max(len(r[i]) for r in [COLUMNS, *table]) for i in range(4)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*COLUMNS[:4]) + "  about / url"]
    for row in table:
        lines.append(fmt.format(*row[:4]) + "  " + row[4])
        lines.append(" " * (sum(widths) + 2 * 4) + row[5])
    print("\n".join(lines))
    return table
