"""``tests/durations.json``: the seconds each test took (those of 0.1 s or more), which conftest's
``pytest_collection_modifyitems`` adds up per file to hand the longest files to the pytest-xdist
workers first (``--dist loadfile --no-loadscope-reorder``: a long file started last is the
suite's tail).

Refresh it from a run's report (``make test-durations`` does both steps)::

    python -m pytest -n 2 --dist loadfile --no-loadscope-reorder -m "not timing" --durations=0 > report.txt
    python -m tests.scripts.durations report.txt

Only the order depends on it: a stale or missing entry changes no test, only how soon it starts.
"""
from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

PATH = Path(__file__).resolve().parents[1] / "durations.json"
MIN_S = 0.1
_LINE = re.compile(r"^([\d.]+)s (?:call|setup|teardown)\s+(tests/\S+\.py::.+?)\s*$")


def parse(report: str) -> dict:
    """``{test id: seconds}`` (setup + call + teardown) from a ``--durations=0`` report, the
    tests of at least ``MIN_S``, longest first."""
    seconds: dict = defaultdict(float)
    for line in report.splitlines():
        match = _LINE.match(line)
        if match:
            seconds[match.group(2)] += float(match.group(1))
    return {name: round(t, 1) for name, t in sorted(seconds.items(), key=lambda kv: -kv[1]) if t >= MIN_S}


def load() -> dict:
    try:
        return json.loads(PATH.read_text())
    except (OSError, ValueError):
        return {}


def main(argv) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    seconds = parse(Path(argv[0]).read_text())
    if not seconds:
        print(f"{argv[0]}: no duration lines (run pytest with --durations=0)", file=sys.stderr)
        return 1
    PATH.write_text(json.dumps(seconds, indent=1) + "\n")
    print(f"{PATH}: {len(seconds)} tests of {MIN_S} s or more, {sum(seconds.values()):.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
