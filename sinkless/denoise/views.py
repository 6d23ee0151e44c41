"""The views of one image that DVT's Stage 1 fits (Yang et al. 2024), and the features a ViT gives for them.

A view is a random resized crop of the image (area and aspect ranges are settings: DVT's
``RandomResizedCropFlip`` uses area 10-50 %, aspect 3/4-4/3, flipped with p = 0.5; ``Stage1Settings``
defaults to area 50-100 % without flips, measured better here), resampled to the model's input size;
the uncropped image is the last view. Every patch of every view gets the image coordinates of its *centre* (DVT uses
edge-to-edge ``linspace`` coordinates, which put a view's border patches on the crop's border; the
centre is where the patch actually looks). Crops are rendered for all views at once with
``affine_grid`` + bicubic ``grid_sample`` (crops are only ever enlarged, so no antialiasing is needed).

What features: ``output`` (the block's output through the final norm: DVT's ``norm=True`` features;
the last layer by default), ``keys`` (the block's attention keys) or ``residual`` (the raw residual
stream after the block). The forward stops after the block it reads.

Shapes: V views, h x w patch grid, D width, H x W pixels.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sinkless.adapters import Modality
from sinkless.devices import autocast, resolve_amp
from sinkless.errors import SinklessError
from sinkless.hooks import hooks, stop_after

__all__ = ["FEATURES", "Views", "sample_boxes", "render", "patch_centres", "feature_reader", "make_views", "check_model"]

FEATURES = ("output", "keys", "residual")


@dataclass
class Views:
    """Features of V views of one image (the last one uncropped) and each patch's image coordinates."""

    features: torch.Tensor  # (V, h, w, D)
    coords: torch.Tensor  # (V, h, w, 2) patch centres (x, y) in the image, in [0, 1]
    boxes: torch.Tensor  # (V, 4) crops as (top, left, height, width) in image units
    flips: torch.Tensor  # (V,) bool

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.features.shape[1:3])


def check_model(loaded) -> None:
    """DVT needs a vision transformer with a patch grid."""
    if loaded.adapter.modality is not Modality.VISION:
        raise SinklessError(
            f"{loaded.name} is a {loaded.adapter.modality.value} model; denoising (DVT) needs a vision transformer",
            fix="use a ViT such as dinov2-s-focus, planted-vit, planted-vit-pos or a DINOv2/ViT hub id",
        )
    if "spatial_shapes" in inspect.signature(type(loaded.model).forward).parameters:
        raise SinklessError(
            f"{loaded.name} ({type(loaded.model).__name__}) takes patchified inputs of any aspect ratio (NaFlex), not a pixel grid; "
            "denoising (DVT) crops and resizes pixel images and is not supported for such models",
            fix="use a ViT that takes pixel_values on a fixed patch grid (DINOv2, ViT, CLIP, SigLIP)",
        )


def sample_boxes(
    n: int, generator: torch.Generator, *, scale: tuple[float, float] = (0.1, 0.5), ratio: tuple[float, float] = (3 / 4, 4 / 3), aspect: float = 1.0
) -> torch.Tensor:
    """(n, 4) random crops (top, left, height, width) in image units, torchvision's RandomResizedCrop rule.

    ``aspect`` is the image's width / height; up to 10 tries per crop, then the centred largest crop.
    """
    tries = 10
    area = torch.empty(n, tries).uniform_(*scale, generator=generator)  # share of the image area
    log_ratio = torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    r = torch.exp(log_ratio)  # crop width / height in pixels
    width = torch.sqrt(area * r / aspect)  # in image widths
    height = torch.sqrt(area / r * aspect)  # in image heights
    fits = (width <= 1) & (height <= 1)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((n,), -1))
    rows = torch.arange(n)
    w = torch.where(first >= 0, width[rows, first.clamp(min=0)], torch.ones(n))
    h = torch.where(first >= 0, height[rows, first.clamp(min=0)], torch.ones(n))
    top = torch.rand(n, generator=generator) * (1 - h)
    left = torch.rand(n, generator=generator) * (1 - w)
    return torch.stack([top, left, h, w], dim=1)


