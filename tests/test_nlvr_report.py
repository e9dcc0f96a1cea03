"""analysis.nlvr_report on hand-made prediction files: accuracy per split and template, the text-only baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis.nlvr_report import main, report
from data.synthetic import generate
from data.synthetic.nlvr import TEMPLATE_NAMES
from utils.errors import UserError


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = generate(tmp_path_factory.mktemp("nlvr_report") / "d", seed=0, parts="nlvr",
                   n_train_pairs=40, n_dev_pairs=20, n_test_pairs=20)
    return Path(out["nlvr"]["root"])


def _ann(data: Path, split: str) -> list[dict]:
    return json.loads((data / "annotation" / f"nlvr_{split}.json").read_text())


def _predictions(entries: list[dict], predict) -> list[dict]:
    """What train_nlvr.py writes per pair: index, identifier, images, sentence, label, prediction, logits."""
    return [{"index": i, "identifier": e["identifier"], "images": e["images"], "sentence": e["sentence"].lower(),
             "label": int(e["label"] == "True"), "prediction": predict(i, e), "logits": [0.1, -0.1]}
            for i, e in enumerate(entries)]


def _write(path: Path, obj) -> None:
    path.write_text(json.dumps(obj))


def test_accuracies_against_chance_and_text_only(data, tmp_path):
    dev, test = _ann(data, "dev"), _ann(data, "test")
    # dev (BLIP's split name 'val'): right except the first 5 pairs; test: always "True"
    _write(tmp_path / "nlvr_result_val.json",
           _predictions(dev, lambda i, e: int((e["label"] == "True") != (i < 5))))
    _write(tmp_path / "nlvr_result_test.json", _predictions(test, lambda i, e: 1))
    (tmp_path / "log.txt").write_text(json.dumps({"epoch": 2, "val_acc": 75.0, "test_acc": 50.0}) + "\nnot json\n")
    out = report(tmp_path, data)
    assert out["splits"]["dev"]["accuracy"] == pytest.approx(75.0)
    assert out["splits"]["test"]["accuracy"] == pytest.approx(50.0)
    for split in ("dev", "test"):
        r = out["splits"][split]
        assert r["pairs"] == 20 and r["unpredicted"] == 0 and r["chance"] == 50.0
        assert r["text_only"] == pytest.approx(50.0)  # every sentence is once true, once false
        assert set(r["per_template"]) == set(TEMPLATE_NAMES)
        assert sum(t["pairs"] for t in r["per_template"].values()) == 20
    wrong = {dev[i]["template"] for i in range(5)}
    assert all((t["accuracy"] < 100) == (name in wrong) for name, t in out["splits"]["dev"]["per_template"].items())
    assert out["log"] == {"records": 1, "last": {"epoch": 2, "val_acc": 75.0, "test_acc": 50.0}}
    md = (tmp_path / "nlvr_report.md").read_text()
    assert "| dev | 20 | **75.0** | 50 | 50.0 | +25.0 |" in md and "| test | 20 | **50.0** |" in md
    assert json.loads((tmp_path / "nlvr_report.json").read_text()) == json.loads(json.dumps(out))


def test_text_only_baseline_finds_a_leak(tmp_path):
    """On data whose sentences give the label away, the baseline says so (computed, not read from meta)."""
    ann = tmp_path / "nlvr" / "annotation"
    ann.mkdir(parents=True)
    imgs = ["images/a.png", "images/b.png"]
    train = [{"images": imgs, "sentence": "The left image has more shapes than the right image.", "label": "True"}] * 3
    train += [{"images": imgs, "sentence": "Both images contain a red shape.", "label": "False"}] * 3
    dev = [{"images": imgs, "sentence": "the left image has more shapes than the right image", "label": "True",
            "identifier": "d0"},
           {"images": imgs, "sentence": "Both images contain a red shape.", "label": "False", "identifier": "d1"},
           {"images": imgs, "sentence": "Two dogs are running.", "label": "False", "identifier": "d2"}]
    _write(ann / "nlvr_train.json", train)
    _write(ann / "nlvr_dev.json", dev)
    _write(ann / "nlvr_test.json", dev)
    run = tmp_path / "run"
    run.mkdir()
    _write(run / "nlvr_result_dev.json", [{"identifier": "d2", "prediction": "False"}, {"index": 0, "prediction": True}])
    out = report(run, tmp_path)  # the benchmark root: its nlvr/annotation is found
    r = out["splits"]["dev"]
    assert r["pairs"] == 2 and r["unpredicted"] == 1 and r["accuracy"] == 100.0
    # "more" seen in train (True), the unseen sentence gets the overall train majority (a tie: True)
    assert r["text_only"] == 50.0
    assert r["per_template"]["more"]["text_only"] == 100.0 and r["per_template"]["other"]["text_only"] == 0.0
    assert out["missing_splits"] == ["test"] and out["log"] is None


def test_bad_inputs_are_named(data, tmp_path):
    dev = _ann(data, "dev")
    with pytest.raises(UserError, match="no NLVR2 prediction file"):
        report(tmp_path, data)
    _write(tmp_path / "nlvr_result_dev.json", _predictions(dev, lambda i, e: "maybe"))
    with pytest.raises(UserError, match=r"nlvr_result_dev.json: entry 0: field 'prediction'"):
        report(tmp_path, data)
    preds = _predictions(dev, lambda i, e: 1)
    preds[3]["label"] = 1 - preds[3]["label"]
    _write(tmp_path / "nlvr_result_dev.json", preds)
    with pytest.raises(UserError, match="entry 3: field 'label'.*not of this data"):
        report(tmp_path, data)
    _write(tmp_path / "nlvr_result_dev.json", [{"identifier": "nope", "prediction": 1}])
    with pytest.raises(UserError, match="entry 0: field 'identifier'"):
        report(tmp_path, data)
    with pytest.raises(UserError, match="no NLVR2 annotation folder"):
        report(tmp_path, tmp_path)
    with pytest.raises(SystemExit, match="error: .*field 'identifier'"):
        main([str(tmp_path), "--data", str(data)])
