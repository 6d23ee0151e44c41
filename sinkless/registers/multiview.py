"""Multi-view feature denoising: a ViT's final patch features averaged over shifted and flipped views,
the teacher target of PH-Reg (Chen et al. 2025, "Vision Transformers with Self-Distilled Registers").

Artifacts are tied to positions of the *input grid* while image content moves with the image, so the
features of the same image patch seen at different grid positions agree on content and disagree on
artifacts; averaging them keeps the first and washes out the second. Per image, ``K`` views:

1. view 0 is the image itself; the others shift it by whole patches ``(dy, dx)`` within ``±max_shift``
   (``out[y, x] = in[y + dy·p, x + dx·p]``), chosen spread out by farthest-point sampling among
   ``10·K`` random offsets, each flipped left-right with probability ½ (never view 0). Pixels shifted in
   from outside the image take one constant colour (``fill``; PH-Reg: white);
2. the model's final-norm patch features of every view are flipped back and moved back by ``(dy, dx)``
   onto the image's patch grid; patches that fell out of the view contribute nothing;
3. each grid position averages the views that cover it (view 0 covers all, so none is empty).

``denoise_views`` is usable on its own to clean features without training. Differences from the
official code (REFERENCE_NOTES §2), on purpose: farthest-point sampling starts from the identity offset
(the official code starts at a random candidate and then overwrites view 0 with (0, 0), which can leave a
near-duplicate of view 0); offsets are drawn from the caller's ``torch.Generator`` (reproducible) instead
of Python's ``random``; ``max_shift`` defaults to round(0.15 × grid side) as there, and is a setting.

Shapes: B images, K views, C channels, H×W pixels, h×w patch grid (P = h·w), p patch size, D width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn

from sinkless.adapters import Adapter, adapter_for
from sinkless.devices import autocast, resolve_amp
from sinkless.errors import SinklessError
from sinkless.hooks import hooks
from sinkless.images import ImageSpec, to_pixels

__all__ = ["ViewSettings", "Views", "sample_views", "render_views", "merge_views", "final_patch_features", "denoise_views", "FILLS"]

FILLS = ("white", "mean", "black")


@dataclass(frozen=True)
class ViewSettings:
    """How the teacher's views are made. Defaults: PH-Reg's (10 views, shifts ±0.15 of the grid, flips, white fill)."""

    views: int = 10
    max_shift: int | None = None  # in patches; None: round(0.15 × the smaller grid side), PH-Reg's rule
    flip: bool = True
    fill: str = "white"  # colour of pixels shifted in from outside: white (PH-Reg), mean (0 after normalising), black
    candidates_per_view: int = 10  # farthest-point sampling picks from views × this many random offsets

    def __post_init__(self) -> None:
        if isinstance(self.views, bool) or not isinstance(self.views, int) or self.views < 1:
            raise SinklessError(f"views must be a whole number >= 1, got {self.views!r}", fix="PH-Reg uses 10")
        if self.max_shift is not None and (not isinstance(self.max_shift, int) or self.max_shift < 0):
            raise SinklessError(f"max_shift must be a whole number of patches >= 0, got {self.max_shift!r}")
        if self.fill not in FILLS:
            raise SinklessError(f"unknown fill {self.fill!r}", fix=f"choose one of {', '.join(FILLS)}")
        if self.candidates_per_view < 1:
            raise SinklessError("candidates_per_view must be >= 1")

    def shift_for(self, grid: tuple[int, int]) -> int:
        shift = round(0.15 * min(grid)) if self.max_shift is None else self.max_shift
        return min(shift, min(grid) - 1)  # a shift by a whole grid side would leave nothing of the image


@dataclass(frozen=True)
class Views:
    """The views of one image: integer patch offsets and flips. ``offsets[0]`` is (0, 0), ``flips[0]`` False."""

    offsets: torch.Tensor  # (K, 2) long, (dy, dx) in patches
    flips: torch.Tensor  # (K,) bool

    @property
    def max_shift(self) -> int:
        return int(self.offsets.abs().max()) if len(self.offsets) else 0


def sample_views(settings: ViewSettings, grid: tuple[int, int], generator: torch.Generator | None = None) -> Views:
    """View 0 = identity; the rest farthest-point sampled among random offsets within ±shift, random flips."""
    k, shift = settings.views, settings.shift_for(grid)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    pool = torch.randint(-shift, shift + 1, (k * settings.candidates_per_view, 2), generator=generator)  # (M, 2)
    flips = torch.rand(k, generator=generator) < 0.5 if settings.flip else torch.zeros(k, dtype=torch.bool)
    flips[0] = False
    chosen = [torch.zeros(2, dtype=torch.long)]
    distance = (pool - chosen[0]).float().pow(2).sum(-1)  # (M,) squared distance to the nearest chosen offset
    for _ in range(1, k):
        far = int(distance.argmax())  # first of ties: deterministic
        chosen.append(pool[far])
        distance = torch.minimum(distance, (pool - pool[far]).float().pow(2).sum(-1))
    return Views(torch.stack(chosen), flips)


def _fill_values(fill: str, spec: ImageSpec) -> torch.Tensor:
    mean, std = torch.tensor(spec.mean), torch.tensor(spec.std)
    colour = {"white": torch.ones(3), "black": torch.zeros(3), "mean": mean}[fill]
    return (colour - mean) / std  # (3,) in normalised units


def render_views(pixels: torch.Tensor, views: Sequence[Views], patch: int, fill: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) normalised pixels -> (B·K, C, H, W): each image's K shifted (and flipped) views."""
    b, c, height, width = pixels.shape
    shift = max(v.max_shift for v in views)
    margin = shift * patch
    canvas = fill.to(pixels).view(1, c, 1, 1).expand(b, c, height + 2 * margin, width + 2 * margin).clone()  # (B, C, H+2m, W+2m)
    canvas[:, :, margin : margin + height, margin : margin + width] = pixels
    out = []
    for i, image_views in enumerate(views):
        for (dy, dx), flip in zip(image_views.offsets.tolist(), image_views.flips.tolist()):
            top, left = margin + dy * patch, margin + dx * patch
            view = canvas[i, :, top : top + height, left : left + width]  # (C, H, W): view[y, x] = image[y + dy·p, x + dx·p]
            out.append(view.flip(-1) if flip else view)
    return torch.stack(out)  # (B·K, C, H, W)


