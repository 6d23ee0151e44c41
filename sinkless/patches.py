"""Geometry of the patch grid: neighbour similarity of patch embeddings, border masks.

Darcet et al. (2024) found high-norm tokens on patches that are redundant with their neighbours:
high cosine similarity of their *input* patch embeddings to the 4 adjacent patches.

Shapes: B batch, P patches (= h·w, row-major), D width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["as_tokens", "neighbor_similarity", "border_mask", "grid_positions"]


def as_tokens(patch_embeddings: torch.Tensor) -> torch.Tensor:
    """(B, P, D) from either (B, P, D) or a conv output (B, D, h, w)."""
    if patch_embeddings.ndim == 4:
        return patch_embeddings.flatten(2).transpose(1, 2)
    return patch_embeddings


def neighbor_similarity(patch_embeddings: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Mean cosine similarity of each patch's embedding to its (up to 4) grid neighbours: (B, P)."""
    x = F.normalize(as_tokens(patch_embeddings).float(), dim=-1)  # (B, P, D)
    b, p, d = x.shape
    h, w = grid
    assert p == h * w, f"{p} patches do not fill a {grid} grid"
    x = x.view(b, h, w, d)
    total = torch.zeros(b, h, w, dtype=x.dtype, device=x.device)
    count = torch.zeros(h, w, dtype=x.dtype, device=x.device)
    # right, left, down, up neighbours, each only where it exists
    right = (x[:, :, :-1] * x[:, :, 1:]).sum(-1)  # (B, h, w-1)
    down = (x[:, :-1] * x[:, 1:]).sum(-1)  # (B, h-1, w)
    total[:, :, :-1] += right
    total[:, :, 1:] += right
    total[:, :-1] += down
    total[:, 1:] += down
    count[:, :-1] += 1
    count[:, 1:] += 1
    count[:-1] += 1
    count[1:] += 1
    return (total / count.clamp(min=1)).view(b, p)


def grid_positions(grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column index of every patch, row-major: two (P,) tensors."""
    rows = torch.arange(grid[0]).repeat_interleave(grid[1])
    cols = torch.arange(grid[1]).repeat(grid[0])
    return rows, cols


def border_mask(grid: tuple[int, int], width: int = 1) -> torch.Tensor:
    """(P,) bool: patches within ``width`` of the image border."""
    rows, cols = grid_positions(grid)
    h, w = grid
    return (rows < width) | (cols < width) | (rows >= h - width) | (cols >= w - width)
