"""PH-Reg self-distillation: the teacher's multi-view denoiser, the training job, exact resume, bad input, CLI, compare."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import io
import json
import math
import os
import re
import types

import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file

import sinkless._io
from sinkless import cli, zoo
from sinkless._io import to_jsonable
from sinkless.adapters import adapter_for
from sinkless.errors import SinklessError
from sinkless.images import IMAGE_SUFFIXES, natural_crops, to_pixels
from sinkless.registers import DistillSettings, ViewSettings, denoise_views, distill, multiview
from sinkless.registers.multiview import final_patch_features, merge_views, render_views, sample_views
from sinkless.training import TrainSettings

distill_module = importlib.import_module("sinkless.registers.distill")  # the package attribute `distill` is the function
FAST = dict(registers=4, steps=6, pool=8, batch_size=2, views=3, checkpoint_every=2, log_every=1)


@pytest.fixture(scope="module")
def tiny():
    return zoo.load("planted-vit-tiny")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for i, image in enumerate(natural_crops(4, seed=11)):
        image.resize((96, 96)).save(folder / f"p{i}.png")
    return folder


def _distill_interrupted_at_step(step, monkeypatch, model, images, out, settings):
    """Run distill and interrupt it (KeyboardInterrupt, as Ctrl-C) when training step ``step`` computes its loss."""
    calls = {"n": 0}
    real = distill_module._feature_loss

    def interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(distill_module, "_feature_loss", interrupt)
    with pytest.raises(KeyboardInterrupt):
        distill(model, images, out, settings, progress=False)
    monkeypatch.setattr(distill_module, "_feature_loss", real)


# -- the multi-view denoiser ---------------------------------------------------------------------
def test_views_identity_first_spread_and_within_range():
    views = sample_views(ViewSettings(views=10, max_shift=3), (16, 16), torch.Generator().manual_seed(0))
    assert views.offsets[0].tolist() == [0, 0] and not views.flips[0]
    assert views.offsets.abs().max() <= 3 and len({tuple(o) for o in views.offsets.tolist()}) == 10  # farthest points are distinct
    assert ViewSettings().shift_for((16, 16)) == 2 and ViewSettings().shift_for((37, 37)) == 6  # PH-Reg: round(0.15 x grid)


def test_views_map_back_onto_the_image_grid():
    """Shift + flip, then merge: a 'feature' that is the image content of each patch comes back exactly."""
    torch.manual_seed(0)
    p, h, w = 4, 5, 6
    pixels = torch.randn(2, 3, h * p, w * p)
    views = [sample_views(ViewSettings(views=6, max_shift=2), (h, w), torch.Generator().manual_seed(s)) for s in (1, 2)]
    assert any(v.flips.any() for v in views)
    fill = torch.full((3,), 1e3)  # far from any pixel: a filled patch would show
    rendered = render_views(pixels, views, p, fill)  # (2·6, 3, H, W)

    def patch_means(x):  # (n, 3, H, W) -> (n, h, w, 3), each patch's mean colour
        return x.unfold(2, p, p).unfold(3, p, p).mean((-1, -2)).permute(0, 2, 3, 1)

    # a patch-level feature that flips with the image: the patch's mean colour (flip-invariant inside a patch)
    per_view = patch_means(rendered).view(2, 6, h, w, 3)
    merged = merge_views(per_view, views)
    diff = (merged - patch_means(pixels)).abs().max().item()
    assert diff < 1e-5, f"max diff {diff:.3g}"


def test_one_view_is_the_plain_forward(tiny):
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    one = denoise_views(tiny, pixels, ViewSettings(views=1))
    with torch.no_grad():
        plain = tiny.model(pixels).last_hidden_state[:, 1:]  # final-norm patch tokens
    diff = (one - plain).abs().max().item()
    assert diff < 1e-5, f"max diff {diff:.3g}"


def test_denoise_views_shapes_determinism_and_untouched_model(tiny):
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    settings = ViewSettings(views=4, max_shift=2)
    a = denoise_views(tiny, pixels, settings, generator=torch.Generator().manual_seed(5))
    b = denoise_views(tiny, pixels, settings, generator=torch.Generator().manual_seed(5), batch_size=3)
    assert a.shape == (3, 64, 64) and torch.allclose(a, b, atol=1e-5)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tiny.model.modules())
    c = denoise_views(tiny.model, list(natural_crops(2, seed=1)), settings)  # PIL images and a bare HF model work too
    assert c.shape == (2, 64, 64)
    with pytest.raises(SinklessError, match="multiples of the patch size"):
        denoise_views(tiny, torch.randn(1, 3, 60, 64), settings)


def test_denoise_views_keys_are_the_last_layer_keys_merged_like_the_features(tiny):
    """``keys=True``: the same features as without, and the last layer's patch keys of every view merged back onto
    the grid exactly as the features are (one view: the plain forward's keys)."""
    from sinkless.hooks import hooks

    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    adapter = tiny.adapter
    site = adapter.key_site(adapter.num_layers(tiny.model) - 1)

    def plain_keys(x):
        with hooks(tiny.model, capture=[site]) as rec, torch.no_grad():
            tiny.model(x)
        return rec[site][:, 1:]  # (n, P, D): CLS dropped

    features, keys = denoise_views(tiny, pixels, ViewSettings(views=1), keys=True)
    assert torch.equal(features, denoise_views(tiny, pixels, ViewSettings(views=1)))
    assert keys.shape == (2, 64, 64) and (keys - plain_keys(pixels)).abs().max().item() < 1e-5  # 8 x 8 patches of 8 px
    settings = ViewSettings(views=4, max_shift=2)
    views = [sample_views(settings, (8, 8), torch.Generator().manual_seed(s)) for s in (1, 2)]
    features, keys = denoise_views(tiny, pixels, settings, views=views, keys=True)
    assert torch.equal(features, denoise_views(tiny, pixels, settings, views=views))
    per_view = plain_keys(render_views(pixels, views, 8, multiview._fill_values("white", tiny.image_spec))).view(2, 4, 8, 8, 64)
    expected = merge_views(per_view, views).flatten(1, 2)
    assert (keys - expected).abs().max().item() < 1e-5
    assert not (keys - plain_keys(pixels)).abs().max().item() < 1e-3  # the views did change them
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tiny.model.modules())


@pytest.mark.parametrize("family", ["dinov2", "dinov2_with_registers", "vit", "clip_vision", "siglip_vision"])
def test_keys_of_every_vision_family(family):
    """``keys=True`` on each supported vision family: one view's keys are the last layer's key projection at the patch
    tokens (CLS and registers dropped, where the family has them), shaped like the features."""
    from conftest import tiny_model
    from sinkless.hooks import hooks

    model = tiny_model(family)
    adapter = adapter_for(model)
    size = getattr(model.config, "vision_config", model.config).image_size  # the configured size: no interpolation
    grid = size // adapter.patch_size(model)
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    features, keys = denoise_views(model, pixels, ViewSettings(views=1), keys=True)
    site = adapter.key_site(adapter.num_layers(model) - 1)
    with hooks(model, capture=[site]) as rec, torch.no_grad():
        model(pixel_values=pixels)
    body = adapter.layout(model, rec[site].shape[1], image_hw=tuple(pixels.shape[-2:])).body
    assert keys.shape == features.shape == (2, grid * grid, features.shape[-1]) and grid > 1
    assert (keys - rec[site][:, body]).abs().max().item() < 1e-5


def test_bad_view_settings():
    for kwargs, message in (({"views": 0}, "views"), ({"max_shift": -1}, "max_shift"), ({"fill": "pink"}, "unknown fill")):
        with pytest.raises(SinklessError, match=message):
            ViewSettings(**kwargs)


def test_view_settings_messages_and_boundaries():
    """Each refusal's exact problem and fix; the smallest accepted values (0 shift, 1 view, 1 candidate) pass."""
    cases = (
        ({"views": 0}, "views must be a whole number >= 1, got 0", "PH-Reg uses 10"),
        ({"views": True}, "views must be a whole number >= 1, got True", "PH-Reg uses 10"),
        ({"views": 2.0}, "views must be a whole number >= 1, got 2.0", "PH-Reg uses 10"),
        ({"max_shift": -1}, "max_shift must be a whole number of patches >= 0, got -1", None),
        ({"max_shift": 1.5}, "max_shift must be a whole number of patches >= 0, got 1.5", None),
        ({"fill": "pink"}, "unknown fill 'pink'", "choose one of " + ", ".join(multiview.FILLS)),
        ({"candidates_per_view": 0}, "candidates_per_view must be >= 1", None),
    )
    for kwargs, problem, fix in cases:
        with pytest.raises(SinklessError) as caught:
            ViewSettings(**kwargs)
        assert caught.value.problem == problem and caught.value.fix == fix, kwargs
    ViewSettings(views=1, max_shift=0, candidates_per_view=1)  # the boundaries themselves are fine
    assert ViewSettings(max_shift=0).shift_for((16, 16)) == 0


@pytest.mark.parametrize("family", ["vit", "dinov2_with_registers"])
def test_final_patch_features_are_the_final_norm_patch_tokens_of_a_non_square_input(family):
    """A 2 x 3 patch grid (the position table interpolated): exactly the patch tokens of last_hidden_state
    (CLS and registers dropped), with autograd when enabled and without it under no_grad."""
    from conftest import tiny_model

    model = tiny_model(family)
    patch = model.config.patch_size
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 2 * patch, 3 * patch)
    extra = 1 + getattr(model.config, "num_register_tokens", 0)
    with torch.no_grad():
        plain = model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state[:, extra:]
        features = multiview.final_patch_features(model, pixels)
    assert features.shape == (1, 6, model.config.hidden_size) and not features.requires_grad
    assert torch.allclose(features, plain, atol=1e-6)
    assert multiview.final_patch_features(model, pixels.requires_grad_()).requires_grad  # a student trains through it


# -- the training job ----------------------------------------------------------------------------
def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_distill_writes_a_loadable_folder_and_log(tmp_path, tiny, photos):
    out = tmp_path / "student"
    result = distill(tiny, photos, out, DistillSettings(**FAST), progress=False, heldout=natural_crops(2, seed=99), heldout_every=3)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["config.json", "distill_log.json", "model.safetensors", "preprocessor_config.json"]
    log = json.loads((out / "distill_log.json").read_text())
    assert log["model"] == "planted-vit-tiny" and log["finished"] and log["steps_done"] == 6
    assert {"loss_curve", "settings", "distill_settings", "data", "seconds", "sinkless_version", "device"} <= set(log)
    assert log["data"]["n_images"] == 4 and len(log["loss_curve"]) == 6
    assert {"loss", "cosine", "mse", "lr"} <= set(log["loss_curve"][0])
    assert [r["step"] for r in log["loss_curve"] if "heldout_cosine" in r] == [3, 6]
    assert log["trainable"]["parts"] == ["registers", "positions", "patch_embed", "blocks"]
    # trained parts moved, frozen parts did not (PH-Reg: registers, positions, patch embedding, last block)
    reloaded = zoo.load(str(out))
    student, teacher = reloaded.model.state_dict(), tiny.model.state_dict()
    last = tiny.adapter.num_layers(tiny.model) - 1
    for name, tensor in teacher.items():
        changed = not torch.equal(student[name], tensor)
        trains = "position_embeddings" in name or "patch_embeddings" in name or name.startswith(f"encoder.layer.{last}.")
        assert changed == trains or (trains and "bias" in name), name
    assert type(reloaded.model).__name__ == "Dinov2WithRegistersModel" and reloaded.adapter.n_registers(reloaded.model) == 4
    assert reloaded.image_spec.size == 64
    plain = transformers.Dinov2WithRegistersModel.from_pretrained(out).eval()
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(plain(pixels).last_hidden_state, reloaded.model(pixels).last_hidden_state)
        assert torch.equal(plain(pixels).last_hidden_state, result.student(pixels).last_hidden_state)