def render(pixels: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Crop ``boxes`` out of ``pixels`` (1, 3, H, W), flip, and resample each to H x W: (V, 3, H, W)."""
    top, left, h, w = boxes.to(pixels).unbind(1)
    sign = 1 - 2 * flips.to(pixels)  # -1 mirrors x inside the crop
    theta = torch.zeros(len(boxes), 2, 3, dtype=pixels.dtype, device=pixels.device)
    theta[:, 0, 0] = w * sign
    theta[:, 0, 2] = 2 * left + w - 1
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * top + h - 1
    grid = F.affine_grid(theta, [len(boxes), *pixels.shape[1:]], align_corners=False)  # (V, H, W, 2)
    return F.grid_sample(pixels.expand(len(boxes), -1, -1, -1), grid, mode="bicubic", padding_mode="border", align_corners=False)


def patch_centres(boxes: torch.Tensor, flips: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(V, h, w, 2) image coordinates (x, y) in [0, 1] of the centre of every patch of every view."""
    h, w = grid
    v = (torch.arange(h, dtype=torch.float32) + 0.5) / h  # (h,) in the view
    u = (torch.arange(w, dtype=torch.float32) + 0.5) / w  # (w,)
    top, left, height, width = boxes.float().unbind(1)  # (V,)
    u = torch.where(flips[:, None], 1 - u[None], u[None])  # (V, w)
    x = left[:, None] + u * width[:, None]  # (V, w)
    y = top[:, None] + v[None] * height[:, None]  # (V, h)
    return torch.stack(torch.broadcast_tensors(x[:, None, :], y[:, :, None]), dim=-1)  # (V, h, w, 2)


@functools.lru_cache(maxsize=32)
def _accepts_interpolation(model_class: type) -> bool:
    return "interpolate_pos_encoding" in inspect.signature(model_class.forward).parameters


def feature_reader(loaded, features: str = "output", layer: int = -1) -> Callable[[torch.Tensor], torch.Tensor]:
    """``read(pixels (B, 3, H, W)) -> (B, h, w, D)`` float32 patch features of ``loaded`` (no hooks left behind)."""
    check_model(loaded)
    if features not in FEATURES:
        raise SinklessError(f"unknown features {features!r}", fix=f"choose one of {', '.join(FEATURES)}")
    model, adapter = loaded.model, loaded.adapter
    n_layers = adapter.num_layers(model)
    if not -n_layers <= layer < n_layers:
        raise SinklessError(f"layer {layer} does not exist: {loaded.name} has {n_layers} layers", fix=f"pass a layer in 0..{n_layers - 1} (or negative)")
    layer %= n_layers
    site = adapter.key_site(layer) if features == "keys" else adapter.residual_site(layer)
    norm = model.get_submodule(adapter.final_norm) if features == "output" and adapter.final_norm else None
    patch = adapter.patch_size(model)
    kwargs = {"interpolate_pos_encoding": True} if _accepts_interpolation(type(model)) else {}
    early = layer < n_layers - 1

    @torch.no_grad()
    def read(pixels: torch.Tensor) -> torch.Tensor:
        with hooks(model, capture=[site]) as rec, stop_after(model, adapter.block(layer)) if early else contextlib.nullcontext():
            model(pixel_values=pixels, **kwargs)
        tokens = rec[site]  # (B, N, D)
        if norm is not None:
            tokens = norm(tokens)
        grid = (pixels.shape[-2] // patch, pixels.shape[-1] // patch)
        layout = adapter.layout(model, tokens.shape[1], image_hw=tuple(pixels.shape[-2:]))
        return tokens[:, layout.body].float().reshape(pixels.shape[0], *grid, -1)  # (B, h, w, D)

    return read


def make_views(
    read: Callable[[torch.Tensor], torch.Tensor],
    pixels: torch.Tensor,
    n_views: int,
    generator: torch.Generator,
    *,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = False,
    batch_size: int = 16,
    amp: str | bool = False,
    progress_bar=None,
) -> Views:
    """``n_views`` random crops of ``pixels`` (1, 3, H, W) plus the whole image, and their features.

    ``amp``: the crops' forwards in bf16 autocast (``devices.resolve_amp``: ``auto`` where the hardware has
    native bf16); the whole image is always read in the model's own precision, so the returned raw
    features are exactly the model's."""
    height, width = pixels.shape[-2:]
    boxes = sample_boxes(n_views, generator, scale=scale, ratio=ratio, aspect=width / height)
    flips = torch.rand(n_views, generator=generator) < 0.5 if flip else torch.zeros(n_views, dtype=torch.bool)
    # bf16 where the hardware has it natively (devices.resolve_amp), for a float32 model: one loaded in half precision
    # already runs in it (and CPU autocast cannot mix float16 with bf16)
    use_amp = resolve_amp(amp, pixels.device) and pixels.dtype == torch.float32
    chunks = []
    for start in range(0, n_views, batch_size):
        b, f = boxes[start : start + batch_size], flips[start : start + batch_size]
        batch = render(pixels, b, f)
        whole = (b[:, 2] >= 1) & (b[:, 3] >= 1) & ~f
        batch[whole] = pixels  # an uncropped view is the image itself, not a resampled copy
        with autocast(pixels.device, use_amp, cpu=True):
            chunks.append(read(batch).float())
        if progress_bar is not None:
            progress_bar.update(len(b))
    chunks.append(read(pixels).float())  # the uncropped image, last, in full precision
    if progress_bar is not None:
        progress_bar.update(1)
    boxes = torch.cat([boxes, torch.tensor([[0.0, 0.0, 1.0, 1.0]])])
    flips = torch.cat([flips, torch.tensor([False])])
    features = torch.cat(chunks)  # (V, h, w, D)
    return Views(features, patch_centres(boxes, flips, features.shape[1:3]).to(features.device), boxes, flips)