def merge_views(features: torch.Tensor, views: Sequence[Views]) -> torch.Tensor:
    """(B, K, h, w, D) per-view patch features -> (B, h, w, D): each grid position averaged over the views covering it."""
    b, k, h, w, d = features.shape
    shift = max(v.max_shift for v in views)
    total = features.new_zeros(b, h + 2 * shift, w + 2 * shift, d)  # (B, h+2s, w+2s, D)
    count = features.new_zeros(b, h + 2 * shift, w + 2 * shift, 1)
    for i, image_views in enumerate(views):
        for j, ((dy, dx), flip) in enumerate(zip(image_views.offsets.tolist(), image_views.flips.tolist())):
            view = features[i, j].flip(1) if flip else features[i, j]  # (h, w, D): view[r, c] is image patch (r+dy, c+dx)
            total[i, shift + dy : shift + dy + h, shift + dx : shift + dx + w] += view
            count[i, shift + dy : shift + dy + h, shift + dx : shift + dx + w] += 1
    return total[:, shift : shift + h, shift : shift + w] / count[:, shift : shift + h, shift : shift + w]


def final_patch_features(model: nn.Module, pixels: torch.Tensor, adapter: Adapter | None = None, *,
                         keys: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) -> (B, P, D): the final-norm patch tokens (CLS and registers dropped), with autograd if enabled.

    ``keys``: also the last layer's attention keys of the patch tokens from the same forward: a pair
    (features, keys), both (B, P, D)."""
    adapter = adapter or adapter_for(model)
    last_layer = adapter.num_layers(model) - 1
    last = adapter.residual_site(last_layer)
    key_site = adapter.key_site(last_layer) if keys else None
    kwargs = {"interpolate_pos_encoding": True} if _accepts_interpolation(model) else {}
    with hooks(model, capture=[last, *([key_site] if keys else [])], detach=not torch.is_grad_enabled()) as rec:
        model(pixel_values=pixels, **kwargs)
    hidden = rec[last]  # (B, N, D) last residual stream
    if adapter.final_norm is not None:
        hidden = model.get_submodule(adapter.final_norm)(hidden)
    grid = (pixels.shape[-2] // adapter.patch_size(model), pixels.shape[-1] // adapter.patch_size(model))
    layout = adapter.layout(model, hidden.shape[1], image_hw=tuple(pixels.shape[-2:]))
    assert layout.grid == grid, (layout, grid)
    if keys:
        return hidden[:, layout.body], rec[key_site][:, layout.body]  # (B, P, D) each
    return hidden[:, layout.body]  # (B, P, D)


def _accepts_interpolation(model: nn.Module) -> bool:
    import inspect

    return "interpolate_pos_encoding" in inspect.signature(type(model).forward).parameters


def _unwrap(model) -> tuple[nn.Module, Adapter, ImageSpec | None]:
    if isinstance(model, nn.Module):
        return model, adapter_for(model), None
    if hasattr(model, "model") and hasattr(model, "adapter"):  # a sinkless Loaded
        return model.model, model.adapter, model.image_spec
    raise SinklessError(f"expected a model or a sinkless Loaded, got {type(model).__name__}")


@torch.no_grad()
def denoise_views(
    model,
    images: torch.Tensor | Sequence[Image.Image],
    settings: ViewSettings = ViewSettings(),
    *,
    generator: torch.Generator | None = None,
    image_spec: ImageSpec | None = None,
    batch_size: int | None = None,
    views: Sequence[Views] | None = None,
    amp: str | bool = "off",
    keys: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Final-norm patch features of ``images`` averaged over ``settings.views`` shifted/flipped views: (B, P, D).

    ``model``: a sinkless ``Loaded`` or a supported HF vision model. ``images``: normalised pixels
    (B, C, H, W) with H, W multiples of the patch size, or PIL images (resized to the model's size).
    ``generator`` draws the views (default: seed 0, the same views for every call); ``views`` gives them
    explicitly, one ``Views`` per image. ``batch_size``: images run per forward (default: all views of
    one image at a time, the speed/memory sweet spot on a CPU). ``image_spec``: the model's
    normalisation and size, for the fill colour and PIL images (default: the Loaded's, else ImageNet
    statistics at the model config's image size). ``amp``: ``off`` (default, float32), ``bf16``, or ``auto``
    (bf16 autocast where the hardware has native bf16, ``sinkless.devices.resolve_amp``; on an AMX CPU the
    10 views of a ViT-S/14 crop then cost ~3x less, with features within cosine 0.999 of float32's).
    ``keys``: also the last layer's attention keys averaged over the same views (a pair (features, keys), both
    (B, P, D)): where an artifact token's key stands apart from the others, its averaged key no longer does.
    """
    net, adapter, spec = _unwrap(model)
    if image_spec is None and spec is None:  # a bare HF model: its configured size, ImageNet statistics
        from sinkless.pretrained import _image_spec_from

        spec = _image_spec_from(None, net.config, adapter)
    spec = image_spec or spec
    if not isinstance(images, torch.Tensor):
        images = list(images)
        if not images:
            raise SinklessError("no images to denoise", fix="pass at least one image (PIL images or a (B, C, H, W) tensor)")
        images = to_pixels(images, spec)
    reference = next(net.parameters())
    pixels = images.to(device=reference.device, dtype=reference.dtype)  # (B, C, H, W)
    patch = adapter.patch_size(net)
    if pixels.dim() != 4 or pixels.shape[-1] % patch or pixels.shape[-2] % patch:
        raise SinklessError(f"pixels of shape {tuple(pixels.shape)} are not (B, C, H, W) with H and W multiples of the patch size {patch}")
    b = pixels.shape[0]
    grid = (pixels.shape[-2] // patch, pixels.shape[-1] // patch)
    if views is None:
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        views = [sample_views(settings, grid, generator) for _ in range(b)]
    if len(views) != b:
        raise SinklessError(f"{len(views)} view sets given for {b} images")
    fill = _fill_values(settings.fill, spec)
    use_amp = resolve_amp(amp, pixels.device) and pixels.dtype == torch.float32  # a half-precision model runs in its own
    k = len(views[0].offsets)
    per_forward = max(1, (batch_size or 1))  # images per forward; all K views of an image go together
    merged: list[list[torch.Tensor]] = []
    for start in range(0, b, per_forward):
        chunk = slice(start, min(start + per_forward, b))
        rendered = render_views(pixels[chunk], views[chunk], patch, fill)  # (b'·K, C, H, W)
        with autocast(pixels.device, use_amp, cpu=True):
            outputs = final_patch_features(net, rendered, adapter, keys=keys)
        outputs = outputs if keys else (outputs,)  # (b'·K, P, D) each
        merged.append([merge_views(x.float().view(-1, k, grid[0], grid[1], x.shape[-1]), views[chunk]).flatten(1, 2)
                       for x in outputs])  # (b', P, D) each
    features, *key = (torch.cat(parts) for parts in zip(*merged))  # (B, P, D)
    return (features, key[0]) if keys else features
