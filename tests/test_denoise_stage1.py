"""DVT Stage 1: views, the decomposition on hand-made data (G recovers a known pattern), and one real fit."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sinkless.denoise.stage1 import Decomposition, Stage1Settings, _principal, denoise_image, fit
from sinkless.denoise.views import Views, patch_centres, render, sample_boxes
from sinkless.errors import SinklessError


def _synthetic(dim=24, grid=(8, 8), views=16, noise=0.05, seed=0):
    """Hand-made features: a smooth signal of the image position + a fixed pattern of the grid position + noise."""
    g = torch.Generator().manual_seed(seed)
    freqs = torch.randn(2, 6, generator=g) * 2.5  # cycles per image side
    mix = torch.randn(12, dim, generator=g)

    def signal(c):  # (..., 2) -> (..., D)
        angle = 2 * math.pi * c @ freqs
        return torch.cat([angle.sin(), angle.cos()], -1) @ mix + 3.0  # a mean, as real features have

    pattern = torch.randn(*grid, dim, generator=g)
    pattern -= pattern.mean((0, 1))
    boxes = torch.cat([sample_boxes(views, g), torch.tensor([[0.0, 0.0, 1.0, 1.0]])])
    flips = torch.cat([torch.rand(views, generator=g) < 0.5, torch.tensor([False])])
    coords = patch_centres(boxes, flips, grid)
    features = signal(coords) + pattern + noise * torch.randn(views + 1, *grid, dim, generator=g)
    return Views(features, coords, boxes, flips), signal, pattern


def _corr(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.fixture(scope="module")
def synthetic_fit():
    views, signal, pattern = _synthetic()
    model, curve = fit(views, Stage1Settings(steps=300, batch=1024, rank=0, seed=0))
    return views, signal, pattern, model, curve


def test_decomposition_recovers_a_position_tied_pattern(synthetic_fit):
    views, signal, pattern, model, curve = synthetic_fit
    recovered = model.artifact_map()
    corr = _corr(recovered, pattern)
    clean = model.clean(views.coords[-1])
    truth = signal(views.coords[-1])
    cos_clean = float(F.cosine_similarity(clean - 3.0, truth - 3.0, dim=-1).mean())
    cos_raw = float(F.cosine_similarity(views.features[-1] - 3.0, truth - 3.0, dim=-1).mean())
    print(f"corr(G, pattern) = {corr:.3f}; clean vs signal cos {cos_clean:.3f} (raw {cos_raw:.3f}); loss {curve[0]['loss']:.3f} -> {curve[-1]['loss']:.3f}")
    assert corr > 0.9
    assert cos_clean > 0.98 and cos_clean > cos_raw + 0.03
    assert curve[-1]["loss"] < curve[0]["loss"]


def test_no_pattern_gives_a_small_artifact(synthetic_fit):
    views, _, pattern, with_pattern, _ = synthetic_fit
    clean_views = Views(views.features - pattern, views.coords, views.boxes, views.flips)
    model, _ = fit(clean_views, Stage1Settings(steps=300, batch=1024, rank=0))
    small, large = model.artifact_map().norm(dim=-1).mean(), with_pattern.artifact_map().norm(dim=-1).mean()
    print(f"|G| without pattern {small:.3f}, with {large:.3f} (pattern {pattern.norm(dim=-1).mean():.3f})")
    assert small < 0.35 * large


def test_principal_subspace_loss_is_exact():
    """The fit's MSE and cosine, computed from k principal coordinates, equal the full-D ones."""
    torch.manual_seed(0)
    y = torch.randn(50, 16) + torch.linspace(-1, 2, 16)
    mean, basis, std = _principal(y, 6)
    model = Decomposition((5, 10), Stage1Settings(rank=6), mean, basis, std)
    z = model.project(y)
    pred = z + 0.3 * torch.randn_like(z)
    pred_raw = model.raw(pred)
    outside = (y - model.raw(z)).pow(2).sum(1)
    mse = (std * std / 16 * (pred - z).pow(2).sum(1) + outside / 16).mean()
    mean_k = basis.T @ mean / std
    dot = y @ mean + std * std * (pred * (z + mean_k)).sum(1)
    norm = (mean @ mean + 2 * std * std * (pred @ mean_k) + std * std * pred.pow(2).sum(1)).sqrt()
    cos = dot / (norm * y.norm(dim=1))
    assert torch.allclose(mse, F.mse_loss(pred_raw, y), atol=1e-5), float((mse - F.mse_loss(pred_raw, y)).abs())
    assert torch.allclose(cos, F.cosine_similarity(pred_raw, y, dim=-1), atol=1e-5)


