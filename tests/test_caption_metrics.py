"""COCO caption metrics (tasks/caption_metrics.py: scores; caption_java.py: Java, PTB tokenizer,
METEOR; caption_spice.py: SPICE; caption_files.py: ids, references, results): the same numbers as
pycocoevalcap's own COCOEvalCap, Java and SPICE handled with clear messages and bounded waits,
references read from BLIP's annotation and ground-truth files with errors that name the entry and
the field.

The tests that score captions run Java (METEOR alone loads for ~10 s): they are `slow`, and skipped
where there is no `java`."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time

import pytest

from tasks import caption_files as cf, caption_java as cj, caption_metrics as cm, caption_spice as cs
from utils.errors import DataError, UserError

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="no java on PATH")

# Six images, 2-5 raw references each; ids of the three kinds we meet (COCO ints, custom paths).
GTS = {
    391895: ["A man with a red helmet on a small moped on a dirt road.",
             "Man riding a motor bike on a dirt road on the countryside.",
             "A man riding on the back of a motorcycle.",
             "A dirt path with a young person on a motor bike rests to the foreground of a verdant area.",
             "A man in a red shirt and a red hat is on a motorcycle on a hill side."],
    522418: ["A woman wearing a net on her head cutting a cake.",
             "A woman cutting a large white sheet cake.",
             "A woman wearing a hair net cutting a large sheet cake."],
    184613: ["A child holding a flowered umbrella and petting a yak.",
             "A young man holding an umbrella next to a herd of cattle."],
    318219: ["A young boy standing in front of a computer keyboard.",
             "a little boy wearing headphones and looking at a computer monitor",
             "He is listening intently to the computer at school.",
             "A young boy stares up at the computer monitor."],
    554625: ["a boy wearing headphones using one computer in a long row of computers",
             "A little boy with earphones on listening to something.",
             "A group of people sitting at desk using computers.",
             "Children sitting at computer stations on a long table.",
             "A small child wearing headphones plays on the computer."],
    397133: ["A man is in a kitchen making pizzas.",
             "Man in apron standing on front of oven with pans and bakeware",
             "A baker is working in the kitchen rolling dough."],
}
CANDIDATES = {
    391895: "a man riding a motorcycle on a dirt road",
    522418: "a woman cutting a cake with a knife",
    184613: "a boy with an umbrella standing next to a cow",
    318219: "a young boy looking at a computer screen",
    554625: "a group of children using computers in a classroom",
    397133: "a man in a kitchen preparing food",
}
BAD = "an orange clock tower over a snowy parking lot"


def _results(captions: dict) -> list[dict]:
    return [{"image_id": i, "caption": c} for i, c in captions.items()]


def _write_gt(path, gts: dict) -> None:
    """A COCO caption-annotation file like BLIP's coco_karpathy_test_gt.json (images in gts order)."""
    images = [{"id": i} for i in gts]
    anns = [{"image_id": i, "caption": c, "id": n}
            for n, (i, c) in enumerate((i, c) for i, refs in gts.items() for c in refs)]
    path.write_text(json.dumps({"images": images, "annotations": anns, "type": "captions",
                                "info": {}, "licenses": []}))


# ----------------------------------------------------------------------------- scores vs pycocoevalcap

@pytest.mark.slow
@needs_java
def test_scores_equal_cocoevalcap_exactly(tmp_path, monkeypatch):
    from pycocoevalcap import eval as coco_eval
    from pycocotools.coco import COCO

    ours = cm.caption_scores(_results(CANDIDATES), GTS, spice=False)
    assert list(ours) == list(cm.METRICS)

    gt_file, res_file = tmp_path / "gt.json", tmp_path / "results.json"
    _write_gt(gt_file, GTS)
    cf.write_results(res_file, _results(CANDIDATES))
    assert cf.read_gt_file(gt_file) == GTS
    coco = COCO(str(gt_file))
    coco_res = coco.loadRes(str(res_file))

    class NoSpice:  # COCOEvalCap always runs SPICE, whose models are not here (offline)
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    monkeypatch.setattr(coco_eval, "Spice", NoSpice)
    evaluator = coco_eval.COCOEvalCap(coco, coco_res)
    evaluator.evaluate()
    reference = {k: evaluator.eval[k] for k in cm.METRICS}
    assert ours == reference  # every metric, to the last bit
    assert all(type(v) is float for v in ours.values())
    assert 0 < ours["Bleu_4"] < ours["Bleu_1"] < 1 and 0 < ours["METEOR"] < 1 and 0 < ours["CIDEr"]


