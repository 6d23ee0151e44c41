"""DVT Stage 1 (Yang et al. 2024, "Denoising Vision Transformers"): split one image's ViT features into a
clean field, a position-tied artifact and a small residual, from many crops of the image.

For the patch features y of every view, with each patch's centre c in image coordinates and its
position p on the model's patch grid (the same for every view):

    y  ≈  F(c)  +  G[p]  +  h(y)

F is a coordinate network (``sinkless.denoise.field``): what the image looks like wherever it is seen
from. G is one map over the patch grid, shared by all views: what the model adds at a grid position
whatever it looks at. h is a small MLP on the raw feature for what is left (view-dependent, sparse),
switched on after ``residual_from`` of the steps, when G is frozen. The loss is DVT's: MSE + (1 - cos)
on F + G (+ h detached), and once h is on 0.1 · MSE(h, y - F - G) + 0.02 · |h|. Random batches of
patches from all views; Adam, linear warm-up then half-cosine from ``lr`` to ``final_lr``. The clean
output is F on the image's own patch centres.

How this differs from the reference (docs/DENOISE.md has the list): pure PyTorch fields instead of
tiny-cuda-nn; patch centres instead of edge-to-edge coordinates; fewer views and steps, chosen by the
quality-vs-time benchmark, so that one ViT-S/14 image at 224 px takes seconds on a CPU; crops of 50-100 %
of the image without flips instead of 10-50 % with flips (at a 16 x 16 grid the reference's zoomed and
mirrored views pull F far from the image's own features, cosine 0.87 to them on an artifact-free model,
and cost a dense probe 6.6 mIoU; these views keep 0.93 and gain 1.4-2.0: docs/RESULTS.md); the fit runs
on standardised features (F's output layer starts at the mean feature) with the loss in raw units;
G's grid mean is kept at zero (a constant belongs to F, so the clean features keep the model's mean);
no GradScaler quirk (the reference scales the loss by 2^10 without unscaling: its weight decay is
effectively 1e-5 / 1024, i.e. none, which is what we use).

Shapes: V views, h x w grid, P = h·w positions, M = V·P patches, B a batch of patches, D width.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from dataclasses import field as _field

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from sinkless.denoise.field import make_field
from sinkless.denoise.views import Views, feature_reader, make_views
from sinkless.devices import model_device, resolve_amp
from sinkless.errors import SinklessError
from sinkless.images import to_pixels

__all__ = ["Stage1Settings", "Decomposition", "Stage1Result", "fit", "denoise_image", "image_pixels"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage1Settings:
    """Views, coordinate network and optimisation of one Stage-1 fit (defaults: the measured CPU budget)."""

    views: int = 24  # random crops; the whole image is added as one more view
    steps: int = 300
    batch: int = 2048  # patches per step, drawn with replacement from all views (DVT: 2048)
    field: str = "hashgrid"  # hashgrid | fourier
    lr: float = 1e-2
    final_lr: float = 1e-3
    warmup: float = 0.1  # share of the steps
    residual_from: float = 0.5  # h switches on and G freezes after this share of the steps
    residual_weight: float = 0.1
    sparsity: float = 0.02
    scale: tuple[float, float] = (0.5, 1.0)  # crop area; DVT: (0.1, 0.5) with flips (docs/DENOISE.md: why not here)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = False
    features: str = "output"  # output | keys | residual (see sinkless.denoise.views)
    layer: int = -1
    view_batch: int = 16
    rank: int = 96  # the fit lives in the image's top-`rank` principal subspace (0: all D dimensions)
    seed: int = 0
    amp: str | bool = "auto"  # bf16 autocast for the ViT forwards: auto (CUDA, CPUs with AMX/AVX512-BF16), bf16, off
    field_options: dict = _field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("views", "steps", "batch", "view_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SinklessError(f"{name} must be a whole number >= 1, got {value!r}")
        for name in ("lr", "final_lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise SinklessError(f"{name} must be a positive number, got {value!r}")
        if not (0 <= self.warmup < 1 and 0 < self.residual_from <= 1):
            raise SinklessError("warmup must be in [0, 1) and residual_from in (0, 1]")
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise SinklessError(f"crop scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        resolve_amp(self.amp, "cpu")  # a known choice

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Decomposition(nn.Module):
    """F (coordinate network), G (one map over the patch grid) and h (residual MLP) of one image.

    They live in the image's top-``k`` principal subspace of the features, in standardised units:
    a feature is ``mean + std · basis @ z`` (``basis``: (D, k) orthonormal columns).
    """

    def __init__(self, grid: tuple[int, int], settings: Stage1Settings, mean: torch.Tensor, basis: torch.Tensor, std: float) -> None:
        super().__init__()
        self.grid = grid
        k = basis.shape[1]
        self.field = make_field(settings.field, k, seed=settings.seed, **settings.field_options)
        self.artifact = nn.Parameter(torch.zeros(grid[0] * grid[1], k))  # (P, k) G
        hidden = max(mean.shape[0] // 4, 8)  # DVT: D -> D/4 -> D/4 -> D
        self.residual = nn.Sequential(nn.Linear(k, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, k))
        self.register_buffer("mean", mean.clone())  # (D,)
        self.register_buffer("basis", basis.clone())  # (D, k)
        self.std = float(std)

    def project(self, y: torch.Tensor) -> torch.Tensor:
        """Raw features (..., D) -> standardised principal coordinates (..., k)."""
        return (y - self.mean) @ self.basis / self.std

    def raw(self, z: torch.Tensor) -> torch.Tensor:
        """Principal coordinates (..., k) -> features (..., D), mean included."""
        return z @ self.basis.T * self.std + self.mean

    @torch.no_grad()
    def clean(self, coords: torch.Tensor) -> torch.Tensor:
        """F at image coordinates (..., 2), in feature units: (..., D)."""
        return self.raw(self.field(coords))

    @torch.no_grad()
    def artifact_map(self) -> torch.Tensor:
        """G in feature units (no mean): (h, w, D)."""
        return (self.artifact @ self.basis.T * self.std).reshape(*self.grid, -1)

    @torch.no_grad()
    def residual_of(self, y: torch.Tensor) -> torch.Tensor:
        """h of raw features (..., D), in feature units (no mean)."""
        return self.residual(self.project(y)) @ self.basis.T * self.std


def _lr(settings: Stage1Settings, step: int) -> float:
    warm = int(settings.warmup * settings.steps)
    if step < warm:
        return settings.lr * (step + 1) / warm
    progress = (step - warm) / max(settings.steps - warm - 1, 1)
    return settings.final_lr + 0.5 * (settings.lr - settings.final_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def _principal(y: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mean (D,), the top-``rank`` principal directions (D, k) of ``y`` (M, D), and the rms of the centred coordinates."""
    mean = y.mean(0)
    centred = y - mean
    dim = y.shape[1]
    if rank <= 0 or rank >= dim:
        basis = torch.eye(dim, dtype=y.dtype, device=y.device)
    else:
        _, vectors = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
        basis = vectors[:, -rank:].flip(1).contiguous()  # (D, k)
    std = float((centred @ basis).pow(2).sum(1).mean().div(basis.shape[1]).sqrt().clamp_min(1e-6))
    return mean, basis, std