def test_interrupt_and_resume_give_the_same_weights(tmp_path, tiny, photos, monkeypatch):
    settings = DistillSettings(**{**FAST, "steps": 8, "checkpoint_every": 3})
    straight = tmp_path / "straight"
    distill(tiny, photos, straight, settings, progress=False)

    resumed = tmp_path / "resumed"
    _distill_interrupted_at_step(5, monkeypatch, tiny, photos, resumed, settings)
    assert (resumed / ".training" / "checkpoint.pt").exists() and not (resumed / "model.safetensors").exists()
    with pytest.raises(SinklessError, match="unfinished distillation"):
        distill(tiny, photos, resumed, settings, progress=False)
    distill(tiny, photos, resumed, settings, progress=False, resume=True)
    log = json.loads((resumed / "distill_log.json").read_text())
    assert log["resumed_from"] == [3] and log["steps_done"] == 8
    a, b = _weights(straight), _weights(resumed)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff == 0, f"max diff {diff:.3g} between resumed and uninterrupted weights"
    assert not (resumed / ".training").exists()
    # resuming a finished run does nothing; starting over on it is refused
    assert distill(tiny, photos, resumed, settings, progress=False, resume=True).log["steps_done"] == 8
    with pytest.raises(SinklessError, match="already holds a distilled model"):
        distill(tiny, photos, resumed, settings, progress=False)


def test_key_weight_pulls_the_students_keys_towards_the_averaged_keys(tmp_path, tiny, photos, monkeypatch):
    """--key-weight: the teacher's pool gets view-averaged last-layer keys, the loss a key term; the keys of a student
    trained with it end nearer those targets than a features-only student's (same seed, crops and views), its log
    has the key cosine, and an interrupted run resumes to the same weights."""
    seen = {}
    real_targets = distill_module._teacher_targets

    def targets(*args, **kwargs):
        seen["targets"] = real_targets(*args, **kwargs)
        seen["pixels"] = args[1]
        return seen["targets"]

    monkeypatch.setattr(distill_module, "_teacher_targets", targets)
    settings = DistillSettings(**{**FAST, "steps": 30, "pool": 8, "checkpoint_every": 10, "lr": 1e-3, "train": ("registers", "blocks")})
    plain = distill(tiny, photos, tmp_path / "plain", settings, progress=False)
    plain_targets, plain_pixels = seen["targets"], seen["pixels"]
    assert isinstance(plain_targets, torch.Tensor) and "key_cosine" not in plain.log["loss_curve"][-1]
    keyed = distill(tiny, photos, tmp_path / "keyed", dataclasses.replace(settings, key_weight=5.0), progress=False)
    features, key_targets = seen["targets"]  # (M, P, D) each
    assert torch.equal(seen["pixels"], plain_pixels) and torch.equal(features, plain_targets)  # the same crops and feature targets
    row = keyed.log["loss_curve"][-1]
    assert row["loss"] == pytest.approx((1 - row["cosine"]) + row["mse"] + 5.0 * (1 - row["key_cosine"]), abs=1e-5)
    assert keyed.log["distill_settings"]["key_weight"] == 5.0

    def key_cosine(student):
        with torch.no_grad():
            _, keys = final_patch_features(student.model, seen["pixels"], student.adapter, keys=True)
        return torch.nn.functional.cosine_similarity(keys, key_targets, dim=-1).mean().item()

    with torch.no_grad():
        _, teacher_keys = final_patch_features(tiny.model, seen["pixels"], tiny.adapter, keys=True)
    before = torch.nn.functional.cosine_similarity(teacher_keys, key_targets, dim=-1).mean().item()
    after_plain, after_keyed = key_cosine(zoo.load(str(tmp_path / "plain"))), key_cosine(zoo.load(str(tmp_path / "keyed")))
    assert after_keyed > after_plain + 0.01 and after_keyed > before + 0.01, (before, after_plain, after_keyed)

    fresh = distill(tiny, photos, tmp_path / "fresh", dataclasses.replace(settings, key_weight=5.0, pool=0, steps=2), progress=False)
    assert all(0 < row["key_cosine"] <= 1 for row in fresh.log["loss_curve"])  # PH-Reg's fresh targets every step, keys too

    short = dataclasses.replace(settings, key_weight=5.0, steps=8, checkpoint_every=3)
    distill(tiny, photos, tmp_path / "straight", short, progress=False)
    _distill_interrupted_at_step(5, monkeypatch, tiny, photos, tmp_path / "resumed", short)
    distill(tiny, photos, tmp_path / "resumed", short, progress=False, resume=True)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_ttr_teacher_targets_are_the_features_of_the_model_with_test_time_registers(tmp_path, tiny, photos, monkeypatch):
    """--teacher ttr: the pool's targets are the teacher's features with test-time registers on (neurons found on the
    training images, recorded in the log), not the plain model's; the teacher is left exactly as it was; a neurons file
    is used as given, without discovery; the log of a PH-Reg run says its teacher is the original."""
    from sinkless.registers import TestTimeRegisters, load_neurons

    seen = {}
    real_targets = distill_module._teacher_targets

    def targets(*args, **kwargs):
        seen["pixels"], seen["targets"], seen["hooks"] = args[1], real_targets(*args, **kwargs), _hook_count(tiny.model)
        return seen["targets"]

    monkeypatch.setattr(distill_module, "_teacher_targets", targets)
    discovery = importlib.import_module("sinkless.registers.discovery")
    real_discover = discovery.discover

    def discover(*args, **kwargs):
        seen["found"] = real_discover(*args, **kwargs)
        return seen["found"]

    monkeypatch.setattr(discovery, "discover", discover)
    hooks_before, state = _hook_count(tiny.model), copy.deepcopy(tiny.model.state_dict())
    settings = DistillSettings(**{**FAST, "steps": 2, "views": 1, "image_size": 56, "teacher": "ttr", "amp": "off"})
    run = distill(tiny, photos, tmp_path / "ttr", settings, progress=False)
    teacher = run.log["teacher"]
    assert teacher["kind"] == "ttr" and teacher["source"] == "found on 3 of the training images (1 more held out)"
    neurons = {int(layer): ids for layer, ids in teacher["neurons"].items()}
    assert neurons and seen["hooks"] > hooks_before  # the teacher ran with the registers' hooks on
    assert _hook_count(tiny.model) == hooks_before and all(torch.equal(v, state[k]) for k, v in tiny.model.state_dict().items())
    with torch.no_grad():
        plain = final_patch_features(tiny.model, seen["pixels"], tiny.adapter)
        with TestTimeRegisters(tiny, [(layer, n) for layer, ids in neurons.items() for n in ids]):
            fixed = final_patch_features(tiny.model, seen["pixels"], tiny.adapter)
    assert torch.allclose(seen["targets"], fixed, atol=1e-5)  # one view: the fixed model's own features
    assert (seen["targets"] - plain).abs().max() > 1e-2  # ... which differ from the plain model's

    file = seen["found"].save(tmp_path / "neurons.json")  # the file `sinkless fix --out` writes
    assert load_neurons(file).by_layer() == neurons
    monkeypatch.setattr(discovery, "discover", _boom)
    given = distill(tiny, photos, tmp_path / "given", dataclasses.replace(settings, teacher_neurons=str(file)), progress=False)
    assert given.log["teacher"] == {"kind": "ttr", "neurons": teacher["neurons"], "source": str(file)}
    assert torch.allclose(seen["targets"], fixed, atol=1e-5)
    assert distill(tiny, photos, tmp_path / "plain", dataclasses.replace(settings, teacher="original"),
                   progress=False).log["teacher"] == {"kind": "original"}

    hooked = []
    real_views = distill_module.denoise_views

    def views(*args, **kwargs):
        hooked.append(_hook_count(tiny.model) > hooks_before)
        return real_views(*args, **kwargs)

    monkeypatch.setattr(distill_module, "denoise_views", views)
    distill(tiny, photos, tmp_path / "fresh", dataclasses.replace(settings, teacher_neurons=str(file), pool=0, steps=2), progress=False)
    assert hooked == [True, True] and _hook_count(tiny.model) == hooks_before  # PH-Reg's fresh targets every step, fixed too


@pytest.mark.parametrize("family", ["vit", "clip_vision", "siglip_vision"])
def test_distill_a_model_object_of_each_hooked_family_with_the_ttr_teacher(tmp_path, photos, family):
    """A model object (no name, no processor) of each family without a register class distils with the test-time
    register teacher into a folder sinkless loads with its registers; the object is left as it was."""
    from conftest import tiny_model
    from sinkless.pretrained import as_loaded
    from sinkless.registers.ttr import RegisterNeurons

    model = tiny_model(family)
    state, hooks_before = copy.deepcopy(model.state_dict()), _hook_count(model)
    name = as_loaded(model, processor=False).name
    file = RegisterNeurons(model=name, neurons=[{"layer": 0, "neuron": 1, "score": 1.0}], top_k=1).save(tmp_path / "n.json")
    settings = DistillSettings(registers=2, steps=2, pool=2, batch_size=2, views=1, teacher="ttr", teacher_neurons=str(file), amp="off")
    for i, given in enumerate((model, as_loaded(model, processor=False))):  # the bare object; a Loaded with no preprocessing
        run = distill(given, photos, tmp_path / f"out{i}", settings, progress=False)
        assert run.log["teacher"]["neurons"] == {"0": [1]} and math.isfinite(run.log["loss_curve"][-1]["loss"])
        student = zoo.load(str(tmp_path / f"out{i}"))
        assert type(student.model).__name__ == type(model).__name__ and student.adapter.n_registers(student.model) == 2
    # a second stage from the first folder: its registers and weights carried over, only the last block's output trains
    second = distill(model, photos, tmp_path / "second", dataclasses.replace(settings, init=str(tmp_path / "out0"),
                     train=("last_block_out",)), progress=False)
    first, after = zoo.load(str(tmp_path / "out0")).model.state_dict(), second.student.state_dict()
    moved = {k for k in first if not torch.equal(first[k], after[k])}
    assert moved and all(k.startswith(adapter_for(model).block(adapter_for(model).num_layers(model) - 1) + ".") for k in moved)
    assert _hook_count(model) == hooks_before and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_trainable_parts_are_a_setting(tmp_path, tiny, photos):
    out = tmp_path / "all"
    result = distill(tiny, photos, out, DistillSettings(**{**FAST, "steps": 2, "train": ("registers",)}), progress=False)
    assert result.log["trainable"]["parameters"] == 4 * 64
    student, teacher = zoo.load(str(out)).model.state_dict(), tiny.model.state_dict()
    assert all(torch.equal(student[k], v) for k, v in teacher.items())  # only the registers moved
    with pytest.raises(SinklessError, match="unknown trainable parts"):
        DistillSettings(train=("everything",))


def test_default_learning_rate_multipliers_follow_the_trained_parts(monkeypatch):
    """Position and patch embeddings train at 0.1 x lr by default, only where they train; an explicit part_lr replaces that."""
    assert DistillSettings().lr_multipliers() == {"positions": 0.1, "patch_embed": 0.1}
    assert DistillSettings(train=("registers", "blocks", "positions")).lr_multipliers() == {"positions": 0.1}
    assert DistillSettings(train=("registers", "blocks")).lr_multipliers() == {}
    assert DistillSettings(part_lr=(("blocks", 2.0),)).lr_multipliers() == {"blocks": 2.0}
    assert DistillSettings(part_lr=()).lr_multipliers() == {}  # PH-Reg's one learning rate for every part
    assert DistillSettings().register_std == 1e-6 and distill_module.PHOTO_SETTINGS.lr_multipliers() == {"positions": 0.1}


def test_the_multipliers_reach_the_optimiser(tmp_path, tiny, photos, monkeypatch):
    """distill hands train() an lr_scale for every parameter of a slowed part, and none for the others."""
    seen = {}
    real = distill_module.train

    def spy(params, step, settings, out, **kwargs):
        seen.update(kwargs.get("lr_scale") or {})
        return real(params, step, settings, out, **kwargs)

    monkeypatch.setattr(distill_module, "train", spy)
    distill(tiny, photos, tmp_path / "s", DistillSettings(**{**FAST, "steps": 1}), progress=False)
    assert seen and set(seen.values()) == {0.1}
    assert any("position" in name for name in seen) and any("patch" in name for name in seen)
    assert not any("register" in name or "layer" in name for name in seen)


