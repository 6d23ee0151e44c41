"""Probes of frozen features: a linear classifier on patch tokens for dense labels, k-NN on CLS.

Dense probe (DINOv2's linear segmentation, on a small scale): the final-norm patch tokens of the
training images (even positions of the data set) get the majority label of their pixels; a
multinomial logistic regression with an L2 penalty is fitted by full-batch L-BFGS (deterministic);
on the test images (odd positions) its patch logits are upsampled bilinearly to the pixels and
scored by mIoU. k-NN probe (DINO's weighted k-NN): leave-one-out over the whole data set on the
image labels, cosine similarity of CLS tokens, votes weighted by exp(similarity / T).

Shapes: P patches (h·w), D width, C classes, N training patches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from sinkless.distributed import map_ordered
from sinkless.errors import SinklessError
from sinkless.tasks._features import check_vision, extract, prepare
from sinkless.tasks.data import IGNORE
from sinkless.tasks.zeroseg import confusion, image_record, resize_mask, scores_from_confusion

__all__ = ["ProbeProtocol", "ProbeScore", "patch_labels", "fit_linear", "knn_accuracy", "evaluate", "LABELS"]

log = logging.getLogger(__name__)

LABELS = ("classes", "foreground")


@dataclass(frozen=True)
class ProbeProtocol:
    labels: str = "classes"  # dense targets: the mask's classes, or foreground vs background
    weight_decay: float = 1e-3
    steps: int = 100  # L-BFGS iterations
    knn_k: int = 20
    knn_temperature: float = 0.07
    max_side: int | None = 448


def patch_labels(mask: np.ndarray, grid: tuple[int, int], patch: int) -> np.ndarray:
    """(P,) majority label of each patch's pixels; IGNORE where ignored pixels (or padding) are the majority."""
    h, w = grid
    padded = np.full((h * patch, w * patch), IGNORE, dtype=np.uint8)
    padded[: mask.shape[0], : mask.shape[1]] = mask[: h * patch, : w * patch]
    blocks = padded.reshape(h, patch, w, patch).transpose(0, 2, 1, 3).reshape(h * w, patch * patch)
    values = np.unique(blocks)
    counts = np.stack([(blocks == v).sum(1) for v in values], 1)  # (P, V)
    return values[counts.argmax(1)]  # ties: the lowest value


