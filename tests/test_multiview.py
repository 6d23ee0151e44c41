"""PH-Reg's multi-view teacher, piece by piece: view sampling, rendering, merging back, the fill colours,
the final patch features of each supported layout, and what ``denoise_views`` accepts as a model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers

from sinkless.errors import SinklessError
from sinkless.images import ImageSpec
from sinkless.registers import ViewSettings, denoise_views
from sinkless.registers import multiview
from sinkless.registers.multiview import Views, merge_views, render_views, sample_views

CORNERS = {(2, 2), (2, -2), (-2, 2), (-2, -2)}
EDGES = {(0, 2), (0, -2), (2, 0), (-2, 0)}


# -- settings --------------------------------------------------------------------------------------
def test_shift_for_defaults_to_fifteen_percent_of_the_smaller_side_and_never_a_whole_side():
    default = ViewSettings()
    assert default.shift_for((16, 16)) == 2 and default.shift_for((37, 40)) == 6 and default.shift_for((40, 37)) == 6
    assert default.shift_for((10, 30)) == 2 and default.shift_for((23, 23)) == 3  # round(1.5) = 2, round(3.45) = 3
    assert default.shift_for((1, 5)) == 0  # a one-patch side cannot shift at all
    # an explicit max_shift is kept where it fits, and clipped to one patch less than the smaller side otherwise
    assert ViewSettings(max_shift=3).shift_for((16, 16)) == 3
    assert ViewSettings(max_shift=10).shift_for((4, 6)) == 3 and ViewSettings(max_shift=10).shift_for((9, 5)) == 4
    assert ViewSettings(max_shift=4).shift_for((5, 5)) == 4 and ViewSettings(max_shift=5).shift_for((5, 5)) == 4


# -- sampling --------------------------------------------------------------------------------------
def test_sampled_views_are_farthest_point_spread_from_the_identity():
    """Within ±2 patches, 10 views: the identity, then the 4 corners, then the 4 edge midpoints, then a diagonal
    neighbour, whatever the seed (a pool of 300 random candidates holds all 25 offsets)."""
    for seed in range(6):
        settings = ViewSettings(views=10, max_shift=2, candidates_per_view=30)
        views = sample_views(settings, (8, 12), torch.Generator().manual_seed(seed))
        offsets = [tuple(o) for o in views.offsets.tolist()]
        assert views.offsets.dtype == torch.long and views.offsets.shape == (10, 2), seed
        assert offsets[0] == (0, 0) and not views.flips[0], seed
        assert set(offsets[1:5]) == CORNERS and set(offsets[5:9]) == EDGES, (seed, offsets)
        assert abs(offsets[9][0]) == 1 and abs(offsets[9][1]) == 1, (seed, offsets)
        assert views.max_shift == 2
    # exact for seed 0: ties go to the first candidate drawn; offsets and flips are reproducible
    views = sample_views(ViewSettings(views=10, max_shift=2), (8, 12), torch.Generator().manual_seed(0))
    assert views.offsets.tolist() == [[0, 0], [2, 2], [2, -2], [-2, -2], [-2, 2], [0, 2], [0, -2], [2, 0], [-2, 0], [-1, -1]]
    assert views.flips.tolist() == [False, False, True, True, True, False, True, False, False, False]


def test_sampled_offsets_reach_both_signs_and_stay_within_the_shift():
    for seed in range(3):
        views = sample_views(ViewSettings(views=6, max_shift=3), (20, 20), torch.Generator().manual_seed(seed))
        for axis in (0, 1):
            assert views.offsets[:, axis].max() == 3 and views.offsets[:, axis].min() == -3, (seed, views.offsets.tolist())
        assert len({tuple(o) for o in views.offsets.tolist()}) == 6
    # the default max_shift follows the grid (here round(0.15 × 8) = 1), clipped explicit shifts too
    for settings, grid, bound in ((ViewSettings(views=5), (8, 30), 1), (ViewSettings(views=5, max_shift=9), (3, 3), 2)):
        views = sample_views(settings, grid, torch.Generator().manual_seed(1))
        assert views.offsets.abs().max() == bound and views.offsets.min() == -bound, views.offsets.tolist()


def test_flips_are_random_but_never_view_zero_and_off_when_disabled():
    flipped = sample_views(ViewSettings(views=10, max_shift=2), (8, 8), torch.Generator().manual_seed(1))
    assert flipped.flips.dtype == torch.bool and flipped.flips.shape == (10,)
    assert not flipped.flips[0] and flipped.flips[1:].any() and not flipped.flips[1:].all()
    plain = sample_views(ViewSettings(views=10, max_shift=2, flip=False), (8, 8), torch.Generator().manual_seed(1))
    assert plain.flips.dtype == torch.bool and plain.flips.shape == (10,) and not plain.flips.any()
    assert torch.equal(plain.offsets, flipped.offsets)  # the offsets are drawn first: flips do not change them
    one = sample_views(ViewSettings(views=1, flip=False), (8, 8))
    assert one.offsets.tolist() == [[0, 0]] and one.flips.tolist() == [False]


def test_the_generator_decides_the_views_and_the_default_is_seed_zero():
    settings = ViewSettings(views=6, max_shift=3)
    with torch.random.fork_rng():
        torch.manual_seed(12345)  # the global RNG plays no part
        default = sample_views(settings, (16, 16))
        torch.manual_seed(999)
        again = sample_views(settings, (16, 16))
    seeded = sample_views(settings, (16, 16), torch.Generator().manual_seed(0))
    for other in (again, seeded):
        assert torch.equal(default.offsets, other.offsets) and torch.equal(default.flips, other.flips)
    g = torch.Generator().manual_seed(5)
    first, second = sample_views(settings, (16, 16), g), sample_views(settings, (16, 16), g)
    assert not torch.equal(first.offsets, default.offsets)  # another seed, other views
    assert not torch.equal(first.offsets, second.offsets)  # the generator advances: each image gets its own views
    replay = sample_views(settings, (16, 16), torch.Generator().manual_seed(5))
    assert torch.equal(replay.offsets, first.offsets) and torch.equal(replay.flips, first.flips)


# -- fill colours ----------------------------------------------------------------------------------
def test_fill_values_are_the_colour_in_normalised_units():
    spec = ImageSpec(size=32, mean=(0.5, 0.25, 0.75), std=(0.5, 0.25, 0.125), patch_size=4)
    assert multiview._fill_values("white", spec).tolist() == [1.0, 3.0, 2.0]  # (1 - mean) / std
    assert multiview._fill_values("black", spec).tolist() == [-1.0, -1.0, -6.0]  # (0 - mean) / std
    assert multiview._fill_values("mean", spec).tolist() == [0.0, 0.0, 0.0]


# -- rendering -------------------------------------------------------------------------------------
def _expected_view(image, dy, dx, flip, patch, fill):
    """view[y, x] = image[y + dy·p, x + dx·p] (fill outside the image), then mirrored left-right if flipped."""
    c, height, width = image.shape
    out = fill.to(image).view(c, 1, 1).expand(c, height, width).clone()
    for y in range(height):
        for x in range(width):
            sy, sx = y + dy * patch, x + dx * patch
            if 0 <= sy < height and 0 <= sx < width:
                out[:, y, x] = image[:, sy, sx]
    return out.flip(-1) if flip else out


def test_render_views_shifts_flips_and_fills_the_uncovered_border():
    p, h, w = 2, 3, 4
    pixels = torch.randn(2, 3, h * p, w * p, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fill = torch.tensor([7.0, 8.0, 9.0])
    views = [
        Views(torch.tensor([[0, 0], [1, -1], [-2, 2]]), torch.tensor([False, True, False])),
        Views(torch.tensor([[0, 0], [0, 1], [-1, 0]]), torch.tensor([False, False, True])),
    ]
    rendered = render_views(pixels, views, p, fill)
    assert rendered.shape == (6, 3, h * p, w * p) and rendered.dtype == torch.float64
    for i, image_views in enumerate(views):
        for j, ((dy, dx), flip) in enumerate(zip(image_views.offsets.tolist(), image_views.flips.tolist())):
            assert torch.equal(rendered[3 * i + j], _expected_view(pixels[i], dy, dx, flip, p, fill)), (i, j)
    assert torch.equal(rendered[0], pixels[0]) and torch.equal(rendered[3], pixels[1])  # view 0 is the image
    # view (1, -1) of image 0: the bottom patch row and the left patch column come from outside -> fill colour
    view = rendered[1].flip(-1)  # undo the flip
    assert (view[:, -p:, :] == fill.view(3, 1, 1).double()).all() and (view[:, :, :p] == fill.view(3, 1, 1).double()).all()
    assert torch.equal(view[:, : -p, p:], pixels[0, :, p:, : -p])


# -- merging back ----------------------------------------------------------------------------------
def _positional_field(h, w, d=3):
    """A feature of the absolute patch position: (h, w, d)."""
    r, c = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    return torch.stack([r, c, r * w + c][:d], -1)


def _identity_model_features(field, views, junk=1e6):
    """What an identity "model" gives for one image's views: view j at grid position (r, c) shows image patch
    (r + dy, c + dx) (plus 10·j, to tell the views apart); positions outside the image get junk, which must
    not leak into the merge; a flipped view comes out mirrored. Also Σ 10·j and the count of covering views."""
    h, w, d = field.shape
    k = len(views.offsets)
    per_view = torch.full((k, h, w, d), junk, dtype=field.dtype)
    bonus, cover = torch.zeros(h, w, 1, dtype=field.dtype), torch.zeros(h, w, 1, dtype=field.dtype)
    for j, ((dy, dx), flip) in enumerate(zip(views.offsets.tolist(), views.flips.tolist())):
        for r in range(h):
            for c in range(w):
                if 0 <= r + dy < h and 0 <= c + dx < w:
                    per_view[j, r, c] = field[r + dy, c + dx] + 10 * j
                    bonus[r + dy, c + dx] += 10 * j
                    cover[r + dy, c + dx] += 1
        if flip:
            per_view[j] = per_view[j].flip(1)
    return per_view, bonus, cover


def test_merge_views_maps_each_view_back_and_averages_the_covering_views():
    h, w = 4, 5
    field = _positional_field(h, w)
    views = [
        Views(torch.tensor([[0, 0], [1, -2], [-1, 1], [2, 2]]), torch.tensor([False, True, False, True])),
        Views(torch.tensor([[0, 0], [-2, 0], [0, 3], [-1, -1]]), torch.tensor([False, True, True, False])),
    ]
    made = [_identity_model_features(field, v) for v in views]
    merged = merge_views(torch.stack([m[0] for m in made]), views)  # (2, h, w, 3)
    assert merged.shape == (2, h, w, 3) and merged.dtype == torch.float64
    for i, (_, bonus, cover) in enumerate(made):
        assert cover.min() >= 1 and cover.max() == 4 and cover.min() < 4  # some patches are covered by fewer views
        assert torch.allclose(merged[i], field + bonus / cover, atol=1e-9), i  # each patch: the mean over the views covering it
    # without the 10·j offsets the field itself comes back exactly; each image merges on its own
    alone = merge_views(_identity_model_features(field, views[1])[0][None] - 10 * torch.arange(4.0, dtype=torch.float64).view(1, 4, 1, 1, 1), views[1:])
    assert torch.allclose(alone[0], field, atol=1e-9)
    assert torch.allclose(merge_views(made[1][0][None], views[1:])[0], merged[1], atol=1e-12)


def test_render_then_merge_recovers_a_positional_feature_exactly():
    """Pixels that encode their own patch position, each view's patch 'feature' read as the patch's mean colour
    (flip-invariant inside a patch), merged back: the position field returns exactly, fill and flips undone."""
    p, h, w = 3, 5, 6
    field = _positional_field(h, w)  # (h, w, 3)
    pixels = field.permute(2, 0, 1).repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(0)  # (1, 3, H, W)
    settings = ViewSettings(views=8, max_shift=2)
    views = [sample_views(settings, (h, w), torch.Generator().manual_seed(3))]
    assert views[0].flips.any()
    rendered = render_views(pixels, views, p, torch.full((3,), -1e3))
    per_view = rendered.unfold(2, p, p).unfold(3, p, p).mean((-1, -2)).permute(0, 2, 3, 1).reshape(1, 8, h, w, 3)
    merged = merge_views(per_view, views)
    assert torch.equal(merged[0], field)


# -- the model side --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "family, prefix, post_norm",
    [("vit", 1, False), ("dinov2_with_registers", 3, False), ("clip_vision", 1, True), ("siglip_vision", 0, False), ("dinov3", 3, False)],
)
def test_final_patch_features_of_each_layout_with_a_ragged_image(family, prefix, post_norm):
    """Pixels 2p+5 × 3p+3: the model sees a 2 × 3 grid (the remainder cropped), and the features are the
    final-norm patch tokens, prefix (CLS, registers) dropped; CLIP's final norm is applied to its last state."""
    from conftest import any_tiny_model

    model = any_tiny_model(family)
    p = model.config.patch_size
    pixels = torch.randn(2, 3, 2 * p + 5, 3 * p + 3, generator=torch.Generator().manual_seed(0))
    kwargs = {"interpolate_pos_encoding": True} if family in ("vit", "clip_vision", "siglip_vision") else {}
    with torch.no_grad():
        hidden = model(pixel_values=pixels, **kwargs).last_hidden_state
        if post_norm:
            hidden = model.get_submodule("post_layernorm")(hidden)
        features = multiview.final_patch_features(model, pixels)
    assert hidden.shape[1] == prefix + 6 and features.shape == (2, 6, model.config.hidden_size)
    assert torch.allclose(features, hidden[:, prefix:], atol=1e-5)


def test_final_patch_features_calls_a_model_without_interpolate_pos_encoding_plainly():
    class PlainViT(transformers.ViTModel):  # a wrapper whose forward takes the pixels only
        def forward(self, pixel_values):
            return super().forward(pixel_values, interpolate_pos_encoding=True)

    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=14)
    model = PlainViT(config).eval()
    pixels = torch.randn(1, 3, 28, 42, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = multiview.final_patch_features(model, pixels)
        plain = model(pixels).last_hidden_state[:, 1:]
    assert features.shape == (1, 6, 32) and torch.allclose(features, plain, atol=1e-6)


@pytest.mark.parametrize("thing", [SimpleNamespace(model=torch.nn.Linear(2, 2)), SimpleNamespace(adapter=None), 3])
def test_denoise_views_refuses_what_is_neither_a_model_nor_a_loaded(thing):
    with pytest.raises(SinklessError) as caught:
        denoise_views(thing, torch.zeros(1, 3, 28, 28))
    assert caught.value.problem == f"expected a model or a sinkless Loaded, got {type(thing).__name__}"


def test_denoise_views_of_a_bare_model_reads_pil_images_at_its_configured_size():
    """A HF model without a sinkless Loaded: PIL images are sized by its config and normalised with ImageNet
    statistics (pretrained's rule for a model without a processor), exactly as with that spec passed in."""
    import numpy as np
    from PIL import Image

    from sinkless.images import IMAGENET_MEAN, IMAGENET_STD

    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=56, patch_size=14)
    model = transformers.ViTModel(config, add_pooling_layer=False).eval()
    image = Image.fromarray((np.random.default_rng(0).random((70, 90, 3)) * 255).astype("uint8"))
    settings = ViewSettings(views=3, max_shift=1)
    bare = denoise_views(model, [image], settings)
    spec = ImageSpec(size=56, mean=IMAGENET_MEAN, std=IMAGENET_STD, patch_size=14)
    given = denoise_views(model, [image], settings, image_spec=spec)
    assert bare.shape == (1, 16, 32) and torch.equal(bare, given)
