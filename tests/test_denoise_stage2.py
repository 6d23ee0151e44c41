"""DVT Stage 2: the denoiser block, its save/load round trip, the feature hook, training, and the dvt fix."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sinkless import zoo
from sinkless.denoise import (
    Denoiser,
    DenoiserConfig,
    DenoiserSettings,
    FeatureTransform,
    Stage1Settings,
    apply_denoiser,
    load_denoiser,
    save_denoiser,
    train_denoiser,
)
from sinkless.errors import SinklessError
from sinkless.hooks import hooks


@pytest.fixture(scope="module")
def tiny():
    return zoo.load("planted-vit-tiny")


def _pixels(batch=2, seed=0, size=64):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_save_load_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    denoiser = Denoiser(DenoiserConfig(dim=64, grid=(8, 8), model="planted-vit-tiny")).eval()
    with torch.no_grad():
        denoiser.pos_embed.normal_()
    save_denoiser(denoiser, tmp_path / "d")
    loaded = load_denoiser(tmp_path / "d")
    assert loaded.config == denoiser.config
    for name, tensor in denoiser.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    x = torch.randn(2, 8, 8, 64)
    with torch.no_grad():
        diff = float((denoiser(x) - loaded(x)).abs().max())
    print(f"round trip max diff {diff}")
    assert diff == 0.0
    assert (tmp_path / "d" / "config.json").exists()
    assert load_denoiser(tmp_path / "d" / "denoiser.safetensors").config == denoiser.config
    with torch.no_grad():
        other_grid = loaded(torch.randn(1, 5, 7, 64))  # the position embedding is resampled
    assert other_grid.shape == (1, 5, 7, 64)


def test_load_errors(tmp_path):
    with pytest.raises(SinklessError, match="no denoiser"):
        load_denoiser(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "denoiser.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SinklessError, match="not a sinkless denoiser"):
        load_denoiser(bad)


def test_identity_transform_is_a_no_op(tiny):
    pixels = _pixels()
    with torch.no_grad():
        plain = tiny.model(pixels).last_hidden_state
        with FeatureTransform(tiny, lambda px, tokens: tokens)():
            same = tiny.model(pixels).last_hidden_state
    diff = float((plain - same).abs().max())
    print(f"identity feature transform: max diff {diff}")
    assert diff == 0.0


def test_a_fresh_identity_denoiser_returns_its_input_and_the_dvt_init_does_not():
    """init="identity" (the default) starts as the identity map; init="dvt" (the reference's random init) does not."""
    torch.manual_seed(0)
    features = torch.randn(2, 8, 8, 64)
    with torch.no_grad():
        assert torch.equal(Denoiser(DenoiserConfig(dim=64, grid=(8, 8)))(features), features)
        assert not torch.allclose(Denoiser(DenoiserConfig(dim=64, grid=(8, 8)), init="dvt")(features), features, atol=1e-3)
    with pytest.raises(SinklessError, match="unknown denoiser init"):
        Denoiser(DenoiserConfig(dim=64, grid=(8, 8)), init="zeros")


def test_transform_edits_patches_only_and_leaves_the_model_clean(tiny):
    pixels = _pixels()
    with torch.no_grad():
        plain = tiny.model(pixels).last_hidden_state
        with pytest.raises(RuntimeError, match="boom"):
            with FeatureTransform(tiny, lambda px, tokens: tokens * 0)():
                edited = tiny.model(pixels).last_hidden_state
                raise RuntimeError("boom")
        after = tiny.model(pixels).last_hidden_state
    assert torch.equal(plain, after)  # hooks gone after the exception
    assert torch.equal(edited[:, 0], plain[:, 0])  # CLS untouched
    assert edited[:, 1:].abs().max() == 0
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tiny.model.modules())
    handle = FeatureTransform(tiny, lambda px, tokens: tokens + 1).attach()
    with torch.no_grad():
        shifted = tiny.model(pixels).last_hidden_state
    handle.remove()
    assert torch.allclose(shifted[:, 1:], plain[:, 1:] + 1)