# -- bad input: one clear error, nothing written ---------------------------------------------------
def _cli(capsys, *argv):
    code = cli.main(["distill", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "setup, argv, message",
    [
        ("empty_dir", ["--model", "planted-vit-tiny"], "holds no input files"),
        ("text_file", ["--model", "planted-vit-tiny"], "cannot read"),
        ("photos", ["--model", "minilm-tiny"], "text model"),
        ("photos", ["--model", "bert-folder"], "text model"),
        ("photos", ["--model", "planted-vit-tiny", "--steps", "0"], "--steps must be >= 1"),
        ("photos", ["--model", "planted-vit-tiny", "--checkpoint-every", "0"], "--checkpoint-every must be >= 1"),
        ("photos", ["--model", "planted-vit-tiny", "--registers", "0"], "--registers must be a whole number >= 1"),
        ("photos", ["--model", "planted-vit-tiny", "--lr", "nan"], "--lr must be a positive number"),
        ("photos", ["--model", "planted-vit-tiny", "--mse-weight", "-1"], "--mse-weight must be >= 0"),
        ("photos", ["--model", "planted-vit-tiny", "--key-weight", "-0.5"], "--key-weight must be >= 0"),
        ("photos", ["--model", "planted-vit-tiny", "--key-weight", "inf"], "--key-weight must be >= 0"),
        ("photos", ["--model", "planted-vit-tiny", "--max-shift", "-2"], "--max-shift must be a whole number of patches"),
        ("photos", ["--model", "planted-vit-tiny", "--image-size", "60"], "not a multiple of the patch size"),
        ("photos", ["--model", "planted-vit-tiny", "--part-lr", "positions"], "is not PART=MULTIPLIER"),
        ("photos", ["--model", "planted-vit-tiny", "--train", "registers", "--part-lr", "positions=0.1"], "not among the trained parts"),
        ("photos", ["--model", "planted-vit-tiny", "--part-lr", "positions=-1"], "must be a positive number"),
        ("photos", ["--model", "planted-vit-tiny", "--part-lr", "foo=1"], "'foo' is no part"),
        ("photos", ["--model", "planted-vit-tiny", "--train-all", "--train", "registers"], "--train-all and --train registers both given"),
        ("photos", ["--model", "planted-vit-tiny", "--registers", "65"], "more tokens than the model's 64 patches"),
        ("photos", ["--model", "planted-vit-tiny", "--register-std", "0"], "--register-std must be a positive number"),
        ("photos", ["--model", "planted-vit-tiny", "--teacher-neurons", "n.json"], "the teacher is not 'ttr'"),
        ("photos", ["--model", "planted-vit-tiny", "--teacher", "ttr", "--teacher-neurons", "missing.json"], "register-neurons file not found"),
        ("photos", ["--model", "planted-vit-tiny", "--teacher", "ttr", "--teacher-neurons", "bad.json"], "is not valid JSON"),
        ("one_photo", ["--model", "planted-vit-tiny", "--teacher", "ttr"], "needs at least 2 training images"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, photos, setup, argv, message):
    images = {"photos": photos, "empty_dir": tmp_path / "empty", "text_file": tmp_path / "notes.png", "one_photo": tmp_path / "one"}[setup]
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "one").mkdir()
    Image.open(next(photos.iterdir())).save(tmp_path / "one" / "p.png")
    (tmp_path / "bad.json").write_text("{not json")
    argv = [str(tmp_path / a) if a.endswith(".json") else a for a in argv]
    if "minilm-tiny" in argv or "bert-folder" in argv:
        from conftest import tiny_model

        tiny_model("bert").save_pretrained(tmp_path / "bert")
        argv = [a if a not in ("minilm-tiny", "bert-folder") else str(tmp_path / "bert") for a in argv]
    out = tmp_path / "out"
    code, _, err = _cli(capsys, *argv, "--images", str(images), "--out", str(out), "--pool", "4")
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not out.exists()


def test_unwritable_or_unsupported_out(tmp_path, capsys, photos):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = _cli(capsys, "--model", "planted-vit-tiny", "--images", str(photos), "--out", str(blocker / "sub"))
    assert code == 2 and "cannot be created" in err
    code, _, err = _cli(capsys, "--model", "planted-vit-tiny", "--images", str(photos), "--out", str(blocker))
    assert code == 2 and "not a folder" in err
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("keep")
    code, _, err = _cli(capsys, "--model", "planted-vit-tiny", "--images", str(photos), "--out", str(full))
    assert code == 2 and "not empty" in err and os.listdir(full) == ["mine.txt"]
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o500)
    try:
        if not os.access(readonly, os.W_OK):  # root can write anywhere: skip that half there
            code, _, err = _cli(capsys, "--model", "planted-vit-tiny", "--images", str(photos), "--out", str(readonly / "out"))
            assert code == 2 and "is not writable" in err
    finally:
        readonly.chmod(0o700)


def test_unsupported_family_exits_2(tmp_path, capsys, photos):
    """A vision model sinkless has no adapter for (here a Swin): one error naming the supported ones."""
    config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=2)
    transformers.SwinModel(config).save_pretrained(tmp_path / "swin")
    code, _, err = _cli(capsys, "--model", str(tmp_path / "swin"), "--images", str(photos), "--out", str(tmp_path / "o"))
    assert code == 2 and ("unsupported architecture" in err or "not supported" in err) and "Dinov2Model" in err
    assert not (tmp_path / "o").exists()


# -- the CLI and compare -------------------------------------------------------------------------
def test_cli_end_to_end_and_compare(tmp_path, capsys, photos):
    out = tmp_path / "student"
    code, stdout, err = _cli(capsys, "--model", "planted-vit-tiny", "--images", str(photos), "--out", str(out), "--registers", "4",
                             "--steps", "3", "--views", "3", "--pool", "4", "--batch-size", "2", "--device", "cpu",
                             "--part-lr", "positions=0.1", "--part-lr", "blocks=0.5", "--register-std", "1e-6")
    assert code == 0, err
    assert "wrote" in stdout and (out / "distill_log.json").exists()
    logged = json.loads((out / "distill_log.json").read_text())["distill_settings"]
    assert [tuple(p) for p in logged["part_lr"]] == [("positions", 0.1), ("blocks", 0.5)] and logged["register_std"] == 1e-6
    code, stdout, err = _cli(capsys, "--model", "planted-vit-tiny", "--images", str(photos), "--out", str(out), "--registers", "4",
                             "--steps", "3", "--views", "3", "--pool", "4", "--batch-size", "2", "--device", "cpu",
                             "--part-lr", "positions=0.1", "--part-lr", "blocks=0.5", "--register-std", "1e-6", "--resume")
    assert code == 0 and "nothing written" in stdout and "wrote" not in stdout  # the same job, finished
    second = tmp_path / "second"  # a second stage from the first: --init, and the last block after its attention
    code, stdout, err = _cli(capsys, "--model", "planted-vit-tiny", "--images", str(photos), "--out", str(second), "--registers", "4",
                             "--steps", "2", "--views", "3", "--pool", "4", "--batch-size", "2", "--init", str(out),
                             "--train", "last_block_out,final_norm")
    assert code == 0, err
    logged = json.loads((second / "distill_log.json").read_text())
    assert logged["distill_settings"]["init"] == str(out) and logged["trainable"]["parts"] == ["last_block_out", "final_norm"]
    code, _, err = _cli(capsys, "--model", "planted-vit-tiny", "--images", str(photos), "--out", str(tmp_path / "third"),
                        "--init", str(out), "--steps", "1")  # the first stage had 4 registers, this run 16
    assert code == 2 and "--init" in err and "4 registers" in err and not (tmp_path / "third").exists()
    result = tmp_path / "cmp.json"
    code = cli.main(["compare", "--model", "planted-vit-tiny", "--data", "synthetic", "--limit", "2", "--task", "lost",
                     "--fix", "none", "--fix", "distilled", "--distilled", str(out),
                     "--fix", "registers", "--registers-model", str(out), "--json", str(result)])
    _, err = capsys.readouterr()
    assert code == 0, err
    rows = {r["fix"]: r for r in json.loads(result.read_text())["results"]}
    assert rows["distilled"]["fix_settings"]["n_registers"] == 4 and rows["distilled"]["fix_settings"]["teacher"] == "planted-vit-tiny"
    assert rows["distilled"]["fix_settings"]["targets_from"] == "original"
    assert rows["registers"]["corloc"] == rows["distilled"]["corloc"]  # the same model under two names
    assert rows["registers"]["fix_settings"]["architecture"] == "Dinov2WithRegistersModel"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--fix", "registers"], "--registers-model PATH"),
        (["--fix", "none", "--distilled", "x"], "--distilled applies to --fix distilled"),
        (["--fix", "registers", "--registers-model", "planted-vit-tiny"], "has no register tokens"),
    ],
)
def test_compare_register_flags(tmp_path, capsys, argv, message):
    out = tmp_path / "o.json"
    code = cli.main(["compare", "--model", "planted-vit-tiny", "--data", "synthetic", "--limit", "1", "--task", "lost", *argv, "--json", str(out)])
    _, err = capsys.readouterr()
    assert code == 2 and message in err and not out.exists()


def test_compare_distils_when_no_folder_is_given(tmp_path, monkeypatch, tiny):
    """`--fix distilled` alone: distilled here on bundled photos that are not evaluation images, then cached."""
    from sinkless.tasks import fixes
    from sinkless.tasks.compare import compare

    monkeypatch.setenv("SINKLESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(distill_module, "PHOTO_SETTINGS", DistillSettings(**FAST))
    seen = {}
    real = distill_module.training_photos

    def spy(exclude=()):
        seen["excluded"] = len(exclude)
        seen["photos"] = real(exclude)[:2]
        return seen["photos"]

    monkeypatch.setattr(distill_module, "training_photos", spy)
    runs = []
    real_distill = distill_module.distill
    monkeypatch.setattr(distill_module, "distill", lambda *a, **k: runs.append(1) or real_distill(*a, **k))
    comparison, _ = compare(tiny, "zeroseg", "synthetic", ["none", "distilled"], limit=2, progress=False)
    row = comparison.results[1]
    assert seen["excluded"] == 2 and row.settings["n_registers"] == 4 and "distilled-planted-vit-tiny" in row.settings["distilled"]
    assert fixes.FIXES["distilled"] is fixes._distilled and runs == [1]
    assert row.settings["training_images"] == [name for name, _ in seen["photos"]]  # the log names the bundled photos
    again, _ = compare(tiny, "zeroseg", "synthetic", ["distilled"], limit=2, progress=False)  # from the cache, same model
    assert again.results[0].per_image == row.per_image and runs == [1]


def test_device_flag_resolves(tmp_path, capsys, photos):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the error path is for machines without one")
    code, _, err = _cli(capsys, "--model", "planted-vit-tiny", "--images", str(photos), "--out", str(tmp_path / "o"), "--device", "cuda")
    assert code == 2 and "no CUDA GPU" in err and not (tmp_path / "o").exists()


def test_photo_pool_never_holds_evaluation_images():
    from sinkless.registers import training_photos
    from sinkless.tasks.data import open_dataset

    mini = list(open_dataset("mini").images())
    names = [n for n, _ in training_photos(exclude=mini)]
    assert names and not {"astronaut", "camera", "chelsea", "coffee", "coins", "motorcycle_left", "rocket"} & set(names)
    photo = Image.new("RGB", (50, 40), (10, 20, 30))
    photo.putpixel((3, 3), (255, 255, 255))
    assert len(training_photos(exclude=[photo])) == len(training_photos())


# -- the helpers: crops, bundled photos, data digest, trainable parts, loss, output folder --------


def _coordinates(width, height):
    """An RGB image whose red channel is x, green is y and blue 255: a crop's pixels say where it came from."""
    import numpy as np

    array = np.zeros((height, width, 3), np.uint8)
    array[..., 0] = np.arange(width)[None, :]
    array[..., 1] = np.arange(height)[:, None]
    array[..., 2] = 255
    return Image.fromarray(array)


def _where(crop):
    """(size, left, top, flipped) of a crop of a `_coordinates` image; every pixel must come from inside the image."""
    import numpy as np

    array = np.asarray(crop)
    assert (array[..., 2] == 255).all(), "the crop reaches outside the image"
    xs, ys = array[..., 0].astype(int), array[..., 1].astype(int)
    assert (ys == ys[:, :1]).all() and (np.diff(ys[:, 0]) == 1).all(), "rows are not consecutive image rows"
    steps = set(np.diff(xs[0]).tolist())
    assert steps <= {1} or steps == {-1}, "columns are not consecutive image columns"
    return crop.size, int(xs.min()), int(ys.min()), bool(steps == {-1})


def test_crop_positions_and_sizes_for_a_seed():
    """Seeded crops are reproducible: this exact sequence (side, left, top, flip) from seed 0 of a 120 x 80 image."""
    image = _coordinates(120, 80)
    generator = torch.Generator().manual_seed(0)
    crops = [_where(distill_module._crop(image, (0.35, 1.0), generator)) for _ in range(6)]
    assert crops == [((53, 53), 52, 2, True), ((43, 43), 49, 18, False), ((51, 51), 44, 10, True),
                     ((29, 29), 15, 15, False), ((64, 64), 45, 2, True), ((63, 63), 53, 7, False)]


def test_crops_are_squares_inside_the_image_over_the_scale_range():
    """Side = scale x the shorter side for scale in crop_scale; always inside the image; every position and both
    orientations reachable; flipped about half the time."""
    image = _coordinates(120, 80)
    generator = torch.Generator().manual_seed(1)
    seen = [_where(distill_module._crop(image, (0.35, 1.0), generator)) for _ in range(400)]
    sides = [size[0] for size, *_ in seen]
    assert all(size[0] == size[1] for size, *_ in seen)
    assert all(left + size[0] <= 120 and top + size[0] <= 80 for size, left, top, _ in seen)
    assert 28 <= min(sides) <= 31 and 77 <= max(sides) <= 80  # int(80 x 0.35) = 28 ... 80
    assert 0.4 < sum(flipped for *_, flipped in seen) / len(seen) < 0.6
    # a 10 x 10 image at scale 0.9: side 9, so left and top are 0 or 1, each with and without a flip
    small = _coordinates(10, 10)
    generator = torch.Generator().manual_seed(2)
    seen = {_where(distill_module._crop(small, (0.9, 0.9), generator)) for _ in range(200)}
    assert seen == {((9, 9), left, top, flip) for left in (0, 1) for top in (0, 1) for flip in (False, True)}
    # the whole square image at scale 1, itself or mirrored; at least one pixel however small the scale
    generator = torch.Generator().manual_seed(3)
    whole = {_where(distill_module._crop(_coordinates(7, 7), (1.0, 1.0), generator)) for _ in range(40)}
    assert whole == {((7, 7), 0, 0, False), ((7, 7), 0, 0, True)}
    tiny_crops = {distill_module._crop(_coordinates(3, 3), (0.35, 0.35), generator).size for _ in range(20)}
    assert tiny_crops == {(1, 1)}


def test_a_flip_draw_of_exactly_one_half_does_not_flip():
    """The flip is u < 0.5: seed 243 advanced by 110617 draws gives a crop whose flip draw is exactly 0.5."""
    generator = torch.Generator().manual_seed(243)
    torch.rand(110_617, generator=generator)
    probe = torch.Generator()
    probe.set_state(generator.get_state())
    assert torch.rand(4, generator=probe)[3].item() == 0.5
    assert _where(distill_module._crop(_coordinates(40, 30), (0.5, 0.5), generator))[3] is False


def test_crops_sample_the_images_at_the_requested_size(tiny):
    """`_crops`: n crops of the given images, resized to `size` (not the model's input size) and normalised."""
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    images = [Image.new("RGB", (40 + 10 * i, 30), colour) for i, colour in enumerate(colours)]
    spec = tiny.image_spec
    settings = DistillSettings()
    pixels = distill_module._crops(images, 9, settings, spec, 24, torch.Generator().manual_seed(0))
    assert pixels.shape == (9, 3, 24, 24) and spec.size != 24
    mean, std = torch.tensor(spec.mean).view(3, 1, 1), torch.tensor(spec.std).view(3, 1, 1)
    rgb = (pixels * std + mean) * 255  # back to 0..255: each crop one of the solid colours
    picked = {tuple(round(v) for v in crop.mean((1, 2)).tolist()) for crop in rgb}
    assert picked <= set(colours) and len(picked) >= 2
    again = distill_module._crops(images, 9, settings, spec, 24, torch.Generator().manual_seed(0))
    assert torch.equal(pixels, again)


@pytest.fixture(scope="module")
def bundled():
    return distill_module.training_photos()


def test_training_photos_are_the_bundled_rgb_photos(bundled):
    import numpy as np

    assert [name for name, _ in bundled] == list(distill_module.TRAINING_PHOTOS)
    photos = dict(bundled)
    assert all(image.mode == "RGB" for image in photos.values())
    assert photos["brick"].size == (512, 512) and photos["text"].size == (448, 172) and photos["page"].size == (384, 191)
    assert photos["grace_hopper"].size == (512, 600) and photos["hubble_deep_field"].size == (1000, 872)
    for name in ("brick", "text", "moon"):  # grayscale sample images: three equal channels
        array = np.asarray(photos[name])
        assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all(), name
    hopper = np.asarray(photos["grace_hopper"])  # the colour photo from matplotlib, as RGB
    assert hopper[0, 0].tolist() == [21, 24, 77] and not (hopper[..., 0] == hopper[..., 2]).all()


def test_training_photos_leave_out_the_evaluation_images(bundled, caplog):
    import logging

    import numpy as np

    photos = dict(bundled)
    noisy = np.asarray(photos["grace_hopper"]).astype(int) + np.random.default_rng(0).integers(-8, 9, (600, 512, 3))
    evaluation = [photos["moon"].resize((300, 300)), Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)),
                  Image.new("RGB", (64, 64), (90, 90, 90))]
    caplog.set_level(logging.INFO, logger=distill_module.__name__)
    names = [name for name, _ in distill_module.training_photos(exclude=evaluation)]
    assert names == [n for n in distill_module.TRAINING_PHOTOS if n not in ("moon", "grace_hopper")]
    assert "left out 2 training photos" in caplog.text


def test_training_photos_skip_an_unavailable_one_and_drop_alpha(monkeypatch, caplog):
    """A sample file this installation lacks is skipped, the rest still come; an RGBA array loses its alpha."""
    import logging

    import numpy as np
    from skimage import data

    def missing():
        raise OSError("not downloaded")

    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 7
    monkeypatch.setattr(data, "moon", missing)
    monkeypatch.setattr(data, "brick", lambda: rgba)
    caplog.set_level(logging.INFO, logger=distill_module.__name__)
    photos = dict(distill_module.training_photos())
    assert list(photos) == [n for n in distill_module.TRAINING_PHOTOS if n != "moon"]
    assert photos["brick"].mode == "RGB" and np.asarray(photos["brick"])[0, 0].tolist() == [200, 0, 0]
    assert "left out" not in caplog.text  # nothing was excluded


def test_thumbnail_is_a_normalised_32px_bilinear_grayscale():
    import numpy as np

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    thumb = distill_module._thumb(image)
    assert thumb.shape == (1024,) and thumb.dtype == np.float32
    gray = np.asarray(image.convert("L").resize((32, 32), Image.BILINEAR), dtype=np.float64).ravel()
    assert np.allclose(thumb, (gray - gray.mean()) / gray.std(), rtol=1e-4, atol=1e-5)
    # nearly flat: one grey level of difference in a 32 x 32 image is still normalised to unit spread
    dot = np.zeros((32, 32), np.uint8)
    dot[5, 7] = 1
    values = dot.astype(np.float64).ravel()
    expected = (values - values.mean()) / (values.std() + 1e-6)
    assert np.allclose(distill_module._thumb(Image.fromarray(dot)), expected, rtol=1e-5, atol=0)
    flat = distill_module._thumb(Image.new("RGB", (20, 20), (50, 60, 70)))  # flat: all zeros, not NaN
    assert np.isfinite(flat).all() and (flat == 0).all()


def test_same_is_a_thumbnail_correlation_above_0_95():
    import numpy as np

    same = distill_module._same
    a = np.array([1.0, 1.0, -1.0, -1.0])
    b = np.array([1.5, 0.5, -0.5, -1.5]) / np.sqrt(1.25)  # correlation 0.894
    assert not same(a, b) and same(a, a) and not same(a, -a)
    ones = np.ones(20)
    assert not same(ones, np.r_[np.ones(19), 0.0])  # exactly 0.95 is not enough
    assert same(ones, np.r_[np.ones(19), 0.02])  # 0.951
    rng = np.random.default_rng(1)
    photo = Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8)).resize((96, 96), Image.BICUBIC)
    thumb = distill_module._thumb(photo)
    assert same(thumb, distill_module._thumb(photo.resize((60, 60))))  # the same image at another size
    assert not same(thumb, distill_module._thumb(Image.fromarray(255 - np.asarray(photo))))  # its negative
    assert not same(thumb, distill_module._thumb(photo.transpose(Image.FLIP_LEFT_RIGHT)))


def test_identity_digest_is_stable_and_tells_data_sets_apart():
    """The digest a checkpoint's job key holds: fixed for fixed pixels (so old checkpoints resume), changed by
    a pixel, the order, or an image's size."""
    import numpy as np

    noise = Image.fromarray(np.random.default_rng(5).integers(0, 256, (48, 40, 3), dtype=np.uint8))  # 40 x 48
    images = [_coordinates(48, 40), noise]
    digest = distill_module._identity(images)
    assert digest == "504064123d391939" and len(digest) == 16
    assert distill_module._identity([im.copy() for im in images]) == digest
    assert distill_module._identity(images[::-1]) != digest
    changed = images[0].copy()
    changed.putpixel((20, 20), (0, 0, 0))
    assert distill_module._identity([changed, images[1]]) != digest
    grey = [Image.new("RGB", (64, 64), (9, 9, 9))]
    assert distill_module._identity(grey) != distill_module._identity([Image.new("RGB", (32, 32), (9, 9, 9))])


def test_trainable_parameters_of_each_part(tiny):
    from sinkless.adapters import adapter_for
    from sinkless.registers.add import add_registers

    student = add_registers(tiny.model, 2, std=1e-6, seed=0)
    adapter = adapter_for(student)
    everything = dict(student.named_parameters())

    def chosen(parts, *blocks):
        params = distill_module.trainable_parameters(student, adapter, parts, *blocks)
        assert all(p is everything[name] for name, p in params.items())
        assert {n for n, p in student.named_parameters() if p.requires_grad} == set(params)  # the rest frozen
        return set(params)

    def layer(i):
        return {n for n in everything if n.startswith(f"encoder.layer.{i}.")}

    assert chosen(["registers"]) == {"embeddings.register_tokens"}
    assert chosen(["positions"]) == {"embeddings.position_embeddings"}
    assert chosen(["patch_embed"]) == {"embeddings.patch_embeddings.projection.weight", "embeddings.patch_embeddings.projection.bias"}
    assert chosen(["final_norm"]) == {"layernorm.weight", "layernorm.bias"}
    assert chosen(["blocks"]) == layer(3) and len(layer(3)) == 18  # the last block by default
    assert chosen(["blocks"], 2) == layer(2) | layer(3)
    assert chosen(["registers", "blocks"], 4) == {"embeddings.register_tokens"} | layer(0) | layer(1) | layer(2) | layer(3)
    assert chosen(["all"]) == set(everything)
    assert chosen(["last_block"]) == layer(3)  # the last block alone, whatever --train-blocks says
    assert chosen(["blocks", "last_block"], 3) == layer(1) | layer(2) | layer(3)
    parts = distill_module._trainable(student, adapter, ["blocks", "last_block"], 3)  # the last block is its own part
    assert {n for n, (_, part) in parts.items() if part == "last_block"} == layer(3)
    assert {n for n, (_, part) in parts.items() if part == "blocks"} == layer(1) | layer(2)
    with pytest.raises(SinklessError, match="train_blocks=5 but the model has 4 blocks"):
        distill_module.trainable_parameters(student, adapter, ["blocks"], 5)


@pytest.mark.parametrize("family", ["dinov2_with_registers", "vit", "clip_vision", "siglip_vision"])
def test_last_block_out_leaves_what_the_last_attention_reads_frozen(family):
    """last_block_out: the last block except the pre-attention norm and q/k/v; training it moves the features but not
    the last layer's queries, keys or values (so neither its attention)."""
    from conftest import tiny_model as make_tiny
    from sinkless.hooks import hooks
    from sinkless.registers.add import add_registers

    torch.manual_seed(0)
    student = add_registers(make_tiny(family), 2, std=0.02, seed=0)
    adapter = adapter_for(student)
    last = adapter.num_layers(student) - 1
    block = adapter.block(last)
    chosen = set(distill_module.trainable_parameters(student, adapter, ["last_block_out"]))
    reads = {n for n in dict(student.named_parameters()) if n.startswith(block + ".")} - chosen
    assert len(reads) == 8 and all(any(f".{q}." in n for q in (*adapter.qkv, *distill_module.PRE_ATTENTION_NORMS)) for n in reads)
    assert any("fc1" in n for n in chosen) and all(n.startswith(block + ".") for n in chosen)
    sites = [adapter.query_site(last), adapter.key_site(last), adapter.value_site(last), adapter.residual_site(last)]
    size = getattr(student.config, "vision_config", student.config).image_size
    pixels = torch.randn(2, 3, size, size)

    def seen():
        with torch.no_grad(), hooks(student, capture=sites) as rec:
            student(pixel_values=pixels)
        return [rec[s].clone() for s in sites]

    before = seen()
    with torch.no_grad():
        for name in chosen:
            dict(student.named_parameters())[name].add_(0.5)
    after = seen()
    for a, b in zip(before[:3], after[:3]):
        assert torch.equal(a, b)
    assert not torch.allclose(before[3], after[3])


def test_init_starts_the_student_from_a_finished_folder(tmp_path, tiny, photos):
    first = tmp_path / "first"
    distill(tiny, photos, first, DistillSettings(**FAST), progress=False)
    settings = DistillSettings(**{**FAST, "steps": 2}, train=("last_block_out", "final_norm"), init=str(first))
    result = distill(tiny, photos, tmp_path / "second", settings, progress=False)
    a, b = _weights(first), _weights(tmp_path / "second")
    moved = {k for k in a if not torch.equal(a[k], b[k])}
    assert moved and all(k.startswith("encoder.layer.3.") or k.startswith("layernorm.") for k in moved)
    assert not any(re.search(r"attention\.(query|key|value)\.|\.norm1\.", k) for k in moved)  # saved under HF's names
    assert any("output.dense" in k for k in moved) and any("fc1" in k for k in moved)
    assert result.log["distill_settings"]["init"] == str(first)
    # the student really started from the folder: everything frozen is the first stage's, not the model's
    assert torch.equal(b["embeddings.register_tokens"], a["embeddings.register_tokens"])
    plain = tiny.model.state_dict()["encoder.layer.3.attention.k_proj.weight"]
    stage2 = zoo.load(str(tmp_path / "second")).model.state_dict()["encoder.layer.3.attention.k_proj.weight"]
    assert torch.equal(stage2, zoo.load(str(first)).model.state_dict()["encoder.layer.3.attention.k_proj.weight"])
    assert not torch.equal(stage2, plain)  # the first stage's keys, kept


def test_init_of_another_shape_is_refused_before_anything_is_written(tmp_path, tiny, photos):
    first = tmp_path / "first"
    distill(tiny, photos, first, DistillSettings(**{**FAST, "steps": 1}), progress=False)
    out = tmp_path / "second"
    with pytest.raises(SinklessError, match="4 registers that does not fit this run's student.*3 registers") as error:
        distill(tiny, photos, out, DistillSettings(**{**FAST, "registers": 3}, init=str(first)), progress=False)
    assert "same --model" in error.value.fix and not out.exists()
    with pytest.raises(SinklessError, match="^--init: .*not a model folder"):
        distill(tiny, photos, out, DistillSettings(**FAST, init=str(tmp_path / "missing")), progress=False)
    assert not out.exists()
    with pytest.raises(SinklessError, match="init must be the path"):
        DistillSettings(init="  ")


def test_feature_loss_is_one_minus_cosine_plus_weighted_mse():
    """Cosine over the feature dimension per patch (tiny vectors too), averaged; MSE over every element."""
    student = torch.tensor([[[3.0, 4.0], [0.01, 0.0]], [[0.0, 2.0], [1.0, 1.0]]], requires_grad=True)  # (B=2, P=2, D=2)
    target = torch.tensor([[[4.0, 3.0], [0.0, 0.02]], [[0.0, 1.0], [1.0, -1.0]]])
    out = distill_module._feature_loss(student, target, 2.0)
    cosine = (0.96 + 0.0 + 1.0 + 0.0) / 4
    mse = (1 + 1 + 0.0001 + 0.0004 + 0 + 1 + 0 + 4) / 8
    assert out["cosine"].item() == pytest.approx(cosine, abs=1e-6) and out["mse"].item() == pytest.approx(mse, abs=1e-6)
    assert out["loss"].item() == pytest.approx(1 - cosine + 2 * mse, abs=1e-6)
    assert out["loss"].requires_grad and not out["cosine"].requires_grad and not out["mse"].requires_grad
    keyed = distill_module._feature_loss(student, target, 2.0, student.flip(-1), target, 3.0)  # keys: cosines 1, 1, 0, 0
    key_cosine = (1.0 + 1.0 + 0.0 + 0.0) / 4
    assert keyed["key_cosine"].item() == pytest.approx(key_cosine, abs=1e-6) and not keyed["key_cosine"].requires_grad
    assert keyed["loss"].item() == pytest.approx(1 - cosine + 2 * mse + 3 * (1 - key_cosine), abs=1e-6)
    assert "key_cosine" not in out
    tiny = torch.full((1, 3, 4), 0.01)  # norms far below 1: still a cosine of exactly 1 for equal directions
    assert distill_module._feature_loss(tiny, tiny * 0.5, 0.0)["loss"].item() == pytest.approx(0.0, abs=1e-6)
    same = distill_module._feature_loss(target.to(torch.bfloat16), target.to(torch.bfloat16).float(), 1.0)
    assert same["loss"].dtype == torch.float32 and same["loss"].item() == pytest.approx(0.0, abs=1e-6)


def test_write_folder_writes_model_preprocessor_and_log(tmp_path, tiny):
    from transformers import AutoImageProcessor

    from sinkless.images import ImageSpec
    from sinkless.registers.add import add_registers

    student = add_registers(tiny.model, 2, std=1e-6, seed=0).eval()
    spec = ImageSpec(size=64, mean=(0.5, 0.25, 0.125), std=(0.5, 0.75, 1.0), patch_size=8)
    provenance = {"teacher": "planted-vit-tiny", "registers": 2, "steps": 7, "sinkless_version": "9.9"}
    log_data = {"job": "distill", "loss_curve": [{"step": 1, "loss": 0.5}], "seconds": {"training": 1.25}}
    out = tmp_path / "model"
    distill_module._write_folder(student, out, spec, 48, provenance, log_data)
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "distill_log.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["sinkless_distill"] == provenance
    assert json.loads((out / "distill_log.json").read_text()) == log_data
    expected = {
        "image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": 48},
        "do_center_crop": True, "crop_size": {"height": 48, "width": 48}, "resample": 3, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.25, 0.125], "image_std": [0.5, 0.75, 1.0],
        "do_convert_rgb": True,
    }
    assert (out / "preprocessor_config.json").read_text() == json.dumps(expected, indent=2) + "\n"  # readable, as transformers writes
    processor = AutoImageProcessor.from_pretrained(out)
    assert type(processor).__name__.startswith("BitImageProcessor") and processor.resample == Image.BICUBIC
    assert processor.size == {"shortest_edge": 48} and processor.crop_size == {"height": 48, "width": 48}
    assert processor.do_resize and processor.do_center_crop and processor.do_rescale
    pixels = processor(Image.new("RGB", (96, 64), (255, 255, 255)), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 48, 48) and torch.allclose(pixels[0, :, 0, 0], torch.tensor([1.0, 1.0, 0.875]))


# -- step by step: settings validation, the --out checks, image loading, the pool's epoch order, and what one
# tiny distillation passes on, computes, logs and cleans up ------------------------------------------------------
def _refused(problem, fix, **kwargs):
    with pytest.raises(SinklessError) as caught:
        DistillSettings(**kwargs)
    assert (caught.value.problem, caught.value.fix) == (problem, fix), kwargs


# -- settings ------------------------------------------------------------------------------------
def test_each_refused_setting_names_itself_and_the_boundaries_pass():
    whole = "{} must be a whole number >= {}, got {}"
    for name, low, bad in (("registers", 1, 0), ("batch_size", 1, 0), ("pool", 0, -1), ("train_blocks", 1, 0), ("image_size", 1, 0)):
        _refused(whole.format(name, low, bad), None, **{name: bad})
        _refused(whole.format(name, low, "2.0"), None, **{name: 2.0})
        _refused(whole.format(name, low, "True"), None, **{name: True})
        DistillSettings(**{name: low})  # the boundary itself is accepted
    for name in ("lr", "final_lr"):
        for bad in (0, -1e-4, math.inf, math.nan, "1e-4"):
            _refused(f"{name} must be a positive number, got {bad!r}", None, **{name: bad})
    for bad in (0, -1.0, math.inf):
        _refused(f"register_std must be a positive number, got {bad!r}", None, register_std=bad)
    for bad in (-1.0, math.inf, math.nan):
        _refused(f"mse_weight must be >= 0, got {bad!r}", None, mse_weight=bad)
    assert DistillSettings(mse_weight=0).mse_weight == 0 and DistillSettings(mse_weight=0.5).mse_weight == 0.5
    for bad in (-1.0, math.inf, math.nan, True, "1"):
        _refused(f"key_weight must be >= 0, got {bad!r}", None, key_weight=bad)
    assert DistillSettings().key_weight == 0 and DistillSettings(key_weight=2).key_weight == 2
    for bad in ("TTR", "views", None):
        _refused(f"unknown teacher {bad!r}", "choose from original, ttr", teacher=bad)
    _refused("teacher_neurons is given but the teacher is not 'ttr'", "set teacher='ttr' (--teacher ttr), or drop the neurons file",
             teacher_neurons="n.json")
    assert DistillSettings(teacher="ttr", teacher_neurons="n.json").teacher_neurons == "n.json"  # read when the run starts
    for bad in ((0.0, 1.0), (0.5, 1.5), (0.6, 0.5), (-0.1, 0.5)):
        _refused(f"crop_scale must satisfy 0 < low <= high <= 1, got {bad}", None, crop_scale=bad)
    DistillSettings(crop_scale=(0.5, 0.5))
    DistillSettings(crop_scale=(1.0, 1.0))
    DistillSettings(register_std=None)
    parts = "choose from registers, positions, patch_embed, blocks, last_block, last_block_out, final_norm, all"
    _refused("unknown trainable parts ['wings']", parts, train=("registers", "wings"))
    _refused("unknown trainable parts (none given)", parts, train=())
    _refused("part_lr names 'all', which is not among the trained parts ['all']",
             "--part-lr takes a part's name (registers, positions, patch_embed, blocks, last_block, last_block_out, final_norm), not all",
             train=("all",), part_lr=(("all", 0.5),))
    _refused("part_lr names 'positions', which is not among the trained parts ['registers']",
             "add positions to --train, or give --part-lr only for registers", train=("registers",), part_lr=(("positions", 0.5),))
    for bad in (0, -1, math.inf):
        _refused(f"the learning-rate multiplier of positions must be a positive number, got {bad!r}", None, part_lr=(("positions", bad),))
    with pytest.raises(SinklessError, match="unknown --amp 'fast'"):
        DistillSettings(amp="fast")
    with pytest.raises(SinklessError, match="views"):
        DistillSettings(views=0)  # the view settings are checked too
    with pytest.raises(SinklessError, match="steps"):
        DistillSettings(steps=0)  # ... and the training loop's


def test_train_and_view_settings_pass_every_field_on():
    s = DistillSettings(steps=7, lr=2e-4, final_lr=1e-5, schedule="linear", weight_decay=0.03, grad_clip=1.5, seed=9,
                        checkpoint_every=3, log_every=2, views=4, max_shift=2, fill="black")
    common = dict(steps=7, lr=2e-4, final_lr=1e-5, schedule="linear", weight_decay=0.03, grad_clip=1.5, seed=9,
                  checkpoint_every=3, log_every=2)
    assert s.train_settings(True) == TrainSettings(amp=True, cpu_amp=True, **common)
    plain = s.train_settings()
    assert plain == TrainSettings(amp=False, cpu_amp=False, **common) and plain.amp is False and plain.cpu_amp is False
    assert s.view_settings() == ViewSettings(views=4, max_shift=2, fill="black")
    assert DistillSettings().train_settings().grad_clip is None  # PH-Reg clips nothing (the loop's default would clip at 1)


def test_register_std_default_is_one_over_sqrt_width(tiny):
    assert distill_module._register_std(DistillSettings(register_std=0.25), tiny.model) == 0.25
    assert distill_module._register_std(DistillSettings(register_std=None), tiny.model) == pytest.approx(64 ** -0.5)  # width 64


def test_epoch_indices_are_seeded_permutations_of_the_pool():
    s = DistillSettings(pool=5, batch_size=3, seed=2)
    steps = [distill_module._epoch_indices(t, s) for t in range(5)]
    assert all(len(index) == 3 for index in steps)
    flat = torch.cat(steps)  # 15 samples: three epochs, batches crossing the epoch boundaries
    for epoch in range(3):
        expected = torch.randperm(5, generator=torch.Generator().manual_seed(2 * 104_729 + epoch))
        assert flat[epoch * 5:(epoch + 1) * 5].tolist() == expected.tolist()
    assert torch.equal(distill_module._epoch_indices(3, s), steps[3])  # no state: the same step gives the same batch
    other = torch.cat([distill_module._epoch_indices(t, DistillSettings(pool=5, batch_size=3, seed=3)) for t in range(5)])
    assert not torch.equal(flat, other)


def test_trainable_default_is_the_last_block(tiny):
    student = distill_module.add_registers(tiny.model, 2)
    adapter = adapter_for(student)
    chosen = distill_module._trainable(student, adapter, ["blocks"])
    last = adapter.num_layers(student) - 1
    assert chosen and all(name.startswith(adapter.block(last) + ".") and part == "blocks" for name, (_, part) in chosen.items())


# -- --out -------------------------------------------------------------------------------------------
def _out_error(out, resume=False):
    with pytest.raises(SinklessError) as caught:
        distill_module._check_out(out, resume)
    return caught.value.problem, caught.value.fix


def test_check_out_refusals_and_resume_rules(tmp_path, monkeypatch):
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    assert _out_error(afile) == (f"--out {afile} is an existing file, not a folder", "choose a folder for --out (it is created if missing)")
    inside = afile / "sub"
    assert _out_error(inside) == (f"--out {inside} cannot be created: {afile} is a file, not a folder", "choose another folder for --out")

    done = tmp_path / "done"
    done.mkdir()
    (done / distill_module.LOG_NAME).write_text("{}")
    (done / "config.json").write_text("{}")
    assert _out_error(done) == (f"{done} already holds a distilled model", "choose a new --out folder (or pass --resume to keep it)")
    assert distill_module._check_out(done, True) is True

    half = tmp_path / "half"  # a log but no model: not finished, and nothing to resume either
    half.mkdir()
    (half / distill_module.LOG_NAME).write_text("{}")
    assert _out_error(half) == (f"--out {half} is not empty",
                                "choose a new or empty folder: the model files would mix with what is there")
    assert _out_error(half, resume=True) == (f"--out {half} is not empty and holds no distillation to resume",
                                             "choose a new or empty folder: the model files would mix with what is there")
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    (only_config / "config.json").write_text("{}")
    assert _out_error(only_config)[0] == f"--out {only_config} is not empty"

    unfinished = tmp_path / "unfinished"
    (unfinished / distill_module.STATE_DIR).mkdir(parents=True)
    assert _out_error(unfinished) == (f"{unfinished} holds an unfinished distillation",
                                      "pass --resume to continue it, or choose a new --out folder")
    assert distill_module._check_out(unfinished, True) is False

    empty = tmp_path / "empty"
    empty.mkdir()
    assert distill_module._check_out(empty, False) is False and distill_module._check_out(tmp_path / "new" / "deep", False) is False

    # a folder we may not write into (simulated: the tests may run as root, which may write anywhere)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_probe = sinkless._io._creation_error
    monkeypatch.setattr(sinkless._io, "_creation_error",
                        lambda folder: PermissionError(13, "Permission denied") if str(folder) == str(locked) else real_probe(folder))
    for out in (locked, locked / "new"):
        assert _out_error(out) == (f"--out {out} cannot be written: folder {locked} is not writable (Permission denied)",
                                   "choose a writable location for --out")
    assert distill_module._check_out(empty, False) is False


# -- images --------------------------------------------------------------------------------------------
def test_load_images_errors_order_and_pil(tmp_path, photos):
    for empty in ([], None, ()):
        with pytest.raises(SinklessError) as caught:
            distill_module.load_images(empty)
        assert (caught.value.problem, caught.value.fix) == (
            "no training images given", "pass --images DIR_OR_GLOB with natural photographs (not your evaluation images)")
    note = tmp_path / "notes.txt"
    note.write_text("x")
    with pytest.raises(SinklessError) as caught:
        distill_module.load_images([note])
    assert (caught.value.problem, caught.value.fix) == (f"no image files in [{str(note)!r}]", f"pass files ending in {', '.join(IMAGE_SUFFIXES)}")
    with pytest.raises(SinklessError) as caught:
        distill_module.load_images(tmp_path)  # a folder with no images: named by the path expansion
    assert caught.value.problem == f"directory {tmp_path} holds no input files"

    images, names = distill_module.load_images(photos)
    assert names == [str(photos / f"p{i}.png") for i in range(4)] and all(im.mode == "RGB" and im.size == (96, 96) for im in images)
    images, names = distill_module.load_images(str(photos / "p1.png"))
    assert names == [str(photos / "p1.png")] and len(images) == 1
    gray, rgba = Image.new("L", (8, 8), 7), Image.new("RGBA", (9, 9), (1, 2, 3, 4))
    images, names = distill_module.load_images([gray, rgba])
    assert names == ["image0", "image1"] and [im.mode for im in images] == ["RGB", "RGB"] and images[1].size == (9, 9)
    images, names = distill_module.load_images([("brick", gray), ("moon", rgba)])  # named pairs (compare's bundled photos)
    assert names == ["brick", "moon"] and [im.mode for im in images] == ["RGB", "RGB"] and images[0].size == (8, 8)


# -- one tiny distillation, watched --------------------------------------------------------------------
class _Clock:
    def __init__(self, start, step):
        self.now, self.step = start, step

    def __call__(self):
        self.now += self.step
        return self.now


