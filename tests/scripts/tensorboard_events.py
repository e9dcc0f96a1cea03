"""Reading a run's TensorBoard events back in tests."""
from __future__ import annotations

from pathlib import Path


def read_tensorboard(folder: Path):
    """The TensorBoard events under ``folder``, as TensorBoard itself reads them (purged steps of a
    resumed run dropped): ``({tag: [(step, value)]}, {tag: [(step, width, height)]})``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    images = {tag: [(e.step, e.width, e.height) for e in acc.Images(tag)] for tag in acc.Tags()["images"]}
    return scalars, images
