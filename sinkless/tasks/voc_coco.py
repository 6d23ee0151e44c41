"""Readers for the public benchmarks' layouts: Pascal VOC (XML boxes, PNG masks) and COCO (JSON, polygons/RLE).

Both return a ``sinkless.tasks.data.Dataset``; annotations are parsed and checked when the data set
is opened, images read when a sample is used.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from sinkless.errors import SinklessError
from sinkless.images import load_image
from sinkless.tasks.dataset import (
    _DATA_HELP,
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

__all__ = ["VOC_CLASSES", "read_voc", "read_coco"]

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


# -- Pascal VOC ----------------------------------------------------------------------------------
def read_voc(root: str | Path, *, split: str | None = None) -> Dataset:
    """A Pascal VOC year folder: ``Annotations/*.xml``, ``JPEGImages/``, optional ``SegmentationClass/*.png``.

    ``split`` names ``ImageSets/Main/<split>.txt`` (e.g. ``trainval``); default: every annotation file.
    VOC's 1-based inclusive pixel boxes become 0-based half-open ones; "difficult" boxes are kept (as LOST does).
    """
    root = Path(root)
    if not (root / "Annotations").is_dir():
        raise SinklessError(f"{root} is not a Pascal VOC folder (no Annotations/)", fix=_DATA_HELP)
    if split is not None:
        listing = root / "ImageSets" / "Main" / f"{split}.txt"
        if not listing.exists():
            raise SinklessError(f"VOC split file not found: {listing}", fix="pass a split that exists under ImageSets/Main (e.g. trainval, test)")
        ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
        xmls = [root / "Annotations" / f"{i}.xml" for i in ids]
    else:
        xmls = sorted((root / "Annotations").glob("*.xml"))
    if not xmls:
        raise SinklessError(f"{root}/Annotations holds no .xml files", fix=_DATA_HELP)
    names, loaders = [], []
    for xml in xmls:
        name, filename, boxes, labels = _parse_voc_xml(xml)
        image_path = root / "JPEGImages" / filename
        if not image_path.exists():
            raise SinklessError(f"{xml}: image not found: {image_path}", fix="keep VOC's JPEGImages/ next to Annotations/")
        mask_path = root / "SegmentationClass" / f"{name}.png"
        names.append(name)
        loaders.append(_voc_loader(name, image_path, boxes, labels, mask_path if mask_path.exists() else None))
    return Dataset(root.name, "voc", names, loaders, ["background", *VOC_CLASSES], str(root))


def _parse_voc_xml(xml: Path) -> tuple[str, str, np.ndarray, list[str]]:
    try:
        tree = ET.parse(xml).getroot()
    except (ET.ParseError, OSError) as error:
        raise SinklessError(f"cannot parse VOC annotation {xml} ({error})", fix="is the XML file truncated?") from None
    filename = tree.findtext("filename") or f"{xml.stem}.jpg"
    boxes, labels = [], []
    for obj in tree.iter("object"):
        box = obj.find("bndbox")
        if box is None:
            continue
        try:
            x0, y0, x1, y1 = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError):
            raise SinklessError(f"{xml}: an <object> has a malformed <bndbox>", fix="each bndbox needs numeric xmin, ymin, xmax, ymax") from None
        boxes.append(_check_box([x0 - 1, y0 - 1, x1, y1], str(xml)))
        labels.append((obj.findtext("name") or "object").strip())
    return xml.stem, filename, np.asarray(boxes, dtype=np.float64).reshape(-1, 4), labels


def _voc_loader(name, image_path, boxes, labels, mask_path):
    def load() -> Sample:
        image = load_image(image_path)
        mask = _read_mask_png(mask_path, image, name) if mask_path else None
        fitted = _fit_boxes(boxes, image, name)
        return Sample(name, image, fitted, labels, mask, _largest_label(fitted, labels))

    return load


# -- COCO ----------------------------------------------------------------------------------------
def read_coco(annotation_file: str | Path, image_dir: str | Path | None = None) -> Dataset:
    """COCO instances JSON: ``bbox`` [x, y, w, h] boxes and polygon / RLE masks.

    Images are looked for in ``image_dir``, else next to the JSON, in ``images/`` beside it, or in COCO's
    layout (``annotations/instances_val2017.json`` with ``val2017/`` beside ``annotations/``).
    Crowd annotations give no box and are ignored (255) in the mask.
    """
    path = Path(annotation_file)
    data = _read_json(path)
    if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= set(data):
        raise SinklessError(f"{path} is not a COCO instances file (needs images, annotations, categories)", fix=_DATA_HELP)
    try:
        categories = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        images = {int(im["id"]): im for im in data["images"]}
        by_image: dict[int, list[dict]] = {i: [] for i in images}
        for ann in data["annotations"]:
            by_image[int(ann["image_id"])].append(ann)
    except (KeyError, TypeError, ValueError) as error:
        raise SinklessError(f"{path}: malformed COCO entry ({type(error).__name__}: {error})", fix="check the JSON against the COCO format") from None
    order = sorted(categories)
    class_of = {cid: i + 1 for i, cid in enumerate(order)}
    folder = _coco_image_dir(path, image_dir, [im.get("file_name", "") for im in images.values()])
    names, loaders = [], []
    for image_id in sorted(images):
        entry = images[image_id]
        file = folder / entry["file_name"]
        if not file.exists():
            raise SinklessError(f"{path}: image not found: {file}", fix="pass the image folder, or keep it beside the JSON")
        names.append(Path(entry["file_name"]).stem)
        loaders.append(_coco_loader(Path(entry["file_name"]).stem, file, by_image[image_id], categories, class_of, str(path)))
    return Dataset(path.stem, "coco", names, loaders, ["background", *(categories[c] for c in order)], str(path))


def _coco_image_dir(path: Path, image_dir, files: list[str]) -> Path:
    if image_dir is not None:
        return Path(image_dir)
    stem = path.stem.split("_", 1)[-1]  # instances_val2017 -> val2017
    candidates = [path.parent, path.parent / "images", path.parent.parent / stem, path.parent.parent / "images"]
    for candidate in candidates:
        if files and (candidate / files[0]).exists():
            return candidate
    return path.parent


def _coco_loader(name, file, anns, categories, class_of, where):
    def load() -> Sample:
        image = load_image(file)
        width, height = image.size
        boxes, labels, layers = [], [], []
        for ann in sorted(anns, key=lambda a: -float(a.get("area", 0))):  # small objects painted last, on top
            crowd = bool(ann.get("iscrowd", 0))
            value = IGNORE if crowd else class_of[int(ann["category_id"])]
            segmentation = ann.get("segmentation")
            if segmentation:
                layers.append((value, _coco_segmentation(segmentation, width, height, where)))
            if not crowd:
                x, y, w, h = (float(v) for v in ann["bbox"])
                boxes.append(_check_box([x, y, x + max(w, 1e-3), y + max(h, 1e-3)], f"{where} ({name})"))
                labels.append(categories[int(ann["category_id"])])
        mask = None
        if layers:
            mask = np.zeros((height, width), dtype=np.uint8)
            for value, region in layers:
                mask[region] = value
        fitted = _fit_boxes(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), image, name)
        return Sample(name, image, fitted, labels, mask, _largest_label(fitted, labels))

    return load


def _coco_segmentation(segmentation, width: int, height: int, where: str) -> np.ndarray:
    """(H, W) bool region of a COCO polygon list or RLE (uncompressed counts or compressed string)."""
    if isinstance(segmentation, list):
        polygons = [(1, np.asarray(p, dtype=np.float64).reshape(-1, 2)) for p in segmentation if len(p) >= 6]
        return rasterize_polygons((width, height), polygons) > 0
    if isinstance(segmentation, dict) and "counts" in segmentation:
        h, w = segmentation.get("size", [height, width])
        counts = segmentation["counts"]
        runs = _rle_string_counts(counts) if isinstance(counts, str) else [int(c) for c in counts]
        flat = np.zeros(h * w, dtype=bool)
        position, value = 0, False
        for run in runs:
            flat[position : position + run] = value
            position += run
            value = not value
        return flat.reshape(w, h).T  # COCO RLE runs down columns
    raise SinklessError(f"{where}: unsupported COCO segmentation {type(segmentation).__name__}", fix="use polygons or RLE")


def _rle_string_counts(text: str) -> list[int]:
    """Decode COCO's compressed RLE string (LEB128-like, 5 bits a character, deltas from the run two back)."""
    counts: list[int] = []
    i = 0
    while i < len(text):
        value, shift, more = 0, 0, True
        while more:
            c = ord(text[i]) - 48
            value |= (c & 0x1F) << (5 * shift)
            more = bool(c & 0x20)
            i += 1
            shift += 1
            if not more and c & 0x10:
                value |= -1 << (5 * shift)
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts
