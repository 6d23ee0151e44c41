"""Zero-shot foreground segmentation from the last layer's CLS attention (DINO, Caron et al. 2021).

The attention of the CLS query to the patches, averaged over heads, is thresholded by mass: the
smallest set of patches holding ``mass`` of the attention (DINO keeps 60 %) is the foreground.
Artifact tokens that act as attention sinks take mass from the object, which this task exposes
(Jiang et al. 2025 score it as mIoU on ImageNet-S). The score is the foreground/background mIoU and the
pixel accuracy, accumulated over all pixels of the data set; mask value 255 is ignored.

Shapes: H heads, P patches (h·w, row-major).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from sinkless.distributed import map_ordered
from sinkless.errors import SinklessError
from sinkless.tasks._features import check_vision, extract, prepare
from sinkless.tasks.data import IGNORE

__all__ = ["ZeroSegProtocol", "ZeroSegScore", "mass_mask", "confusion", "scores_from_confusion", "evaluate", "resize_mask"]


@dataclass(frozen=True)
class ZeroSegProtocol:
    mass: float = 0.6  # share of the CLS attention the foreground keeps
    max_side: int | None = 448


def mass_mask(attention: torch.Tensor, grid: tuple[int, int], mass: float) -> torch.Tensor:
    """(h, w) bool: the fewest patches whose mean-over-heads attention sums to ``mass`` of the total.

    ``attention`` is (H, P) or (P,); ties are broken by patch index.
    """
    scores = attention.double().mean(0) if attention.ndim == 2 else attention.double()  # (P,)
    order = torch.sort(scores, descending=True, stable=True).indices
    shares = scores[order] / scores.sum().clamp_min(1e-30)
    before = torch.cumsum(shares, 0) - shares  # mass of the patches ranked above each one
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[order[before < mass]] = True
    return keep.view(grid)


def resize_mask(mask: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a class-index mask to (h, w)."""
    if mask.shape == tuple(size_hw):
        return mask
    return np.asarray(Image.fromarray(mask).resize((size_hw[1], size_hw[0]), Image.NEAREST))


def confusion(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) pixel counts, rows = truth, columns = prediction, pixels marked IGNORE left out."""
    valid = truth != IGNORE
    index = truth[valid].astype(np.int64) * n_classes + pred[valid].astype(np.int64)
    return np.bincount(index, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def pixel_counts(matrix: np.ndarray) -> dict:
    """Per class that occurs in an image (in truth or prediction): its pixels in the truth, in the prediction and in both.

    Summed over images they give the data set's IoU exactly (union = truth + predicted - intersection), in a few
    numbers per image instead of the C x C confusion matrix.
    """
    inter = np.diag(matrix)
    truth, predicted = matrix.sum(1), matrix.sum(0)
    present = np.flatnonzero((truth + predicted) > 0)
    return {"class": present.tolist(), "intersection": inter[present].tolist(), "truth": truth[present].tolist(),
            "predicted": predicted[present].tolist()}


def image_record(name: str, matrix: np.ndarray) -> dict:
    """One image's entry of ``per_image``: its own mIoU and pixel accuracy, and its additive ``counts`` (which the
    bootstrap of sinkless.tasks.uncertainty re-sums)."""
    scores = scores_from_confusion(matrix)
    return {"name": name, "miou": scores["miou"], "pixel_accuracy": scores["pixel_accuracy"], "counts": pixel_counts(matrix)}


def scores_from_confusion(matrix: np.ndarray) -> dict:
    """mIoU over the classes that occur (in truth or prediction), per-class IoU and pixel accuracy."""
    inter = np.diag(matrix).astype(np.float64)
    union = matrix.sum(0) + matrix.sum(1) - inter
    present = union > 0
    iou = np.where(present, inter / np.maximum(union, 1), np.nan)
    return {
        "miou": 100.0 * float(np.nanmean(iou)) if present.any() else float("nan"),
        "pixel_accuracy": 100.0 * float(inter.sum() / max(matrix.sum(), 1)),
        "iou": [None if np.isnan(v) else round(100.0 * float(v), 3) for v in iou],
    }


@dataclass
class ZeroSegScore:
    miou: float
    pixel_accuracy: float
    foreground_iou: float
    n_images: int
    per_image: list[dict] = field(default_factory=list)
    visuals: dict[str, Image.Image] = field(default_factory=dict)

    def metrics(self) -> dict:
        return {"miou": self.miou, "pixel_accuracy": self.pixel_accuracy, "foreground_iou": self.foreground_iou}


def evaluate(loaded, dataset, protocol: ZeroSegProtocol = ZeroSegProtocol(), *, progress: bool = True, visuals: bool = False) -> ZeroSegScore:
    """Foreground/background mIoU of the thresholded CLS attention on every image with a mask."""
    check_vision(loaded, "zeroseg")
    if not 0 < protocol.mass <= 1:
        raise SinklessError(f"--mass must be in (0, 1], got {protocol.mass}", fix="DINO keeps 0.6 of the attention")
    patch = loaded.adapter.patch_size(loaded.model)

    def one(index: int):  # the confusion matrix, record and picture of one image (None: no mask)
        sample = dataset[index]
        if sample.mask is None:
            return None
        prepared = prepare(sample.image, loaded, protocol.max_side)
        out = extract(loaded, prepared, cls_attention=True)
        grid_mask = mass_mask(out.cls_attention, out.layout.grid, protocol.mass).numpy()  # (h, w)
        height, width = prepared.image_hw
        pred = grid_mask.repeat(patch, 0).repeat(patch, 1)[:height, :width].astype(np.uint8)  # (H, W)
        truth = resize_mask(sample.mask, (height, width))
        truth = np.where(truth == IGNORE, IGNORE, truth > 0).astype(np.uint8)
        matrix = confusion(pred, truth, 2)
        return matrix, image_record(sample.name, matrix), _draw(sample.image, pred) if visuals else None

    # data parallel under torchrun / accelerate launch: each process its share of the images, all get every result
    done = [r for r in map_ordered(one, len(dataset), desc="zeroseg", progress=progress) if r is not None]
    total = np.zeros((2, 2), dtype=np.int64)
    for matrix, _, _ in done:
        total += matrix
    records = [record for _, record, _ in done]
    pictures = {record["name"]: picture for _, record, picture in done if picture is not None}
    if not records:
        raise SinklessError(f"no image of {dataset.name} has a mask, so zero-shot segmentation cannot be scored", fix="use data with segmentation masks")
    scores = scores_from_confusion(total)
    return ZeroSegScore(scores["miou"], scores["pixel_accuracy"], scores["iou"][1] or 0.0, len(records), records, pictures)


def _draw(image: Image.Image, pred: np.ndarray) -> Image.Image:
    """The predicted foreground tinted red (at the resized resolution of ``pred``, scaled back)."""
    mask = Image.fromarray(pred * 255).resize(image.size, Image.NEAREST)
    tint = Image.new("RGB", image.size, (255, 0, 0))
    return Image.composite(Image.blend(image.convert("RGB"), tint, 0.5), image.convert("RGB"), mask)
