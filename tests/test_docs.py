"""The documentation holds together (pure file reads): README.md is a short map, every relative link in
README.md and docs/*.md reaches a file, every docs page the code or the docs cite exists, and every
docs page is reachable from the README."""
from __future__ import annotations

import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = sorted((REPO / "docs").glob("*.md"))
MAX_README_LINES = 250
SKIP_DIRS = {".venv", "outputs", ".git", "__pycache__", ".pytest_cache", "node_modules"}
CITING = (".py", ".md", ".sh", ".yaml", ".yml")

LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")   # [text](target "title")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CITED_PAGE = re.compile(r"(?<![\w/.-])docs/([A-Za-z0-9_-]+\.md)")


def _prose(text: str) -> str:
    """The text without fenced code blocks (a `[x](y)` in code is no link)."""
    return FENCE.sub("", text)


def _links(md: Path) -> list:
    """(target path without its #anchor, the link as written) of every relative link in a page."""
    out = []
    for target in LINK.findall(_prose(md.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # http(s):, mailto:, an anchor in the same page
        out.append((target.split("#", 1)[0], target))
    return out


def _citing_files():
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        for name in files:
            if name.endswith(CITING) or name == "Makefile":
                yield Path(root) / name


def test_readme_is_a_map_of_at_most_250_lines():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines (at most {MAX_README_LINES}): move the details to a page under docs/")


def test_readme_holds_no_measured_figure():
    # Measured numbers live in docs/PERFORMANCE.md and the task pages; the README only links them.
    prose = re.sub(r"`[^`\n]*`", "", _prose(README.read_text(encoding="utf-8")))
    decimals = set(re.findall(r"\b\d+\.\d+\b", prose)) - {"3.10", "3.11", "3.12"}  # Python versions
    durations = re.findall(r"\b\d+(?:\.\d+)?\s*(?:min|s|h|ms)\b", prose)
    ratios = re.findall(r"\b\d+(?:\.\d+)?x\b", prose)
    assert not decimals and not durations and not ratios, (decimals, durations, ratios)
    assert "docs/PERFORMANCE.md" in prose and "outputs/demo/REPORT.md" in README.read_text(encoding="utf-8")


def test_every_relative_link_resolves_to_a_file():
    checked, broken = 0, []
    for md in [README, *PAGES]:
        for path, written in _links(md):
            checked += 1
            if not path or not (md.parent / path).exists():
                broken.append(f"{md.relative_to(REPO)}: ({written})")
    assert checked > 20  # the README and the task pages link each other
    assert not broken, "links to nothing:\n" + "\n".join(broken)


def test_every_cited_docs_page_exists():
    cited = {}
    for f in _citing_files():
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for name in CITED_PAGE.findall(text):
            cited.setdefault(name, str(f.relative_to(REPO)))
    assert {"FORMATS.md", "BLIP.md", "RETRIEVAL.md"} <= set(cited), sorted(cited)
    missing = {name: where for name, where in cited.items() if not (REPO / "docs" / name).is_file()}
    assert not missing, f"docs pages cited but absent (page: first file citing it): {missing}"


def test_every_docs_page_is_reachable_from_the_readme():
    linked = {(README.parent / path).resolve() for path, _ in _links(README)}
    unlinked = [p.name for p in PAGES if p.resolve() not in linked]
    assert PAGES and not unlinked, f"docs pages the README does not link (add them to its map): {unlinked}"
