"""Bad flags on every verb: exit 2 with one line naming the problem and the fix, before any long work,
no traceback, nothing written or deleted. (Argument *types* — ``--batch-size abc`` — are argparse's.)"""

from __future__ import annotations

import pytest

from robustness_helpers import expect_error, photos, tiny_text_model_dir
from sinkless.cli import main

pytestmark = pytest.mark.robustness


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A tiny random causal LM with a word-level tokenizer, as a model folder."""
    return tiny_text_model_dir(tmp_path_factory.mktemp("models") / "tiny-llama")

TINY = ["--model", "planted-vit-tiny"]


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A folder with two photos, an earlier output and a file in the way; the CLI runs inside it."""
    monkeypatch.chdir(tmp_path)
    photos(tmp_path / "imgs", 2)
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "report.json").write_text('{"mine": true}')
    (tmp_path / "afile").write_text("not a folder")
    return tmp_path


SCAN = [
    (["--threshold", "nan"], "--threshold must be a finite number"),
    (["--threshold", "inf"], "--threshold must be a finite number"),
    (["--threshold", "-3"], "--threshold must be a positive number"),
    (["--threshold", "0"], "--threshold must be a positive number"),
    (["--threshold", "1e300"], "--threshold 1e+300 is too large"),
    (["--image-size", "-28"], "--image-size must be at least 1"),
    (["--image-size", "0"], "--image-size must be at least 1"),
    (["--image-size", "5"], "smaller than one 8-pixel patch"),
    (["--max-tokens", "0"], "--max-tokens must be at least 1"),
    (["--max-tokens", "-5"], "--max-tokens must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--batch-size", "-4"], "--batch-size must be at least 1"),
    (["--layers", "3-1"], "runs backwards"),
    (["--layers", "2-9"], "outside 0..3"),
    (["--layers", "-9"], "outside 0..3"),
    (["--layers", "one"], "bad --layers"),
    (["--out", "afile"], "is an existing file"),
    (["--out", "afile/sub"], "afile is a file"),
    (["--out", ""], "--out is empty"),
    (["--registers", "missing.json"], "file not found"),
    (["--registers", "imgs"], "is a folder"),
]


@pytest.mark.parametrize("flags, message", SCAN, ids=[" ".join(f) or "empty" for f, _ in SCAN])
def test_scan_flags(work, capsys, flags, message):
    expect_error(["scan", "imgs", *TINY, *flags], capsys, contains=message, root=work)


FIX = [
    (["--n-inputs", "0"], "--n-inputs must be at least 1"),
    (["--n-inputs", "-3"], "--n-inputs must be at least 1"),
    (["--n-heldout", "0"], "--n-heldout must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--top-k", "0"], "--top-k must be at least 1"),
    (["--top-k", "-2"], "--top-k must be at least 1"),
    (["--threshold", "nan"], "--threshold must be a finite number"),
    (["--threshold", "-1"], "--threshold must be a positive number"),
    (["--detection-layer", "99"], "--detection-layer 99 is not a layer of planted-vit-tiny, which has 4 layers"),
    (["--detection-layer", "-99"], "is not a layer"),
]


@pytest.mark.parametrize("flags, message", FIX, ids=[" ".join(f) for f, _ in FIX])
def test_fix_flags(work, capsys, flags, message):
    expect_error(["fix", *TINY, *flags, "--out", "n.json"], capsys, contains=message, root=work)


@pytest.mark.parametrize(
    "out, message",
    [("imgs", "is a folder, not a file"), ("afile/n.json", "afile is a file"), ("", "--out is empty")],
    ids=["folder", "under-a-file", "empty"],
)
def test_fix_out(work, capsys, out, message):
    expect_error(["fix", *TINY, "--out", out], capsys, contains=message, root=work)


def test_fix_out_must_not_overwrite_an_input(work, capsys):
    expect_error(["fix", "imgs/photo0.png", "imgs/photo1.png", *TINY, "--out", "imgs/photo0.png"], capsys,
                 contains="is one of the inputs", root=work)


def test_fix_with_inputs_and_detection_layer_without_outliers(work, capsys):
    """A layer that exists but where the discovery inputs show no outliers: an error, not a ValueError traceback."""
    expect_error(["fix", "imgs", *TINY, "--detection-layer", "0", "--out", "n.json"], capsys,
                 contains=["no discovery input has outliers at detection layer 0"], root=work)


COMPARE = [
    (["--limit", "0"], "--limit must be at least 1"),
    (["--k", "0"], "--k must be at least 1"),
    (["--knn-k", "-1"], "--knn-k must be at least 1"),
    (["--mass", "0"], "--mass must be in (0, 1]"),
    (["--mass", "1.5"], "--mass must be in (0, 1]"),
    (["--mass", "nan"], "--mass must be a finite number"),
    (["--max-side", "-1"], "--max-side must be at least 0"),
    (["--gram-bias", "nan"], "--gram-bias must be a finite number"),
    (["--json", "imgs"], "is a folder, not a file"),
    (["--json", "afile/r.json"], "afile is a file"),
    (["--out-dir", "afile"], "is an existing file"),
    (["--registers", "nope.json"], "file not found"),
]


@pytest.mark.parametrize("flags, message", COMPARE, ids=[" ".join(f) for f, _ in COMPARE])
def test_compare_flags(work, capsys, flags, message):
    expect_error(["compare", *TINY, "--task", "lost", "--data", "synthetic", *flags], capsys, contains=message, root=work)


def test_models_load_unknown(work, capsys):
    expect_error(["models", "--load", "./no-such-folder"], capsys, contains="not a model folder", root=work)


@pytest.mark.parametrize("argv", [["scan", "--batch-size", "abc"], ["fix", "--model", "x"], ["scan", "--rule", "magic"], ["frobnicate"]],
                         ids=["not-a-number", "missing-required", "bad-choice", "unknown-verb"])
def test_argparse_errors_exit_2(work, capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_text_flags_on_a_text_model(work, capsys, text_model):
    expect_error(["scan", "--model", str(text_model), "--text", "w1 w2", "--max-tokens", "0"], capsys,
                 contains="--max-tokens must be at least 1", root=work)


MORE = [
    (["scan", "imgs", *TINY, "--threshold=-inf"], "--threshold must be a finite number"),
    (["fix", *TINY, "--threshold", "inf", "--out", "n.json"], "--threshold must be a finite number"),
    (["compare", *TINY, "--task", "lost", "--data", "synthetic", "--limit", "-5"], "--limit must be at least 1"),
    (["compare", *TINY, "--task", "lost", "--data", "synthetic", "--k", "-1"], "--k must be at least 1"),
    (["scan", "imgs", *TINY, "--out", "/dev/null"], "is an existing file"),
    (["scan", "imgs", *TINY, "--out", "x" * 300], "File name too long"),
]


@pytest.mark.parametrize("argv, message", MORE, ids=[" ".join(a[-2:])[:40] for a, _ in MORE])
def test_more_flags(work, capsys, argv, message):
    expect_error(argv, capsys, contains=message, root=work)


@pytest.mark.parametrize("argv", [["scan", "--image-size", "1e3"], ["fix", "--model", "x", "--out", "n.json", "--top-k", "2.5"]], ids=["float-int", "float-top-k"])
def test_not_a_whole_number_is_argparses(work, capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and "invalid int value" in capsys.readouterr().err


# -- ppl and stream (the streaming verbs): every number and output checked before the model loads ------
PPL = [
    (["--mode", "sink", "--sinks", "-2"], "--sinks must be at least 0"),
    (["--sinks", "-2"], "--sinks must be at least 0"),  # full mode ignores --sinks, but -2 is still a mistake
    (["--mode", "sink", "--window", "0"], "--window must be at least 1"),
    (["--max-tokens", "0"], "--max-tokens must be at least 1"),
    (["--max-tokens", "-5"], "--max-tokens must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--chunk-size", "-1"], "--chunk-size must be at least 1"),
    (["--mode", "recompute", "--every", "0"], "--every must be at least 1"),
    (["--json", "imgs"], "is a folder, not a file"),
    (["--json", "afile/r.json"], "afile is a file"),
    (["--plot", "imgs"], "is a folder, not a file"),
    (["--registers", "nope.json"], "file not found"),
    (["--zero-neurons", "imgs"], "is a folder"),
]


@pytest.mark.parametrize("flags, message", PPL, ids=[" ".join(f) for f, _ in PPL])
def test_ppl_flags(work, capsys, flags, message):
    expect_error(["ppl", "--model", "smollm2-135m", *flags], capsys, contains=message, root=work)


STREAM = [
    (["--sinks", "-2"], "--sinks must be at least 0"),
    (["--window", "0"], "--window must be at least 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--chunk-size", "0"], "--chunk-size must be at least 1"),
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--temperature", "-1"], "--temperature must be"),
]


@pytest.mark.parametrize("flags, message", STREAM, ids=[" ".join(f) for f, _ in STREAM])
def test_stream_flags(work, capsys, flags, message):
    expect_error(["stream", "--model", "smollm2-135m", "--prompt", "hello", *flags], capsys, contains=message, root=work)
