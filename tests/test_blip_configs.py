"""Every config file of BLIP's release (tests/fixtures/blip_configs: retrieval_coco, retrieval_flickr,
caption_coco, nocaps, pretrain, vqa, nlvr, retrieval_msrvtt), verbatim, runs its entry script's
``--dry_run`` with only data paths changed (and, here, small-model keys; at BLIP's sizes:
``python -m tests.scripts.blip_configs``). The files' key sets are held in
tests/scripts/blip_configs.py, so a later change cannot silently drop one."""
from __future__ import annotations

import json

import pytest
from ruamel.yaml import YAML

from tests.scripts.blip_configs import BLIP_CONFIGS, DATA_KEYS, ENTRY, KEY_SETS, tiny_overrides, write_data
from tests.scripts.campaign_runs import run_inprocess


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("blip_configs")
    return root, write_data(root / "data")


def test_the_eight_files_are_blips_and_their_key_sets_are_held():
    assert sorted(ENTRY) == sorted(p.stem for p in BLIP_CONFIGS.glob("*.yaml"))
    for name in ENTRY:
        keys = sorted(YAML(typ="safe").load((BLIP_CONFIGS / f"{name}.yaml").read_text()))
        assert keys == KEY_SETS[name], name
        assert set(DATA_KEYS[name]) <= set(keys), name


@pytest.mark.parametrize("name", list(ENTRY))
def test_blip_config_runs_its_entry_script_dry_run(name, world, monkeypatch, capsys):
    root, data = world
    out = root / "runs" / name
    opts = {**data[name], **tiny_overrides(name, root)}
    code, stdout, err = run_inprocess(monkeypatch, capsys, ENTRY[name], "--config", BLIP_CONFIGS / f"{name}.yaml",
                                      "--dry_run", "--output_dir", out, "--opts",
                                      *[f"{k}={v}" for k, v in opts.items()])
    assert code == 0, err[-3000:]
    record = json.loads((out / "dry_run.json").read_text())
    assert record  # what the dry run measured (losses, or the first batch of an evaluation)
    # Every key of BLIP's file is in the run's config, with BLIP's value where no data key changed it.
    blip = YAML(typ="safe").load((BLIP_CONFIGS / f"{name}.yaml").read_text())
    ran = YAML(typ="safe").load(next(out.glob("config*.yaml")).read_text())
    for key, value in blip.items():
        assert key in ran, key
        if key not in opts and key not in DATA_KEYS[name]:
            assert ran[key] == value or float(ran[key]) == float(value), (key, ran[key], value)
