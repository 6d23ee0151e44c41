"""The evaluation data type every reader returns: ``Sample``, ``Dataset``, and the checks readers share.

A ``Dataset`` is a list of named samples, each an RGB image with object boxes (pixel edges,
half-open ``[x0, x1) × [y0, y1)``), an optional semantic mask (class index per pixel, 0 background,
255 ignored) and an optional image-level label, read lazily. The readers sit above this module:
``data`` (a plain folder with an annotation file, the shipped mini set, ``--data``), ``voc_coco``
(Pascal VOC, COCO) and ``synthetic`` (generated scenes); the formats are in docs/TASKS.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from sinkless.errors import SinklessError
from sinkless.images import unique_names

__all__ = ["Sample", "Dataset", "IGNORE", "ANNOTATION_FORMAT", "rasterize_polygons"]

log = logging.getLogger(__name__)

IGNORE = 255  # mask value of pixels that count for no class (VOC object borders, COCO crowds)
ANNOTATION_FORMAT = "sinkless-annotations"
_FORMAT_FIX = "see the annotation format in docs/TASKS.md"
_DATA_HELP = (
    "pass 'synthetic', 'mini', a Pascal VOC folder (Annotations/, JPEGImages/), a COCO annotation JSON, "
    "or a folder of images with annotations.json / annotations.csv (see docs/TASKS.md)"
)


@dataclass
class Sample:
    """One annotated image."""

    name: str
    image: Image.Image  # RGB
    boxes: np.ndarray  # (K, 4) float64 x0, y0, x1, y1 in pixels, half-open
    box_labels: list[str] = field(default_factory=list)
    mask: np.ndarray | None = None  # (H, W) uint8 class index, 0 background, IGNORE
    label: str | None = None  # image-level class (k-NN probe); default: the largest object's


@dataclass
class Dataset:
    """Named samples read lazily; ``classes[i]`` names mask value ``i`` (0: background)."""

    name: str
    kind: str  # voc, coco, folder, mini, synthetic
    names: list[str]
    loaders: list[Callable[[], Sample]]
    classes: list[str]
    source: str = ""
    info: dict = field(default_factory=dict)  # e.g. the synthetic generator's settings

    def __post_init__(self) -> None:
        # one name per image: two folders' x.png would share per-image records and --out-dir pictures
        unique = unique_names(self.names)
        if unique != list(self.names):
            self.loaders = [load if new == old else _renamed(load, new) for load, old, new in zip(self.loaders, self.names, unique)]
            self.names = unique

    def __len__(self) -> int:
        return len(self.loaders)

    def __getitem__(self, i: int) -> Sample:
        return self.loaders[i]()

    def __iter__(self) -> Iterator[Sample]:
        return (load() for load in self.loaders)

    def limit(self, n: int | None) -> Dataset:
        """The first ``n`` samples (all when ``n`` is None)."""
        if n is None:
            return self
        if n < 1:
            raise SinklessError(f"--limit must be at least 1, got {n}", fix="pass a positive number of images")
        return Dataset(self.name, self.kind, self.names[:n], self.loaders[:n], self.classes, self.source, self.info)

    def images(self) -> Sequence[Image.Image]:
        """The images alone, read on access (what a fix may calibrate on)."""
        return _Images(self)

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "n_images": len(self), "classes": self.classes,
                "source": self.source, **self.info}


def _renamed(load: Callable[[], Sample], name: str) -> Callable[[], Sample]:
    return lambda: dataclasses.replace(load(), name=name)


class _Images(Sequence):
    def __init__(self, dataset: Dataset) -> None:
        self._dataset = dataset

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._dataset[j].image for j in range(*i.indices(len(self)))]
        return self._dataset[i].image


# -- shared helpers ------------------------------------------------------------------------------
def rasterize_polygons(size: tuple[int, int], polygons: Sequence[tuple[int, Sequence[Sequence[float]]]]) -> np.ndarray:
    """(H, W) uint8 mask from ``(value, [[x, y], ...])`` polygons painted in order (later ones on top).

    ``size`` is (width, height). Coordinates are pixel edges: a pixel is inside when its centre is.
    """
    from matplotlib.path import Path as Polygon

    width, height = size
    mask = np.zeros((height, width), dtype=np.uint8)
    for value, points in polygons:
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        x0, y0 = np.floor(points.min(0)).astype(int).clip(0)
        x1, y1 = np.ceil(points.max(0)).astype(int)
        x1, y1 = min(x1, width), min(y1, height)
        if x1 <= x0 or y1 <= y0:
            continue
        ys, xs = np.mgrid[y0:y1, x0:x1]
        centres = np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], 1)  # only the polygon's box is tested
        inside = Polygon(points).contains_points(centres).reshape(ys.shape)
        mask[y0:y1, x0:x1][inside] = int(value)
    return mask


def _largest_label(boxes: np.ndarray, labels: list[str]) -> str | None:
    if not len(boxes):
        return None
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return labels[int(np.argmax(areas))]


def _check_box(box: Sequence, where: str) -> list[float]:
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise SinklessError(f"{where}: a box must be four numbers x0, y0, x1, y1, got {box!r}", fix=_FORMAT_FIX) from None
    if not (0 <= x0 < x1 and 0 <= y0 < y1):
        raise SinklessError(f"{where}: box {box!r} is empty or negative (need 0 <= x0 < x1 and 0 <= y0 < y1)", fix=_FORMAT_FIX)
    return [x0, y0, x1, y1]


def _fit_boxes(boxes: np.ndarray, image: Image.Image, where: str) -> np.ndarray:
    width, height = image.size
    if len(boxes) and (boxes[:, 2].max() > width + 1 or boxes[:, 3].max() > height + 1):
        raise SinklessError(f"{where}: a box reaches past the {width}x{height} image", fix="boxes are pixel coordinates of this image")
    if len(boxes):
        boxes = boxes.copy()
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    return boxes


def _read_mask_png(path: Path, image: Image.Image, where: str) -> np.ndarray:
    if not path.exists():
        raise SinklessError(f"{where}: mask file not found: {path}", fix="check the mask path (relative to the annotation file)")
    try:
        with Image.open(path) as handle:
            if handle.mode not in ("P", "L", "I", "I;16", "1"):
                raise SinklessError(f"{where}: mask {path} is {handle.mode}, not a single-channel class-index PNG", fix=_FORMAT_FIX)
            mask = np.asarray(handle)
    except (OSError, SyntaxError) as error:
        raise SinklessError(f"{where}: cannot read mask {path} ({error})", fix="is the file a PNG?") from None
    if mask.shape != (image.height, image.width):
        raise SinklessError(f"{where}: mask {path} is {mask.shape[1]}x{mask.shape[0]}, image is {image.width}x{image.height}", fix="masks must match their image")
    return mask.astype(np.uint8)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise SinklessError(f"cannot read {path} ({error})", fix="check the path") from None
    except json.JSONDecodeError as error:
        raise SinklessError(f"{path} is not valid JSON ({error})", fix=_FORMAT_FIX) from None
