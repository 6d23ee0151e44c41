"""Pictures of a DVT decomposition (Yang et al. 2024): raw | clean | artifact | residual, and the model's artifact G.

Feature maps are shown as RGB from their first three principal components. Raw and clean share
one projection (fitted on both), so their colours compare; the artifact and the residual have
their own (they live in other directions), and their norms are shown as heat maps.

Shapes: h x w grid, D width.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from sinkless._io import atomic_path

__all__ = ["pca_rgb", "stage1_figure", "artifact_figure"]


def pca_rgb(maps: list[torch.Tensor], fit_on: list[torch.Tensor] | None = None) -> list[np.ndarray]:
    """(h, w, 3) images in [0, 1] of feature maps (h, w, D), projected on the top-3 principal components of ``fit_on``."""
    sample = torch.cat([m.reshape(-1, m.shape[-1]) for m in (fit_on or maps)]).float()  # (n, D)
    mean = sample.mean(0)
    _, _, vectors = torch.linalg.svd(sample - mean, full_matrices=False)
    basis = vectors[:3].T  # (D, 3)
    projected = [(m.float() - mean) @ basis for m in maps]  # (h, w, 3) each
    every = torch.cat([p.reshape(-1, 3) for p in projected])
    lo, hi = every.quantile(0.01, dim=0), every.quantile(0.99, dim=0)
    return [((p - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1).numpy() for p in projected]


def _save(fig, path: str | os.PathLike) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")


def stage1_figure(image: Image.Image | None, result, path: str | os.PathLike, title: str = "") -> None:
    """One row: the image, raw, clean, artifact G (PCA), residual h (norm)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    raw_rgb, clean_rgb = pca_rgb([result.raw, result.clean], fit_on=[result.raw, result.clean])
    (artifact_rgb,) = pca_rgb([result.artifact])
    panels = [("raw", raw_rgb, None), ("clean (F)", clean_rgb, None), ("artifact (G)", artifact_rgb, None),
              ("residual |h|", result.residual.norm(dim=-1).numpy(), "magma")]
    if image is not None:
        panels.insert(0, ("image", np.asarray(image.convert("RGB")), None))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.9))
    for ax, (name, picture, cmap) in zip(axes, panels):
        ax.imshow(picture, cmap=cmap, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    _finish(fig, path, title)


def artifact_figure(artifact: torch.Tensor, path: str | os.PathLike, title: str = "") -> None:
    """The position-tied artifact G (h, w, D): its principal components as RGB and its norm per position."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (rgb,) = pca_rgb([artifact])
    norm = artifact.norm(dim=-1).numpy()
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.2))
    axes[0].imshow(rgb, interpolation="nearest")
    axes[0].set_title("G: top-3 principal components", fontsize=9)
    shown = axes[1].imshow(norm, cmap="magma", interpolation="nearest")
    axes[1].set_title("|G| per patch position", fontsize=9)
    fig.colorbar(shown, ax=axes[1], fraction=0.046)
    for ax in axes:
        ax.axis("off")
    _finish(fig, path, title)


def _finish(fig, path: str | os.PathLike, title: str) -> None:
    """Title the figure, write it (atomically) and release it."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=9)
    try:
        _save(fig, path)
    finally:
        plt.close(fig)
