"""Applying DVT (Yang et al. 2024) to a model: a feature transform on the patch tokens, as a hook.

``FeatureTransform(loaded, transform, features, layer)`` rewrites the patch tokens at the site DVT
reads (``output``: the final norm's output, i.e. ``last_hidden_state`` and everything computed
from it; ``keys`` / ``residual``: the block's keys or output) with ``transform(pixels, tokens
(B, h, w, D)) -> (B, h, w, D)``; CLS, registers and anything appended stay as they are. A pre-hook
on the model's input records the pixels, so the transform knows the patch grid (and, for the
per-image mode, the image). Used with ``with`` it is a temporary edit; ``attach()`` returns a
persistent handle with ``.remove()``. Both go through ``sinkless.hooks``.

Two transforms: ``denoiser_transform`` (Stage 2: the trained block, near-zero cost) and
``stage1_transform`` (the per-image mode: Stage 1 on every image the model sees, cached by image;
seconds per image, for small sets). Stage 1 runs on a private copy of the model, so its own forward
passes never reach the hooks of whoever is reading the outer one.

The final norm of some models is also called outside the forward (``sinkless.tasks`` applies it to
a captured (N, D) residual stream): such a call on the same image is transformed the same way.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
from collections.abc import Callable, Iterator

import torch

from sinkless.denoise.stage1 import Stage1Settings, denoise_image
from sinkless.denoise.stage2 import Denoiser
from sinkless.denoise.views import FEATURES, check_model
from sinkless.errors import SinklessError
from sinkless.hooks import Hooks

__all__ = ["FeatureTransform", "denoiser_transform", "stage1_transform", "feature_site", "STAGE1_OUTPUTS"]

log = logging.getLogger(__name__)

Transform = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def feature_site(loaded, features: str = "output", layer: int = -1) -> str:
    """The hook site holding the features DVT reads (see ``sinkless.denoise.views``)."""
    adapter, model = loaded.adapter, loaded.model
    if features not in FEATURES:
        raise SinklessError(f"unknown features {features!r}", fix=f"choose one of {', '.join(FEATURES)}")
    n_layers = adapter.num_layers(model)
    if not -n_layers <= layer < n_layers:
        raise SinklessError(f"layer {layer} does not exist: {loaded.name} has {n_layers} layers",
                            fix=f"pass a layer from 0 to {n_layers - 1} (or -1 for the last)")
    layer %= n_layers
    if features == "keys":
        return adapter.key_site(layer)
    if features == "residual":
        return adapter.residual_site(layer)
    if layer != n_layers - 1 or adapter.final_norm is None:
        raise SinklessError(
            f"applying a denoiser of `output` features needs the last layer of a model with a final norm ({loaded.name}: layer {layer})",
            fix="train the denoiser on the last layer's output (the default)",
        )
    return f"{adapter.final_norm}:output"


class FeatureTransform:
    """Rewrite the patch tokens at DVT's feature site with ``transform`` (a context manager, or ``attach()``)."""

    def __init__(self, loaded, transform: Transform, *, features: str = "output", layer: int = -1) -> None:
        check_model(loaded)
        self.loaded, self.transform = loaded, transform
        self.site = feature_site(loaded, features, layer)
        self.features, self.layer = features, layer % loaded.adapter.num_layers(loaded.model)
        self._pixels: torch.Tensor | None = None

    def _record(self, pixels: torch.Tensor) -> torch.Tensor:
        self._pixels = pixels
        return pixels

    def _edit(self, tokens: torch.Tensor) -> torch.Tensor:
        if self._pixels is None:
            return tokens
        model, adapter = self.loaded.model, self.loaded.adapter
        batched = tokens.dim() == 3
        x = tokens if batched else tokens[None]  # (B, N, D)
        if x.dim() != 3 or x.shape[0] != self._pixels.shape[0]:
            return tokens  # not the token sequence of the recorded images (e.g. a pooled output)
        try:
            layout = adapter.layout(model, x.shape[1], image_hw=tuple(self._pixels.shape[-2:]))
        except ValueError:
            return tokens
        h, w = layout.grid
        body = x[:, layout.body]  # (B, P, D)
        denoised = self.transform(self._pixels, body.reshape(x.shape[0], h, w, -1))  # (B, h, w, D)
        out = x.clone()
        out[:, layout.body] = denoised.reshape(body.shape).to(out.dtype)
        return out if batched else out[0]

    def attach(self) -> Hooks:
        """Persistent: the hooks stay until ``.remove()``."""
        return Hooks(self.loaded.model, edit={":input": self._record, self.site: self._edit})

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        """The temporary edit; yields None (the fixes' contract: evaluate the model as modified)."""
        handle = self.attach()
        try:
            yield None
        finally:
            handle.remove()
            self._pixels = None


def denoiser_transform(denoiser: Denoiser) -> Transform:
    """Stage 2: the trained block on the patch features."""

    def transform(pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return denoiser(tokens.to(next(denoiser.parameters()).dtype))

    return transform


STAGE1_OUTPUTS = ("clean", "raw-minus-artifact")


def bare_copy(loaded):
    """A copy of ``loaded`` without the hooks attached to its model (the caller's, a fix's), so that they do not reach
    Stage 1's own forwards; the hook that inserts a ViT's added registers stays: it is part of the model."""
    from sinkless.registers.add import register_hook_ids

    bare = copy.deepcopy(loaded)
    keep = register_hook_ids(bare.model)
    for module in bare.model.modules():
        for attached in (module._forward_hooks, module._forward_pre_hooks):
            for key in [key for key in attached if key not in keep]:
                del attached[key]
    return bare


def stage1_transform(loaded, settings: Stage1Settings = Stage1Settings(), *, progress: bool = False, output: str = "clean") -> Transform:
    """The per-image mode: Stage 1 on each image seen (cached by the image's pixels).

    ``output``: ``clean`` (DVT's: the fitted field F at the image's patches, a smooth map) or
    ``raw-minus-artifact`` (the image's own features minus the fitted position-tied map G: removes only
    what every view shares at a grid position and keeps the features' detail; measured in docs/RESULTS.md).
    """
    if output not in STAGE1_OUTPUTS:
        raise SinklessError(f"unknown Stage-1 output {output!r}", fix=f"choose from {', '.join(STAGE1_OUTPUTS)}")
    bare = bare_copy(loaded)
    cache: dict[str, torch.Tensor] = {}

    def transform(pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(pixels.shape[0]):
            key = hashlib.sha1(pixels[i].detach().float().cpu().numpy().tobytes()).hexdigest()
            if key not in cache:
                result = denoise_image(bare, pixels[i : i + 1], settings, progress=progress)
                cache[key] = result.clean if output == "clean" else result.raw - result.artifact
                log.debug("stage 1 on a %s image: %.1f s", result.grid, result.timings["total_s"])
            out.append(cache[key].to(tokens))
        return torch.stack(out)  # (B, h, w, D)

    transform.cache = cache  # type: ignore[attr-defined]
    return transform
