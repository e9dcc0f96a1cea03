"""Official checkpoints by name (`pretrained: blip/model_base`, utils/zoo.py): the registry, the name
-> URL resolution through the download cache, the ViT check, `python -m tools models`, and one real
evaluation through train_retrieval.py. Everything is served from 127.0.0.1 ($BLIP_ZOO_URL)."""
from __future__ import annotations

import functools
import http.server
import json
import re
import threading
from pathlib import Path

import pytest
import torch

import train_retrieval
from models.blip import BlipArch
from models.factory import read_source
from tasks.retrieval import RetrievalConfig
from utils import zoo
from utils.checkpoint import load_checkpoint
from utils.download import resolve_checkpoint
from utils.errors import CheckpointDownloadError
from utils.state_dict import extract_state_dict

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "blip_official_tiny"
RELEASE_CONFIGS = REPO / "tests" / "fixtures" / "blip_configs"


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    # A proxy from the environment would intercept requests meant for 127.0.0.1.
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def zoo_server(tmp_path, monkeypatch):
    """Serve `tmp_path / 'www'` on 127.0.0.1 as the zoo ($BLIP_ZOO_URL), the cache in tmp_path
    ($CONTEXTBLIP_CACHE). Yields (root, base url, requests: the paths asked for, truncate: a set of
    file names whose answer promises the whole file and stops half-way)."""
    root, cache = tmp_path / "www", tmp_path / "cache"
    root.mkdir()
    requests, truncate = [], set()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            requests.append(self.path)
            name = self.path.lstrip("/")
            if name in truncate:
                data = (root / name).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.close_connection = True
                return
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}/zoo"
    monkeypatch.setenv(zoo.URL_ENV, base)
    monkeypatch.setenv("CONTEXTBLIP_CACHE", str(cache))
    (root / "zoo").mkdir()
    yield root / "zoo", base, requests, truncate
    server.shutdown()
    server.server_close()


def _cache(tmp_path) -> list:
    folder = tmp_path / "cache"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --------------------------------------------------------------------------- the registry

def test_registry_holds_every_file_the_release_lists():
    # Every checkpoint file named by the release's configs (copied verbatim into the fixtures) ...
    in_configs = {m for f in RELEASE_CONFIGS.glob("*.yaml")
                  for m in re.findall(r"BLIP/models/(\w+)\.pth", f.read_text())}
    assert in_configs and in_configs <= {e.file for e in zoo.ENTRIES}
    # ... and the README's two tables: 4 pretrained, 9 fine-tuned files.
    assert {e.file for e in zoo.ENTRIES} == {
        "model_base", "model_base_14M", "model_base_capfilt_large", "model_large",
        "model_base_retrieval_coco", "model_large_retrieval_coco", "model_base_retrieval_flickr",
        "model_large_retrieval_flickr", "model_base_caption_capfilt_large", "model_large_caption",
        "model_vqa", "model_base_vqa_capfilt_large", "model_base_nlvr"}
    for e in zoo.ENTRIES:
        assert e.name == "blip/" + e.file and e.vit in ("base", "large") and e.about
        assert e.vit == ("large" if "large" in e.file.replace("capfilt_large", "") else "base"), e.name
        assert e.url(zoo.BASE_URL) == f"{zoo.BASE_URL}{e.file}.pth"
    assert zoo.BASE_URL == "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/"
    # The image size the release uses each at, as its configs say.
    sizes = {e.file: e.image_size for e in zoo.ENTRIES}
    for config in RELEASE_CONFIGS.glob("*.yaml"):
        text = config.read_text()
        size = int(re.search(r"^image_size: (\d+)", text, re.M).group(1))
        for file in re.findall(r"BLIP/models/(\w+)\.pth", text):
            assert sizes[file] == size, (config.name, file)
    assert {sizes[f] for f in ("model_base", "model_base_14M", "model_base_capfilt_large", "model_large")} == {224}


# --------------------------------------------------------------------------- resolution

def test_name_resolves_to_its_url_downloads_once_and_reuses_the_cache(tmp_path, zoo_server):
    root, base, requests, _ = zoo_server
    sd = {"fc.weight": torch.randn(3, 2)}
    torch.save({"model": sd}, root / "model_base.pth")
    assert zoo.zoo_url("blip/model_base") == f"{base}/model_base.pth"

    first = resolve_checkpoint("blip/model_base", timeout=5)
    assert requests == ["/zoo/model_base.pth"]
    assert first.parent == tmp_path / "cache" and first.name.endswith("_model_base.pth")
    assert first.read_bytes() == (root / "model_base.pth").read_bytes()
    again = load_checkpoint("blip/model_base", timeout=5)
    assert requests == ["/zoo/model_base.pth"]  # the second call asked nothing of the server
    assert torch.equal(extract_state_dict(again)["fc.weight"], sd["fc.weight"])
    assert _cache(tmp_path) == [first.name]


def test_truncated_download_is_refused_and_leaves_nothing_in_the_cache(tmp_path, zoo_server):
    root, base, requests, truncate = zoo_server
    torch.save({"model": {"w": torch.randn(64, 64)}}, root / "model_large.pth")
    size = (root / "model_large.pth").stat().st_size
    truncate.add("zoo/model_large.pth")
    with pytest.raises(CheckpointDownloadError, match=f"{size // 2} of {size} bytes") as info:
        resolve_checkpoint("blip/model_large", timeout=5)
    assert f"{base}/model_large.pth" in str(info.value) and "\n" not in str(info.value)
    assert requests == ["/zoo/model_large.pth"]
    assert _cache(tmp_path) == []


