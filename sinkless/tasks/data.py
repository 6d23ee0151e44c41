"""Evaluation data: samples, data sets, a plain folder of images with a simple annotation file, ``--data``.

Every reader returns a ``Dataset``: named samples, each an RGB image with object boxes (pixel
edges, half-open ``[x0, x1) × [y0, y1)``), an optional semantic mask (class index per pixel,
0 background, 255 ignored) and an optional image-level label. Annotations are parsed and checked
when the dataset is opened, so a malformed file fails before any model runs; images are read when
a sample is used. Nothing is downloaded. Pascal VOC and COCO are read by ``voc_coco``; the formats
are documented in docs/TASKS.md.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from sinkless.errors import SinklessError
from sinkless.images import load_image

__all__ = [
    "Sample",
    "Dataset",
    "IGNORE",
    "ANNOTATION_FORMAT",
    "open_dataset",
    "read_annotation_file",
    "mini_set",
    "rasterize_polygons",
]

log = logging.getLogger(__name__)

IGNORE = 255  # mask value of pixels that count for no class (VOC object borders, COCO crowds)
ANNOTATION_FORMAT = "sinkless-annotations"
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


# -- the plain folder + annotation file ----------------------------------------------------------
_FORMAT_FIX = "see the annotation format in docs/TASKS.md"


def read_annotation_file(path: str | Path) -> Dataset:
    """A folder of images described by ``annotations.json`` (sinkless format) or ``annotations.csv``.

    JSON: ``{"format": "sinkless-annotations", "version": 1, "classes": [...], "images": [{"file": ...,
    "label": ..., "objects": [{"label": ..., "box": [x0, y0, x1, y1], "polygons": [[[x, y], ...]]}],
    "mask": "optional class-index PNG"}]}``. CSV: a header ``file,x0,y0,x1,y1,label`` and one row a box.
    Paths are relative to the annotation file.
    """
    path = Path(path)
    if path.is_dir():
        for candidate in ("annotations.json", "annotations.csv"):
            if (path / candidate).exists():
                return read_annotation_file(path / candidate)
        raise SinklessError(f"{path} holds no annotations.json or annotations.csv", fix=_DATA_HELP)
    if not path.exists():
        raise SinklessError(f"annotation file not found: {path}", fix=_DATA_HELP)
    entries, classes = _read_csv(path) if path.suffix.lower() == ".csv" else _read_sinkless_json(path)
    names, loaders = [], []
    for i, entry in enumerate(entries):
        where = f"{path} image {i} ({entry['file']})"
        file = path.parent / entry["file"]
        if not file.exists():
            raise SinklessError(f"{where}: image not found: {file}", fix="image paths are relative to the annotation file")
        names.append(Path(entry["file"]).stem)
        loaders.append(_folder_loader(Path(entry["file"]).stem, file, entry, classes, path.parent, where))
    if not loaders:
        raise SinklessError(f"{path} lists no images", fix=_FORMAT_FIX)
    return Dataset(path.parent.name, "folder", names, loaders, ["background", *classes], str(path))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise SinklessError(f"cannot read {path} ({error})", fix="check the path") from None
    except json.JSONDecodeError as error:
        raise SinklessError(f"{path} is not valid JSON ({error})", fix=_FORMAT_FIX) from None


def _read_sinkless_json(path: Path) -> tuple[list[dict], list[str]]:
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise SinklessError(f"{path}: expected an object with an \"images\" list", fix=_FORMAT_FIX)
    if data.get("format", ANNOTATION_FORMAT) != ANNOTATION_FORMAT:
        raise SinklessError(f"{path}: format {data.get('format')!r} is not {ANNOTATION_FORMAT!r}", fix=_FORMAT_FIX)
    classes = list(data.get("classes") or [])
    entries = []
    for i, raw in enumerate(data["images"]):
        where = f"{path} image {i}"
        if not isinstance(raw, dict) or not isinstance(raw.get("file"), str):
            raise SinklessError(f"{where}: each image needs a \"file\"", fix=_FORMAT_FIX)
        objects = []
        for j, obj in enumerate(raw.get("objects") or []):
            if not isinstance(obj, dict) or ("box" not in obj and "polygons" not in obj):
                raise SinklessError(f"{where} object {j}: needs a \"box\" or \"polygons\"", fix=_FORMAT_FIX)
            label = str(obj.get("label", "object"))
            if label not in classes:
                classes.append(label)
            polygons = obj.get("polygons") or []
            try:
                polygons = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in polygons]
            except (TypeError, ValueError):
                raise SinklessError(f"{where} object {j}: polygons must be lists of [x, y] points", fix=_FORMAT_FIX) from None
            if any(len(p) < 3 for p in polygons):
                raise SinklessError(f"{where} object {j}: a polygon needs at least 3 points", fix=_FORMAT_FIX)
            if "box" in obj:
                box = _check_box(obj["box"], f"{where} object {j}")
            else:  # the tight box of the polygons
                points = np.concatenate(polygons)
                box = _check_box([*points.min(0), *points.max(0)], f"{where} object {j}")
            objects.append({"label": label, "box": box, "polygons": polygons})
        entries.append({"file": raw["file"], "label": raw.get("label"), "objects": objects, "mask": raw.get("mask")})
    return entries, classes


def _read_csv(path: Path) -> tuple[list[dict], list[str]]:
    try:
        rows = list(csv.DictReader(path.read_text(encoding="utf-8").splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise SinklessError(f"cannot read {path} ({error})", fix=_FORMAT_FIX) from None
    needed = {"file", "x0", "y0", "x1", "y1"}
    if not rows or not needed <= set(rows[0]):
        raise SinklessError(f"{path}: expected a header with {sorted(needed)} (and optional label)", fix=_FORMAT_FIX)
    by_file: dict[str, dict] = {}
    classes: list[str] = []
    for i, row in enumerate(rows, start=2):
        label = (row.get("label") or "object").strip()
        if label not in classes:
            classes.append(label)
        box = _check_box([row["x0"], row["y0"], row["x1"], row["y1"]], f"{path} line {i}")
        entry = by_file.setdefault(row["file"], {"file": row["file"], "label": None, "objects": [], "mask": None})
        entry["objects"].append({"label": label, "box": box, "polygons": []})
    return list(by_file.values()), classes


def _folder_loader(name, file, entry, classes, folder, where):
    def load() -> Sample:
        image = load_image(file)
        objects = entry["objects"]
        boxes = _fit_boxes(np.asarray([o["box"] for o in objects], dtype=np.float64).reshape(-1, 4), image, where)
        labels = [o["label"] for o in objects]
        mask = None
        if entry["mask"]:
            mask = _read_mask_png(folder / entry["mask"], image, where)
        elif any(o["polygons"] for o in objects):
            polygons = [(classes.index(o["label"]) + 1, p) for o in objects for p in o["polygons"]]
            mask = rasterize_polygons(image.size, polygons)
        return Sample(name, image, boxes, labels, mask, entry["label"] or _largest_label(boxes, labels))

    return load


# -- named sets and the --data argument ----------------------------------------------------------
def mini_set() -> Dataset:
    """The small set of natural photographs that ships with sinkless (docs/MINI_SET.md)."""
    folder = resources.files("sinkless") / "data" / "mini"
    dataset = read_annotation_file(Path(str(folder)) / "annotations.json")
    dataset.name, dataset.kind = "mini", "mini"
    return dataset


def open_dataset(spec: str | Path, *, split: str | None = None, image_dir: str | Path | None = None) -> Dataset:
    """``synthetic``, ``mini``, or a path: a VOC folder, a COCO JSON, a folder with an annotation file."""
    from sinkless.tasks.synthetic import synthetic_scenes
    from sinkless.tasks.voc_coco import read_coco, read_voc

    if str(spec) == "synthetic":
        return synthetic_scenes()
    if str(spec) == "mini":
        return mini_set()
    path = Path(spec)
    if not path.exists():
        raise SinklessError(f"data not found: {spec}", fix=_DATA_HELP)
    if path.is_dir():
        if (path / "Annotations").is_dir():
            return read_voc(path, split=split)
        return read_annotation_file(path)
    if path.suffix.lower() == ".json":
        data = _read_json(path)
        if isinstance(data, dict) and "annotations" in data and "categories" in data:
            return read_coco(path, image_dir)
        return read_annotation_file(path)
    if path.suffix.lower() == ".csv":
        return read_annotation_file(path)
    raise SinklessError(f"cannot tell what kind of data {path} is", fix=_DATA_HELP)
