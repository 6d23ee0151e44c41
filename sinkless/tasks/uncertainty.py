"""How sure is a row of ``sinkless compare``? A bootstrap over the evaluated images.

A dense task's score is one number from a few images (the shipped mini set scores its probe on 4), so a
difference of a few points between two fixes may be which images happened to be chosen. Every task
leaves per image an additive statistic whose sum gives its headline metric exactly: LOST the hit
(CorLoc = hits / images), zero-shot segmentation and the dense probe each class's pixels in the
truth, in the prediction and in both (IoU = both / (truth + prediction - both) of the sums). Resampling the images with replacement and recomputing the
metric gives a percentile interval; resampling the *same* images for a fix and for ``none`` gives
the interval of their difference (a paired bootstrap: both rows were scored on the same images).

What it covers: which images were drawn. What it does not: anything fixed across resamples, such as
the probe's linear head (trained once on the training images) or a fix's own randomness.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["RESAMPLES", "SEED", "n_classes", "statistics", "metric_of", "bootstrap_interval", "verdict", "paired", "annotate"]

RESAMPLES = 2000
SEED = 0
LEVEL = 0.95


def n_classes(per_image: Sequence[dict]) -> int:
    """Classes to lay the pixel counts of ``per_image`` records out over (1 + the largest class id seen)."""
    return 1 + max((max(r["counts"]["class"], default=-1) for r in per_image if "counts" in r), default=-1)


def statistics(task: str, per_image: Sequence[dict], classes: int | None = None) -> np.ndarray | None:
    """(N, d) the additive per-image statistic of ``task`` (None when the records do not carry it).

    LOST: (N, 1) the hits. Zero-shot segmentation and the probe: (N, 3C) each class's pixels in both, in the truth and
    in the prediction (``per_image[].counts``), laid out over ``classes`` (default: those the records name).
    """
    if not per_image:
        return None
    if task == "lost":
        if not all("hit" in r for r in per_image):
            return None
        return np.asarray([[float(bool(r["hit"]))] for r in per_image])  # (N, 1)
    if not all("counts" in r for r in per_image):
        return None
    classes = classes or n_classes(per_image)
    out = np.zeros((len(per_image), 3, classes))
    for i, record in enumerate(per_image):
        counts = record["counts"]
        for row, key in enumerate(("intersection", "truth", "predicted")):
            out[i, row, counts["class"]] = counts[key]
    return out.reshape(len(per_image), 3 * classes)


def metric_of(task: str, totals: np.ndarray, n_images: int) -> np.ndarray:
    """The headline metric (%) of summed statistics ``totals`` (R, d) over ``n_images`` images: (R,)."""
    if task == "lost":
        return 100.0 * totals[:, 0] / n_images
    inter, truth, predicted = totals.reshape(len(totals), 3, -1).transpose(1, 0, 2)  # (R, C) each
    union = truth + predicted - inter
    present = union > 0
    iou = np.where(present, inter / np.maximum(union, 1), 0.0)
    count = present.sum(1)
    return np.where(count > 0, 100.0 * iou.sum(1) / np.maximum(count, 1), np.nan)  # mean over the classes that occur


def _draws(n: int, resamples: int, seed: int) -> np.ndarray:
    """(R, N) how often each image is drawn in each resample (the same draws for every row: paired)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def bootstrap_interval(task: str, stats: np.ndarray, base: np.ndarray | None = None, *, resamples: int = RESAMPLES,
                       seed: int = SEED, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of the metric of ``stats`` (N, d), or of metric(stats) - metric(base) when ``base`` is given."""
    n = stats.shape[0]
    draws = _draws(n, resamples, seed)
    values = metric_of(task, draws @ stats, n)
    if base is not None:
        values = values - metric_of(task, draws @ base, n)
    values = values[~np.isnan(values)]
    if not len(values):
        return float("nan"), float("nan")
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def verdict(low: float, high: float) -> str:
    """``higher`` / ``lower`` when the interval of a difference excludes 0, else ``within the spread`` (the images cannot tell)."""
    if low > 0:
        return "higher"
    if high < 0:
        return "lower"
    return "within the spread"


def _rounded(interval: tuple[float, float]) -> list[float | None]:
    return [None if v != v else round(v, 3) for v in interval]  # NaN (nothing to score) -> null in the JSON


def _per_image_metric(task: str, record: dict) -> float | None:
    value = record.get("hit") if task == "lost" else record.get("miou")
    return None if value is None else float(value)


def paired(task: str, row: dict, base: dict, metric: str, *, resamples: int = RESAMPLES, seed: int = SEED) -> dict | None:
    """``row``'s difference to ``base`` on the same images, with its paired interval (None: not the same images, or no statistic).

    Rows are dicts with the headline ``metric`` and ``per_image`` (``FixResult.to_json()``, or the rows of two
    JSON files of the same data, e.g. a model and its clean twin).
    """
    classes = n_classes([*row.get("per_image", []), *base.get("per_image", [])])
    stats, base_stats = statistics(task, row.get("per_image", []), classes), statistics(task, base.get("per_image", []), classes)
    if stats is None or base_stats is None or row.get(metric) is None or base.get(metric) is None:
        return None
    if [r.get("name") for r in row["per_image"]] != [r.get("name") for r in base["per_image"]] or stats.shape != base_stats.shape:
        return None
    pairs = [(_per_image_metric(task, a), _per_image_metric(task, b)) for a, b in zip(row["per_image"], base["per_image"])]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    low, high = bootstrap_interval(task, stats, base_stats, resamples=resamples, seed=seed)
    return {
        "delta": round(row[metric] - base[metric], 3),
        "ci95": _rounded((low, high)),
        "verdict": verdict(low, high),
        "images_better": sum(a > b for a, b in pairs),
        "images_worse": sum(a < b for a, b in pairs),
        "images_same": sum(a == b for a, b in pairs),
        "resamples": resamples,
        "seed": seed,
        "unit": "image (paired bootstrap: the same resampled images for both rows)",
    }


def annotate(task: str, rows: Sequence[dict], metric: str, *, resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, dict]:
    """Per fix, ``ci95`` (the interval of its headline metric) and, beside a ``none`` row, ``vs_none`` (``paired``).

    ``rows``: dicts with ``fix``, the headline ``metric`` and ``per_image`` (as ``FixResult.to_json()``). Rows whose
    images differ from ``none``'s get their own interval but no paired one; rows without the per-image statistic
    get nothing.
    """
    base = next((r for r in rows if r["fix"] == "none"), None)
    out: dict[str, dict] = {}
    for row in rows:
        stats = statistics(task, row.get("per_image", []))
        if stats is None or row.get(metric) is None:
            continue
        entry = out[row["fix"]] = {"ci95": _rounded(bootstrap_interval(task, stats, resamples=resamples, seed=seed))}
        versus = paired(task, row, base, metric, resamples=resamples, seed=seed) if base is not None and row is not base else None
        if versus is not None:
            entry["vs_none"] = versus
    return out
