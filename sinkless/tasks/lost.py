"""LOST unsupervised single-object discovery (Siméoni et al. 2021) and its CorLoc score.

From the patch features F of one image (by default the keys of the last attention layer, heads
concatenated, CLS and any register dropped): A = F Fᵀ (+ an optional bias), degree = number of
positive entries per row, seed = the lowest-degree patch (ties: lowest index), expansion = those of
the k lowest-degree patches positively correlated with the seed, score M = the sum of their rows of
A, and the predicted box is the bounding box of the 4-connected component of M > 0 that holds the seed.
CorLoc = share of images whose box has IoU >= 0.5 with some ground-truth box.

Shapes: P patches (h·w, row-major), D width.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from sinkless.distributed import map_ordered
from sinkless.errors import SinklessError
from sinkless.tasks._features import FEATURES, check_vision, extract, prepare, resolve_layer

__all__ = ["LostProtocol", "LostResult", "LostScore", "lost", "component", "box_iou", "evaluate"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LostProtocol:
    """The choices papers vary; every result records them."""

    layer: int = -1  # attention layer whose q/k/v are read (negative: from the end)
    features: str = "keys"  # keys | queries | values | tokens (block output)
    l2: bool = False  # L2-normalise features before the Gram matrix (LOST: no)
    gram_bias: float | str = 0.0  # added to every entry of A = F Fᵀ; "median": minus A's median, per image
    k: int = 100  # expansion: the k lowest-degree patches
    max_side: int | None = 448  # downscale images whose longer side exceeds this (None: full resolution)
    iou_threshold: float = 0.5


@dataclass
class LostResult:
    """LOST on one feature map."""

    seed: int  # patch index, row-major
    degree: torch.Tensor  # (P,) positive entries per row of A
    candidates: list[int]  # the k lowest-degree patches, seed first
    expansion: list[int]  # candidates with A[seed, p] > 0
    score: torch.Tensor  # (P,) M: sum of the expansion's rows of A
    mask: torch.Tensor  # (h, w) bool: the 4-connected component of M > 0 holding the seed
    box: tuple[int, int, int, int]  # in patches: x0, y0, x1, y1 (half-open)


def lost(features: torch.Tensor, grid: tuple[int, int], *, k: int = 100, gram_bias: float | str = 0.0, l2: bool = False) -> LostResult:
    """Seed, expansion and box of LOST on ``features`` (P, D) laid out row-major on ``grid``.

    ``gram_bias`` is added to A = F Fᵀ; ``"median"`` subtracts the median entry of A (a per-image
    bias that makes half the entries positive, for features that all correlate positively).
    """
    h, w = grid
    assert features.shape[0] == h * w, f"{features.shape[0]} features do not fill a {grid} grid"
    x = F.normalize(features.double(), dim=-1) if l2 else features.double()  # (P, D)
    gram = x @ x.T  # (P, P)
    gram = gram - gram.median() if gram_bias == "median" else gram + float(gram_bias)
    degree = (gram > 0).sum(-1)  # (P,)
    order = torch.sort(degree, stable=True).indices  # ties: lowest patch index first
    seed = int(order[0])
    candidates = order[:k]
    expansion = candidates[gram[seed, candidates] > 0]
    score = gram[expansion].sum(0)  # (P,)
    mask = component(score.view(h, w) > 0, seed)
    rows, cols = torch.nonzero(mask, as_tuple=True)
    box = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
    return LostResult(seed, degree, candidates.tolist(), expansion.tolist(), score, mask, box)


def component(positive: torch.Tensor, seed: int) -> torch.Tensor:
    """(h, w) bool: the 4-connected component of ``positive`` holding patch ``seed``.

    When the seed itself is not positive (possible with a negative Gram bias), the component is the seed alone.
    """
    h, w = positive.shape
    out = torch.zeros_like(positive, dtype=torch.bool)
    start = divmod(seed, w)
    out[start] = True
    if not positive[start]:
        return out
    queue = deque([start])
    while queue:
        r, c = queue.popleft()
        for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= nr < h and 0 <= nc < w and positive[nr, nc] and not out[nr, nc]:
                out[nr, nc] = True
                queue.append((nr, nc))
    return out


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box (4,) with each of ``boxes`` (K, 4); half-open x0, y0, x1, y1."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    ix = (np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0])).clip(0)
    iy = (np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1])).clip(0)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-12)


@dataclass
class LostScore:
    corloc: float
    n_images: int
    per_image: list[dict] = field(default_factory=list)
    visuals: dict[str, Image.Image] = field(default_factory=dict)

    def metrics(self) -> dict:
        return {"corloc": self.corloc}


def evaluate(loaded, dataset, protocol: LostProtocol = LostProtocol(), *, progress: bool = True, visuals: bool = False) -> LostScore:
    """CorLoc of LOST on every image of ``dataset`` that has at least one box."""
    check_vision(loaded, "lost")
    if protocol.features not in FEATURES:
        raise SinklessError(f"unknown features {protocol.features!r}", fix=f"choose one of {', '.join(FEATURES)}")
    if isinstance(protocol.gram_bias, str) and protocol.gram_bias != "median":
        raise SinklessError(f"--gram-bias must be a number or 'median', got {protocol.gram_bias!r}", fix="e.g. --gram-bias -0.5 or --gram-bias median")
    if protocol.k < 1:
        raise SinklessError(f"LOST needs k >= 1, got {protocol.k}", fix="pass --k 100 (the paper's value)")
    layer = resolve_layer(loaded, protocol.layer)
    patch = loaded.adapter.patch_size(loaded.model)

    def one(index: int):  # the record and picture of one image (None: no box)
        sample = dataset[index]
        if not len(sample.boxes):
            return None
        prepared = prepare(sample.image, loaded, protocol.max_side)
        out = extract(loaded, prepared, layer=layer, features=protocol.features)
        result = lost(out.features, out.layout.grid, k=protocol.k, gram_bias=protocol.gram_bias, l2=protocol.l2)
        height, width = prepared.image_hw
        x0, y0, x1, y1 = (v * patch for v in result.box)
        pred = np.asarray([x0, y0, min(x1, width), min(y1, height)], dtype=np.float64)
        # the resized image's own factor per axis (its sides are rounded to whole pixels): truth and prediction in one frame
        factor = np.asarray([width / sample.image.width, height / sample.image.height] * 2)
        truth = sample.boxes * factor
        best = float(box_iou(pred, truth).max())
        hit = best >= protocol.iou_threshold
        record = {
            "name": sample.name, "box": (pred / factor).round(1).tolist(), "iou": round(best, 4), "hit": hit,
            "seed": divmod(result.seed, out.layout.grid[1]), "expansion": len(result.expansion),
        }
        picture = _draw(sample.image, pred / factor, sample.boxes, result, patch / prepared.scale, hit) if visuals else None
        return record, picture

    # data parallel under torchrun / accelerate launch: each process its share of the images, all get every result
    done = [r for r in map_ordered(one, len(dataset), desc="lost", progress=progress) if r is not None]
    records = [record for record, _ in done]
    pictures = {record["name"]: picture for record, picture in done if picture is not None}
    if not records:
        raise SinklessError(f"no image of {dataset.name} has a box, so LOST cannot be scored", fix="use data with object boxes")
    corloc = 100.0 * sum(r["hit"] for r in records) / len(records)
    return LostScore(corloc, len(records), records, pictures)


def _draw(image: Image.Image, pred, truth, result: LostResult, cell: float, hit: bool) -> Image.Image:
    """The image with the ground truth (green), the prediction (red/blue) and the seed patch."""
    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    for box in truth:
        draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], outline=(0, 220, 0), width=3)
    draw.rectangle([pred[0], pred[1], pred[2] - 1, pred[3] - 1], outline=(40, 90, 255) if hit else (255, 40, 40), width=3)
    r, c = divmod(result.seed, result.mask.shape[1])
    draw.rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1], fill=(255, 220, 0))  # inclusive corners
    return canvas
