"""MMVP-VLM (docs/FORMATS.md section 4): read the folder as distributed and score it with the official protocol.

Layout, read as it is (spaces in folder names included)::

    <data_root>/Questions.csv                        Question ID,Type,Statement
    <data_root>/MLLM_VLM Images/<Type>/<qid>.jpg     e.g. "MLLM_VLM Images/Camera Perspective/241.jpg"

Rows come in consecutive pairs (2k-1, 2k); each statement describes the image with its own qid.
A ``Type`` must be one of the release's nine (``TYPE_FOLDERS``), or one listed in ``extra_patterns``
(a custom benchmark's own patterns, reported under their own names next to the nine).

Protocol (``evaluate_pairs``, a pure function over a *scorer*): prompt = ``"a photo of " + statement``;
for each statement of a pair both images are scored and the higher wins, a tie going to the second
image; a pair counts only when both statements pick their own image. The pattern of pair ``p``
(0-based, file order) is ``PATTERNS[p // 15]``; per-pattern accuracy = 100 * correct / pairs of the
pattern (15 in the release), and the average is the mean over the patterns.
"""
from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from data import preflight
from data.utils import read_text
from utils.errors import DataError

logger = logging.getLogger(__name__)

QUESTIONS_FILE = "Questions.csv"
IMAGE_FOLDER = "MLLM_VLM Images"
COLUMNS = ("Question ID", "Type", "Statement")
PROMPT_PREFIX = "a photo of "
PAIRS_PER_PATTERN = 15

# The nine visual patterns, in the order their pairs appear in Questions.csv.
PATTERNS = (
    "Orientation and Direction", "Presence of Specific Features", "State and Condition",
    "Quantity and Count", "Positional and Relational Context", "Color and Appearance",
    "Structural Characteristics", "Texts", "Viewpoint and Perspective",
)
# The `Type` column (and image folder) the release uses for each pattern, same order.
TYPE_FOLDERS = (
    "Orientation", "Presence", "State", "Quantity", "Spatial", "Color",
    "Structural Character", "Text", "Camera Perspective",
)
CHANCE = 25.0  # a coin flip per statement: both right with probability 1/4


@dataclass(frozen=True)
class MMVPItem:
    """One row of Questions.csv and its image."""
    qid: int
    type: str
    statement: str
    image: Path
    row: int  # 1-based data row (the header is row 0)


@dataclass(frozen=True)
class MMVPPair:
    index: int      # 0-based pair index in file order
    pattern: str    # PATTERNS[k // pairs_per_pattern], k = index among the pairs of the nine Types;
                    # an extra pattern's pairs: their Type
    first: MMVPItem
    second: MMVPItem

    @property
    def items(self) -> Tuple[MMVPItem, MMVPItem]:
        return self.first, self.second


def _read_rows(csv_path: Path) -> List[Tuple[int, List[str]]]:
    """Data rows as (1-based row number, fields); checks the header and the field count."""
    if not csv_path.is_file():
        raise FileNotFoundError(f"MMVP questions file not found: {csv_path} (data_root must hold "
                                f"{QUESTIONS_FILE!r} and {IMAGE_FOLDER!r}/)")
    rows = list(csv.reader(io.StringIO(read_text(csv_path), newline="")))
    if not rows:
        raise DataError(f"{csv_path}: empty file; expected the header {','.join(COLUMNS)}")
    header = tuple(h.strip() for h in rows[0])
    if header != COLUMNS:
        raise DataError(f"{csv_path}: expected the columns {','.join(COLUMNS)}, got {','.join(header)}")
    out = []
    for n, fields in enumerate(rows[1:], start=1):
        if not any(x.strip() for x in fields):
            continue  # a trailing blank line
        if len(fields) != len(COLUMNS):
            raise DataError(f"{csv_path}: row {n} has {len(fields)} fields, expected "
                             f"{len(COLUMNS)} ({','.join(COLUMNS)}): {fields!r}")
        out.append((n, fields))
    return out


def _item(root: Path, csv_path: Path, row: int, fields: List[str]) -> MMVPItem:
    qid_text, qtype, statement = (x.strip() for x in fields)
    try:
        qid = int(qid_text)
    except ValueError:
        raise DataError(f"{csv_path}: row {row}, field 'Question ID': {qid_text!r} is not an integer") from None
    if not qtype:
        raise DataError(f"{csv_path}: row {row} (Question ID {qid}), field 'Type' is empty")
    if not statement:
        raise DataError(f"{csv_path}: row {row} (Question ID {qid}), field 'Statement' is empty")
    return MMVPItem(qid, qtype, statement, root / IMAGE_FOLDER / qtype / f"{qid}.jpg", row)


