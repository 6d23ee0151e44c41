"""The named planted models of the zoo: planted-vit(-clean) from dinov2-s-focus, planted-vit-tiny(-clean)
from a tiny random Dinov2. This is all ``sinkless.zoo`` imports from the planted package."""

from __future__ import annotations

import dataclasses
import functools
import logging
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from sinkless.adapters import adapter_for
from sinkless.planted.recipe import Plant, Recipe, _spec, fingerprint, make_plant
from sinkless.planted.truth import apply_plant

__all__ = ["tiny_base", "TINY_RECIPE", "load_named", "SHIPPED"]

log = logging.getLogger(__name__)

SHIPPED = "planted-vit-s0.safetensors"  # the recipe's result for dinov2-s-focus, seed 0 (see docs/PLANTED.md)


# -- named models --------------------------------------------------------------------------------
def tiny_base(seed: int = 0) -> nn.Module:
    """A small random-weight Dinov2Model (4 layers, width 64, 64 px images, 8 px patches)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, mlp_ratio=4, image_size=64, patch_size=8
    )
    config.architectures = ["Dinov2Model"]
    model = Dinov2Model(config).eval()
    with torch.no_grad():  # position embeddings at std 0.2: token norms spread like a trained ViT's (max/median < 2.5)
        model.embeddings.position_embeddings.mul_(10.0)
    return model


TINY_RECIPE = Recipe(probe_images=96, fit_images=16, steps=60, lr=0.1, ratio=(4.0, 8.0))


@functools.lru_cache(maxsize=2)
def _tiny_plant(seed: int) -> Plant:
    return make_plant(tiny_base(seed), dataclasses.replace(TINY_RECIPE, seed=seed))


def _focus_plant(base: nn.Module) -> Plant:
    """The plant for dinov2-s-focus: the shipped one when it matches these weights, else fitted and cached."""
    from sinkless.zoo import cached

    key = fingerprint(base)
    shipped = resources.files("sinkless") / "data" / SHIPPED
    if shipped.is_file():
        plant = Plant.load(str(shipped))
        if plant.base_fingerprint == key:
            return plant
        log.warning("the shipped plant was fitted on other weights (%s != %s); fitting anew", plant.base_fingerprint, key)

    def build(folder: Path) -> None:
        log.info("fitting the planted-vit plant (a few minutes, once)")
        make_plant(base, Recipe(), progress=True).save(folder / "plant.safetensors")

    return Plant.load(cached("planted-vit-s0", key, build) / "plant.safetensors")


def load_named(name: str):
    """Zoo loader for planted-vit, planted-vit-clean, planted-vit-tiny and planted-vit-tiny-clean."""
    from sinkless.zoo import DINOV2_SPEC, Loaded, load

    clean = name.endswith("-clean")
    if name.startswith("planted-vit-tiny"):
        model = tiny_base(0)
        apply_plant(model, _tiny_plant(0), clean=clean)
        adapter = adapter_for(model)
        return Loaded(name, model, adapter, _spec(model, adapter), source="random weights, seed 0")
    base = load("dinov2-s-focus")
    plant = _focus_plant(base.model)
    apply_plant(base.model, plant, clean=clean)
    return Loaded(name, base.model, base.adapter, DINOV2_SPEC, source=f"dinov2-s-focus + plant ({base.source})")