def test_unknown_name_lists_the_known_names_closest_first_before_any_request(tmp_path, zoo_server):
    _, _, requests, _ = zoo_server
    with pytest.raises(zoo.ZooError) as info:
        resolve_checkpoint("blip/model_base_retrieval_cooc", timeout=5)
    msg = str(info.value)
    assert "\n" not in msg and "'blip/model_base_retrieval_cooc'" in msg
    assert "did you mean blip/model_base_retrieval_coco?" in msg
    listed = msg.split("known names: ")[1]
    assert listed.startswith("blip/model_base_retrieval_coco, ")
    assert all(e.name in listed for e in zoo.ENTRIES)
    assert requests == [] and _cache(tmp_path) == []


def test_vit_that_contradicts_the_entry_is_refused_before_any_request(tmp_path, zoo_server):
    _, _, requests, _ = zoo_server
    torch.save({"model": {}}, zoo_server[0] / "model_base.pth")
    cfg = RetrievalConfig(vit="large", pretrained="blip/model_base_retrieval_coco")
    with pytest.raises(zoo.ZooError) as info:
        read_source(cfg.pretrained, cfg)
    assert str(info.value) == ("`vit: large` contradicts `pretrained: blip/model_base_retrieval_coco`, a ViT-base "
                               "checkpoint: set vit: base, or a ViT-large retrieval checkpoint "
                               "(blip/model_large_retrieval_coco, blip/model_large_retrieval_flickr)")
    # A mapping equal to a preset is that preset; a DLIP teacher's key is teacher_vit.
    large = {"width": 1024, "depth": 24, "heads": 16, "patch_size": 16}
    with pytest.raises(zoo.ZooError, match=r"^`vit: large` contradicts `pretrained: blip/model_base`"):
        read_source("blip/model_base", RetrievalConfig(vit=large))
    with pytest.raises(zoo.ZooError, match=r"^`teacher_vit: base` contradicts `teacher: blip/model_large`"):
        read_source("blip/model_large", BlipArch(vit="base"), role="teacher")
    assert requests == [] and _cache(tmp_path) == []
    # The matching preset passes the check and downloads.
    read_source("blip/model_base", RetrievalConfig(vit="base"))
    assert requests == ["/zoo/model_base.pth"]


def test_tools_models_lists_every_entry(capsys, monkeypatch):
    # Through `python -m tools`'s dispatch (COMMANDS), in-process: a subprocess would spend seconds
    # importing torch for the same code path.
    from tools.__main__ import main
    monkeypatch.delenv(zoo.URL_ENV, raising=False)
    main(["models", "--format", "tsv"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split("\t") == ["name", "task", "vit", "image_size", "about", "url"]
    rows = [line.split("\t") for line in lines[1:]]
    assert [r[0] for r in rows] == [e.name for e in zoo.ENTRIES]
    assert rows[0][:4] == ["blip/model_base", "pretrain", "base", "224"]
    assert rows[0][5] == zoo.BASE_URL + "model_base.pth"

    table = main(["models"])
    out = capsys.readouterr().out
    assert len(table) == len(zoo.ENTRIES)
    for e in zoo.ENTRIES:
        assert re.search(rf"^{re.escape(e.name)} +{e.task} +{e.vit} +{e.image_size} +{re.escape(e.about)}$",
                         out, re.M), e.name
        assert e.url() in out


# --------------------------------------------------------------------------- through an entry point

def test_evaluate_with_a_name_downloads_the_checkpoint_and_reproduces_its_scores(tmp_path, zoo_server,
                                                                                  fixture_config):
    """The official-layout fixture served as model_base_retrieval_coco.pth: `pretrained: blip/...` with
    the fixture's custom ViT mapping (not judged by the zoo; the strict load judges its shapes)."""
    root, _, requests, _ = zoo_server
    (root / "model_base_retrieval_coco.pth").write_bytes((FIXTURE / "checkpoint.pth").read_bytes())
    ref = torch.load(FIXTURE / "reference.pt", weights_only=True)
    cfg = fixture_config(tmp_path, pretrained="blip/model_base_retrieval_coco")
    out = tmp_path / "eval"
    record = train_retrieval.main(["--config", str(cfg), "--output_dir", str(out), "--evaluate", "--no_progress"])
    assert requests == ["/zoo/model_base_retrieval_coco.pth"]
    assert len(_cache(tmp_path)) == 1 and _cache(tmp_path)[0].endswith("_model_base_retrieval_coco.pth")
    assert record["test_txt_r1"] == ref["metrics"]["txt_r1"] and record["test_img_r1"] == ref["metrics"]["img_r1"]
    assert json.loads((out / "evaluate.txt").read_text().splitlines()[-1]) == record

    # The same name with a contradicting ViT stops before the model is built and asks nothing.
    bad = fixture_config(tmp_path, pretrained="blip/model_base_retrieval_coco", vit="large")
    with pytest.raises(zoo.ZooError, match="contradicts"):
        train_retrieval.main(["--config", str(bad), "--output_dir", str(tmp_path / "bad"), "--evaluate",
                              "--no_progress"])
    assert requests == ["/zoo/model_base_retrieval_coco.pth"]
