"""The bad-input campaign (issue 25): bad and odd inputs a real user gives every entry script and
tool, each run through the entry point as the user runs it, with what must come of it: the exit
status, the parts of the first message line, and what must not change (every file of the watched
folders byte for byte, and the folders a refused run must not create).

``tests/test_bad_inputs.py`` runs every case in-process. This file also prints the campaign's
table for any checkout of the project (the inputs are made with this checkout's code)::

    python -m tests.scripts.bad_inputs --tree /path/to/a/checkout [--out table.md] [--cases R1 O3]

Each case is ``Case(id, title, make)``: ``make(world, tmp)`` writes what the case needs under
``tmp`` and returns a :class:`Run`. ``R*`` are the inputs the issue reported, ``O*`` our own
(``V*``: train_vqa.py, ``N*``: train_nlvr.py).

Where things live (all under ``tests/scripts/``): ``campaign_runs.py`` (``Run``, ``Case``,
``refused``, running a case in-process or as a subprocess, observing it), ``campaign_world.py``
(the ``World`` the cases read, ``build_world``, the fixture paths and the shared command helpers),
and the cases by what they exercise, each module with its ``CASES``: ``cases_runs.py`` (the entry
scripts' training / evaluation / resume / checkpoint inputs), ``cases_tools.py`` (``python -m
tools ...`` and HF folders), ``cases_vqa_nlvr.py`` (``V*``, ``N*``). This file assembles
:data:`CASES` in the campaign's order (R, O, V, N, each by number) and prints the table.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import List

from tests.scripts import campaign_world, cases_runs, cases_tools, cases_vqa_nlvr
from tests.scripts.campaign_runs import REPO, changes, first_line, run_subprocess, snapshot
from tests.scripts.campaign_world import World, build_world

CASES = sorted(cases_runs.CASES + cases_tools.CASES + cases_vqa_nlvr.CASES,
               key=lambda case: ("ROVN".index(case.id[0]), int(case.id[1:])))
assert len({case.id for case in CASES}) == len(CASES), "two cases share an id"


# ----------------------------------------------------------------------------- the table

def _cell(text: str, limit: int = 150) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def table(world: World, tree: Path, ids=None) -> List[str]:
    rows = ["| case | input | exit | first message line | files written or changed |", "|---|---|---:|---|---|"]
    for case in CASES:
        if ids and case.id not in ids:
            continue
        tmp = world.root / "cases" / case.id
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        run = case.make(world, tmp)
        watched = run.watch + [world.root / n for n in ("run", "gallery", "hf")]
        before = snapshot(watched)
        t0 = time.time()
        code, out, err = run_subprocess(run, tree)
        written = changes(before, snapshot(watched))
        written += [f"+{p.name}/" for p in run.absent + run.shows if p.exists()]
        line = first_line(code, out, err)
        rows.append(f"| {case.id} | {_cell(case.title, 70)} | {code} | {_cell(line)} | "
                    f"{_cell(', '.join(sorted(set(written))) or 'nothing', 80)} |")
        print(f"{case.id} ({time.time() - t0:.0f}s): {code} {line[:120]}", file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", type=Path, default=REPO, help="the checkout whose entry points run the cases")
    p.add_argument("--work", type=Path, default=None, help="folder for the inputs (default: a temp folder)")
    p.add_argument("--out", type=Path, default=None, help="write the markdown table here too")
    p.add_argument("--cases", nargs="*", default=None, help="only these case ids")
    args = p.parse_args(argv)
    import tempfile
    work = args.work or Path(tempfile.mkdtemp(prefix="bad_inputs_"))
    campaign_world.SETUP_TREE = args.tree.resolve() if args.tree.resolve() != REPO else None
    world = build_world(work / "world")
    rows = table(world, args.tree.resolve(), set(args.cases) if args.cases else None)
    text = "\n".join(rows) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
