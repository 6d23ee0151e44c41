"""PH-Reg self-distillation: the teacher's multi-view denoiser, the training job, exact resume, bad input, CLI, compare."""

from __future__ import annotations

import importlib
import json
import os

import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file

from sinkless import cli, zoo
from sinkless.errors import SinklessError
from sinkless.images import natural_crops
from sinkless.registers import DistillSettings, ViewSettings, denoise_views, distill
from sinkless.registers import multiview
from sinkless.registers.multiview import merge_views, render_views, sample_views

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
    distill_module = importlib.import_module("sinkless.registers.distill")  # the package attribute `distill` is the function

    settings = DistillSettings(**{**FAST, "steps": 8, "checkpoint_every": 3})
    straight = tmp_path / "straight"
    distill(tiny, photos, straight, settings, progress=False)

    calls = {"n": 0}
    real = distill_module._feature_loss

    def interrupt_at_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(distill_module, "_feature_loss", interrupt_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        distill(tiny, photos, resumed, settings, progress=False)
    monkeypatch.setattr(distill_module, "_feature_loss", real)
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
    distill_module = importlib.import_module("sinkless.registers.distill")

    assert DistillSettings().lr_multipliers() == {"positions": 0.1, "patch_embed": 0.1}
    assert DistillSettings(train=("registers", "blocks", "positions")).lr_multipliers() == {"positions": 0.1}
    assert DistillSettings(train=("registers", "blocks")).lr_multipliers() == {}
    assert DistillSettings(part_lr=(("blocks", 2.0),)).lr_multipliers() == {"blocks": 2.0}
    assert DistillSettings(part_lr=()).lr_multipliers() == {}  # PH-Reg's one learning rate for every part
    assert DistillSettings().register_std == 1e-6 and distill_module.PHOTO_SETTINGS.lr_multipliers() == {"positions": 0.1}


def test_the_multipliers_reach_the_optimiser(tmp_path, tiny, photos, monkeypatch):
    """distill hands train() an lr_scale for every parameter of a slowed part, and none for the others."""
    distill_module = importlib.import_module("sinkless.registers.distill")

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
        ("photos", ["--model", "planted-vit-tiny", "--lr", "nan"], "lr must be a positive number"),
        ("photos", ["--model", "planted-vit-tiny", "--image-size", "60"], "not a multiple of the patch size"),
        ("photos", ["--model", "planted-vit-tiny", "--part-lr", "positions"], "is not PART=MULTIPLIER"),
        ("photos", ["--model", "planted-vit-tiny", "--train", "registers", "--part-lr", "positions=0.1"], "not among the trained parts"),
        ("photos", ["--model", "planted-vit-tiny", "--part-lr", "positions=-1"], "must be a positive number"),
        ("photos", ["--model", "planted-vit-tiny", "--register-std", "0"], "register_std must be a positive number"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, photos, setup, argv, message):
    images = {"photos": photos, "empty_dir": tmp_path / "empty", "text_file": tmp_path / "notes.png"}[setup]
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.png").write_text("not an image")
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
    assert code == 2 and "cannot write" in err
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
            assert code == 2 and "cannot write" in err
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
    result = tmp_path / "cmp.json"
    code = cli.main(["compare", "--model", "planted-vit-tiny", "--data", "synthetic", "--limit", "2", "--task", "lost",
                     "--fix", "none", "--fix", "distilled", "--distilled", str(out),
                     "--fix", "registers", "--registers-model", str(out), "--json", str(result)])
    _, err = capsys.readouterr()
    assert code == 0, err
    rows = {r["fix"]: r for r in json.loads(result.read_text())["results"]}
    assert rows["distilled"]["fix_settings"]["n_registers"] == 4 and rows["distilled"]["fix_settings"]["teacher"] == "planted-vit-tiny"
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
    distill_module = importlib.import_module("sinkless.registers.distill")  # the package attribute `distill` is the function
    from sinkless.tasks import fixes
    from sinkless.tasks.compare import compare

    monkeypatch.setenv("SINKLESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(distill_module, "PHOTO_SETTINGS", DistillSettings(**FAST))
    seen = {}
    real = distill_module.training_photos

    def spy(exclude=()):
        seen["excluded"] = len(exclude)
        return real(exclude)[:2]

    monkeypatch.setattr(distill_module, "training_photos", spy)
    runs = []
    real_distill = distill_module.distill
    monkeypatch.setattr(distill_module, "distill", lambda *a, **k: runs.append(1) or real_distill(*a, **k))
    comparison, _ = compare(tiny, "zeroseg", "synthetic", ["none", "distilled"], limit=2, progress=False)
    row = comparison.results[1]
    assert seen["excluded"] == 2 and row.settings["n_registers"] == 4 and "distilled-planted-vit-tiny" in row.settings["distilled"]
    assert fixes.FIXES["distilled"] is fixes._distilled and runs == [1]
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
distill_module = importlib.import_module("sinkless.registers.distill")  # the package attribute `distill` is the function


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
    with pytest.raises(SinklessError, match="train_blocks=5 but the model has 4 blocks"):
        distill_module.trainable_parameters(student, adapter, ["blocks"], 5)


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
