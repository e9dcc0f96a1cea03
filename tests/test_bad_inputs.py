"""The bad-input campaign (``tests/scripts/bad_inputs.py``): every case through its entry point, as
a user runs it. Each asserts the exit status, the parts of the first message line, that every
watched file stayed byte-identical (bytes and modification time) and that a refused run created
nothing (no output folder, no run.log, no config.yaml)."""
from __future__ import annotations

import pytest

from tests.scripts.bad_inputs import CASES
from tests.scripts.campaign_runs import first_line, run_inprocess, snapshot
from tests.scripts.campaign_world import build_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("bad_inputs"))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, world, tmp_path, monkeypatch, capsys):
    run = case.make(world, tmp_path)
    for key, value in run.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The world's shared inputs are watched by every case: no case may touch them.
    watched = run.watch + [world.run, world.gallery, world.hf, world.cfg]
    before = snapshot(watched)
    code, out, err = run_inprocess(monkeypatch, capsys, *run.argv)
    line = first_line(code, out, err)
    assert code == run.code, f"{case.id} {case.title}: exit {code}\n{err[-3000:]}\n{out[-2000:]}"
    text = line if code != 0 else out + err
    missing = [part for part in run.message if part not in text]
    assert not missing, f"{case.id}: {missing} not in {text[-1500:]!r}"
    if code != 0:
        assert "Traceback" not in err and "Traceback" not in out, err
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("usage:", " "))]
        assert lines == [line], err  # one line (after argparse's usage, for a config error: status 2)
    assert snapshot(watched) == before, f"{case.id}: a watched file was written"
    for path in run.absent:
        assert not path.exists(), f"{case.id}: {path} was created"