def test_transform_reaches_the_tasks_final_norm_call(tiny):
    """sinkless.tasks applies the final norm to a captured (N, D) stream: the same image is transformed the same way."""
    from sinkless.tasks._features import Prepared, extract

    pixels = _pixels(batch=1)
    prepared = Prepared(pixels, (64, 64), 1.0)
    with FeatureTransform(tiny, lambda px, tokens: tokens * 0 + 2)():
        out = extract(tiny, prepared, tokens=True)
    assert torch.allclose(out.patch_tokens, torch.full_like(out.patch_tokens, 2.0))


def test_apply_denoiser_checks_width(tiny):
    wrong = Denoiser(DenoiserConfig(dim=32, grid=(8, 8)))
    with pytest.raises(SinklessError, match="wide"):
        apply_denoiser(tiny, wrong)


def _noise_images(seed: int, n: int) -> list[tuple[str, object]]:
    """``n`` seeded noise images of 48 x 40 px as ``(name, PIL image)`` pairs, the training input of ``train_denoiser``."""
    from PIL import Image

    rng = torch.Generator().manual_seed(seed)
    return [(f"im{i}", Image.fromarray((torch.rand(40, 48, 3, generator=rng) * 255).byte().numpy())) for i in range(n)]


def test_train_denoiser_end_to_end_and_resume(tiny, tmp_path):
    images = _noise_images(0, 4)
    stage1 = Stage1Settings(views=3, steps=8, batch=128)
    settings = DenoiserSettings(steps=6, batch=2, checkpoint_every=3, holdout=1, view_pairs=5)
    summary = train_denoiser(tiny, images, tmp_path / "den", settings, stage1, device="cpu", progress=False)
    assert summary["finished"] and summary["steps_done"] == 6
    assert summary["n_pairs"] == 3 * (1 + 3)  # 3 training images, each whole + its crops (5 asked, capped at the 3 crops)
    from safetensors.torch import load_file

    stored = load_file(sorted((tmp_path / "den" / "stage1").glob("*.safetensors"))[0])
    assert stored["view_raw"].shape == stored["view_clean"].shape == (3, 8, 8, 64) and stored["view_raw"].dtype == torch.float16
    assert not torch.equal(stored["view_raw"], stored["view_clean"])
    assert summary["holdout"]["n_images"] == 1
    assert len(list((tmp_path / "den" / "stage1").glob("*.safetensors"))) == 4
    denoiser = load_denoiser(tmp_path / "den")
    assert denoiser.config.grid == (8, 8) and denoiser.config.model == "planted-vit-tiny"
    with pytest.raises(SinklessError, match="earlier run"):
        train_denoiser(tiny, images, tmp_path / "den", settings, stage1, device="cpu", progress=False)
    (tmp_path / "den" / "denoiser.safetensors").unlink()  # as if interrupted after the last checkpoint
    again = train_denoiser(tiny, images, tmp_path / "den", settings, stage1, device="cpu", progress=False, resume=True)
    assert again["steps_done"] == 6 and again["resumed_from"] == [6]
    assert again["stage1_timing"]["images_fitted_now"] == 0  # the targets were reused
    assert torch.equal(load_denoiser(tmp_path / "den").pos_embed, denoiser.pos_embed)
    pixels = _pixels(batch=1)
    with torch.no_grad():
        plain = tiny.model(pixels).last_hidden_state
        with apply_denoiser(tiny, tmp_path / "den")():
            denoised = tiny.model(pixels).last_hidden_state
        expected = denoiser(plain[:, 1:].reshape(1, 8, 8, 64)).reshape(1, 64, 64)
    assert torch.allclose(denoised[:, 1:], expected, atol=1e-5)


def test_dvt_fix_in_compare(tiny, tmp_path):
    from sinkless.tasks.compare import compare
    from sinkless.tasks.fixes import make_fix

    denoiser = Denoiser(DenoiserConfig(dim=64, grid=(8, 8), model="planted-vit-tiny"))
    save_denoiser(denoiser, tmp_path / "d")
    comparison, _ = compare(tiny, "probe", "synthetic", ["none", "dvt"], limit=4, progress=False,
                            fix_options={"dvt": {"denoiser": str(tmp_path / "d")}})
    results = {r.fix: r for r in comparison.results}
    assert results["dvt"].settings["mode"] == "stage 2"
    with make_fix("dvt", tiny, []) as entered:  # the per-image mode
        assert entered is None
        with torch.no_grad():
            tiny.model(_pixels(batch=1))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tiny.model.modules())


def test_capture_hooks_of_the_caller_see_one_call_in_the_per_image_mode(tiny):
    from sinkless.denoise.hook import stage1_transform

    transform = stage1_transform(tiny, Stage1Settings(views=2, steps=3, batch=64))
    site = tiny.adapter.residual_site(1)
    with FeatureTransform(tiny, transform)(), hooks(tiny.model, capture=[site]) as rec, torch.no_grad():
        tiny.model(_pixels(batch=1))
    assert len(rec.calls(site)) == 1
    assert len(transform.cache) == 1


def test_stage2_probe_script_scores_offsets_against_the_twin(tmp_path):
    """scripts/dvt_stage2_probe.py (docs/RESULTS.md): a correction every image shares is found by the mean offset (share
    100 %, cosine 1 to the twin), raw scores 0 % and Stage 1 100 %, and the block trains and is scored every --every steps."""
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    pattern = 3 * torch.randn(4, 4, 64, generator=g)  # the one position-tied correction of every image
    folder = tmp_path / "stage1"
    folder.mkdir()
    for i in range(3):
        raw = torch.randn(4, 4, 64, generator=g)
        views = torch.randn(2, 4, 4, 64, generator=g)
        save_file({"raw": raw, "clean": raw + pattern, "view_raw": views.half(), "view_clean": (views + pattern).half()},
                  str(folder / f"{i:05d}_t{i}.safetensors"))
    raw = torch.randn(2, 4, 4, 64, generator=g)
    torch.save({"p_raw": raw, "p_clean": raw + pattern, "c_raw": raw.clone(), "c_clean": raw + pattern}, tmp_path / "held.pt")
    script = Path(__file__).resolve().parents[1] / "scripts" / "dvt_stage2_probe.py"
    done = subprocess.run([sys.executable, str(script), str(folder), "unused", "--cache", str(tmp_path / "held.pt"), "--steps", "2",
                           "--every", "1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    lines = {label: next(line for line in out if line.startswith(label)) for label in (
        "raw ", "Stage 1 (the image's own)", "+ mean Stage-1 correction", "- held-out mean planted-minus-twin")}
    assert "share    +0 %" in lines["raw "]
    assert "share  +100 %" in lines["Stage 1 (the image's own)"]
    assert "to the twin's Stage 1 1.0000  share  +100 %" in lines["+ mean Stage-1 correction"]
    assert "images closer than raw 2/2" in lines["+ mean Stage-1 correction"]
    assert "share    +0 %" in lines["- held-out mean planted-minus-twin"]  # planted and twin raw are equal here
    assert sum(line.startswith("Stage 2, step") for line in out) == 2


def test_per_image_output_is_the_field_or_the_features_minus_g(tiny):
    """--dvt-output: ``clean`` gives Stage 1's F, ``raw-minus-artifact`` the image's own features minus its fitted G."""
    from sinkless.denoise import denoise_image
    from sinkless.denoise.hook import stage1_transform

    settings = Stage1Settings(views=2, steps=3, batch=64)
    pixels = _pixels(batch=1)
    result = denoise_image(tiny, pixels, settings)
    with torch.no_grad():
        plain = tiny.model(pixels).last_hidden_state
    outputs = {}
    for output in ("clean", "raw-minus-artifact"):
        with FeatureTransform(tiny, stage1_transform(tiny, settings, output=output))(), torch.no_grad():
            outputs[output] = tiny.model(pixels).last_hidden_state
        assert torch.equal(outputs[output][:, :1], plain[:, :1])  # CLS untouched
    assert torch.allclose(outputs["clean"][0, 1:], result.clean.reshape(64, 64), atol=1e-5)
    assert torch.allclose(outputs["raw-minus-artifact"][0, 1:], (result.raw - result.artifact).reshape(64, 64), atol=1e-5)
    assert torch.allclose(outputs["raw-minus-artifact"][0, 1:] + result.artifact.reshape(64, 64), plain[0, 1:], atol=1e-4)
    with pytest.raises(SinklessError, match="unknown Stage-1 output 'smooth'"):
        stage1_transform(tiny, settings, output="smooth")


