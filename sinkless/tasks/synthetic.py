"""Synthetic scenes: shapes on flat or textured backgrounds, with exact boxes and masks.

Large flat backgrounds are made of patches that are redundant with their neighbours, exactly where
ViTs put their high-norm artifact tokens (Darcet et al. 2024), so these scenes show what artifacts do
to dense tasks. A pixel belongs to a shape when its centre does; masks and boxes are computed from
the same test that paints the pixels, so they are exact. Scene ``i`` depends only on ``(seed, i)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from sinkless.tasks.dataset import Dataset, Sample

__all__ = ["SHAPES", "SceneSpec", "render_scene", "synthetic_scenes"]

SHAPES = ("disk", "square", "triangle")  # mask values 1, 2, 3


@dataclass(frozen=True)
class SceneSpec:
    """Settings of the generator; recorded in every result that uses it."""

    n: int = 48
    size: int = 224  # square side in pixels
    seed: int = 0
    textured: float = 0.5  # share of scenes with a textured background (the others are flat)
    max_objects: int = 2
    scale: tuple[float, float] = (0.18, 0.36)  # object size (circumscribed diameter) / image side
    min_contrast: float = 90.0  # RGB distance between an object's colour and the background's


def _background(rng: np.random.Generator, spec: SceneSpec, textured: bool) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) float image and its mean colour."""
    size = spec.size
    base = rng.uniform(0, 255, 3)
    if not textured:
        return np.broadcast_to(base, (size, size, 3)).copy(), base
    other = rng.uniform(0, 255, 3)
    coarse = rng.random((6, 6)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC))  # (H, W)
    smooth = (smooth - smooth.min()) / max(float(np.ptp(smooth)), 1e-6)
    grain = rng.normal(0, 12, (size, size, 1))
    image = base * (1 - smooth[..., None]) + other * smooth[..., None] + grain
    return image, image.reshape(-1, 3).mean(0)


def _shape_mask(kind: str, cx: float, cy: float, radius: float, angle: float, size: int) -> np.ndarray:
    """(H, W) bool: pixels whose centre lies inside the shape."""
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = xs - cx, ys - cy
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy  # shape coordinates
    if kind == "disk":
        return u * u + v * v <= radius * radius
    if kind == "square":
        half = radius / math.sqrt(2)
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    # equilateral triangle inscribed in the circle of ``radius``: three half-planes
    inside = np.ones_like(u, dtype=bool)
    for k in range(3):
        theta = 2 * math.pi * k / 3 + math.pi / 2
        inside &= u * math.cos(theta) + v * math.sin(theta) <= radius / 2
    return inside


def render_scene(index: int, spec: SceneSpec = SceneSpec()) -> Sample:
    """Scene ``index``: 1..max_objects shapes, no overlaps, exact boxes and mask."""
    rng = np.random.default_rng([spec.seed, index])
    size = spec.size
    textured = bool(rng.random() < spec.textured)
    image, background = _background(rng, spec, textured)
    mask = np.zeros((size, size), dtype=np.uint8)
    boxes, labels = [], []
    for _ in range(int(rng.integers(1, spec.max_objects + 1))):
        for _attempt in range(50):
            kind = SHAPES[int(rng.integers(len(SHAPES)))]
            radius = rng.uniform(*spec.scale) * size / 2
            cx, cy = rng.uniform(radius + 4, size - radius - 4, 2)
            region = _shape_mask(kind, cx, cy, radius, rng.uniform(0, 2 * math.pi), size)
            grown = np.zeros_like(region)
            ys, xs = np.nonzero(region)
            grown[max(ys.min() - 8, 0) : ys.max() + 9, max(xs.min() - 8, 0) : xs.max() + 9] = True
            if not (grown & (mask > 0)).any():
                break
        else:
            continue  # no room left for another object
        colour = rng.uniform(0, 255, 3)
        while np.linalg.norm(colour - background) < spec.min_contrast:
            colour = rng.uniform(0, 255, 3)
        # a linear shading across the object so that it is not one flat colour
        light = rng.uniform(0, 2 * math.pi)
        ys_all, xs_all = np.mgrid[0:size, 0:size] + 0.5
        shade = 0.8 + 0.2 * ((xs_all - cx) * math.cos(light) + (ys_all - cy) * math.sin(light)) / radius
        image[region] = (colour * shade[region][:, None]).clip(0, 255)
        mask[region] = SHAPES.index(kind) + 1
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        labels.append(kind)
    pixels = Image.fromarray(image.clip(0, 255).round().astype(np.uint8))
    boxes_array = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
    label = labels[int(np.argmax(areas))] if labels else None
    return Sample(f"scene-{index:04d}", pixels, boxes_array, labels, mask, label)


def synthetic_scenes(n: int | None = None, *, spec: SceneSpec = SceneSpec()) -> Dataset:
    """The built-in synthetic scenes (``--data synthetic``): ``spec.n`` scenes unless ``n`` is given."""
    count = spec.n if n is None else n
    loaders = [(lambda i=i: render_scene(i, spec)) for i in range(count)]
    names = [f"scene-{i:04d}" for i in range(count)]
    info = {"generator": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(spec).items() if k != "n"}}
    return Dataset("synthetic", "synthetic", names, loaders, ["background", *SHAPES], "sinkless.tasks.synthetic", info)