def check_patterns(pairs: Sequence[MMVPPair]) -> Optional[str]:
    """A warning when a Type does not sit in its pattern's block (e.g. rows in another order)."""
    for pair in pairs:
        if pair.first.type in TYPE_FOLDERS and TYPE_FOLDERS.index(pair.first.type) != PATTERNS.index(pair.pattern):
            return (f"pair {pair.index} (Question ID {pair.first.qid}) has Type {pair.first.type!r} but "
                    f"its position makes it {pair.pattern!r}: the protocol goes by position")
    return None


def read_mmvp(data_root, pairs_per_pattern: int = PAIRS_PER_PATTERN, check_images: bool = True,
              extra_patterns: Sequence[str] = ()) -> List[MMVPPair]:
    """Read ``data_root`` (``Questions.csv`` + ``MLLM_VLM Images/``) into pairs, in file order.

    Raises ValueError naming the file, row and field for a malformed CSV (other columns, a row with
    another field count, an odd number of rows, a pair whose rows differ in Type, a Type that is
    neither one of the nine nor in ``extra_patterns``, more pairs than the nine patterns hold), and
    FileNotFoundError / BadImageError naming the image, its Question ID and row when an image is
    missing or its header unreadable (``check_images``: checked up front, in parallel, before any
    model runs).
    """
    root = Path(data_root)
    csv_path = root / QUESTIONS_FILE
    rows = _read_rows(csv_path)
    if not rows:
        raise DataError(f"{csv_path}: no data rows under the header")
    if len(rows) % 2:
        raise DataError(f"{csv_path}: {len(rows)} data rows, an odd number; rows come in consecutive "
                         f"pairs (2k-1, 2k), so the last row (Question ID {rows[-1][1][0].strip()}) has no partner")
    items = [_item(root, csv_path, n, fields) for n, fields in rows]
    seen: Dict[int, int] = {}
    for it in items:
        if it.qid in seen:
            raise DataError(f"{csv_path}: row {it.row}, field 'Question ID': {it.qid} repeats row {seen[it.qid]}")
        seen[it.qid] = it.row
        if it.type not in TYPE_FOLDERS and it.type not in extra_patterns:
            # It would be scored, by its position, as one of the nine: say so instead.
            raise DataError(f"{csv_path}: row {it.row} (Question ID {it.qid}), field 'Type': {it.type!r} is not one "
                             f"of the nine MMVP Types ({', '.join(TYPE_FOLDERS)}); a custom benchmark lists its own "
                             "patterns in the config key extra_patterns")
    max_pairs = len(PATTERNS) * pairs_per_pattern
    known = sum(items[2 * p].type in TYPE_FOLDERS for p in range(len(items) // 2))
    if known > max_pairs:
        raise DataError(f"{csv_path}: {known} pairs of the nine Types, but {len(PATTERNS)} patterns x "
                         f"{pairs_per_pattern} pairs hold at most {max_pairs}")
    pairs, k = [], 0
    for p in range(len(items) // 2):
        a, b = items[2 * p], items[2 * p + 1]
        if a.type != b.type:
            raise DataError(f"{csv_path}: rows {a.row} and {b.row} form pair {p} but their field "
                             f"'Type' differs ({a.type!r} vs {b.type!r}); are the rows out of order?")
        if a.type in TYPE_FOLDERS:
            pairs.append(MMVPPair(p, PATTERNS[k // pairs_per_pattern], a, b))
            k += 1
        else:
            pairs.append(MMVPPair(p, a.type, a, b))
    if check_images:
        images = [it for pair in pairs for it in pair.items]
        preflight.check_images([str(it.image) for it in images],
                               lambda n: f"Question ID {images[n].qid}, row {images[n].row} of {csv_path}",
                               str(csv_path), skip=False, hint="")
    misplaced = check_patterns(pairs)
    if misplaced:
        logger.warning("%s: %s", csv_path, misplaced)
    if known != max_pairs:
        logger.warning("%s: %d pairs of the nine Types, not the release's %d; patterns without pairs are left out",
                       csv_path, known, max_pairs)
    return pairs


# ----------------------------------------------------------------------------- protocol

# scorer(pairs, prompts) -> scores [n, 2, 2]: scores[k, t, i] = how well prompt t of pair k fits its
# image i (t, i in {0: first row, 1: second row}); higher is better.
Scorer = Callable[[Sequence[MMVPPair], Sequence[Tuple[str, str]]], np.ndarray]


@dataclass
class MMVPResult:
    accuracy: Dict[str, float]   # pattern -> percent, plus "Average"
    counts: Dict[str, Tuple[int, int]]  # pattern -> (correct pairs, pairs)
    records: List[dict]          # one per pair: qids, pattern, scores, predictions, correct


def prompts_for(pair: MMVPPair, prefix: str = PROMPT_PREFIX) -> Tuple[str, str]:
    return prefix + pair.first.statement, prefix + pair.second.statement


def choose(scores: np.ndarray) -> np.ndarray:
    """Chosen image per statement: ``[..., 2 statements, 2 images]`` -> ``[..., 2]``; 0 only when the
    first image scores strictly higher (a tie goes to the second image)."""
    return np.where(scores[..., 0] > scores[..., 1], 0, 1)


def evaluate_pairs(pairs: Sequence[MMVPPair], scorer: Scorer, batch_size: int = 16,
                   prompt_prefix: str = PROMPT_PREFIX) -> MMVPResult:
    """Score every pair with ``scorer`` (``batch_size`` pairs per call) and apply the protocol."""
    scores = []
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        out = np.asarray(scorer(chunk, [prompts_for(p, prompt_prefix) for p in chunk]), dtype=np.float64)
        if out.shape != (len(chunk), 2, 2):
            raise DataError(f"scorer returned shape {out.shape} for {len(chunk)} pairs, expected ({len(chunk)}, 2, 2)")
        scores.append(out)
    scores_all = np.concatenate(scores) if scores else np.zeros((0, 2, 2))
    return summarize(pairs, scores_all)


def summarize(pairs: Sequence[MMVPPair], scores: np.ndarray) -> MMVPResult:
    """The protocol on precomputed ``scores`` ``[n, 2, 2]`` (statement x image)."""
    picks = choose(scores)
    correct = (picks[:, 0] == 0) & (picks[:, 1] == 1)
    counts: Dict[str, List[int]] = {}
    records = []
    for pair, s, pick, ok in zip(pairs, scores, picks, correct):
        c = counts.setdefault(pair.pattern, [0, 0])
        c[0] += int(ok)
        c[1] += 1
        records.append({"pair": pair.index, "pattern": pair.pattern, "type": pair.first.type,
                        "qids": [pair.first.qid, pair.second.qid],
                        "statements": [pair.first.statement, pair.second.statement],
                        "scores": s.tolist(), "chosen": [pair.items[int(i)].qid for i in pick],
                        "correct": bool(ok)})
    order = [p for p in PATTERNS if p in counts] + [p for p in counts if p not in PATTERNS]  # extras: file order
    accuracy = {p: 100.0 * counts[p][0] / counts[p][1] for p in order}
    accuracy["Average"] = float(np.mean(list(accuracy.values()))) if accuracy else float("nan")
    return MMVPResult(accuracy, {p: (c[0], c[1]) for p, c in counts.items()}, records)


# ----------------------------------------------------------------------------- reporting

# Published averages over the nine patterns (docs/FORMATS.md); per-pattern values are not recorded there.
PUBLISHED_AVERAGES = {
    "CLIP ViT-L/14 224px (OpenAI)": 19.3,
    "SigLIP ViT-SO/14": 37.8,
    "DFN ViT-H/14": 39.3,
    "EVA02 bigE": 33.3,
}


def _extra(accuracy: Dict[str, float]) -> List[str]:
    """The patterns of ``accuracy`` beyond the nine (``extra_patterns``), in their order."""
    return [p for p in accuracy if p not in PATTERNS and p != "Average"]


def markdown_table(accuracy: Dict[str, float], name: str = "ours") -> str:
    """The nine patterns (and any extra ones) and the average for ``name``, with the published CLIP
    rows for reference."""
    cols = [*PATTERNS, *_extra(accuracy), "Average"]
    fmt = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|",
             f"| {name} | " + " | ".join(fmt(accuracy.get(c)) for c in cols) + " |"]
    for model, avg in PUBLISHED_AVERAGES.items():
        lines.append(f"| {model} (published) | " + " | ".join("–" for _ in cols[:-1]) + f" | {avg:.1f} |")
    lines += ["", f"Pair accuracy (%); chance is {CHANCE:.0f}. Published rows: average only (docs/FORMATS.md)."]
    return "\n".join(lines) + "\n"


def bar_chart(accuracy: Dict[str, float], path, title: str = "MMVP-VLM") -> Path:
    """Bar chart of the per-pattern and average accuracy, with chance and, next to the average, the
    published CLIP-family averages."""
    import textwrap

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [p for p in PATTERNS if p in accuracy] + _extra(accuracy) + ["Average"]
    values = [accuracy[n] for n in names]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    x_avg = len(names) - 1
    bars = ax.bar(range(len(names)), values, color=["#4c72b0"] * x_avg + ["#dd8452"])
    ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.axhline(CHANCE, color="grey", linestyle=":", linewidth=1, label=f"chance ({CHANCE:.0f})")
    y_text = float("-inf")
    for model, avg in sorted(PUBLISHED_AVERAGES.items(), key=lambda kv: kv[1]):
        ax.hlines(avg, x_avg - 0.45, x_avg + 0.45, colors="#55a868", linewidth=1.2)
        y_text = max(avg, y_text + 3.5)  # keep close averages' labels apart
        ax.text(x_avg + 0.5, y_text, f"{model}: {avg}", fontsize=6, va="center", color="#2d6e3e")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([textwrap.fill(n, 14, break_long_words=False) for n in names], fontsize=7)
    ax.set_xlim(-0.6, len(names) + 2.2)
    ax.set_ylim(0, 105)
    ax.set_ylabel("pair accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