def test_dvt_output_option_in_compare(tiny, tmp_path):
    from sinkless.tasks.compare import compare
    from sinkless.tasks.fixes import make_fix

    comparison, _ = compare(tiny, "probe", "synthetic", ["none", "dvt"], limit=2, progress=False,
                            fix_options={"dvt": {"output": "raw-minus-artifact"}})
    settings = {r.fix: r.settings for r in comparison.results}["dvt"]
    assert settings["mode"] == "stage 1 per image" and settings["output"] == "raw-minus-artifact"
    with pytest.raises(SinklessError, match="applies to the per-image mode"):
        make_fix("dvt", tiny, [], denoiser=str(tmp_path), output="clean")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tiny.model.modules())


def test_measure_stage2_fits_stage1_on_the_features_the_denoiser_reads(tmp_path, monkeypatch):
    """``python -m sinkless.denoise.measure stage2``: Stage 1 runs on the denoiser's own features (a keys denoiser is
    scored in key space), and an identity-start denoiser scores exactly the raw features (share 0)."""
    from PIL import Image

    from sinkless.denoise import measure

    seen = []
    real = measure.paired_stage1

    def spy(first, second, image, settings):
        seen.append(settings.features)
        return real(first, second, image, settings)

    monkeypatch.setattr(measure, "paired_stage1", spy)
    save_denoiser(Denoiser(DenoiserConfig(dim=64, grid=(8, 8), features="keys", model="planted-vit-tiny")), tmp_path / "d")
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))
    result = measure.measure_stage2(str(tmp_path / "d"), "planted-vit-tiny", "planted-vit-tiny", [image],
                                    Stage1Settings(views=2, steps=3, batch=64))
    assert seen == ["keys"] and result["features"] == "keys"
    mean = result["mean_cosine_to_twin_stage1"]
    assert mean["stage2"] == pytest.approx(mean["raw"], abs=1e-6)
    assert mean["stage1"] != pytest.approx(mean["raw"], abs=1e-6)
    planted = result["planted_tokens"]  # planted-vit-tiny carries a content plant: its tokens' outlier statistics per stage
    assert planted["images_with_planted_tokens"] == 1 and planted["stage2"] == pytest.approx(planted["raw"], abs=1e-5)


def test_a_keys_denoiser_reaches_what_lost_and_zero_shot_segmentation_read(tiny, tmp_path):
    """``compare --fix dvt --denoiser KEYS``: the task sees the denoised last-layer keys (LOST reads them) and the CLS
    attention computed from them (zero-shot segmentation reads it); an output denoiser leaves both as they are."""
    from sinkless.tasks._features import extract, prepare
    from sinkless.tasks.fixes import make_fix
    from sinkless.tasks.synthetic import render_scene

    prepared = prepare(render_scene(0).image, tiny, 64)
    plain = extract(tiny, prepared, features="keys", cls_attention=True)
    h, w = plain.layout.grid
    torch.manual_seed(0)
    for features in ("keys", "output"):
        denoiser = Denoiser(DenoiserConfig(dim=64, grid=(h, w), features=features, model="planted-vit-tiny")).eval()
        with torch.no_grad():
            denoiser.pos_embed.normal_()
        save_denoiser(denoiser, tmp_path / features)
    with make_fix("dvt", tiny, [], denoiser=str(tmp_path / "keys")):
        keyed = extract(tiny, prepared, features="keys", cls_attention=True)
    with torch.no_grad():
        expected = load_denoiser(tmp_path / "keys")(plain.features.reshape(1, h, w, 64)).reshape(h * w, 64)
    assert torch.allclose(keyed.features, expected, atol=1e-5)
    assert not torch.allclose(keyed.cls_attention, plain.cls_attention, atol=1e-4)
    with make_fix("dvt", tiny, [], denoiser=str(tmp_path / "output")):
        out = extract(tiny, prepared, features="keys", cls_attention=True)
    assert torch.equal(out.features, plain.features) and torch.equal(out.cls_attention, plain.cls_attention)


