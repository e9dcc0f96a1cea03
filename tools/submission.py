"""Ranked submission files for test data without ground truth (``tools search`` and ``tools ensemble``).

A submission lists, per query, the ids of its top ``k`` gallery items, best first:

- ``STEM.csv``: header ``query_id,top1,...,topK``, one row per query (a query with fewer candidates
  than ``k``: the last cells empty);
- ``STEM.json``: ``[{"query_id": ..., "ids": [...], "scores": [...]}, ...]``, the score of each id
  being the score it was ranked by (the best of its items' when several gallery items share it).

An id is a column of the gallery file (``--id_col``; default: the image path). The ids of one query
are distinct: when several gallery items share an id (several pictures of one product), its first
(best) item ranks it and the others are skipped, so that every query gets ``k`` different ids as
long as the gallery has them.
"""
from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from utils.outputs import refuse_existing


def fetch_size(keys: Sequence[str], k: int) -> int:
    """How many gallery items a query must rank to find ``k`` distinct ids: ``k`` times the largest
    number of items that share one id (at most the gallery)."""
    most = max(Counter(keys).values(), default=1)
    return min(len(keys), k * most)


def distinct_top(ranked: Sequence[int], scores: Sequence[float], keys: Sequence[str],
                 k: int) -> Tuple[List[str], List[float]]:
    """The first ``k`` distinct ids of gallery items ``ranked`` (best first) and their scores."""
    ids, out_scores, seen = [], [], set()
    for item, score in zip(ranked, scores):
        key = keys[int(item)]
        if key in seen:
            continue
        seen.add(key)
        ids.append(key)
        out_scores.append(float(score))
        if len(ids) == k:
            break
    return ids, out_scores


def submission_paths(stem) -> Tuple[Path, Path]:
    """``STEM.csv`` and ``STEM.json`` (a ``.csv`` / ``.json`` suffix on ``stem`` is dropped)."""
    stem = Path(stem)
    if stem.suffix.lower() in (".csv", ".json"):
        stem = stem.with_suffix("")
    return stem.with_name(stem.name + ".csv"), stem.with_name(stem.name + ".json")


def check_submission_target(stem, overwrite: bool) -> None:
    """Before any work: an existing submission is replaced only with ``--overwrite``."""
    refuse_existing(submission_paths(stem), overwrite, f"--submission {stem}")


def write_submission(stem: str | os.PathLike, query_ids: Sequence[str], ids: Sequence[Sequence[str]],
                     scores: Sequence[Sequence[float]], k: int) -> Tuple[Path, Path]:
    """Write ``STEM.csv`` and ``STEM.json`` (atomically: a temporary file renamed into place); returns
    their paths."""
    paths = submission_paths(stem)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    width = max([len(row) for row in ids] + [0]) if ids else k
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["query_id"] + [f"top{r + 1}" for r in range(width)])
    for query, row in zip(query_ids, ids):
        writer.writerow([query] + list(row) + [""] * (width - len(row)))
    records = [{"query_id": q, "ids": list(row), "scores": [round(float(s), 6) for s in sc]}
               for q, row, sc in zip(query_ids, ids, scores)]
    for path, text in zip(paths, (buf.getvalue(), json.dumps(records, indent=1, ensure_ascii=False))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return paths


def key_of(record: dict, default: Optional[str] = None) -> str:
    """A gallery or query record's id: its ``key`` (an id column) when it has one, else ``default``
    (else its image path)."""
    if record.get("key") is not None:
        return str(record["key"])
    return str(default if default is not None else record.get("image", ""))
