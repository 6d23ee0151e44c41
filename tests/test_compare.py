"""``sinkless compare`` end to end on the tiny planted model: JSON schema, determinism, errors, fix plug-ins."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from sinkless import cli, zoo
from sinkless.errors import SinklessError
from sinkless.hooks import hooks
from sinkless.tasks import fixes
from sinkless.tasks._features import extract, prepare
from sinkless.tasks.compare import compare
from sinkless.tasks.synthetic import render_scene

TINY = ["--model", "planted-vit-tiny", "--data", "synthetic", "--limit", "4"]


@pytest.fixture(scope="module")
def tiny():
    return zoo.load("planted-vit-tiny")


def _run(capsys, *argv):
    code = cli.main(["compare", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _results(path):
    data = json.loads(path.read_text())
    for row in data["results"]:
        row.pop("seconds"), row.pop("setup_seconds")
    return data["results"]


def test_lost_json_schema_and_table(tmp_path, capsys, tiny):
    out = tmp_path / "lost.json"
    code, table, _ = _run(capsys, *TINY, "--fix", "none", "--task", "lost", "--json", str(out), "--out-dir", str(tmp_path / "pics"))
    assert code == 0
    data = json.loads(out.read_text())
    assert {"sinkless_version", "model", "task", "data", "protocol", "results"} <= set(data)
    assert (data["model"], data["task"], data["data"]) == ("planted-vit-tiny", "lost", "synthetic")
    protocol = data["protocol"]
    assert protocol["features"] == "keys" and protocol["layer"] == 3 and protocol["k"] == 100
    assert {"l2", "gram_bias", "max_side", "preprocessing"} <= set(protocol)
    (row,) = data["results"]
    assert row["fix"] == "none" and row["n_images"] == 4 and 0 <= row["corloc"] <= 100 and row["seconds"] > 0
    assert "corloc" in table and "none" in table
    assert len(list((tmp_path / "pics" / "none").glob("*.png"))) == 4


@pytest.mark.parametrize("task, metrics", [("zeroseg", {"miou", "pixel_accuracy"}), ("probe", {"miou", "accuracy"})])
def test_other_tasks(tmp_path, capsys, tiny, task, metrics):
    out = tmp_path / f"{task}.json"
    code, _, _ = _run(capsys, *TINY, "--task", task, "--json", str(out))
    assert code == 0
    (row,) = json.loads(out.read_text())["results"]
    assert metrics <= set(row) and row["fix"] == "none"


def test_repeated_runs_are_identical(tmp_path, capsys, tiny):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    for path in (first, second):
        assert _run(capsys, *TINY, "--task", "lost", "--features", "values", "--l2", "--json", str(path))[0] == 0
    assert _results(first) == _results(second)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "planted-vit-tiny", "--task", "lost", "--data", "/no/such/folder"], "data not found"),
        (["--model", "no-such-model-anywhere", "--task", "lost", "--data", "synthetic"], "unknown model"),
        (["--model", "planted-vit-tiny", "--task", "lost", "--data", "synthetic", "--fix", "magic"], "unknown fix 'magic'"),
        (["--model", "planted-vit-tiny", "--task", "lost", "--data", "synthetic", "--mass", "0.5"], "--mass does not apply to --task lost"),
        (["--model", "planted-vit-tiny", "--task", "lost", "--data", "synthetic", "--limit", "0"], "--limit must be at least 1"),
        (["--model", "planted-vit-tiny", "--task", "lost", "--data", "synthetic", "--layer", "9"], "layer 9 does not exist"),
    ],
)
def test_bad_input_exits_2_without_output(tmp_path, capsys, argv, message):
    out = tmp_path / "out.json"
    code, stdout, err = _run(capsys, *argv, "--json", str(out))
    assert code == 2 and message in err and "fix:" in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_malformed_annotation_file_exits_2(tmp_path, capsys):
    (tmp_path / "annotations.json").write_text('{"images": [{"file": "a.jpg", "objects": [{"box": [1, 2]}]}]}')
    out = tmp_path / "out.json"
    code, _, err = _run(capsys, "--model", "planted-vit-tiny", "--task", "lost", "--data", str(tmp_path), "--json", str(out))
    assert code == 2 and "four numbers" in err and not out.exists()


def test_text_model_is_refused():
    from conftest import tiny_model
    from sinkless.adapters import adapter_for
    from sinkless.zoo import Loaded

    bert = tiny_model("bert")
    with pytest.raises(SinklessError, match="text model; the lost task needs a vision transformer"):
        compare(Loaded("tiny-bert", bert, adapter_for(bert)), "lost", "synthetic", limit=1)


# -- the fix mechanism: what the lead's `ttr` will plug into ---------------------------------------
def _append_zero_token(loaded, images):
    """A stand-in for test-time registers: one zero token appended after the patches, through hooks."""
    site = loaded.adapter.block_input_site(0)
    return hooks(loaded.model, edit={site: lambda x: torch.cat([x, torch.zeros_like(x[:, :1])], 1)})


def _no_op(loaded, images):
    return hooks(loaded.model, edit={loaded.adapter.block_input_site(0): lambda x: x})


def test_appended_tokens_never_reach_a_task(tiny):
    prepared = prepare(render_scene(0).image, tiny, None)
    plain = extract(tiny, prepared, features="keys", cls_attention=True, tokens=True)
    with _append_zero_token(tiny, []):
        grown = extract(tiny, prepared, features="keys", cls_attention=True, tokens=True)
    assert plain.layout.n_appended == 0 and grown.layout.n_appended == 1
    assert grown.features.shape == plain.features.shape == (28 * 28, 64)  # 224 px / 8 px patches
    assert grown.cls_attention.shape == plain.cls_attention.shape and grown.patch_tokens.shape == plain.patch_tokens.shape
    assert not any(h for h in tiny.model.modules() if h._forward_pre_hooks)  # the fix is gone on exit


def test_a_registered_fix_runs_without_changing_task_code(monkeypatch, tiny):
    monkeypatch.setitem(fixes.FIXES, "append", _append_zero_token)
    monkeypatch.setitem(fixes.FIXES, "noop", _no_op)
    for task in ("lost", "zeroseg", "probe"):
        comparison, _ = compare(tiny, task, "synthetic", ["none", "noop", "append"], limit=4, progress=False,
                                overrides={"max_side": 112})
        none, noop, append = (r.to_json() for r in comparison.results)
        metric = comparison.metric
        assert none[metric] == noop[metric], task  # a no-op fix changes nothing
        assert append["n_images"] == none["n_images"] == 4


def test_a_fix_may_evaluate_another_model(monkeypatch, tiny):
    clean = zoo.load("planted-vit-tiny-clean")
    monkeypatch.setitem(fixes.FIXES, "swap", lambda loaded, images: contextlib.nullcontext(clean))
    comparison, _ = compare(tiny, "lost", "synthetic", ["swap"], limit=2, progress=False)
    reference, _ = compare(clean, "lost", "synthetic", ["none"], limit=2, progress=False)
    assert comparison.results[0].per_image == reference.results[0].per_image


def test_ttr_fix_end_to_end(tmp_path, capsys):
    """`--fix ttr` with neurons from `sinkless fix`, and with neurons it finds itself."""
    neurons = tmp_path / "neurons.json"
    assert cli.main(["fix", "--model", "planted-vit-tiny", "--n-inputs", "24", "--n-heldout", "8", "--out", str(neurons)]) == 0
    capsys.readouterr()
    out = tmp_path / "ttr.json"
    code, stdout, err = _run(capsys, *TINY, "--task", "lost", "--fix", "none", "--fix", "ttr", "--registers", str(neurons), "--json", str(out))
    assert code == 0, err
    result = json.loads(out.read_text())
    ttr = next(r for r in result["results"] if r["fix"] == "ttr")
    assert ttr["fix_settings"]["source"] == str(neurons) and ttr["fix_settings"]["top_k"] >= 1
    assert "ttr" in stdout
    found, _ = compare(zoo.load("planted-vit-tiny"), "zeroseg", "synthetic", ["ttr"], limit=2, progress=False)
    assert found.results[0].settings["source"].startswith("found on")


def test_a_registers_model_of_another_architecture_is_refused(tmp_path, capsys):
    """Its row would be another model's, scored with --model's layer and patch size."""
    from conftest import tiny_model

    from sinkless.registers import add_registers

    add_registers(tiny_model("vit"), 2).save_pretrained(tmp_path / "other")
    code = cli.main(["compare", "--model", "planted-vit-tiny", "--fix", "none", "--fix", "registers", "--registers-model",
                     str(tmp_path / "other"), "--task", "lost", "--data", "synthetic", "--limit", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "is not planted-vit-tiny with registers" in err and "Traceback" not in err


def test_a_damaged_distill_log_is_one_error(tmp_path, capsys):
    from sinkless.registers import add_registers

    student = add_registers(zoo.load("planted-vit-tiny").model, 2)
    student.save_pretrained(tmp_path / "student")
    for text in ("{oops", "[1, 2]"):
        (tmp_path / "student" / "distill_log.json").write_text(text)
        code = cli.main(["compare", "--model", "planted-vit-tiny", "--fix", "distilled", "--distilled", str(tmp_path / "student"),
                         "--task", "lost", "--data", "synthetic", "--limit", "2", "--resamples", "0"])
        err = capsys.readouterr().err
        assert code == 2 and "distill_log.json" in err and "Traceback" not in err


@pytest.mark.parametrize("flags", [["--split", "val"], ["--images", "/nonexistent"]])
def test_data_flags_that_do_not_apply_are_refused(capsys, flags):
    code = cli.main(["compare", "--model", "planted-vit-tiny", "--task", "lost", "--data", "synthetic", "--limit", "2", *flags])
    err = capsys.readouterr().err
    assert code == 2 and f"{flags[0]} does not apply" in err


def test_the_registers_model_follows_the_models_precision(tmp_path):
    from sinkless.registers import add_registers

    add_registers(zoo.load("planted-vit-tiny").model, 2).save_pretrained(tmp_path / "student")
    loaded = zoo.load("planted-vit-tiny", dtype="bfloat16")
    other = fixes._with_registers(str(tmp_path / "student"), "--registers-model", loaded)
    assert next(other.model.parameters()).dtype == torch.bfloat16


def test_json_never_overwrites_the_data_and_never_equals_out_dir(tmp_path, capsys):
    from PIL import Image as PILImage

    data = tmp_path / "data"
    data.mkdir()
    PILImage.new("RGB", (48, 40), (90, 30, 10)).save(data / "a.png")
    (data / "annotations.json").write_text(json.dumps({"images": [{"file": "a.png", "objects": [{"label": "cat", "box": [5, 5, 30, 30]}]}]}))
    before = (data / "annotations.json").read_bytes()
    for target, source in ((data / "annotations.json", data), (data / "a.png", data / "annotations.json")):
        code = cli.main(["compare", "--model", "planted-vit-tiny", "--task", "lost", "--data", str(source), "--json", str(target)])
        assert code == 2 and "is one of the inputs" in capsys.readouterr().err
    assert (data / "annotations.json").read_bytes() == before
    same = tmp_path / "same"
    code = cli.main(["compare", "--model", "planted-vit-tiny", "--task", "lost", "--data", "synthetic", "--limit", "2",
                     "--json", str(same), "--out-dir", str(same)])
    assert code == 2 and "are the same path" in capsys.readouterr().err and not same.exists()


def test_the_json_records_the_precision(tmp_path):
    comparison, _ = compare("planted-vit-tiny", "lost", "synthetic", ["none"], limit=2, progress=False, resamples=0, dtype="bfloat16")
    assert comparison.to_json()["precision"] == {"dtype": "bfloat16", "device": "cpu"}