def fit(views: Views, settings: Stage1Settings = Stage1Settings(), *, progress: bool = False) -> tuple[Decomposition, list[dict]]:
    """Fit y ≈ F(coords) + G[grid position] + h(y) to the features of ``views``; returns the model and its loss curve.

    The loss is DVT's, in raw feature units, computed exactly from the k principal coordinates: the
    part of each feature outside the subspace is a constant of the fit (it enters the MSE and the
    cosine's norms, never the gradients' direction). Gradients are on even when called under
    ``no_grad``/``inference_mode`` (e.g. from a hook during a task's feature extraction).
    """
    with torch.inference_mode(False), torch.enable_grad():
        return _fit(Views(*(t.clone() for t in (views.features, views.coords, views.boxes, views.flips))), settings, progress)


def _fit(views: Views, settings: Stage1Settings, progress: bool) -> tuple[Decomposition, list[dict]]:
    y_all = views.features.reshape(-1, views.features.shape[-1])  # (M, D)
    coords = views.coords.reshape(-1, 2).to(y_all)  # (M, 2)
    n_views, h, w, dim = views.features.shape
    position = torch.arange(h * w, device=y_all.device).repeat(n_views)  # (M,) grid position of each patch
    mean, basis, std = _principal(y_all, settings.rank)
    torch.manual_seed(settings.seed)  # the MLPs' default initialisation
    model = Decomposition((h, w), settings, mean, basis, std).to(y_all.device)
    with torch.no_grad():
        z_all = model.project(y_all)  # (M, k)
        outside = (y_all - model.raw(z_all)).pow(2).sum(1)  # (M,) squared norm outside the subspace
        y_norm = y_all.norm(dim=1)  # (M,)
        mean_dot_y = y_all @ mean  # (M,)
        mean_k = basis.T @ mean / std  # (k,) the mean's principal coordinates (in std units)
        mean_sq = float(mean @ mean)
    optimizer = torch.optim.Adam(
        [{"params": [*model.field.parameters(), model.artifact]}, {"params": model.residual.parameters()}],
        lr=settings.lr, betas=(0.9, 0.99), eps=1e-15,
    )
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    start_residual = int(settings.residual_from * settings.steps)
    scale = std * std / dim  # principal-coordinate squared error -> raw MSE per element
    curve: list[dict] = []
    for step in tqdm(range(settings.steps), desc="stage 1 fit", disable=not progress, leave=False):
        residual_on = step >= start_residual
        if step == start_residual:
            model.artifact.requires_grad_(False)
        for group in optimizer.param_groups:
            group["lr"] = _lr(settings, step)
        index = torch.randint(len(z_all), (settings.batch,), generator=generator).to(y_all.device)  # (B,)
        z = z_all[index]  # (B, k)
        f = model.field(coords[index])  # (B, k)
        g = model.artifact[position[index]]  # (B, k)
        pred = f + g
        if residual_on:
            r = model.residual(z)  # (B, k)
            pred = pred + r.detach()
        mse = (scale * (pred - z).pow(2).sum(1) + outside[index] / dim).mean()
        # cos(mean + std·U·pred, y), exactly: U's columns are orthonormal and y's part outside U is orthogonal to them
        dot = mean_dot_y[index] + std * std * (pred * (z + mean_k)).sum(1)
        pred_norm = (mean_sq + 2 * std * std * (pred @ mean_k) + std * std * pred.pow(2).sum(1)).clamp_min(1e-12).sqrt()
        cos = (dot / (pred_norm * y_norm[index]).clamp_min(1e-12)).mean()
        loss = mse + (1 - cos)
        if residual_on:
            target = (z - f - g).detach()
            loss = loss + settings.residual_weight * scale * (r - target).pow(2).sum(1).mean()
            loss = loss + settings.sparsity * std * r.abs().sum(1).mean() / dim  # L1 of h's coordinates, per feature element
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if not residual_on:
            with torch.no_grad():  # G is defined up to a constant, which belongs to F
                model.artifact -= model.artifact.mean(0, keepdim=True)
        if step % 50 == 0 or step == settings.steps - 1:
            curve.append({"step": step + 1, "loss": float(loss.detach()), "mse": float(mse.detach()), "cos": float(cos.detach())})
    model.eval()
    return model, curve


@dataclass
class Stage1Result:
    """One image's decomposition on its own patch grid, in feature units."""

    raw: torch.Tensor  # (h, w, D) the model's features of the whole image
    clean: torch.Tensor  # (h, w, D) F at the image's patch centres
    artifact: torch.Tensor  # (h, w, D) G, the position-tied artifact
    residual: torch.Tensor  # (h, w, D) h of the raw features (zero when h never switched on)
    settings: dict
    timings: dict
    curve: list[dict] = _field(default_factory=list)
    view_raw: torch.Tensor | None = None  # (K, h, w, D) features of K of the crops (``denoise_image(view_pairs=K)``)
    view_clean: torch.Tensor | None = None  # (K, h, w, D) F at those crops' patch centres: their clean targets

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.raw.shape[:2])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"raw": self.raw, "clean": self.clean, "artifact": self.artifact, "residual": self.residual}

    def summary(self) -> dict:
        """Norms and cosines that say what the decomposition did."""
        raw_norm = self.raw.norm(dim=-1)  # (h, w)
        return {
            "grid": list(self.grid),
            "raw_norm_median": float(raw_norm.float().quantile(0.5)),  # the middle two's mean on an even grid (torch's median: the lower)
            "clean_norm_median": float(self.clean.norm(dim=-1).float().quantile(0.5)),
            "artifact_norm_mean": float(self.artifact.norm(dim=-1).mean()),
            "artifact_relative": float(self.artifact.norm(dim=-1).mean() / raw_norm.mean()),
            "residual_norm_mean": float(self.residual.norm(dim=-1).mean()),
            "cosine_raw_clean": float(F.cosine_similarity(self.raw, self.clean, dim=-1).mean()),
            "final_loss": self.curve[-1]["loss"] if self.curve else None,
        }


def image_pixels(loaded, image: Image.Image | torch.Tensor, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """(1, 3, H, W) model input of ``image``: a PIL image resized to the model's square size (DVT resizes
    to the model's input size too), or a normalised pixel tensor used as it is."""
    if isinstance(image, torch.Tensor):
        pixels = image[None] if image.dim() == 3 else image
        if pixels.dim() != 4 or pixels.shape[0] != 1 or pixels.shape[1] != 3:
            raise SinklessError(f"expected pixels of shape (1, 3, H, W), got {tuple(image.shape)}")
        return pixels
    return to_pixels([image], loaded.image_spec, size=size)


def denoise_image(
    loaded,
    image: Image.Image | torch.Tensor,
    settings: Stage1Settings = Stage1Settings(),
    *,
    progress: bool = False,
    size: int | tuple[int, int] | None = None,
    view_pairs: int = 0,
) -> Stage1Result:
    """Stage 1 on one image (PIL, resized to the model's input size, or a (1, 3, H, W) pixel tensor).

    Runs where the model is (CPU or CUDA); the fit runs on the same device. ``view_pairs``: also return
    the raw features of that many of the crops and F at their patch centres (``view_raw``, ``view_clean``):
    more (raw, clean) pairs for training Stage 2 at no extra forward pass, since every crop sees the
    model's position-tied artifact at its grid positions and F is the image's clean signal wherever it is seen.
    """
    from sinkless.zoo import loaded_from

    loaded = loaded_from(loaded)  # a name or a model object too
    started = time.perf_counter()
    device = model_device(loaded.model)
    read = feature_reader(loaded, settings.features, settings.layer)
    pixels = image_pixels(loaded, image, size).to(device=device, dtype=next(loaded.model.parameters()).dtype)
    patch = loaded.adapter.patch_size(loaded.model)
    if pixels.shape[-1] < patch or pixels.shape[-2] < patch:
        raise SinklessError(f"the image is smaller than one patch ({patch} px)", fix=f"pass images at least {patch} px on each side")
    generator = torch.Generator().manual_seed(settings.seed)
    with tqdm(total=settings.views + 1, desc="stage 1 views", disable=not progress, leave=False) as bar:
        views = make_views(read, pixels, settings.views, generator, scale=settings.scale, ratio=settings.ratio,
                           flip=settings.flip, batch_size=settings.view_batch, amp=settings.amp, progress_bar=bar)
    views_done = time.perf_counter()
    model, curve = fit(views, settings, progress=progress)
    fitted = time.perf_counter()
    raw = views.features[-1]  # (h, w, D) the uncropped view
    full = views.coords[-1]  # (h, w, 2)
    residual = model.residual_of(raw) if settings.residual_from < 1 else torch.zeros_like(raw)
    result = Stage1Result(
        raw.cpu(), model.clean(full).cpu(), model.artifact_map().cpu(), residual.cpu(), settings.to_dict(),
        {"views_s": views_done - started, "fit_s": fitted - views_done, "total_s": time.perf_counter() - started,
         "device": str(device)},
        curve,
    )
    if view_pairs:
        chosen = torch.arange(min(view_pairs, views.features.shape[0] - 1))  # the first crops (random already)
        result.view_raw = views.features[chosen].cpu()
        result.view_clean = model.clean(views.coords[chosen]).cpu()
    log.debug("stage 1: %s", result.summary())
    return result
