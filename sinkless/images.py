"""Reading images, the bundled sample photographs, and turning images into model inputs."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from sinkless.errors import SinklessError

__all__ = [
    "ImageSpec",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SUFFIXES",
    "load_image",
    "expand_paths",
    "sample_images",
    "SAMPLE_NAMES",
    "to_pixels",
    "natural_crops",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

# Natural photographs shipped inside the scikit-image wheel (no download): public domain / CC0.
SAMPLE_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "motorcycle_left", "clock", "page", "moon", "brick", "grass", "gravel")


@dataclass(frozen=True)
class ImageSpec:
    """How a model wants its pixels: square side, normalisation and patch size."""

    size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    patch_size: int = 14


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB, with a clear error for a missing or unreadable file."""
    path = Path(path)
    if not path.exists():
        raise SinklessError(f"image file not found: {path}", fix="check the path")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise SinklessError(
            f"cannot read {path} as an image ({type(error).__name__}: {error})",
            fix=f"pass image files ({', '.join(IMAGE_SUFFIXES)}); is the file truncated or not an image?",
        ) from None


def expand_paths(inputs: Iterable[str], suffixes: Sequence[str] | None = None) -> list[Path]:
    """Files named by ``inputs``: files, directories (their files with ``suffixes``, sorted) or globs.

    Raises a ``SinklessError`` naming the first input that matches nothing.
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and (suffixes is None or p.suffix.lower() in suffixes))
            if not files:
                raise SinklessError(f"directory {path} holds no input files", fix=f"expected files ending in {', '.join(suffixes or ['*'])}")
            found.extend(files)
        elif path.is_file():
            found.append(path)
        elif glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matches:
                raise SinklessError(f"no file matches {item!r}", fix="check the pattern (quote it so the shell does not expand it)")
            found.extend(matches)
        else:
            raise SinklessError(f"input not found: {item}", fix="pass existing files, directories or glob patterns")
    return found


def _skimage(name: str) -> np.ndarray:
    from skimage import data

    array = getattr(data, name)() if name != "motorcycle_left" else data.stereo_motorcycle()[0]
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return np.ascontiguousarray(array[..., :3])


def sample_images(names: Sequence[str] | None = None) -> list[tuple[str, Image.Image]]:
    """Natural photographs bundled with scikit-image, as ``(name, RGB image)`` pairs."""
    chosen = SAMPLE_NAMES if names is None else names
    unknown = sorted(set(chosen) - set(SAMPLE_NAMES))
    if unknown:
        raise ValueError(f"unknown sample images {unknown}; choose from {list(SAMPLE_NAMES)}")
    return [(name, Image.fromarray(_skimage(name))) for name in chosen]


def to_pixels(images: Sequence[Image.Image], spec: ImageSpec, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Resize (bicubic, whole image, no crop) and normalise images into a (B, 3, H, W) float tensor."""
    height, width = (size, size) if isinstance(size, int) else size or (spec.size, spec.size)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    arrays = []
    for image in images:
        resized = image.convert("RGB").resize((width, height), Image.BICUBIC)
        arrays.append((np.asarray(resized, dtype=np.float32) / 255.0 - mean) / std)
    return torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())  # (B, 3, H, W)


def natural_crops(n: int, *, seed: int = 0, names: Sequence[str] | None = None, min_scale: float = 0.35) -> list[Image.Image]:
    """``n`` varied natural images: random square-ish crops (and flips) of the sample photographs.

    Deterministic for ``seed``. Used wherever a method needs many natural images offline
    (register-neuron discovery, planted-model calibration, benchmarks).
    """
    rng = np.random.default_rng(seed)
    photos = [image for _, image in sample_images(names)]
    crops = []
    for i in range(n):
        photo = photos[i % len(photos)]
        width, height = photo.size
        scale = rng.uniform(min_scale, 1.0)
        side = int(min(width, height) * scale)
        left = int(rng.integers(0, width - side + 1))
        top = int(rng.integers(0, height - side + 1))
        crop = photo.crop((left, top, left + side, top + side))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        crops.append(crop)
    return crops
