"""Token norms of the residual stream and the outlier rule (Darcet et al. 2024, "Vision Transformers Need Registers").

An *outlier* (high-norm, artifact) token at a layer is one whose residual-stream L2 norm stands far
above the typical token of the same input. Two rules:

- ``robust`` (default): norm > max(``floor`` x median, median + ``k`` x 1.4826 x MAD) of the input's
  body tokens at that layer. The floor (default 3) encodes the defining trait, "2-10x the typical
  norm", with margin above the natural spread of clean models (DINOv2 ViT-S: max/median <= 2.9);
  the MAD term keeps the rule conservative on heavy-tailed layers.
- ``meanstd``: norm > mean + 3 sigma of the body-token norms (the rule Jiang et al. 2025 suggest);
  it always flags the top tail of any distribution and misses outliers when they are many, so
  use it together with ``absolute``/inspection rather than as a detector on its own.

An ``absolute`` threshold, when given, replaces both.

Shapes: B inputs, N tokens, L layers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

__all__ = ["Rule", "OutlierRule", "thresholds", "robust_median"]


class Rule(str, enum.Enum):
    ROBUST = "robust"
    MEANSTD = "meanstd"


def robust_median(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Median along the last dim, ignoring masked-out entries: (..., N) -> (...)."""
    if mask is None:
        return values.median(dim=-1).values
    return values.masked_fill(~mask, float("nan")).nanmedian(dim=-1).values


@dataclass(frozen=True)
class OutlierRule:
    """How a token is judged an outlier (see the module docstring)."""

    rule: Rule = Rule.ROBUST
    floor: float = 3.0
    k: float = 6.0
    absolute: float | None = None

    def describe(self) -> str:
        if self.absolute is not None:
            return f"norm > {self.absolute:g} (absolute)"
        if self.rule is Rule.MEANSTD:
            return "norm > mean + 3 sigma of the input's body-token norms at the layer"
        return f"norm > max({self.floor:g} x median, median + {self.k:g} x 1.4826 x MAD) of the input's body-token norms at the layer"

    def to_dict(self) -> dict:
        return {"rule": self.rule.value, "floor": self.floor, "k": self.k, "absolute": self.absolute, "text": self.describe()}


def thresholds(norms: torch.Tensor, rule: OutlierRule, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-input outlier thresholds for body-token norms ``norms`` (..., N) -> (...).

    ``mask`` (..., N) marks which entries count (e.g. real tokens, not padding or position 0).
    """
    if rule.absolute is not None:
        return torch.full(norms.shape[:-1], float(rule.absolute), dtype=norms.dtype)
    if mask is None:
        mask = torch.ones_like(norms, dtype=torch.bool)
    if rule.rule is Rule.MEANSTD:
        count = mask.sum(-1).clamp(min=1)
        mean = (norms * mask).sum(-1) / count
        var = (((norms - mean[..., None]) ** 2) * mask).sum(-1) / (count - 1).clamp(min=1)
        return mean + 3 * var.sqrt()
    median = robust_median(norms, mask)
    mad = robust_median((norms - median[..., None]).abs(), mask)
    return torch.maximum(rule.floor * median, median + rule.k * 1.4826 * mad)
