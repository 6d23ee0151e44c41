"""What the dense tasks read from a ViT: one image at full resolution, q/k/v, CLS attention, patch tokens.

Images keep their aspect ratio (downscaled to a maximum side when asked), are normalised with the
model's statistics and padded bottom/right with zeros (the mean colour) to a multiple of the patch
size, as LOST does. Tokens are always selected through the adapter's ``TokenLayout``, so tokens a
fix appends after the patches (test-time registers) or trained registers never enter a task.

Shapes: N tokens, P patches (h·w, row-major), D width, H heads.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from sinkless.adapters import Modality, TokenLayout, eager_attention
from sinkless.errors import SinklessError
from sinkless.hooks import hooks
from sinkless.images import to_pixels
from sinkless.scan.measure import to_model

__all__ = ["Prepared", "prepare", "Extracted", "extract", "FEATURES", "check_vision", "resolve_layer"]

FEATURES = ("keys", "queries", "values", "tokens")  # tokens: the block's output (residual stream)
_QKV = {"keys": "key", "queries": "query", "values": "value"}


@dataclass(frozen=True)
class Prepared:
    """A model input for one image and how it maps back to the image."""

    pixels: torch.Tensor  # (1, 3, Hp, Wp), Hp and Wp multiples of the patch size
    image_hw: tuple[int, int]  # the resized image inside the padded input
    scale: float  # resized side / original side


def prepare(image: Image.Image, loaded, max_side: int | None) -> Prepared:
    """Resize so the longer side is at most ``max_side`` (never enlarge), normalise, pad to the patch grid."""
    spec = loaded.image_spec
    patch = loaded.adapter.patch_size(loaded.model)
    width, height = image.size
    scale = 1.0 if not max_side or max(width, height) <= max_side else max_side / max(width, height)
    w, h = max(round(width * scale), patch), max(round(height * scale), patch)
    pixels = to_pixels([image], spec, size=(h, w))  # (1, 3, h, w)
    padded = F.pad(pixels, (0, math.ceil(w / patch) * patch - w, 0, math.ceil(h / patch) * patch - h))
    return Prepared(padded, (h, w), scale)


@dataclass
class Extracted:
    """Per-image outputs of one forward pass; token groups already split by the layout."""

    layout: TokenLayout
    features: torch.Tensor | None = None  # (P, D) keys/queries/values/tokens of the chosen layer
    cls_attention: torch.Tensor | None = None  # (H, P) attention of the CLS query to every patch
    patch_tokens: torch.Tensor | None = None  # (P, D) final-norm patch tokens
    cls_token: torch.Tensor | None = None  # (D,) final-norm CLS token (or mean patch token without CLS)


def check_vision(loaded, task: str) -> None:
    if loaded.adapter.modality is not Modality.VISION:
        raise SinklessError(
            f"{loaded.name} is a {loaded.adapter.modality.value} model; the {task} task needs a vision transformer",
            fix="use a ViT such as dinov2-s-focus, planted-vit or a DINOv2/CLIP/SigLIP hub id",
        )


def resolve_layer(loaded, layer: int) -> int:
    n = loaded.adapter.num_layers(loaded.model)
    if not -n <= layer < n:
        raise SinklessError(f"layer {layer} does not exist: {loaded.name} has {n} layers", fix=f"pass --layer between 0 and {n - 1} (or negative from the end)")
    return layer % n


@functools.lru_cache(maxsize=32)
def _accepts_interpolation(model_class: type) -> bool:
    return "interpolate_pos_encoding" in inspect.signature(model_class.forward).parameters


@torch.no_grad()
def extract(
    loaded,
    prepared: Prepared,
    *,
    layer: int | None = None,
    features: str | None = None,
    cls_attention: bool = False,
    tokens: bool = False,
) -> Extracted:
    """Run one image and return what was asked for. ``layer`` defaults to the last block."""
    model, adapter = loaded.model, loaded.adapter
    last = adapter.num_layers(model) - 1
    layer = last if layer is None else layer
    sites: dict[str, str] = {}
    if features is not None:
        if features not in FEATURES:
            raise SinklessError(f"unknown features {features!r}", fix=f"choose one of {', '.join(FEATURES)}")
        sites["features"] = adapter.residual_site(layer) if features == "tokens" else adapter.qkv_site(layer, _QKV[features])
    if cls_attention:
        if adapter.n_cls == 0:
            raise SinklessError(f"{loaded.name} has no CLS token, so it has no CLS attention map", fix="use a model with a CLS token (DINOv2, ViT, CLIP)")
        sites["attention"] = adapter.attention_site(last)
    if tokens:
        sites["tokens"] = adapter.residual_site(last)
    kwargs = {"interpolate_pos_encoding": True} if _accepts_interpolation(type(model)) else {}
    with eager_attention(model) if cls_attention else contextlib.nullcontext(), hooks(model, capture=sites.values()) as rec:
        model(**to_model({"pixel_values": prepared.pixels}, model), **kwargs)  # on the model's device, in its dtype
    captured = {name: rec[site][0] for name, site in sites.items()}  # batch of one
    n_tokens = next(iter(captured.values())).shape[-2]
    layout = adapter.layout(model, n_tokens, image_hw=tuple(prepared.pixels.shape[-2:]))
    out = Extracted(layout)
    if "features" in captured:
        out.features = captured["features"][layout.body].float()  # (P, D)
    if "attention" in captured:
        out.cls_attention = captured["attention"][:, layout.cls.start, layout.body].float()  # (H, P)
    if "tokens" in captured:
        hidden = captured["tokens"]  # (N, D) last residual stream
        if adapter.final_norm is not None:
            hidden = model.get_submodule(adapter.final_norm)(hidden)
        out.patch_tokens = hidden[layout.body].float()  # (P, D)
        out.cls_token = (hidden[layout.cls.start] if layout.n_cls else hidden[layout.body].mean(0)).float()  # (D,)
    return out