def test_views_geometry():
    g = torch.Generator().manual_seed(0)
    boxes = sample_boxes(200, g)
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 1 + 1e-6).all() and (left + w <= 1 + 1e-6).all()
    area = h * w
    assert area.min() >= 0.099 and area.max() <= 0.501
    pixels = torch.randn(1, 3, 28, 42)
    same = render(pixels, torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([False]))
    print(f"identity crop max diff {float((same - pixels).abs().max()):.2e}")
    assert torch.allclose(same, pixels, atol=1e-4)
    flipped = render(pixels, torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([True]))
    assert torch.allclose(flipped, pixels.flip(-1), atol=1e-4)
    centres = patch_centres(torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]), torch.tensor([False, True]), (2, 3))
    assert torch.allclose(centres[0, 0, :, 0], torch.tensor([1 / 6, 0.5, 5 / 6]))
    assert torch.allclose(centres[1, 0, :, 0], torch.tensor([5 / 6, 0.5, 1 / 6]))
    assert torch.allclose(centres[0, :, 0, 1], torch.tensor([0.25, 0.75]))


def test_denoise_image_on_a_tiny_planted_vit():
    from sinkless import zoo

    loaded = zoo.load("planted-vit-tiny")
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    settings = Stage1Settings(views=6, steps=20, batch=256)
    first = denoise_image(loaded, pixels, settings)
    again = denoise_image(loaded, pixels, settings)
    assert first.raw.shape == first.clean.shape == first.artifact.shape == first.residual.shape == (8, 8, 64)
    with torch.no_grad():
        direct = loaded.model(pixels).last_hidden_state[0, 1:].reshape(8, 8, 64)
    print(f"raw vs the model's output: max diff {float((first.raw - direct).abs().max()):.2e}")
    assert torch.allclose(first.raw, direct, atol=1e-5)
    assert torch.equal(first.clean, again.clean)  # seeded
    assert set(first.timings) >= {"views_s", "fit_s", "total_s"}
    keys = denoise_image(loaded, pixels, Stage1Settings(views=4, steps=5, batch=64, features="keys", layer=2))
    assert keys.raw.shape == (8, 8, 64)


def test_bad_settings_are_user_errors():
    with pytest.raises(SinklessError):
        Stage1Settings(views=0)
    with pytest.raises(SinklessError):
        Stage1Settings(lr=float("nan"))
    with pytest.raises(SinklessError):
        Stage1Settings(scale=(0.6, 0.2))


def test_the_summary_medians_are_the_usual_median():
    """An 8 x 8 grid has an even number of patches: the median is the middle two's mean (torch.median gives the lower)."""
    import numpy as np

    from sinkless import zoo
    from sinkless.denoise import Stage1Settings, denoise_image
    from sinkless.images import natural_crops

    result = denoise_image(zoo.load("planted-vit-tiny"), natural_crops(1)[0], Stage1Settings(views=2, steps=3))
    summary = result.summary()
    assert result.raw.shape[0] * result.raw.shape[1] % 2 == 0
    assert summary["raw_norm_median"] == pytest.approx(float(np.median(result.raw.norm(dim=-1).numpy())), rel=1e-6)
    assert summary["clean_norm_median"] == pytest.approx(float(np.median(result.clean.norm(dim=-1).numpy())), rel=1e-6)
