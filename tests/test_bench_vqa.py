"""bench/bench_vqa.py at its tiny size: runs as a user runs it, checks that our rank and generate
give the release loops' answers for every question, and writes its JSON and markdown rows."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from tests.scripts import forked

REPO = Path(__file__).resolve().parents[1]


def test_bench_vqa_tiny_same_answers_and_json(tmp_path):
    out = tmp_path / "bench_vqa.json"
    cmd = [sys.executable, "-m", "bench.bench_vqa", "--size", "tiny", "--device", "cpu", "--threads", "1",
           "--questions", "6", "--candidates", "40", "--k_test", "16", "--repeats", "1", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    proc = forked.run_cmd(cmd, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    s = result["setup"]
    assert (s["size"], s["questions"], s["candidates"], s["k_test"], s["batch_size"]) == ("tiny", 6, 40, 16, 4)
    assert s["question_tokens_min_max"][0] < s["question_tokens_min_max"][1]   # questions padded differently
    assert result["identical_answers"] is True
    runs = {r["inference"]: r for r in result["runs"]}
    assert set(runs) == {"rank", "generate"}
    for name, r in runs.items():
        assert r["identical_answers"] is True and r["n_differing"] == 0, (name, r)
        assert r["ours_s"] > 0 and r["release_s"] > 0 and r["speedup"] > 0
        assert r["ours_questions_per_s"] == pytest.approx(6 / r["ours_s"], rel=0.02)
    assert runs["rank"]["identical_topk"] is True and runs["rank"]["max_abs_score_diff"] < 1e-4
    # the check is not vacuous: the questions do not all get the same answer
    assert runs["rank"]["distinct_answers"] > 1 and runs["generate"]["distinct_answers"] > 1
    assert result["table"] in proc.stdout
    rows = result["table"].splitlines()
    assert len(rows) == 4 and "| tiny | rank |" in rows[2] and "| tiny | generate |" in rows[3]
