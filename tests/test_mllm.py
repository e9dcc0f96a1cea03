"""The MLLM comparison harness: seeded sampling, the chat client against a local HTTP server
(inline images, retries on 429/500, unparseable answers, resume), and compare."""
from __future__ import annotations

import base64
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from analysis.chat_client import ChatClient, ChatError, parse_image_number
from analysis.mllm import ask, compare, compare_table, load_sample, read_answers, sample_items, window
from tests.scripts import forked

REPO = Path(__file__).resolve().parents[1]


def _imagecode(root: Path, n_static: int = 5, n_video: int = 5) -> Path:
    """A tiny ImageCoDe folder: data/valid_data.json + image-sets/<set>/img<N>.jpg."""
    data = {}
    for k in range(n_static + n_video):
        video = k >= n_static
        name = f"MSR-VTT-clip{k}" if video else f"open-images-{k}"
        frames = [3 * j + 7 for j in range(10)] if video else list(range(10))  # video: img7, img10, ... (not contiguous)
        for j, n in enumerate(frames):
            path = root / "image-sets" / name / f"img{n}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (20 * j, 10 * k, 90)).save(path)
        data[name] = {str(k % 10): f"description {k} a", str((k + 5) % 10): f"description {k} b"}
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data" / "valid_data.json").write_text(json.dumps(data))
    return root


@pytest.fixture
def sample(tmp_path):
    src = _imagecode(tmp_path / "imagecode")
    out = tmp_path / "sample"
    out.mkdir()
    sample_items(src / "data", src / "image-sets", out, n_static=3, n_video=4, seed=0)
    return out


def test_window_around_the_target():
    expected = {0: (0, 4), 1: (0, 4), 2: (0, 4), 3: (1, 5), 5: (3, 7), 7: (5, 9), 8: (6, 10), 9: (6, 10)}
    for target, win in expected.items():
        assert window(target) == win and win[0] <= target < win[1]


def test_sample_is_seeded_balanced_and_self_contained(sample, tmp_path):
    folder, doc = load_sample(sample)
    items = doc["items"]
    assert (doc["n_static"], doc["n_video"]) == (3, 4) and [it["id"] for it in items] == list(range(7))
    assert [it["video"] for it in items] == [False] * 3 + [True] * 4
    for it in items:
        assert len(it["images"]) == 10 and all((folder / p).is_file() for p in it["images"])
        start, end = it["window"]
        assert (start, end) == window(it["target"]) and it["target_in_window"] == it["target"] - start
    video = items[-1]
    # Numeric frame order: img7, img10, ..., img34; the target is a position in that order.
    assert [Path(p).name for p in video["images"]][:3] == ["img7.jpg", "img10.jpg", "img13.jpg"]
    again = tmp_path / "again"
    again.mkdir()
    doc2 = sample_items(tmp_path / "imagecode" / "data", tmp_path / "imagecode" / "image-sets", again, 3, 4, seed=0)
    assert [(i["set"], i["description"]) for i in doc2["items"]] == [(i["set"], i["description"]) for i in items]
    other = sample_items(tmp_path / "imagecode" / "data", tmp_path / "imagecode" / "image-sets", again, 3, 4, seed=1)
    assert [(i["set"], i["description"]) for i in other["items"]] != [(i["set"], i["description"]) for i in items]


@pytest.mark.parametrize("answer, number", [
    ("3", 3), ("Image 3.", 3), ("**Image 4**", 4), ("image four", 4), ("The answer is 10", 10),
    ("I choose 3. Final answer: 3", 3), ("either 2 or 5", None), ("I cannot tell.", None),
    ("img10", None), ("2.5", None), ("", None), ("Image 12", None),
])
def test_parse_image_number_never_guesses(answer, number):
    assert parse_image_number(answer, 1, 10) == number


