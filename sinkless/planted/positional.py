"""planted-vit-pos: a real DINOv2 with a known *position-tied* artifact, the test bed of DVT (Yang et al. 2024).

DVT's main finding is that ViT features carry a pattern tied to the patch-grid position, the same in
every image, and that it comes from the position embeddings. ``planted-vit`` (``sinkless.planted``)
has a content-driven artifact instead, so this is a second kind of planted truth.

Mechanism: a fixed, seeded pattern is added to the patch part of ``embeddings.position_embeddings``
of ``dinov2-s-focus``. Nothing else changes, so the result is an ordinary ``Dinov2Model`` that saves
and loads like any other, and its clean twin is ``dinov2-s-focus`` itself (the pattern is purely
added: nothing is removed or zeroed, so the unmodified backbone is the exact twin; ``planted-vit-clean``
has four MLP neurons zeroed and would not be). The pattern is added to the residual stream of every
patch token at the input of block 0, the only place where an ordinary HF Dinov2 has a per-position
parameter: a fixed pattern entering at a middle layer would need a parameter the architecture does
not have (or a decoder of position from content, which makes the pattern depend on the image).
The blocks then carry and transform it, so what DVT reads at the last layer is the pattern as the
network turned it; ``output_pattern`` measures that against the twin, ``input_pattern`` is the
pattern itself on any grid.

The pattern is a smooth function of the normalised position (u, v) in [0, 1]², so it looks the same
at every resolution (HF interpolates the position table bicubically for other image sizes):

    pattern(u, v) = strength · m · Σ_k a_k cos(2π (f_k · (u, v)) + φ_k) d_k

with K components, frequencies |f_k| of ``cycles`` periods per image side in a random direction,
random phases φ_k, orthonormal random directions d_k in feature space, a_k normalising the rms norm
per position to 1, and m the median norm of the model's own patch position embeddings.
Everything random comes from ``seed``. docs/DENOISE.md has what it does to the dense tasks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sinkless.adapters import adapter_for
from sinkless.errors import SinklessError

__all__ = ["PositionalPlant", "CONFIG_KEY", "SHIPPED_PLANT", "make_pattern", "apply_positional", "positional_truth",
           "input_pattern", "output_pattern", "load_planted_pos"]

CONFIG_KEY = "sinkless_positional_plant"


@dataclass(frozen=True)
class PositionalPlant:
    """The seeded pattern of planted-vit-pos (see the module docstring)."""

    seed: int = 0
    components: int = 8
    cycles: tuple[float, float] = (1.5, 5.0)  # periods per image side
    strength: float = 4.0  # rms norm per position / median norm of the model's patch position embeddings

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SHIPPED_PLANT = PositionalPlant()


def make_pattern(plant: PositionalPlant, grid: tuple[int, int], dim: int) -> torch.Tensor:
    """(h, w, D) the unit-rms pattern (before ``strength`` and m) at the cell centres of an h x w grid."""
    generator = torch.Generator().manual_seed(plant.seed)
    k = plant.components
    angle = torch.rand(k, generator=generator) * 2 * math.pi
    cycles = plant.cycles[0] + torch.rand(k, generator=generator) * (plant.cycles[1] - plant.cycles[0])
    freq = torch.stack([angle.cos(), angle.sin()], 1) * cycles[:, None]  # (K, 2) cycles per side along (u, v)
    phase = torch.rand(k, generator=generator) * 2 * math.pi
    directions, _ = torch.linalg.qr(torch.randn(dim, k, generator=generator))  # (D, K) orthonormal
    h, w = grid
    v = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    u = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    uv = torch.stack(torch.broadcast_tensors(u[None, :], v[:, None]), -1)  # (h, w, 2)
    waves = torch.cos(2 * math.pi * uv @ freq.T + phase)  # (h, w, K)
    return waves @ directions.T / math.sqrt(k / 2)  # (h, w, D), rms norm per position ≈ 1


def _embeddings(model: nn.Module) -> nn.Module:
    adapter = adapter_for(model)
    if adapter.family not in ("dinov2", "dinov2_with_registers"):
        raise SinklessError(f"the positional plant needs a DINOv2 model, got {type(model).__name__}", fix="plant into dinov2-s-focus")
    return model.embeddings


@torch.no_grad()
def apply_positional(model: nn.Module, plant: PositionalPlant = SHIPPED_PLANT) -> nn.Module:
    """Add the plant's pattern to ``model``'s patch position embeddings, in place; record it in the config."""
    if getattr(model.config, CONFIG_KEY, None):
        raise SinklessError("this model already carries a positional plant", fix="apply it to an unplanted model")
    table = _embeddings(model).position_embeddings  # (1, 1 + S·S, D)
    side = math.isqrt(table.shape[1] - 1)
    patches = table[0, 1:]  # (S·S, D)
    scale = float(patches.norm(dim=-1).median()) * plant.strength
    pattern = make_pattern(plant, (side, side), table.shape[-1]) * scale  # (S, S, D)
    patches += pattern.reshape(side * side, -1).to(patches)
    setattr(model.config, CONFIG_KEY, {**plant.to_dict(), "cycles": list(plant.cycles), "scale": scale, "table_grid": side})
    return model


def positional_truth(model: nn.Module) -> dict:
    """The plant recorded in ``model``'s config (a SinklessError for a model without one)."""
    meta = getattr(model.config, CONFIG_KEY, None)
    if not meta:
        raise SinklessError(f"{type(model).__name__} carries no positional plant", fix="use planted-vit-pos or apply_positional()")
    return dict(meta)


def input_pattern(model: nn.Module, grid: tuple[int, int]) -> torch.Tensor:
    """(h, w, D) exactly what the plant adds to the patch tokens of an input with an h x w patch grid.

    The position table's pattern, resampled the way HF Dinov2 resamples its table (bicubic,
    ``align_corners=False``, none at the table's own square grid).
    """
    meta = positional_truth(model)
    plant = PositionalPlant(meta["seed"], meta["components"], tuple(meta["cycles"]), meta["strength"])
    side = meta["table_grid"]
    table = make_pattern(plant, (side, side), model.config.hidden_size) * meta["scale"]  # (S, S, D)
    if tuple(grid) == (side, side):
        return table
    resized = F.interpolate(table.permute(2, 0, 1)[None], size=tuple(grid), mode="bicubic", align_corners=False)
    return resized[0].permute(1, 2, 0)  # (h, w, D)


@torch.no_grad()
def output_pattern(planted, clean, pixels: torch.Tensor, features: str = "output", layer: int = -1) -> torch.Tensor:
    """(h, w, D) the pattern as it appears at the features DVT reads: mean over ``pixels`` (B, 3, H, W) of
    planted-vit-pos's features minus its clean twin's (``features``/``layer`` as in ``sinkless.denoise``)."""
    from sinkless.denoise.views import feature_reader

    diff = feature_reader(planted, features, layer)(pixels) - feature_reader(clean, features, layer)(pixels)  # (B, h, w, D)
    return diff.mean(0)


def load_planted_pos(name: str = "planted-vit-pos"):
    """Zoo loader of planted-vit-pos: dinov2-s-focus plus the shipped pattern."""
    from sinkless.zoo import load

    base = load("dinov2-s-focus")
    apply_positional(base.model, SHIPPED_PLANT)
    base.name = name
    base.source = f"dinov2-s-focus + positional plant seed {SHIPPED_PLANT.seed} ({base.source})"
    return base
