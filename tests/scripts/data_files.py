"""Small files the data tests write (``tests/test_data_utils.py``, ``tests/test_data_retrieval.py``):
a JSON file, an RGB image."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image


def _write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def _rgb(path: Path, color=(200, 30, 60), size=(20, 12)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path