class _Server:
    """An OpenAI-compatible /chat/completions on 127.0.0.1 that replays scripted replies."""

    def __init__(self, replies):
        self.replies, self.requests = list(replies), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                status, content = outer.replies.pop(0) if outer.replies else (200, "1")
                if status == 200:
                    payload = {"choices": [{"message": {"role": "assistant", "content": content}}]}
                else:
                    payload = {"error": {"message": content}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server_factory():
    servers = []

    def make(replies):
        servers.append(_Server(replies))
        return servers[-1]
    yield make
    for s in servers:
        s.close()


def _client(url, sleeps, **kw):
    return ChatClient(url, "test-model", api_key="sk-test", min_interval=0.0, backoff=0.5, sleep=sleeps.append, **kw)


def test_ask_retries_parses_and_counts_unparseable_answers(sample, server_factory, tmp_path):
    # item 0: 429 then 500 then "Image 2"; item 1: malformed; item 2: two numbers (ambiguous); rest: "1".
    srv = server_factory([(429, "slow down"), (500, "oops"), (200, "Image 2"), (200, "Hmm, hard to say"),
                          (200, "Image 1 or image 3")])
    sleeps = []
    answers = tmp_path / "answers.jsonl"
    counts = ask(sample, answers, _client(srv.url, sleeps), variant=4)
    assert counts == {"asked": 7, "unparsed": 2, "retries": 2}
    assert sleeps == [0.5, 1.0]  # exponential backoff (Retry-After 0 is shorter)
    assert len(srv.requests) == 9 and srv.requests[0]["path"] == "/v1/chat/completions"
    assert srv.requests[0]["auth"] == "Bearer sk-test"
    body = srv.requests[0]["body"]
    assert body["model"] == "test-model" and body["temperature"] == 0
    content = body["messages"][0]["content"]
    _, doc = load_sample(sample)
    item = doc["items"][0]
    start, end = item["window"]
    shown = [c["image_url"]["url"] for c in content if c["type"] == "image_url"]
    assert len(shown) == 4 and [c["text"] for c in content[1::2]] == [f"Image {k}:" for k in range(1, 5)]
    assert shown[0] == "data:image/jpeg;base64," + base64.b64encode((sample / item["images"][start]).read_bytes()).decode()
    assert item["description"] in content[0]["text"] and "numbered 1 to 4" in content[0]["text"]
    rows = read_answers(answers)
    assert [r["id"] for r in rows] == list(range(7))
    assert rows[0]["number"] == 2 and rows[0]["pred"] == start + 1  # "Image 2" = second shown = window start + 1
    assert rows[1]["pred"] is None and rows[1]["answer"] == "Hmm, hard to say" and rows[1]["correct"] is False
    assert rows[2]["pred"] is None


def test_ask_resumes_and_stops_on_a_configuration_error(sample, server_factory, tmp_path):
    answers = tmp_path / "answers.jsonl"
    srv = server_factory([])
    assert ask(sample, answers, _client(srv.url, []), limit=3)["asked"] == 3
    with answers.open("a") as f:
        f.write('{"id": 3, "set": "cut off by a ki')  # a kill in the middle of a write
    bad = server_factory([(200, "4"), (401, "invalid api key")])
    with pytest.raises(ChatError, match="HTTP 401"):
        ask(sample, answers, _client(bad.url, []))
    assert [r["id"] for r in read_answers(answers)] == [0, 1, 2, 3]  # the answered item survived the stop
    assert ask(sample, answers, _client(srv.url, []))["asked"] == 3  # only the rest
    assert [r["id"] for r in read_answers(answers)] == list(range(7))
    other = ChatClient(srv.url, "another-model", min_interval=0.0)
    with pytest.raises(ValueError, match="answers of model test-model, not another-model"):
        ask(sample, answers, other)
    down = _client(srv.url, [], max_retries=1)
    srv.close()
    with pytest.raises(ChatError, match="after 1 retries"):
        down.complete([{"role": "user", "content": "hi"}])


def test_ask_cli_reads_the_key_from_the_environment_and_never_stores_it(sample, server_factory, tmp_path):
    srv = server_factory([(500, "oops"), (200, "Image 3")])
    answers = tmp_path / "cli.jsonl"
    cmd = [sys.executable, "-m", "analysis.mllm", "ask", "--sample", str(sample), "--answers", str(answers),
           "--base_url", srv.url, "--model", "m", "--api_key_env", "MY_TEST_KEY", "--rate", "1000",
           "--backoff", "0.01", "--limit", "2"]
    env = {**os.environ, "MY_TEST_KEY": "sk-secret-123"}
    proc = forked.run_cmd(cmd, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "asked 2 items" in proc.stdout and "1 retries" in proc.stdout
    assert srv.requests[0]["auth"] == "Bearer sk-secret-123"
    assert "sk-secret" not in answers.read_text() and not list(sample.rglob("*secret*"))
    env.pop("MY_TEST_KEY")
    proc = forked.run_cmd(cmd, env=env, timeout=120)
    assert proc.returncode != 0 and "MY_TEST_KEY is not set" in proc.stderr


def test_compare_scores_both_on_the_same_items(sample, tmp_path):
    _, doc = load_sample(sample)
    items = doc["items"]
    answers, preds = [], []
    for it in items[:6]:  # item 6 has no answer: left out of the comparison
        k = it["id"]
        theirs = it["target"] if k in (0, 1, 4) else (None if k == 2 else (it["target"] + 1) % 10)
        answers.append({"id": k, "set": it["set"], "description": it["description"], "variant": 10, "pred": theirs})
    for it in items:
        k = it["id"]
        scores = [0.0] * 10
        scores[it["target"]] = 1.0 if k in (0, 3, 4, 5) else 0.5
        best_outside = (it["window"][1]) % 10 if it["window"][1] < 10 else it["window"][0] - 1
        scores[best_outside] = 0.9  # outside the 4-image window
        preds.append({"set": it["set"], "description": it["description"], "target": it["target"],
                      "pred": max(range(10), key=scores.__getitem__), "scores": scores, "video": it["video"]})
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    (tmp_path / "predictions.json").write_text(json.dumps(preds))
    res = compare(sample, tmp_path / "answers.jsonl", tmp_path / "predictions.json", variant=10)
    assert res["missing"] == {"answers": 1, "predictions": 0}
    s = res["summary"]
    # theirs right: 0, 1, 4; ours right (10 images): 0, 3, 4, 5; static = items 0-2, video = 3-5.
    assert s["all"]["n"] == 6 and s["all"]["theirs"] == pytest.approx(50.0) and s["all"]["ours"] == pytest.approx(400 / 6)
    assert s["all"]["unparsed"] == 1 and (s["all"]["both"], s["all"]["only_theirs"], s["all"]["only_ours"],
                                          s["all"]["neither"]) == (2, 1, 2, 1)
    assert (s["static"]["n"], s["static"]["theirs"], s["static"]["ours"]) == (3, pytest.approx(200 / 3), pytest.approx(100 / 3))
    assert (s["video"]["n"], s["video"]["theirs"], s["video"]["ours"]) == (3, pytest.approx(100 / 3), 100.0)
    # 4-image variant: ours = best of the window, so the distractor outside it no longer wins.
    for a in answers:
        a["variant"] = 4
    (tmp_path / "answers4.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    res4 = compare(sample, tmp_path / "answers4.jsonl", tmp_path / "predictions.json", variant=4)
    assert res4["summary"]["all"]["ours"] == 100.0 and res4["summary"]["all"]["theirs"] == pytest.approx(50.0)
    assert "| all | 6 | 50.0 | 100.0 | 1 |" in compare_table(res4)


def test_compare_cli_parses_raw_external_answers(sample, tmp_path):
    _, doc = load_sample(sample)
    ext = [{"set": it["set"], "description": it["description"], "answer": f"Image {it['target'] + 1}"}
           for it in doc["items"]]
    preds = [{"set": it["set"], "description": it["description"], "target": it["target"], "pred": 0,
              "scores": [1.0] + [0.0] * 9, "video": it["video"]} for it in doc["items"]]
    (tmp_path / "ext.json").write_text(json.dumps(ext))
    (tmp_path / "p.json").write_text(json.dumps(preds))
    cmd = [sys.executable, "-m", "analysis.mllm", "compare", "--sample", str(sample), "--answers",
           str(tmp_path / "ext.json"), "--predictions", str(tmp_path / "p.json"), "--names", "GPT-4V,ContextBLIP",
           "--out", str(tmp_path / "cmp")]
    proc = forked.run_cmd(cmd, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert result["summary"]["all"]["theirs"] == 100.0
    ours = 100.0 * sum(it["target"] == 0 for it in doc["items"]) / len(doc["items"])
    assert result["summary"]["all"]["ours"] == pytest.approx(ours)
    assert "GPT-4V" in (tmp_path / "cmp" / "compare.md").read_text()