def test_select_best_keeps_the_best_held_out_step(tiny, tmp_path):
    from sinkless.denoise.train import _holdout

    images = _noise_images(1, 5)
    stage1 = Stage1Settings(views=3, steps=8, batch=128)
    # a large learning rate, so the held-out score moves from row to row and the best row is not simply the last
    settings = DenoiserSettings(steps=40, batch=2, lr=3e-2, checkpoint_every=15, holdout=2, view_pairs=0, select="best")
    summary = train_denoiser(tiny, images, tmp_path / "best", settings, stage1, device="cpu", progress=False)
    rows = [r for r in summary["loss_curve"] if "holdout_cosine" in r]
    assert [r["step"] for r in rows] == [1, 10, 20, 30, 40]  # every logged row is scored
    top = max(rows, key=lambda r: r["holdout_cosine"])
    assert summary["selected"] == {"rule": "best", "step": top["step"], "holdout_cosine": top["holdout_cosine"]}
    # what was saved is that step's block: its held-out cosine is the row's (recomputed from the saved file)
    from safetensors.torch import load_file

    targets = [load_file(str(p)) for p in sorted((tmp_path / "best" / "stage1").glob("*.safetensors"))]
    raw, clean = torch.stack([t["raw"] for t in targets[3:]]), torch.stack([t["clean"] for t in targets[3:]])
    saved = load_denoiser(tmp_path / "best")
    assert _holdout(saved, raw, clean)["cosine_denoised_to_stage1"] == pytest.approx(top["holdout_cosine"], abs=1e-6)
    assert summary["holdout"]["cosine_denoised_to_stage1"] == pytest.approx(top["holdout_cosine"], abs=1e-6)

    # the same run with "last" trains identically and keeps step 40
    last = train_denoiser(tiny, images, tmp_path / "last", dataclasses.replace(settings, select="last"), stage1, device="cpu", progress=False)
    assert last["selected"]["step"] == 40 and [r["holdout_cosine"] for r in last["loss_curve"]] == [r["holdout_cosine"] for r in summary["loss_curve"]]
    # and reports the kept (last) block's held-out cosine, which the last logged row scored
    assert last["selected"]["holdout_cosine"] == last["holdout"]["cosine_denoised_to_stage1"]
    assert last["selected"]["holdout_cosine"] == pytest.approx(last["loss_curve"][-1]["holdout_cosine"], abs=1e-6)