@contextlib.contextmanager
def _watch(monkeypatch_context, calls):
    """Record what distill passes to its helpers (the helpers themselves run unchanged)."""
    mp = monkeypatch_context
    for name in ("_crops", "_teacher_targets", "denoise_views", "_feature_loss", "add_registers", "train"):
        real = getattr(distill_module, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            state = {}
            if _name in ("_crops", "_teacher_targets"):
                generator = args[5] if _name == "_crops" else args[3]
                state["generator_state"] = generator.get_state().clone() if isinstance(generator, torch.Generator) else None
            if _name == "denoise_views":
                state["autocast"] = torch.is_autocast_cpu_enabled()
            result = _real(*args, **kwargs)
            calls.setdefault(_name, []).append((args, kwargs, state, result))
            return result

        mp.setattr(distill_module, name, spy)
    yield


def _run(tiny, photos, out, settings, clock=False, **kwargs):
    calls: dict = {}
    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, _watch(mp, calls), contextlib.redirect_stderr(stderr):
        if clock:
            mp.setattr(distill_module, "time", types.SimpleNamespace(perf_counter=_Clock(1000.0, 0.12345), process_time=_Clock(50.0, 0.01111)))
        result = distill(tiny, photos, out, settings, **kwargs)
    return types.SimpleNamespace(result=result, calls=calls, stderr=stderr.getvalue(), out=out, settings=settings,
                                 log=json.loads((out / distill_module.LOG_NAME).read_text()))


POOLED = DistillSettings(registers=3, steps=4, pool=4, batch_size=3, views=2, max_shift=1, image_size=48, train_blocks=2,
                         seed=3, checkpoint_every=2, log_every=1, amp="bf16", mse_weight=0.5)
HELD = natural_crops(2, seed=99)


@pytest.fixture(scope="module")
def pooled(tmp_path_factory, tiny, photos):
    """A pool of 4 crops, batches of 3 (crossing epochs), bf16 autocast, held-out images, progress bars on."""
    was = tiny.model.training
    tiny.model.train()
    try:
        run = _run(tiny, photos, tmp_path_factory.mktemp("pooled") / "student", POOLED, clock=True, heldout=HELD, heldout_every=2)
        run.teacher_training = tiny.model.training
    finally:
        tiny.model.train(was)
    return run


def test_the_log_holds_the_job_data_settings_and_seconds(pooled, tiny, photos):
    log, out = pooled.log, pooled.out
    assert log["job"] == "distill" and log["model"] == "planted-vit-tiny" and log["student"] == "Dinov2WithRegistersModel"
    assert log["out"] == str(out) and log["finished"] and log["steps_done"] == 4
    images, names = distill_module.load_images(photos)
    assert log["data"] == {"n_images": 4, "images": names, "digest": distill_module._identity(images), "image_size": 48, "pool": 4}
    assert log["distill_settings"] == json.loads(json.dumps(to_jsonable(POOLED.to_dict())))
    assert log["views"] == json.loads(json.dumps(to_jsonable(dataclasses.asdict(POOLED.view_settings()))))
    assert log["precision"] == "bf16 autocast" and log["settings"]["amp"] is True and log["settings"]["cpu_amp"] is True
    assert "job_key" not in log and not any("job_key" in key.lower() for key in log)
    assert log["teacher"] == {"kind": "original"}
    assert set(log) == {"sinkless_version", "job", "model", "model_key", "student", "data", "distill_settings", "teacher", "trainable", "settings",
                        "steps_done", "finished", "seconds", "resumed_from", "device", "torch_threads", "loss_curve", "out",
                        "cpu_seconds_this_run", "views", "precision"}
    student = copy.deepcopy(pooled.result.student)
    parameters = distill_module.trainable_parameters(student, adapter_for(student), POOLED.train, 2)
    assert log["trainable"] == {"parts": list(POOLED.train), "parameters": sum(p.numel() for p in parameters.values())}
    # the clock: started, t0, teacher end, total (each call 0.12345 s later); CPU: one call 0.01111 s later
    assert log["seconds"]["teacher_targets"] == round((1000.0 + 3 * 0.12345) - (1000.0 + 2 * 0.12345), 3) == 0.123
    assert log["seconds"]["total_this_run"] == round((1000.0 + 4 * 0.12345) - (1000.0 + 0.12345), 3) == 0.37
    assert log["cpu_seconds_this_run"] == round((50.0 + 2 * 0.01111) - (50.0 + 0.01111), 3) == 0.011
    training = log["seconds"]["training"]
    assert isinstance(training, float) and 0 < training and round(training, 3) == training
    assert set(log["seconds"]) == {"teacher_targets", "training", "total_this_run"}
    assert json.loads(json.dumps(to_jsonable(pooled.result.log))) == log and pooled.result.out == out


def test_the_folder_records_provenance_and_size_and_drops_the_state(pooled):
    out = pooled.out
    config = json.loads((out / "config.json").read_text())
    from sinkless._version import __version__

    assert config["sinkless_distill"] == {"teacher": "planted-vit-tiny", "registers": 3, "steps": 4, "sinkless_version": __version__}
    assert config["num_register_tokens"] == 3
    preprocessor = json.loads((out / "preprocessor_config.json").read_text())
    assert preprocessor["size"] == {"shortest_edge": 48} and preprocessor["crop_size"] == {"height": 48, "width": 48}
    assert not (out / ".training").exists()
    student = pooled.result.student
    assert not student.training and not any(p.requires_grad for p in student.parameters())
    assert pooled.teacher_training  # the teacher is put back in the mode it came in


def test_the_pool_the_targets_and_the_loss(pooled, tiny, photos):
    calls = pooled.calls
    (args, kwargs, _, result), = calls["add_registers"]
    assert args[1] == 3 and kwargs == {"std": 1e-6, "seed": 3}
    pool_call, = calls["_crops"]  # the pool: 4 crops of 48 px drawn from the seeded generator
    assert pool_call[0][1] == 4 and pool_call[0][4] == 48 and pool_call[3].shape == (4, 3, 48, 48)
    assert torch.equal(pool_call[2]["generator_state"], torch.Generator().manual_seed(3 * 7_919 + 1).get_state())
    pool_targets_call, held_call = calls["_teacher_targets"]
    assert pool_targets_call[0][1] is pool_call[3] and pool_targets_call[0][2] == POOLED.view_settings()
    assert pool_targets_call[0][3] is pool_call[0][5]  # the views are drawn from the same generator, after the crops
    assert pool_targets_call[0][5:] == (True, True)  # a progress bar, bf16
    assert held_call[0][5:] == (False, True) and held_call[0][1].shape == (2, 3, 48, 48)
    assert torch.equal(held_call[0][1], to_pixels(list(HELD), tiny.image_spec, size=48))
    assert torch.equal(held_call[2]["generator_state"], torch.Generator().manual_seed(12_345).get_state())
    assert all(state["autocast"] for _, _, state, _ in calls["denoise_views"])  # the teacher runs in bf16 autocast
    pool_targets = pool_targets_call[3]
    losses = calls["_feature_loss"]
    assert len(losses) == 4
    for t, (args, _, _, returned) in enumerate(losses):
        features, target, weight = args
        assert weight == 0.5 and features.shape == (3, 36, 64)
        assert torch.equal(target, pool_targets[distill_module._epoch_indices(t, POOLED)].float())
        assert pooled.log["loss_curve"][t]["loss"] == pytest.approx(float(returned["loss"].detach()), abs=1e-6)


def test_heldout_cosines_and_progress(pooled, tiny):
    curve = pooled.log["loss_curve"]
    assert [row["step"] for row in curve] == [1, 2, 3, 4]
    assert [row["step"] for row in curve if "heldout_cosine" in row] == [2, 4]
    held_targets = pooled.calls["_teacher_targets"][1][3]
    student = pooled.result.student
    with torch.no_grad():
        features = final_patch_features(student, to_pixels(list(HELD), tiny.image_spec, size=48)).float()
    expected = float(torch.nn.functional.cosine_similarity(features, held_targets, dim=-1).mean())
    assert curve[-1]["heldout_cosine"] == pytest.approx(expected, abs=1e-5)
    lines = [line for line in re.split(r"[\r\n]+", pooled.stderr) if line.strip()]
    targets = [line for line in lines if line.startswith("teacher targets")]
    assert targets and all("/4" in line for line in targets)  # the pool's bar, not the held-out one
    assert any(line.startswith("distill planted-vit-tiny") and "4/4" in line for line in lines)


# -- PH-Reg's on-the-fly targets ------------------------------------------------------------------------
FRESH = DistillSettings(registers=2, steps=51, pool=0, batch_size=1, views=2, max_shift=1, image_size=40, seed=5,
                        checkpoint_every=100, log_every=25, amp="bf16", register_std=None)


def test_fresh_crops_and_targets_every_step(tmp_path, tiny, photos):
    run = _run(tiny, photos, tmp_path / "fresh", FRESH, heldout=HELD[:1], progress=False)
    log, calls = run.log, run.calls
    assert [row["step"] for row in log["loss_curve"]] == [1, 25, 50, 51]
    assert [row["step"] for row in log["loss_curve"] if "heldout_cosine" in row] == [50, 51]  # every 50 steps and the last
    assert log["data"]["pool"] == 0 and log["data"]["image_size"] == 40
    assert calls["add_registers"][0][1] == {"std": pytest.approx(64 ** -0.5), "seed": 5}
    crops = calls["_crops"]
    assert len(crops) == 51
    for t, (args, _, state, pixels) in enumerate(crops[:3]):  # each step's crops come from that step's generator
        assert args[1:5] == (1, FRESH, tiny.image_spec, 40) and pixels.shape == (1, 3, 40, 40)
        assert torch.equal(state["generator_state"], torch.Generator().manual_seed(5 * 1_000_003 + t).get_state())
    fresh_views = [c for c in calls["denoise_views"] if c[0][1].shape[0] == 1 and c[0][1].shape[-1] == 40][-51:]
    assert len(fresh_views) == 51
    for (args, kwargs, state, target), crop, loss in zip(fresh_views, crops, calls["_feature_loss"]):
        assert args[0] is tiny and torch.equal(args[1], crop[3]) and args[2] == FRESH.view_settings()
        assert kwargs["image_spec"] == tiny.image_spec and kwargs["generator"] is crop[0][5] and state["autocast"]
        assert torch.equal(loss[0][1], target.float()) and loss[0][0].shape == (1, 25, 64)
    assert not (run.out / ".training").exists() and log["precision"] == "bf16 autocast"
    assert run.stderr == ""  # progress=False: no bars


# -- float32, finishing, failing, resuming ---------------------------------------------------------------
PLAIN = DistillSettings(registers=2, steps=2, pool=2, batch_size=1, views=1, checkpoint_every=5, log_every=1, amp="off")


def test_float32_run_and_a_finished_folder(tmp_path, tiny, photos):
    out = tmp_path / "plain"
    run = _run(tiny, photos, out, PLAIN, progress=False)
    assert run.log["precision"] == "float32" and run.log["settings"]["amp"] is False and run.log["settings"]["cpu_amp"] is False
    assert not any(state["autocast"] for _, _, state, _ in run.calls["denoise_views"])
    fresh = _run(tiny, photos, tmp_path / "fresh32", DistillSettings(**{**PLAIN.to_dict(), "pool": 0, "steps": 1}), progress=False)
    assert fresh.calls["denoise_views"] and not any(state["autocast"] for _, _, state, _ in fresh.calls["denoise_views"])
    again = distill(tiny, photos, out, PLAIN, progress=False, resume=True)  # nothing to do
    assert again.out == out and again.log == run.log and again.student is None
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    for changed, said in (({"steps": PLAIN.steps + 3}, f"steps {PLAIN.steps} -> {PLAIN.steps + 3}"), ({"lr": 1e-3}, "lr")):
        with pytest.raises(SinklessError, match="holds a finished distillation with other settings") as caught:
            distill(tiny, photos, out, DistillSettings(**{**PLAIN.to_dict(), **changed}), progress=False, resume=True)
        assert said in caught.value.problem and "new --out folder" in caught.value.fix
    fewer = sorted(photos.glob("*.png"))[:3]  # the same settings on other images, or another model: another job
    with pytest.raises(SinklessError, match=r"finished distillation of another job \(other training images\)"):
        distill(tiny, [str(p) for p in fewer], out, PLAIN, progress=False, resume=True)
    with pytest.raises(SinklessError, match=r"another job \(model planted-vit-tiny -> planted-vit-tiny-clean\)"):
        distill("planted-vit-tiny-clean", photos, out, PLAIN, progress=False, resume=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # the finished model untouched
    assert json.loads(json.dumps(to_jsonable(run.result.log))) == run.log and run.result.out == out


def _boom(*args, **kwargs):
    raise RuntimeError("boom")


@pytest.mark.parametrize("where", ["_teacher_targets", "_feature_loss"])
def test_a_failed_run_leaves_nothing_behind(tmp_path, tiny, photos, monkeypatch, where):
    tiny.model.train()
    try:
        monkeypatch.setattr(distill_module, where, _boom)
        new = tmp_path / "new"
        with pytest.raises(RuntimeError, match="boom"):
            distill(tiny, photos, new, PLAIN, progress=False)
        assert not new.exists() and tiny.model.training
        existing = tmp_path / "existing"
        existing.mkdir()
        with pytest.raises(RuntimeError, match="boom"):
            distill(tiny, photos, existing, PLAIN, progress=False)
        assert existing.is_dir() and list(existing.iterdir()) == [] and tiny.model.training
    finally:
        tiny.model.eval()


def test_bad_image_size_is_refused_with_a_multiple(tmp_path, tiny, photos):
    for size, fix in ((60, "e.g. 56"), (5, "e.g. 8")):
        with pytest.raises(SinklessError) as caught:
            distill(tiny, photos, tmp_path / f"s{size}", DistillSettings(image_size=size, registers=2), progress=False)
        assert (caught.value.problem, caught.value.fix) == (f"image_size {size} is not a multiple of the patch size 8", fix)
        assert not (tmp_path / f"s{size}").exists()


def test_resume_accepts_a_new_step_budget_and_bookkeeping(tmp_path, tiny, photos, monkeypatch):
    settings = DistillSettings(registers=2, steps=4, pool=2, batch_size=1, views=1, checkpoint_every=2, log_every=1, amp="off")
    out = tmp_path / "resumed"
    _distill_interrupted_at_step(3, monkeypatch, tiny, photos, out, settings)
    assert (out / ".training" / "checkpoint.pt").exists()
    interim = json.loads((out / ".training" / "train_log.json").read_text())  # the log while training
    assert interim["job"] == "distill" and interim["student"] == "Dinov2WithRegistersModel" and interim["steps_done"] == 2
    assert interim["data"]["pool"] == 2 and "job_key" not in interim and not any(key.isupper() or "XX" in key for key in interim)
    longer = DistillSettings(**{**settings.to_dict(), "steps": 5, "checkpoint_every": 3, "log_every": 2})
    result = distill(tiny, photos, out, longer, progress=False, resume=True)
    assert result.log["resumed_from"] == [2] and result.log["steps_done"] == 5


def _script(name: str = "planted_distill"):
    """scripts/NAME.py as a fresh module (its monkeypatches stay in this copy)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_planted_distill_eval_splits_the_gap_by_ring():
    """scripts/planted_distill.py's `by_ring` (docs/RESULTS.md): the 16 x 16 grid's edge ring, rings 1-2, ring 3 and the
    interior partition the patches; a student equal to the ceiling closes 100 % of every ring, one equal to raw 0 %."""
    script = _script()
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(2, 256, 8, generator=g)
    raw = reference + torch.randn(2, 256, 8, generator=g)
    ceiling = reference + 0.1 * torch.randn(2, 256, 8, generator=g)
    for student, closed in ((ceiling, 1.0), (raw, 0.0)):
        rows = script._by_ring({"clean_raw": raw, "planted_raw": raw, "planted_teacher_denoised": ceiling, "student_raw": student}, reference)
        assert [r["rings"] for r in rows] == ["0-0", "1-2", "3-3", "4-centre"]
        assert [r["patches"] for r in rows] == [60, 96, 36, 64]
        assert all(abs(r["gap_closed"] - closed) < 1e-6 for r in rows)
    edge_only = reference.clone()
    edge_only[:, :16] += 5 * torch.randn(2, 16, 8, generator=g)  # the top row: part of the edge ring only
    rows = script._by_ring({"clean_raw": raw, "planted_raw": raw, "planted_teacher_denoised": ceiling, "student_raw": edge_only}, reference)
    assert rows[0]["student_raw"] < 0.9 and all(r["student_raw"] > 0.999 for r in rows[1:])


def test_planted_distill_key_auc_reads_apartness_from_the_key_similarities():
    """`_key_auc`: 1 when every planted patch is less similar to the rest than every other patch, 0.5 when the
    planted patches are indistinguishable (ties count half), 0 when they are the most similar; None without a
    planted patch. The diagonal (a patch with itself) does not count."""
    script = _script()
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 1] = mask[1, 4] = True

    def similarity(planted_value: float) -> torch.Tensor:
        sim = torch.full((2, 6, 6), 0.5)
        for b, i in ((0, 1), (1, 4)):
            sim[b, i, :] = sim[b, :, i] = planted_value  # the planted patch's cosine to every other patch
            sim[b, i, i] = 30.0  # a large self-similarity of the planted patch must not enter its mean
        return sim

    for planted_value, auc in ((0.1, 1.0), (0.5, 0.5), (0.9, 0.0)):
        assert script._key_auc(similarity(planted_value), mask) == pytest.approx(auc)
    assert script._key_auc(similarity(0.1), torch.zeros(2, 6, dtype=torch.bool)) is None


def test_planted_distill_ablate_drops_exactly_the_trained_positions_or_the_registers(tiny, photos, tmp_path, capsys):
    """scripts/planted_distill.py ablate: ``original-positions`` is the student with the model's own position table and
    nothing else changed; ``no-registers`` is the student with no register tokens and every other weight kept."""
    settings = DistillSettings(**FAST, train=("registers", "positions", "blocks"), part_lr=(("positions", 10.0),))
    distill("planted-vit-tiny", str(photos), tmp_path / "student", settings, progress=False)
    result = _script().ablate(types.SimpleNamespace(student=str(tmp_path / "student"), out=str(tmp_path / "abl"), model="planted-vit-tiny"))
    assert result["position_table_relative_change"] > 0 and result["n_registers_dropped"] == 4
    student = load_file(str(tmp_path / "student" / "model.safetensors"))
    kept = load_file(str(tmp_path / "abl" / "original-positions" / "model.safetensors"))
    assert torch.equal(kept["embeddings.position_embeddings"], tiny.model.embeddings.position_embeddings)
    assert all(torch.equal(kept[k], v) for k, v in student.items() if k != "embeddings.position_embeddings")
    bare = zoo.load(str(tmp_path / "abl" / "no-registers"))
    trained = zoo.load(str(tmp_path / "student"))
    assert bare.adapter.n_registers(bare.model) == 0 and trained.adapter.n_registers(trained.model) == 4
    bare_state = bare.model.state_dict()
    for name, value in trained.model.state_dict().items():
        if name != "embeddings.register_tokens":
            assert torch.equal(bare_state[name], value), name
    pixels = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert bare.model(pixels).last_hidden_state.shape[1] == trained.model(pixels).last_hidden_state.shape[1] - 4
    # bad input: exit 2, one line, nothing written
    script = _script()
    capsys.readouterr()
    for student, out, model, message in ((tmp_path / "nowhere", tmp_path / "x", "planted-vit-tiny", "no model.safetensors"),
                                         (tmp_path / "abl" / "no-registers", tmp_path / "y", "planted-vit-tiny", "has no register tokens"),
                                         (tmp_path / "student", tmp_path / "abl", "planted-vit-tiny", "exists"),
                                         (tmp_path / "student", tmp_path / "z", "planted-vit", "was not distilled from planted-vit")):
        with pytest.raises(SystemExit) as exited:
            script.main(["ablate", str(student), str(out), "--model", model, "--json", str(tmp_path / "a.json")])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("planted_distill.py")]  # (loading may log too)
        assert exited.value.code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err
        assert not (tmp_path / "a.json").exists() and (out == tmp_path / "abl" or not out.exists())


def test_planted_distill_ceiling_with_independent_views(monkeypatch, tmp_path):
    """scripts/planted_distill.py ceiling: with the same views the teacher of the reference model itself reaches cosine 1;
    with other seeds or 40 views it does not, and the gap closed is measured against the 40-view ceiling."""
    script = _script()
    tiny = zoo.load("planted-vit-tiny")  # planted-vit, its clean twin and the student all the same model here
    monkeypatch.setattr(script.zoo, "load", lambda name: tiny)
    monkeypatch.setattr(script, "_held_out", lambda: {"few": natural_crops(2, seed=5)})
    monkeypatch.setattr(script, "VIEWS", ViewSettings(views=3, max_shift=1, fill="white"))
    out = tmp_path / "ceiling.json"
    assert script.main(["ceiling", "student", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["sets"]["few"]
    assert row["ceiling_same_views"] == pytest.approx(1.0, abs=1e-5)
    assert row["ceiling_other_views_seed1"] < 0.9999 and row["ceiling_40_views"] < 0.9999
    assert row["clean_other_views_seed1"] == pytest.approx(row["ceiling_other_views_seed1"], abs=1e-6)  # the same model
    assert row["student"] == row["planted_raw"]
    assert row["gap_closed_vs_40_view_ceiling"] == {"student": 0.0}
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, image in enumerate(natural_crops(5, seed=6)):
        image.save(folder / f"p{i}.png")
    (folder / "notes.txt").write_text("not an image")
    assert script.main(["fit", "student", "--images", str(folder), "--every", "2", "--limit", "2", "--json", str(out)]) == 0
    fitted = json.loads(out.read_text())
    assert fitted["images"] == ["p0.png", "p2.png"] and fitted["student"] == fitted["planted_raw"] < 0.9999


def test_augmented_adds_two_turns_and_a_seeded_colour_jitter():
    images = [Image.new("RGB", (40, 24), (200, 60, 30)), natural_crops(1, seed=3)[0].resize((30, 50))]
    images[0].putpixel((0, 0), (0, 0, 255))  # a marked corner shows where each copy's pixels went
    out = distill_module.augmented(images)
    assert len(out) == 8 and out[0] is images[0] and out[4] is images[1]
    assert [im.size for im in out[:4]] == [(40, 24), (24, 40), (40, 24), (40, 24)]
    assert out[1].getpixel((0, 39)) == (0, 0, 255)  # turned 90° counter-clockwise: top-left -> bottom-left
    assert out[2].getpixel((39, 23)) == (0, 0, 255)  # turned 180°
    assert out[3].getpixel((5, 5)) != (200, 60, 30) and out[3].size == (40, 24)  # jittered colours, same geometry
    again = distill_module.augmented(images)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(out, again))  # seeded: the same copies every time
    other = distill_module.augmented(images, seed=8)
    assert other[3].tobytes() != out[3].tobytes() and other[1].tobytes() == out[1].tobytes()
    # the jitter factors are drawn in the documented order and ranges
    import random
    from PIL import ImageEnhance

    draw, expected = random.Random(7), images[0]
    for name, (low, high) in (("Color", (0.3, 1.6)), ("Brightness", (0.7, 1.3)), ("Contrast", (0.7, 1.3))):
        expected = getattr(ImageEnhance, name)(expected).enhance(draw.uniform(low, high))
    assert out[3].tobytes() == expected.tobytes()
    with pytest.raises(SinklessError, match="augment must be True or False, got 'yes'"):
        DistillSettings(augment="yes")


def test_augment_and_mse_weight_flags_reach_the_run(tmp_path, capsys, photos, monkeypatch):
    seen = {}
    real_crops = distill_module._crops

    def crops(images, *args, **kwargs):
        seen["n_images"] = len(images)
        return real_crops(images, *args, **kwargs)

    monkeypatch.setattr(distill_module, "_crops", crops)
    out = tmp_path / "student"
    code, _, err = _cli(capsys, "--model", "planted-vit-tiny", "--images", str(photos), "--out", str(out), "--registers", "2",
                        "--steps", "2", "--views", "2", "--pool", "4", "--batch-size", "2", "--device", "cpu",
                        "--augment", "--mse-weight", "0")
    assert code == 0, err
    log = json.loads((out / "distill_log.json").read_text())
    assert log["distill_settings"]["augment"] is True and log["distill_settings"]["mse_weight"] == 0
    assert seen["n_images"] == 16 and log["data"]["n_images"] == 4 and log["data"]["n_augmented"] == 16
    assert all(row["loss"] == pytest.approx(1 - row["cosine"], abs=1e-6) for row in log["loss_curve"])  # cosine only


def test_key_weight_flag_reaches_the_run(tmp_path, capsys, photos):
    out = tmp_path / "student"
    code, _, err = _cli(capsys, "--model", "planted-vit-tiny", "--images", str(photos), "--out", str(out), "--registers", "2",
                        "--steps", "2", "--views", "2", "--pool", "4", "--batch-size", "2", "--device", "cpu",
                        "--mse-weight", "0", "--key-weight", "0.5")
    assert code == 0, err
    log = json.loads((out / "distill_log.json").read_text())
    assert log["distill_settings"]["key_weight"] == 0.5
    assert all(row["loss"] == pytest.approx((1 - row["cosine"]) + 0.5 * (1 - row["key_cosine"]), abs=1e-6) for row in log["loss_curve"])


def test_teacher_flags_reach_the_run(tmp_path, capsys, photos):
    """--teacher ttr finds the neurons on the training images; --teacher-neurons FILE uses that file's."""
    common = ["--model", "planted-vit-tiny", "--images", str(photos), "--registers", "2", "--steps", "1", "--views", "1",
              "--pool", "2", "--batch-size", "2", "--teacher", "ttr"]
    code, _, err = _cli(capsys, *common, "--out", str(tmp_path / "found"))
    assert code == 0, err
    log = json.loads((tmp_path / "found" / "distill_log.json").read_text())
    assert log["distill_settings"]["teacher"] == "ttr" and log["teacher"]["source"].startswith("found on 3 of the training images")
    from sinkless.registers.ttr import RegisterNeurons

    file = RegisterNeurons(model="planted-vit-tiny", neurons=[{"layer": 1, "neuron": 3, "score": 1.0}], top_k=1).save(tmp_path / "n.json")
    code, _, err = _cli(capsys, *common, "--teacher-neurons", str(file), "--out", str(tmp_path / "given"))
    assert code == 0, err
    log = json.loads((tmp_path / "given" / "distill_log.json").read_text())
    assert log["teacher"] == {"kind": "ttr", "neurons": {"1": [3]}, "source": str(file)}
    result = tmp_path / "cmp.json"
    code = cli.main(["compare", "--model", "planted-vit-tiny", "--data", "synthetic", "--limit", "1", "--task", "lost",
                     "--fix", "distilled", "--distilled", str(tmp_path / "given"), "--json", str(result)])
    assert code == 0, capsys.readouterr().err
    assert json.loads(result.read_text())["results"][0]["fix_settings"]["targets_from"] == "ttr"  # compare says which teacher


def _encoded(image, fmt: str) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, fmt, quality=95)
    return buffer.getvalue()


def _photo_like(seed: int, size=(320, 240)):
    """A smooth random field with fine texture: many colours, few equal neighbours (not 'drawn')."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize(size, Image.BICUBIC)).astype(float)
    return Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))


def test_carve_photos_keeps_distinct_photos_of_photo_activities(tmp_path):
    """scripts/carve_photos.py (`fetch_photos.sh --many`): JPEG and WebP pictures embedded in GCompris rcc blobs are
    found; drawings, small pictures, near-repeats and non-photo activities are left out; no rcc files -> exit 2."""
    from PIL import Image

    carve = _script("carve_photos")
    first, second = _photo_like(1), _photo_like(2)
    drawn = Image.new("RGB", (320, 240), "white")
    drawn.paste((200, 30, 30), (40, 40, 200, 160))
    blob = (b"rcc header \xff\xd9 junk" + _encoded(first, "JPEG") + b"\x00" * 7 + _encoded(second, "WEBP") + b"tail"
            + _encoded(drawn, "JPEG") + _encoded(_photo_like(3, (150, 120)), "JPEG") + _encoded(first, "JPEG"))
    found = list(carve.embedded_pictures(blob))
    assert [(image.format, image.size) for image in found] == [  # JPEGs in file order, then WebPs
        ("JPEG", (320, 240)), ("JPEG", (320, 240)), ("JPEG", (150, 120)), ("JPEG", (320, 240)), ("WEBP", (320, 240))]
    assert carve.looks_drawn(drawn) and not carve.looks_drawn(first) and not carve.looks_drawn(second)

    rcc = tmp_path / "root" / "usr/share/gcompris-qt/rcc"
    rcc.mkdir(parents=True)
    (rcc / "erase.rcc").write_bytes(blob)
    (rcc / "lang.rcc").write_bytes(_encoded(_photo_like(4), "JPEG"))  # not a photo activity
    assert carve.main(tmp_path / "root", tmp_path / "out") == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gc_erase_000.jpg", "gc_erase_004.jpg"]
    assert carve.main(tmp_path / "empty", tmp_path / "out2") == 2 and not (tmp_path / "out2").exists()


def test_distill_teacher_choices_are_the_library_teachers():
    """The distill parser lists --teacher's choices literally (building it must not import torch-heavy modules):
    they must stay the teachers ``distill`` accepts."""
    import argparse

    from sinkless.cli import _parser
    from sinkless.registers.distill import TEACHERS

    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    option = next(a for a in sub.choices["distill"]._actions if "--teacher" in a.option_strings)
    assert tuple(option.choices) == TEACHERS


def test_a_tilde_out_is_expanded_once(tmp_path, tiny, photos, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    run = distill(tiny, photos, "~/student", PLAIN, progress=False)
    assert run.out == tmp_path / "home" / "student" and (run.out / "config.json").exists()
    assert not (run.out / distill_module.STATE_DIR).exists() and not any((tmp_path / "cwd").iterdir())  # no ./~ folder, no checkpoint left
    with pytest.raises(SinklessError, match="already holds a distilled model"):
        distill(tiny, photos, "~/student", PLAIN, progress=False)


def test_the_model_key_is_the_real_path(tmp_path, tiny, monkeypatch):
    """A checkpoint names the model however it was spelled: relative, absolute, through a link; a zoo name as it is."""
    (tmp_path / "m").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    real = os.path.realpath(tmp_path / "m")
    assert distill_module._model_key("m") == distill_module._model_key(str(tmp_path / "m")) == distill_module._model_key("link") == real
    assert distill_module._model_key("planted-vit-tiny") == "planted-vit-tiny" and distill_module._model_key(tiny) == tiny.name


def test_a_second_distill_into_a_folder_in_use_is_refused(tmp_path, tiny, photos):
    """Two runs into one --out at once: the second is refused (before: both ran, sharing one checkpoint)."""
    from sinkless._tempfiles import lock

    out = tmp_path / "busy"
    out.mkdir()
    held = os.open(out, os.O_RDONLY)  # what a running distill holds
    try:
        assert lock(held, block=False)
        with pytest.raises(SinklessError, match="another `sinkless distill` is writing into"):
            distill(tiny, photos, out, PLAIN, progress=False)
    finally:
        os.close(held)
    assert distill(tiny, photos, out, PLAIN, progress=False).student is not None  # free again: it runs
