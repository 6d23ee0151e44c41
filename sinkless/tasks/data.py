"""Evaluation data from files: a plain folder of images with a simple annotation file, the shipped mini
set, and ``--data`` (which also opens Pascal VOC, COCO and the synthetic scenes through their readers).

Annotations are parsed and checked when the dataset is opened, so a malformed file fails before any
model runs; images are read when a sample is used. Nothing is downloaded. The formats are documented
in docs/TASKS.md; the data type is ``sinkless.tasks.dataset.Dataset``.
"""

from __future__ import annotations

import csv
from importlib import resources
from pathlib import Path

import numpy as np

from sinkless.errors import SinklessError
from sinkless.images import load_image
from sinkless.tasks.dataset import (
    _DATA_HELP,
    _FORMAT_FIX,
    ANNOTATION_FORMAT,
    IGNORE,
    Dataset,
    Sample,
    _check_box,
    _fit_boxes,
    _largest_label,
    _read_json,
    _read_mask_png,
    rasterize_polygons,
)
from sinkless.tasks.synthetic import synthetic_scenes
from sinkless.tasks.voc_coco import read_coco, read_voc

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


# -- the plain folder + annotation file ----------------------------------------------------------
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
        if not file.is_file():
            raise SinklessError(f"{where}: image not found: {file}" + (" (a folder)" if file.is_dir() else ""),
                                fix="image paths are relative to the annotation file")
        names.append(Path(entry["file"]).stem)
        loaders.append(_folder_loader(Path(entry["file"]).stem, file, entry, classes, path.parent, where))
    if not loaders:
        raise SinklessError(f"{path} lists no images", fix=_FORMAT_FIX)
    return Dataset(path.parent.name, "folder", names, loaders, ["background", *classes], str(path))


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
        if not isinstance(raw, dict) or not isinstance(raw.get("file"), str) or not raw["file"].strip():
            raise SinklessError(f"{where}: each image needs a \"file\" (the image's path, relative to {path.name})", fix=_FORMAT_FIX)
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
    try:  # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark
        reader = csv.DictReader(path.read_text(encoding="utf-8-sig").splitlines(), skipinitialspace=True)
        reader.fieldnames = [name.strip() for name in reader.fieldnames or []]  # "file, x0, y0" as "file,x0,y0"
        rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise SinklessError(f"cannot read {path} ({error})", fix=_FORMAT_FIX) from None
    needed = ("file", "x0", "y0", "x1", "y1")
    missing = [name for name in needed if name not in (reader.fieldnames or [])]
    if missing:
        raise SinklessError(f"{path}: the header has no {', '.join(missing)} (it needs {', '.join(needed)}, and an optional label)",
                            fix=_FORMAT_FIX)
    by_file: dict[str, dict] = {}
    classes: list[str] = []
    for i, row in enumerate(rows, start=2):
        if not (row.get("file") or "").strip():
            raise SinklessError(f"{path} line {i}: no file name", fix=_FORMAT_FIX)
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
    """``synthetic``, ``mini``, or a path: a VOC folder, a COCO JSON, a folder with an annotation file.

    ``split`` applies to VOC and ``image_dir`` to COCO; given for other data they are refused, not ignored."""
    def unused(flag: str, kind: str) -> SinklessError:
        return SinklessError(f"{flag} does not apply to {kind} data ({spec})", fix=f"drop {flag} ({'VOC' if flag == '--split' else 'COCO'} data only)")

    if str(spec) in ("synthetic", "mini"):
        if split or image_dir:
            raise unused("--split" if split else "--images", "the bundled")
        return synthetic_scenes() if str(spec) == "synthetic" else mini_set()
    path = Path(spec).expanduser()
    if not path.exists():
        raise SinklessError(f"data not found: {spec}", fix=_DATA_HELP)
    image_dir = None if image_dir is None else Path(image_dir).expanduser()
    if path.is_dir() and (path / "Annotations").is_dir():
        if image_dir:
            raise unused("--images", "VOC")
        return read_voc(path, split=split)
    if split:
        raise unused("--split", "this")
    if path.suffix.lower() == ".json" and not path.is_dir():
        data = _read_json(path)
        if isinstance(data, dict) and "annotations" in data and "categories" in data:
            return read_coco(path, image_dir)
    if image_dir:
        raise unused("--images", "this")
    if path.is_dir() or path.suffix.lower() in (".json", ".csv"):
        return read_annotation_file(path)
    raise SinklessError(f"cannot tell what kind of data {path} is", fix=_DATA_HELP)
