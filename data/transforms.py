"""Image transforms for BLIP retrieval: RandAugment on PIL images, and the train/test pipelines.

Train (docs/BLIP.md "Retrieval fine-tuning loss"): RandomResizedCrop(size, scale=(0.5, 1), bicubic) ->
horizontal flip -> RandomAugment(2 ops, magnitude 5) -> ToTensor -> Normalize.
Test: Resize((size, size), bicubic) -> ToTensor -> Normalize: exactly torchvision's, as in BLIP.

Output of both pipelines: float tensor ``[3, image_size, image_size]``.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from PIL import Image, ImageEnhance, ImageOps
from torchvision import transforms
from torchvision.transforms import InterpolationMode

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

MAX_MAGNITUDE = 10.0
FILL = (128, 128, 128)

# Magnitude m in [0, 10] maps to, with a random sign where marked (+/-):
#   Brightness, Sharpness: enhance factor 0.1 + 1.8 * m/10      (m=5: 1.0)
#   ShearX, ShearY:        shear +/- 0.3 * m/10                  (m=5: 0.15, about 8.5 degrees)
#   TranslateX, -Y:        +/- 10 * m/10 pixels                  (m=5: 5 px)
#   Rotate:                +/- 30 * m/10 degrees                 (m=5: 15 degrees)
# These are BLIP's released mappings, kept so fine-tuning reproduces its recipe. Note what they
# imply: at BLIP's magnitude 5 the enhance ops are exact no-ops, and translation is a fixed number of
# pixels whatever the resolution. Change the constants (not the ops) for a stronger augmentation.
ENHANCE_BASE, ENHANCE_SPAN = 0.1, 1.8
SHEAR_RANGE = 0.3
TRANSLATE_PIXELS = 10.0
ROTATE_RANGE = 30.0


def _signed(value: float) -> float:
    """``value`` with a random sign from Python's ``random`` (seeded per DataLoader worker)."""
    return -value if random.random() < 0.5 else value


def _fill(img: Image.Image) -> int | tuple[int, ...]:
    # PIL wants a scalar fill for single-band images.
    return FILL[0] if len(img.getbands()) == 1 else FILL


def _affine(img: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    """Affine warp; ``matrix`` maps output (x, y) to input coordinates, about the top-left."""
    return img.transform(img.size, Image.Transform.AFFINE, matrix,
                         resample=Image.Resampling.BILINEAR, fillcolor=_fill(img))


def identity(img: Image.Image, magnitude: float) -> Image.Image:
    return img


def auto_contrast(img: Image.Image, magnitude: float) -> Image.Image:
    return ImageOps.autocontrast(img)


def equalize(img: Image.Image, magnitude: float) -> Image.Image:
    return ImageOps.equalize(img)


def brightness(img: Image.Image, magnitude: float) -> Image.Image:
    factor = ENHANCE_BASE + ENHANCE_SPAN * magnitude / MAX_MAGNITUDE
    return ImageEnhance.Brightness(img).enhance(factor)


def sharpness(img: Image.Image, magnitude: float) -> Image.Image:
    factor = ENHANCE_BASE + ENHANCE_SPAN * magnitude / MAX_MAGNITUDE
    return ImageEnhance.Sharpness(img).enhance(factor)


def shear_x(img: Image.Image, magnitude: float) -> Image.Image:
    shear = _signed(SHEAR_RANGE * magnitude / MAX_MAGNITUDE)
    return _affine(img, (1.0, shear, 0.0, 0.0, 1.0, 0.0))


def shear_y(img: Image.Image, magnitude: float) -> Image.Image:
    shear = _signed(SHEAR_RANGE * magnitude / MAX_MAGNITUDE)
    return _affine(img, (1.0, 0.0, 0.0, shear, 1.0, 0.0))


def translate_x(img: Image.Image, magnitude: float) -> Image.Image:
    pixels = _signed(TRANSLATE_PIXELS * magnitude / MAX_MAGNITUDE)
    return _affine(img, (1.0, 0.0, pixels, 0.0, 1.0, 0.0))


def translate_y(img: Image.Image, magnitude: float) -> Image.Image:
    pixels = _signed(TRANSLATE_PIXELS * magnitude / MAX_MAGNITUDE)
    return _affine(img, (1.0, 0.0, 0.0, 0.0, 1.0, pixels))


def rotate(img: Image.Image, magnitude: float) -> Image.Image:
    degrees = _signed(ROTATE_RANGE * magnitude / MAX_MAGNITUDE)
    return img.rotate(degrees, resample=Image.Resampling.BILINEAR, fillcolor=_fill(img))


# name -> op(img, magnitude) -> img. Every op keeps the image size and mode.
OPS: dict[str, Callable[[Image.Image, float], Image.Image]] = {
    "Identity": identity,
    "AutoContrast": auto_contrast,
    "Brightness": brightness,
    "Sharpness": sharpness,
    "Equalize": equalize,
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateX": translate_x,
    "TranslateY": translate_y,
    "Rotate": rotate,
}
DEFAULT_OPS = tuple(OPS)


class RandomAugment:
    """RandAugment for PIL images, as BLIP uses it.

    Each call draws ``n`` op names uniformly *with replacement* (as BLIP does) and applies each with
    probability ``p`` at a fixed ``magnitude`` in [0, 10]; signs are drawn per application. All
    randomness comes from Python's ``random``, which torch's DataLoader seeds in each worker.
    """

    def __init__(self, n: int = 2, magnitude: float = 5, ops: Sequence[str] = DEFAULT_OPS,
                 p: float = 0.5) -> None:
        unknown = [name for name in ops if name not in OPS]
        if unknown:
            raise ValueError(f"unknown RandomAugment op(s) {unknown}; valid: {sorted(OPS)}")
        if not ops:
            raise ValueError("RandomAugment needs at least one op")
        if not 0 <= magnitude <= MAX_MAGNITUDE:
            raise ValueError(f"magnitude must be in [0, {MAX_MAGNITUDE:g}], got {magnitude}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.n = int(n)
        self.magnitude = float(magnitude)
        self.ops = tuple(ops)
        self.p = float(p)

    def __call__(self, img: Image.Image) -> Image.Image:
        for name in random.choices(self.ops, k=self.n):
            if random.random() < self.p:
                img = OPS[name](img, self.magnitude)
        return img

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n={self.n}, magnitude={self.magnitude:g}, "
                f"ops={list(self.ops)}, p={self.p:g})")


def build_train_transform(image_size: int, scale: tuple[float, float] = (0.5, 1.0),
                          hflip: bool = True, randaug: bool = True) -> transforms.Compose:
    """PIL RGB image -> float tensor ``[3, image_size, image_size]``, BLIP's train augmentation."""
    steps: list[Callable] = [
        transforms.RandomResizedCrop(image_size, scale=tuple(scale),
                                     interpolation=InterpolationMode.BICUBIC),
    ]
    if hflip:
        steps.append(transforms.RandomHorizontalFlip())
    if randaug:
        steps.append(RandomAugment(2, 5))
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGE_MEAN, IMAGE_STD)]
    return transforms.Compose(steps)


def build_test_transform(image_size: int) -> transforms.Compose:
    """PIL RGB image -> float tensor ``[3, image_size, image_size]``; torchvision's bicubic resize,
    which on PIL input is PIL's own resize, so features match the official BLIP evaluation."""
    return transforms.Compose([
        transforms.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(IMAGE_MEAN, IMAGE_STD),
    ])