def fit_linear(x: torch.Tensor, y: torch.Tensor, n_classes: int, *, weight_decay: float, steps: int) -> torch.nn.Linear:
    """Multinomial logistic regression on standardised ``x`` (N, D) -> ``y`` (N,), full-batch L-BFGS."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    head = torch.nn.Linear(x.shape[1], n_classes).double()
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    xs = ((x - mean) / std).double()  # (N, D)
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(head(xs), y) + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    # fold the standardisation into the layer so it applies to raw features
    with torch.no_grad():
        weight = head.weight / std.double()
        head.bias -= (weight * mean.double()).sum(1)
        head.weight.copy_(weight)
    return head.eval()


def knn_accuracy(features: torch.Tensor, labels: list[int], *, k: int, temperature: float) -> float:
    """Leave-one-out weighted k-NN accuracy (%) of ``features`` (B, D) with integer ``labels``."""
    x = F.normalize(features.double(), dim=-1)
    similarity = x @ x.T  # (B, B)
    similarity.fill_diagonal_(-float("inf"))  # leave one out
    k = min(k, len(labels) - 1)
    top, index = similarity.topk(k, dim=1)  # (B, k)
    target = torch.tensor(labels)
    votes = torch.zeros(len(labels), int(target.max()) + 1, dtype=torch.float64)
    votes.scatter_add_(1, target[index], torch.exp(top / temperature))
    return 100.0 * float((votes.argmax(1) == target).double().mean())


@dataclass
class ProbeScore:
    miou: float  # dense linear probe on the test images
    pixel_accuracy: float
    accuracy: float | None  # k-NN on CLS, leave-one-out (None: fewer than two labelled images)
    n_images: int
    n_train: int
    n_test: int
    per_class_iou: list = field(default_factory=list)
    per_image: list[dict] = field(default_factory=list)
    visuals: dict = field(default_factory=dict)

    def metrics(self) -> dict:
        return {"miou": self.miou, "pixel_accuracy": self.pixel_accuracy, "accuracy": self.accuracy,
                "n_train": self.n_train, "n_test": self.n_test, "per_class_iou": self.per_class_iou}


def evaluate(loaded, dataset, protocol: ProbeProtocol = ProbeProtocol(), *, progress: bool = True, visuals: bool = False) -> ProbeScore:
    """Dense linear probe (even images train, odd images test) and leave-one-out k-NN on CLS."""
    check_vision(loaded, "probe")
    if protocol.labels not in LABELS:
        raise SinklessError(f"unknown probe labels {protocol.labels!r}", fix=f"choose one of {', '.join(LABELS)}")
    patch = loaded.adapter.patch_size(loaded.model)
    n_classes = 2 if protocol.labels == "foreground" else len(dataset.classes)

    def one(i: int):  # CLS token and label, then (train patches, labels) for even images or the test entry for odd ones
        sample = dataset[i]
        prepared = prepare(sample.image, loaded, protocol.max_side)
        out = extract(loaded, prepared, tokens=True)
        cls = (out.cls_token, sample.label) if sample.label is not None else None
        if sample.mask is None:
            return cls, None, None
        mask = resize_mask(sample.mask, prepared.image_hw)
        if protocol.labels == "foreground":
            mask = np.where(mask == IGNORE, IGNORE, mask > 0).astype(np.uint8)
        if i % 2 == 0:
            labels = patch_labels(mask, out.layout.grid, patch)
            keep = labels != IGNORE
            return cls, (out.patch_tokens[torch.from_numpy(keep)], torch.from_numpy(labels[keep].astype(np.int64))), None
        return cls, None, (sample.name, out.patch_tokens, out.layout.grid, prepared, mask)

    # data parallel under torchrun / accelerate launch: each process extracts its share, all get every image's features
    done = map_ordered(one, len(dataset), desc="probe", progress=progress)
    cls_tokens = [cls[0] for cls, _, _ in done if cls is not None]
    image_labels = [cls[1] for cls, _, _ in done if cls is not None]
    train_x = [train[0] for _, train, _ in done if train is not None]
    train_y = [train[1] for _, train, _ in done if train is not None]
    test = [entry for _, _, entry in done if entry is not None]
    if not train_x or not test:
        raise SinklessError(
            f"the dense probe needs masks on at least two images of {dataset.name} (one to train, one to test)",
            fix="use data with segmentation masks and at least two images",
        )
    head = fit_linear(torch.cat(train_x), torch.cat(train_y), n_classes, weight_decay=protocol.weight_decay, steps=protocol.steps)
    total = np.zeros((n_classes, n_classes), dtype=np.int64)
    records = []
    with torch.no_grad():
        for name, tokens, grid, prepared, mask in test:
            logits = head(tokens.double()).T.reshape(1, n_classes, *grid)  # (1, C, h, w)
            size = tuple(prepared.pixels.shape[-2:])
            up = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[0]  # (C, Hp, Wp)
            height, width = prepared.image_hw
            pred = up[:, :height, :width].argmax(0).numpy().astype(np.uint8)
            matrix = confusion(pred, mask, n_classes)
            total += matrix
            records.append(image_record(name, matrix))
    scores = scores_from_confusion(total)
    accuracy = None
    if len(set(image_labels)) >= 2 and len(image_labels) >= 3:
        classes = sorted(set(image_labels))
        accuracy = knn_accuracy(torch.stack(cls_tokens), [classes.index(label) for label in image_labels],
                                k=protocol.knn_k, temperature=protocol.knn_temperature)
    n_train = len(train_x)
    return ProbeScore(scores["miou"], scores["pixel_accuracy"], accuracy, n_train + len(test), n_train, len(test), scores["iou"], records)
