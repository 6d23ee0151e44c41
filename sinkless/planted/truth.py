"""Ground truth of a planted model: where the plant is (read from its config), which tokens it fires on,
and writing a plant into a model (or zeroing its neurons: the clean twin)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from sinkless.adapters import Adapter, adapter_for
from sinkless.errors import SinklessError
from sinkless.hooks import hooks, stop_after

if TYPE_CHECKING:
    from sinkless.planted.recipe import Plant

__all__ = ["CONFIG_KEY", "GroundTruth", "ground_truth", "planted_tokens", "apply_plant"]

CONFIG_KEY = "sinkless_plant"


def _check_model(model: nn.Module) -> Adapter:
    adapter = adapter_for(model)
    if adapter.family not in ("dinov2", "dinov2_with_registers") or getattr(model.config, "use_swiglu_ffn", False):
        raise SinklessError(
            f"planting needs a DINOv2 model with a GELU MLP, got {type(model).__name__}",
            fix="plant into dinov2-s-focus, planted-vit-tiny's base (tiny_base()) or another Dinov2Model",
        )
    return adapter


def _mlp(model: nn.Module, adapter: Adapter, layer: int) -> nn.Module:
    return model.get_submodule(f"{adapter.block(layer)}.mlp")


def _pair_output(z: torch.Tensor, step: float) -> torch.Tensor:
    """What an on/off pair writes, in units of its step: ~0 off, 1 on."""
    return (F.gelu(z) - F.gelu(z - step)) / step


# -- applying and reading back -------------------------------------------------------------------
@torch.no_grad()
def apply_plant(model: nn.Module, plant: Plant, *, clean: bool = False) -> nn.Module:
    """Write ``plant`` into ``model`` in place (or zero its neurons: the clean twin) and record it in the config."""
    adapter = _check_model(model)
    mlp = _mlp(model, adapter, plant.layer)
    idx = torch.tensor(plant.neurons)
    if clean:
        mlp.fc1.weight[idx] = 0
        mlp.fc1.bias[idx] = 0
        mlp.fc2.weight[:, idx] = 0
    else:
        mlp.fc1.weight[idx] = plant.fc1_weight.to(mlp.fc1.weight)
        mlp.fc1.bias[idx] = plant.fc1_bias.to(mlp.fc1.bias)
        mlp.fc2.weight[:, idx] = plant.fc2_weight.to(mlp.fc2.weight)
    meta = {k: v for k, v in plant.meta().items() if k != "report"}
    setattr(model.config, CONFIG_KEY, {**meta, "role": "clean" if clean else "planted"})
    return model


@dataclass(frozen=True)
class GroundTruth:
    role: str  # "planted" or "clean"
    layer: int
    neurons: list[int]
    up: list[int]
    down: list[int]
    step: float


def ground_truth(model: nn.Module) -> GroundTruth:
    """Plant layer and neuron indices of a planted model (or its clean twin), read from its config."""
    meta = getattr(model.config, CONFIG_KEY, None)
    if not meta:
        raise SinklessError(f"{type(model).__name__} carries no plant", fix="use planted-vit, planted-vit-tiny or apply_plant()")
    return GroundTruth(meta["role"], meta["layer"], [*meta["up"], *meta["down"]], meta["up"], meta["down"], meta["step"])


@torch.no_grad()
def planted_tokens(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, N) bool over all tokens: where the planted pairs are on for these images (all False for a clean twin)."""
    truth = ground_truth(model)
    adapter = adapter_for(model)
    site = f"{adapter.block(truth.layer)}.mlp.fc1:output"
    with hooks(model, capture=[site]) as rec, stop_after(model, adapter.block(truth.layer)):
        model(pixel_values)
    if truth.role == "clean":
        return torch.zeros(rec[site].shape[:2], dtype=torch.bool)
    z = rec[site][..., truth.up]  # (B, N, pairs) pre-activations of the up neurons
    return _pair_output(z, truth.step).mean(-1) > 0.5
