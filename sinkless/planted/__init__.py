"""Planted-artifact ViTs: a real DINOv2 with a few MLP neurons re-purposed as register neurons.

No ViT that shows high-norm artifacts (Darcet et al. 2024) can be downloaded here, so we make one
whose truth we know. In one middle layer, the k MLP neurons with the smallest effect are rewritten
(their fc1 rows and biases, their fc2 columns); nothing else changes, so the result is an ordinary
HF ``Dinov2Model`` that saves and loads like any other. Its *clean twin* has the same k neurons
zeroed and nothing planted.

The recipe, with the seed fixing every random choice:

1. **Detector (fc1).** A ridge probe on the MLP input of the plant layer learns "this patch is among
   the most redundant 5 % of its image" (cosine of its input patch embedding to its 4 neighbours,
   the trait of real artifacts), on natural crops and synthetic scenes. Its threshold is set so that
   2.5 % of natural-image patches fire.
2. **Clean step.** Neurons come in pairs that share the detector, the second shifted by ``step``:
   ``gelu(z) - gelu(z - step)`` is ~0 below threshold and exactly ``step`` above, so artifact norms
   are bimodal like real ones, and the pair is either on or off.
3. **Write (fc2).** The pairs together add one vector ``d`` to the residual stream of the tokens they
   fire on. ``d`` is fitted by gradient descent, through the frozen later layers, so that the tokens
   keep 3.5-8x the median patch norm at the later layers (the last block excepted) and draw the largest possible share of
   attention from the other tokens: they become attention sinks, as in large DINOv2/CLIP models,
   while the CLS output stays close to the clean model's and the last layer's keys of planted tokens
   stand apart from the other patches' (both as with real artifacts). docs/PLANTED.md has the numbers.

Ground truth: ``ground_truth(model)`` (layer, neurons) and ``planted_tokens(model, pixels)``.
"""

from sinkless.planted.builder import SHIPPED, TINY_RECIPE, _tiny_plant, load_named, tiny_base  # noqa: F401 (_tiny_plant: tests)
from sinkless.planted.recipe import Plant, Recipe, fingerprint, make_plant
from sinkless.planted.truth import CONFIG_KEY, GroundTruth, apply_plant, ground_truth, planted_tokens

__all__ = [
    "Recipe",
    "Plant",
    "make_plant",
    "apply_plant",
    "ground_truth",
    "planted_tokens",
    "GroundTruth",
    "tiny_base",
    "load_named",
    "fingerprint",
    "properties",
    "detection",
    "CONFIG_KEY",
    "SHIPPED",
    "TINY_RECIPE",
]


def __getattr__(name: str):
    """``properties`` and ``detection`` use ``scan``, which uses the zoo: imported on first use, so that
    the zoo can import the builder without a circle."""
    if name in ("properties", "detection"):
        from sinkless.planted import measure

        return getattr(measure, name)
    raise AttributeError(f"module 'sinkless.planted' has no attribute {name!r}")
