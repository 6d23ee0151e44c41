"""Coordinate networks F(x, y) -> feature: the clean, view-consistent signal of DVT's Stage 1 (Yang et al. 2024).

DVT fits a neural field to the patch features of many crops of one image, indexed by each patch's
position in the *image*. The paper uses tiny-cuda-nn's multi-resolution hash grid (Müller et al.
2022) followed by a small MLP; that needs a CUDA build. Both fields here are plain PyTorch (CPU or
CUDA, no compiled extension), vectorised over all points and levels:

- ``HashGridField``: L levels of 2-D grids from ``base`` to ``finest`` cells per side, ``features``
  values per vertex, bilinear interpolation; a level whose (res + 1)² vertices fit in the table is
  stored densely (no collisions, as instant-NGP does for coarse levels), finer ones are hashed with
  instant-NGP's spatial hash. All levels live in one table, looked up with one ``F.embedding``.
- ``FourierField``: random Fourier features (Tancik et al. 2020) of the coordinates and an MLP.

Which one Stage 1 uses is a measured choice (``python -m benchmarks.runner dvt``; docs/RESULTS.md).
Both end in an MLP ``encoding -> hidden -> D`` with ReLU (DVT's 128 -> D/2 -> D).

Shapes: B points, L levels, C = 4 corners, Fd features per level, D output width.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["HashGridField", "FourierField", "FIELDS", "make_field"]

_PRIME = 2654435761  # instant-NGP's hash prime for the second axis (the first axis uses 1)
_CORNERS = torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1]])  # (C, 2) offsets (dx, dy)


class _Interpolate(torch.autograd.Function):
    """``(table[index] * weight).sum(corners)`` whose backward is one ``index_add_`` (2-3x faster on CPU than
    ``F.embedding``'s dense backward, which sorts the indices)."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index, weight)
        ctx.rows = table.shape[0]
        return (table[index] * weight[..., None]).sum(2)  # (B, L, Fd)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        index, weight = ctx.saved_tensors
        spread = (grad[:, :, None, :] * weight[..., None]).reshape(-1, grad.shape[-1])  # (B·L·C, Fd)
        table_grad = grad.new_zeros(ctx.rows, grad.shape[-1]).index_add_(0, index.reshape(-1), spread)
        return table_grad, None, None


def _mlp(in_dim: int, hidden: int, out_dim: int, layers: int = 1) -> nn.Sequential:
    dims = [in_dim] + [hidden] * layers
    modules: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        modules += [nn.Linear(a, b), nn.ReLU()]
    modules.append(nn.Linear(dims[-1], out_dim))
    return nn.Sequential(*modules)


class HashGridField(nn.Module):
    """Multi-resolution hash-grid encoding + MLP, in pure PyTorch. ``forward(coords (..., 2) in [0, 1]) -> (..., D)``."""

    def __init__(
        self,
        out_dim: int,
        *,
        levels: int = 8,
        features: int = 4,
        base: int = 4,
        finest: int = 64,
        log2_table: int = 14,
        hidden: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        growth = math.exp((math.log(finest) - math.log(base)) / max(levels - 1, 1))
        res = [int(math.floor(base * growth**level)) for level in range(levels)]
        table = 2**log2_table
        sizes = [min((r + 1) ** 2, table) for r in res]
        offsets = [0]
        for size in sizes[:-1]:
            offsets.append(offsets[-1] + size)
        self.register_buffer("res", torch.tensor(res), persistent=False)  # (L,)
        self.register_buffer("sizes", torch.tensor(sizes), persistent=False)  # (L,)
        self.register_buffer("offsets", torch.tensor(offsets), persistent=False)  # (L,)
        self.register_buffer("dense", torch.tensor([(r + 1) ** 2 <= table for r in res]), persistent=False)  # (L,)
        self.register_buffer("corners", _CORNERS.clone(), persistent=False)  # (C, 2)
        generator = torch.Generator().manual_seed(seed)
        # instant-NGP initialises the table uniformly in ±1e-4
        self.table = nn.Parameter((torch.rand(sum(sizes), features, generator=generator) * 2 - 1) * 1e-4)
        self.levels, self.features = levels, features
        self.mlp = _mlp(levels * features, hidden or max(out_dim // 2, 16), out_dim)

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        """(B, 2) coordinates in [0, 1] -> (B, L * Fd) interpolated grid features."""
        res = self.res.to(coords.dtype)  # (L,)
        pos = coords[:, None, :] * res[None, :, None]  # (B, L, 2)
        cell = torch.minimum(pos.floor(), (res - 1)[None, :, None])  # (B, L, 2) lower-left vertex
        frac = pos - cell  # (B, L, 2) in [0, 1]
        vertex = cell.long()[:, :, None, :] + self.corners[None, None]  # (B, L, C, 2)
        ix, iy = vertex[..., 0], vertex[..., 1]  # (B, L, C)
        dense_index = ix + iy * (self.res + 1)[None, :, None]
        hashed = torch.bitwise_xor(ix, iy * _PRIME) % self.sizes[None, :, None]
        index = torch.where(self.dense[None, :, None], dense_index, hashed) + self.offsets[None, :, None]  # (B, L, C)
        fx, fy = frac[..., 0:1], frac[..., 1:2]  # (B, L, 1)
        dx, dy = self.corners[:, 0].to(coords.dtype), self.corners[:, 1].to(coords.dtype)  # (C,)
        weight = (dx * fx + (1 - dx) * (1 - fx)) * (dy * fy + (1 - dy) * (1 - fy))  # (B, L, C)
        return _Interpolate.apply(self.table, index, weight.to(self.table.dtype)).reshape(coords.shape[0], -1)  # (B, L * Fd)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        shape = coords.shape[:-1]
        flat = coords.reshape(-1, 2).clamp(0, 1)
        return self.mlp(self.encode(flat).to(self.mlp[0].weight.dtype)).reshape(*shape, -1)


class FourierField(nn.Module):
    """Random Fourier features of the coordinates + MLP. ``forward(coords (..., 2) in [0, 1]) -> (..., D)``."""

    def __init__(self, out_dim: int, *, frequencies: int = 64, scale: float = 10.0, hidden: int = 256, layers: int = 2, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        # frequencies in cycles per image side, Gaussian with std ``scale`` (Tancik et al.)
        self.register_buffer("basis", torch.randn(2, frequencies, generator=generator) * scale, persistent=False)  # (2, m)
        self.mlp = _mlp(2 * frequencies + 2, hidden, out_dim, layers)

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        angle = 2 * math.pi * coords @ self.basis.to(coords.dtype)  # (B, m)
        return torch.cat([angle.sin(), angle.cos(), coords * 2 - 1], dim=-1)  # (B, 2m + 2)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        shape = coords.shape[:-1]
        flat = coords.reshape(-1, 2)
        return self.mlp(self.encode(flat).to(self.mlp[0].weight.dtype)).reshape(*shape, -1)


FIELDS: dict[str, Callable[..., nn.Module]] = {"hashgrid": HashGridField, "fourier": FourierField}


def make_field(kind: str, out_dim: int, **options) -> nn.Module:
    """A coordinate network by name (``hashgrid`` or ``fourier``)."""
    if kind not in FIELDS:
        raise ValueError(f"unknown field {kind!r}; choose one of {', '.join(FIELDS)}")
    return FIELDS[kind](out_dim, **options)