@pytest.mark.slow
@needs_java
def test_a_perfect_caption_beats_a_bad_one_on_every_metric_and_meteor_ends(monkeypatch):
    started = []

    class Recorded(cj.Meteor):
        def __init__(self):
            super().__init__()
            started.append(self)

    monkeypatch.setattr(cj, "Meteor", Recorded)
    monkeypatch.setattr(cm, "_spice_models_ready", lambda required: pytest.fail("spice=False looked for SPICE"))
    perfect = cm.caption_scores(_results({i: refs[0] for i, refs in GTS.items()}), GTS, spice=False)
    bad = cm.caption_scores(_results({i: BAD for i in GTS}), GTS, spice=False)
    for metric in cm.METRICS:
        assert perfect[metric] > bad[metric], (metric, perfect[metric], bad[metric])
    assert perfect["Bleu_1"] == pytest.approx(1.0) and perfect["ROUGE_L"] == pytest.approx(1.0)
    # METEOR's long-running java is gone once the scores are back, not left to the garbage collector.
    assert len(started) == 2 and all(m.meteor_p.poll() is not None for m in started)


@needs_java
def test_captions_with_other_line_ends_stay_with_their_image():
    # The Java tokenizer splits lines at \r, \u2028, ...: each would shift every later caption.
    out = cj._tokenize({1: [{"caption": "Left\rright."}, {"caption": "A\u2028B\x0bC"}], 2: [{"caption": "Next!"}]})
    assert out == {1: ["left right", "a b c"], 2: ["next"]}


# ------------------------------------------------------------------------------------------ Java

def test_missing_java_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no java
    with pytest.raises(UserError) as err:
        cm.caption_scores(_results(CANDIDATES), GTS, spice=False)
    message = str(err.value)
    assert "Java 8" in message and "METEOR" in message and "SPICE" in message
    assert "apt-get install -y default-jre-headless" in message and "conda install -c conda-forge openjdk" in message
    assert "brew install openjdk" in message


def test_too_old_or_broken_java_is_refused(tmp_path, monkeypatch):
    java = tmp_path / "java"
    java.write_text('#!/bin/sh\necho \'java version "1.7.0_80"\' >&2\n')
    java.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match=r"Java 7 .*install"):
        cj.require_java()
    java.write_text("#!/bin/sh\necho 'Error: could not create the Java Virtual Machine.' >&2\nexit 1\n")
    with pytest.raises(UserError, match=r"exit status 1: Error: could not create"):
        cj.require_java()
    java.write_text('#!/bin/sh\necho \'openjdk version "1.8.0_292"\' >&2\n')
    assert cj.require_java() == 'openjdk version "1.8.0_292"'


@needs_java
def test_require_java_reports_the_version():
    assert "version" in cj.require_java()


# ------------------------------------------------------------------------------------------ SPICE

spice_models_absent = pytest.mark.skipif(cs.spice_models_present(), reason="SPICE models are installed here")


