"""Image transforms (data/transforms.py): the test transform against torchvision, the train
transform, every RandAugment op and RandomAugment's options."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from data.transforms import IMAGE_MEAN, IMAGE_STD, OPS, RandomAugment, build_test_transform, build_train_transform


# ---------------------------------------------------------------- transforms
def test_test_transform_equals_torchvision():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    reference = transforms.Compose([
        transforms.Resize((24, 24), interpolation=InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(IMAGE_MEAN, IMAGE_STD),
    ])
    out = build_test_transform(24)(img)
    assert out.shape == (3, 24, 24)
    assert torch.equal(out, reference(img))


def test_train_transform_shape_and_randomness():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    tf = build_train_transform(32)
    assert any(isinstance(t, RandomAugment) for t in tf.transforms)
    torch.manual_seed(0)
    random.seed(0)
    a = tf(img)
    b = tf(img)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert not torch.equal(a, b)
    plain = build_train_transform(32, hflip=False, randaug=False)
    assert not any(isinstance(t, (RandomAugment, transforms.RandomHorizontalFlip))
                   for t in plain.transforms)


def test_every_randaugment_op_runs_on_rgb():
    assert set(OPS) == {"Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize",
                        "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(30, 220, (24, 32, 3), dtype=np.uint8))
    random.seed(0)
    for name, op in OPS.items():
        out = op(img, 8)
        assert out.mode == "RGB" and out.size == img.size, name
        if name != "Identity":
            assert out.tobytes() != img.tobytes(), f"{name} left the image unchanged"
    # BLIP's enhance mapping 0.1 + 1.8 * m/10 is exactly 1.0 at its magnitude 5: a no-op there.
    for name in ("Brightness", "Sharpness"):
        assert OPS[name](img, 5).tobytes() == img.tobytes(), name
    # Geometric ops expose the grey fill colour in the corners they move out of view.
    random.seed(0)
    rotated = OPS["Rotate"](img, 10)
    assert rotated.getpixel((0, 0)) == (128, 128, 128)


def test_random_augment_p_and_validation():
    img = Image.new("RGB", (16, 16), (10, 200, 40))
    img.putpixel((3, 3), (255, 255, 255))
    assert RandomAugment(n=3, magnitude=10, p=0.0)(img) is img
    with pytest.raises(ValueError, match="Solarize"):
        RandomAugment(ops=("Identity", "Solarize"))
    with pytest.raises(ValueError, match="magnitude"):
        RandomAugment(magnitude=11)