def test_select_best_resume_from_a_mid_run_checkpoint(tiny, tmp_path, monkeypatch):
    from sinkless import training

    images = _noise_images(1, 5)  # the data of the test above: the best row is step 30 of 40
    stage1 = Stage1Settings(views=3, steps=8, batch=128)
    settings = DenoiserSettings(steps=40, batch=2, lr=3e-2, checkpoint_every=10, holdout=2, view_pairs=0, select="best")
    whole = train_denoiser(tiny, images, tmp_path / "whole", settings, stage1, device="cpu", progress=False)
    assert whole["selected"]["step"] == 30  # so the choice below was made before the interruption and kept in the checkpoint

    real_learning_rate = training.learning_rate

    def interrupt(settings_, step):  # Ctrl-C as step 35 begins: the checkpoint of step 30 stays
        if step == 35:
            raise KeyboardInterrupt
        return real_learning_rate(settings_, step)

    monkeypatch.setattr(training, "learning_rate", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_denoiser(tiny, images, tmp_path / "cut", settings, stage1, device="cpu", progress=False)
    monkeypatch.setattr(training, "learning_rate", real_learning_rate)
    assert not (tmp_path / "cut" / "denoiser.safetensors").exists()
    resumed = train_denoiser(tiny, images, tmp_path / "cut", settings, stage1, device="cpu", progress=False, resume=True)
    assert resumed["resumed_from"] == [30]
    assert resumed["selected"] == whole["selected"]
    a, b = load_denoiser(tmp_path / "whole"), load_denoiser(tmp_path / "cut")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_select_settings_are_checked():
    with pytest.raises(SinklessError, match="holdout"):
        DenoiserSettings(select="best")
    with pytest.raises(SinklessError, match="unknown selection"):
        DenoiserSettings(select="first", holdout=1)


def test_raw_minus_artifact_target_is_the_input_minus_the_images_G(tiny, tmp_path):
    """``--target raw-minus-artifact``: the block learns each input's own features minus its image's fitted G (for
    the whole image and for each stored crop, which sees G at the same grid positions); the config records it."""
    from safetensors.torch import load_file

    from sinkless.denoise.train import _stage1_targets

    images = _noise_images(3, 3)
    stage1 = Stage1Settings(views=4, steps=8, batch=128)
    settings = DenoiserSettings(steps=3, batch=2, checkpoint_every=3, view_pairs=2, target="raw-minus-artifact")
    summary = train_denoiser(tiny, images, tmp_path / "g", settings, stage1, device="cpu", progress=False)
    assert summary["denoiser"]["target"] == "raw-minus-artifact" and load_denoiser(tmp_path / "g").config.target == "raw-minus-artifact"
    stored = [load_file(str(p)) for p in sorted((tmp_path / "g" / "stage1").glob("*.safetensors"))]
    assert all(set(t) >= {"raw", "clean", "artifact", "view_raw", "view_clean"} for t in stored)
    raw, target, _, pairs = _stage1_targets(tiny, images, tmp_path / "g" / "stage1", stage1, False, 2, "raw-minus-artifact")
    for i, t in enumerate(stored):
        assert torch.equal(target[i], t["raw"] - t["artifact"]) and not torch.equal(target[i], t["clean"])
        assert torch.allclose(pairs[i][1].float(), t["view_raw"].float() - t["artifact"], atol=2e-2)  # float16 storage
    _, clean, _, _ = _stage1_targets(tiny, images, tmp_path / "g" / "stage1", stage1, False, 2, "clean")  # the same fits, DVT's target
    assert all(torch.equal(clean[i], t["clean"]) for i, t in enumerate(stored))

    # a Stage-1 folder written before G was kept: a clear error for this target only
    for path in (tmp_path / "g" / "stage1").glob("*.safetensors"):
        from safetensors.torch import save_file

        save_file({k: v for k, v in load_file(str(path)).items() if k != "artifact"}, str(path))
    with pytest.raises(SinklessError, match="no fitted artifact"):
        _stage1_targets(tiny, images, tmp_path / "g" / "stage1", stage1, False, 2, "raw-minus-artifact")
    with pytest.raises(SinklessError, match="unknown denoiser target"):
        DenoiserSettings(target="smooth")


def test_measure_stage2_scores_a_raw_minus_artifact_denoiser_against_features_minus_g(tmp_path, monkeypatch):
    from PIL import Image

    from sinkless.denoise import measure

    pairs = []
    real = measure.paired_stage1

    def spy(first, second, image, settings):
        pairs.append(real(first, second, image, settings))
        return pairs[-1]

    monkeypatch.setattr(measure, "paired_stage1", spy)
    save_denoiser(Denoiser(DenoiserConfig(dim=64, grid=(8, 8), model="planted-vit-tiny", target="raw-minus-artifact")), tmp_path / "d")
    image = Image.fromarray((np.random.default_rng(1).random((64, 64, 3)) * 255).astype("uint8"))
    result = measure.measure_stage2(str(tmp_path / "d"), "planted-vit-tiny", "planted-vit-tiny", [image], Stage1Settings(views=2, steps=3, batch=64))
    p, c = pairs[0]["a"], pairs[0]["b"]
    cos = lambda x, y: float(torch.nn.functional.cosine_similarity(x, y, dim=-1).mean())  # noqa: E731
    assert result["target"] == "raw-minus-artifact"
    assert result["mean_cosine_to_twin_stage1"]["stage1"] == pytest.approx(cos(p["raw"] - p["artifact"], c["raw"] - c["artifact"]), abs=1e-6)
    assert result["mean_cosine_to_twin_stage1"]["raw"] == pytest.approx(cos(p["raw"], c["raw"] - c["artifact"]), abs=1e-6)