@spice_models_absent
@pytest.mark.timing  # asserts a wall-time bound: run alone, not beside another worker
def test_spice_fetch_attempt_gives_up_within_its_bound(monkeypatch, caplog):
    monkeypatch.setattr(cs, "_spice_fetch_failed", None)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger=cs.__name__):
        assert cs._spice_models_ready(required=False) is False
    elapsed = time.monotonic() - start
    assert elapsed < cs.SPICE_PROBE_TIMEOUT_S + 5  # offline: DNS fails at once, well under a second here
    [record] = caplog.records
    assert "SPICE skipped" in record.getMessage() and "get_stanford_models" in record.getMessage()
    assert cs._spice_fetch_failed is not None
    # Later calls in this process skip at once, with their own single line, and never fetch again.
    monkeypatch.setattr(cs, "_fetch_spice_models", lambda: pytest.fail("fetched twice"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=cs.__name__):
        assert cs._spice_models_ready(required=False) is False
    assert len(caplog.records) == 1


@pytest.mark.timing  # asserts a wall-time bound: run alone, not beside another worker
def test_a_silent_server_or_a_stuck_fetch_is_given_up_on_in_time(monkeypatch):
    import socket

    with socket.socket() as server:  # accepts connections (backlog) and never answers
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        monkeypatch.setattr(cs, "_spice_url", lambda: f"http://127.0.0.1:{server.getsockname()[1]}/corenlp.zip")
        monkeypatch.setattr(cs, "SPICE_PROBE_TIMEOUT_S", 2)
        start = time.monotonic()
        reason = cs._fetch_spice_models()
        assert time.monotonic() - start < 10
    assert reason.startswith("reaching http://127.0.0.1:") and "timed out" in reason
    start = time.monotonic()  # name resolution ignores socket timeouts: the child process is stopped
    assert cs._run_child("import time; time.sleep(60)", [], 1, "downloading x") == "downloading x took longer than 1 s"
    assert time.monotonic() - start < 10


@pytest.mark.slow
@needs_java
@spice_models_absent
@pytest.mark.timing  # asserts a wall-time bound: run alone, not beside another worker
def test_spice_auto_offline_is_skipped_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(cs, "_spice_fetch_failed", None)
    start = time.monotonic()
    with caplog.at_level(logging.DEBUG, logger=cs.__name__):
        scores = cm.caption_scores(_results(CANDIDATES), GTS)  # spice="auto"
    elapsed = time.monotonic() - start
    assert list(scores) == list(cm.METRICS)  # no SPICE key, the rest computed
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert message.startswith("SPICE skipped") and "stanford-corenlp-3.6.0-models.jar" in message
    assert "\n" not in message
    assert elapsed < 90  # METEOR's ~10 s load and the tokenizer; the fetch attempt adds well under a second


@spice_models_absent
@pytest.mark.timing  # asserts a wall-time bound: run alone, not beside another worker
def test_spice_true_offline_is_an_error_before_any_scoring(monkeypatch):
    if shutil.which("java") is None:
        pytest.skip("no java on PATH")
    monkeypatch.setattr(cs, "_spice_fetch_failed", "an earlier failure")  # required: tries again anyway
    start = time.monotonic()
    with pytest.raises(UserError, match=r"SPICE cannot be computed: .*could not be fetched"):
        cm.caption_scores(_results(CANDIDATES), GTS, spice=True)  # before any scoring: no METEOR wait
    assert time.monotonic() - start < cs.SPICE_PROBE_TIMEOUT_S + 10
    with pytest.raises(ValueError, match="spice must be"):
        cm.caption_scores(_results(CANDIDATES), GTS, spice="yes")


def test_spice_failures_are_skipped_in_auto_and_errors_when_required(monkeypatch, caplog):
    import pycocoevalcap.spice.spice as spice_module

    seen = {}

    class FailingSpice:
        def compute_score(self, gts, res):
            seen["ids"] = list(gts)
            raise subprocess.CalledProcessError(1, ["java", "-jar", "-Xmx8G", "spice-1.0.jar"])

    monkeypatch.setattr(spice_module, "Spice", FailingSpice)
    gts_tok = {"b.jpg": ["a dog"], "a.jpg": ["a cat"]}
    res_tok = {"b.jpg": ["a dog"], "a.jpg": ["a cat"]}
    with caplog.at_level(logging.WARNING, logger=cs.__name__):
        assert cs._spice(gts_tok, res_tok, required=False) is None
    [record] = caplog.records
    assert "SPICE skipped" in record.getMessage() and "exited with status 1" in record.getMessage()
    assert seen["ids"] == [0, 1]  # ranks of the sorted ids: SPICE's json gets ints
    with pytest.raises(UserError, match="SPICE failed: its java run exited with status 1"):
        cs._spice(gts_tok, res_tok, required=True)


def test_spice_sees_ids_ranked_in_their_sorted_order(monkeypatch):
    import pycocoevalcap.spice.spice as spice_module

    class RecordingSpice:
        def compute_score(self, gts, res):
            self.__class__.inputs = (gts, res)
            return 0.25, []

    monkeypatch.setattr(spice_module, "Spice", RecordingSpice)
    gts_tok = {"z.jpg": ["a dog"], "a.jpg": ["a cat", "cat"], 7: ["x"]}  # mixed: reference order kept
    assert cs._spice(gts_tok, {k: ["c"] for k in gts_tok}, required=True) == 0.25
    assert RecordingSpice.inputs[0] == {0: ["a dog"], 1: ["a cat", "cat"], 2: ["x"]}
    gts_tok = {3: ["c"], 1: ["a"], 2: ["b"]}
    cs._spice(gts_tok, gts_tok, required=True)
    assert RecordingSpice.inputs[0] == {0: ["a"], 1: ["b"], 2: ["c"]}


# ------------------------------------------------------------------------------ results vs references

def test_results_and_references_must_pair_one_to_one():
    gts = {1: ["a cat"], 2: ["a dog"], "img/3.jpg": ["a bird"]}
    with pytest.raises(ValueError, match=r"1 result id\(s\) not in the references: \[4\]; "
                                         r"1 reference id\(s\) without a result: \['img/3.jpg'\]"):
        cm.caption_scores(_results({1: "a", 2: "b", 4: "c"}), gts, spice=False)
    with pytest.raises(DataError, match=r"1 id\(s\) with several results: \[2\]"):
        cm.caption_scores(_results({1: "a", 2: "b", "img/3.jpg": "c"}) + [{"image_id": 2, "caption": "d"}], gts)
    with pytest.raises(DataError, match=r"\['1'\].*7 and '7' are two images"):
        cm.caption_scores([{"image_id": "1", "caption": "a"}, {"image_id": 2, "caption": "b"},
                           {"image_id": "img/3.jpg", "caption": "c"}], gts)
    with pytest.raises(DataError, match=r"results\[1\] \(image 2\) field 'caption'"):
        cm.caption_scores([{"image_id": 1, "caption": "a"}, {"image_id": 2, "caption": None}], gts)
    with pytest.raises(DataError, match=r"results\[0\]: expected"):
        cm.caption_scores([{"caption": "a"}], gts)
    with pytest.raises(DataError, match=r"references of image 2: expected a non-empty list"):
        cm.caption_scores(_results({1: "a", 2: "b"}), {1: ["a cat"], 2: []})
    with pytest.raises(DataError, match="ground truth is empty"):
        cm.caption_scores([], {})


# -------------------------------------------------------------------------------------- ground truth

def test_image_ids_of_coco_flickr_and_custom_entries():
    coco = {"image": "val2014/COCO_val2014_000000391895.jpg", "caption": ["a"]}
    assert cf.image_id_for(coco, "coco") == 391895
    assert cf.image_id_for({"image": "flickr30k-images/1007129816.jpg", "caption": "a"}, "flickr") == 1007129816
    assert cf.image_id_for({"image": "C:\\data\\COCO_val2014_000000000042.jpg"}, "coco") == 42
    assert cf.image_id_for({"image": "photos/cat 1.png", "caption": "a"}, "custom") == "photos/cat 1.png"
    assert cf.image_id_for({"image": "photos/cat.png", "image_id": 7}, "custom") == 7
    assert cf.image_id_for({"image": "photos/cat.png", "image_id": "cat"}, "custom") == "cat"
    assert cf.image_id_for({"image": "./a/../b.png"}, "custom") == "./a/../b.png"  # as written


def test_image_id_errors_name_the_entry_and_the_field():
    with pytest.raises(DataError, match=r"'val2014/cat\.jpg'.*field 'image': no image id at the end .*'cat\.jpg'"):
        cf.image_id_for({"image": "val2014/cat.jpg", "caption": ["a"]}, "coco")
    with pytest.raises(DataError, match=r"field 'image': expected the image path"):
        cf.image_id_for({"caption": ["a"]}, "flickr")
    with pytest.raises(DataError, match=r"field 'image_id': expected an int or a non-empty string, got 1\.5"):
        cf.image_id_for({"image": "a.jpg", "image_id": 1.5}, "custom")
    with pytest.raises(ValueError, match="unknown dataset 'vizwiz'"):
        cf.image_id_for({"image": "a.jpg"}, "vizwiz")
    assert cf.image_id_for({"image": "a.jpg", "img_id": 7}, "nocaps") == 7
    with pytest.raises(DataError, match="field 'img_id'"):
        cf.image_id_for({"image": "a.jpg"}, "nocaps")


def test_ground_truth_from_annotation_entries():
    entries = [{"image": "val2014/COCO_val2014_000000391895.jpg", "caption": ["A man.", "A moped."]},
               {"image": "val2014/COCO_val2014_000000522418.jpg", "caption": "A cake."}]
    assert cf.ground_truth(entries, lambda e: cf.image_id_for(e, "coco")) == {
        391895: ["A man.", "A moped."], 522418: ["A cake."]}
    custom = [{"image": "b.jpg", "caption": "one"}, {"image": "a.jpg", "caption": ["x"]},
              {"image": "b.jpg", "caption": "two"}, {"image": "c.jpg", "image_id": "c", "caption": "y"}]
    gts = cf.ground_truth(custom, lambda e: cf.image_id_for(e, "custom"))
    assert gts == {"b.jpg": ["one", "two"], "a.jpg": ["x"], "c": ["y"]}  # pooled, first-seen order
    assert list(gts) == ["b.jpg", "a.jpg", "c"]


def test_ground_truth_errors_name_entry_file_and_field():
    coco = lambda e: cf.image_id_for(e, "coco")  # noqa: E731
    with pytest.raises(DataError, match=r"entry 1 of test\.json: .*'val2014/x\.jpg'.*field 'image'"):
        cf.ground_truth([{"image": "val2014/COCO_val2014_000000000001.jpg", "caption": "a"},
                         {"image": "val2014/x.jpg", "caption": "b"}], coco, source="test.json")
    with pytest.raises(DataError, match=r"entry 0 \(image 'a\.jpg'\): no field 'caption'"):
        cf.ground_truth([{"image": "a.jpg"}], lambda e: e["image"])
    with pytest.raises(DataError, match=r"entry 0 of f\.json \(image 'a\.jpg'\) field 'caption'\[1\]: expected a non-empty"):
        cf.ground_truth([{"image": "a.jpg", "caption": ["ok", "  "]}], lambda e: e["image"], source="f.json")
    with pytest.raises(DataError, match=r"entry 0 \(image 'a\.jpg'\) field 'caption': expected a caption or"):
        cf.ground_truth([{"image": "a.jpg", "caption": []}], lambda e: e["image"])
    with pytest.raises(DataError, match=r"no annotation entries of f\.json"):
        cf.ground_truth([], lambda e: e["image"], source="f.json")


def test_read_gt_file_reads_blips_gt_json(tmp_path):
    path = tmp_path / "coco_karpathy_test_gt.json"
    gts = {391895: ["A man.", "A moped."], 522418: ["A cake."], 184613: ["A yak.", "An umbrella."]}
    _write_gt(path, gts)
    read = cf.read_gt_file(path)
    assert read == gts and list(read) == list(gts)
    # Without "images": the order of first appearance.
    path.write_text(json.dumps({"annotations": [{"image_id": 5, "caption": "b"}, {"image_id": 2, "caption": "a"},
                                                {"image_id": 5, "caption": "c"}]}))
    assert list(cf.read_gt_file(path).items()) == [(5, ["b", "c"]), (2, ["a"])]


@pytest.mark.parametrize("content, match", [
    ("{not json", r"cannot read it as json"),
    ("[]", r"expected a COCO caption-annotation object with an 'annotations' list"),
    ('{"images": []}', r"with an 'annotations' list .*got keys \['images'\]"),
    ('{"annotations": [{"image_id": 1}]}', r"annotations\[0\] field 'caption': expected a non-empty string, got None"),
    ('{"annotations": [{"image_id": 1, "caption": "a"}, {"caption": "b"}]}', r"annotations\[1\] field 'image_id'"),
    ('{"images": [{"id": 1}], "annotations": [{"image_id": 2, "caption": "a"}]}',
     r"annotations\[0\] field 'image_id': image 2 is not in 'images'"),
    ('{"images": [{"id": 1}, {"id": 2}], "annotations": [{"image_id": 1, "caption": "a"}]}',
     r"field 'images': 1 image\(s\) without any caption in 'annotations': \[2\]"),
    ('{"images": [{"id": 1}, {"name": "x"}], "annotations": []}', r"images\[1\] field 'id'"),
    ('{"images": [{"id": 1}, {"id": 1}], "annotations": []}', r"images\[1\] field 'id': image 1 is listed twice"),
    ('{"annotations": []}', r"field 'annotations': no captions"),
])
def test_read_gt_file_errors_name_the_file_and_the_field(tmp_path, content, match):
    path = tmp_path / "gt.json"
    path.write_text(content)
    with pytest.raises(DataError, match=match) as err:
        cf.read_gt_file(path)
    assert str(path) in str(err.value)


def test_read_gt_file_missing(tmp_path):
    with pytest.raises(DataError, match=r"nope\.json: no such ground-truth file"):
        cf.read_gt_file(tmp_path / "nope.json")


# ------------------------------------------------------------------------------------------ results

def test_write_results_is_atomic_and_readable(tmp_path):
    import numpy as np

    path = tmp_path / "out" / "test_epoch0.json"
    results = [{"image_id": np.int64(391895), "caption": "a man on a moped"}, {"image_id": "p/1.jpg", "caption": "é"}]
    cf.write_results(path, results)
    assert json.loads(path.read_text(encoding="utf-8")) == [
        {"image_id": 391895, "caption": "a man on a moped"}, {"image_id": "p/1.jpg", "caption": "é"}]
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # the usual permissions, not mkstemp's 0600
    with pytest.raises(TypeError):
        cf.write_results(path, [{"image_id": object(), "caption": "x"}])
    assert json.loads(path.read_text(encoding="utf-8"))[0]["image_id"] == 391895  # the old file intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["test_epoch0.json"]  # no temp file left


@needs_java
def test_best_constant_caption_is_the_argmax_of_cider_over_the_candidates():
    from pycocoevalcap.cider.cider import Cider
    gts = {1: ["a red circle on the left", "a red circle at the left side"],
           2: ["a blue square on the right", "one blue square at the right"],
           3: ["a red square in the middle", "a red square in the center"]}
    candidates = ["a red circle on the left", "a blue square on the right", "a red square", "an image"]
    best = cm.best_constant_caption(gts, candidates)
    # Each candidate's CIDEr when it is the caption of every image, computed independently.
    tok = cj._tokenize({i: [{"caption": c} for c in refs] for i, refs in gts.items()})
    ciders = []
    for c in candidates:
        res = cj._tokenize({i: [{"caption": c}] for i in gts})
        ciders.append(Cider().compute_score(tok, res)[0])
    k = max(range(len(candidates)), key=lambda j: ciders[j])
    assert best["caption"] == candidates[k] and best["CIDEr"] == pytest.approx(ciders[k], abs=1e-12)
    assert best["candidates"] == 4 and 0.0 <= best["Bleu_4"] <= 1.0
    assert ciders[-1] < best["CIDEr"]  # "an image" shares nothing
