"""Bad files: neurons files (types, ranges, top_k, another model's), model folders (config, weights,
tokenizer), unusable outputs (a folder, a file in the way, a read-only place), a hub id offline."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest
import torch

from robustness_helpers import expect_error, neurons_file, photos, tiny_text_model_dir, tree, words
from sinkless import zoo
from sinkless.cli import main
from sinkless.errors import SinklessError
from sinkless.registers import RegisterNeurons, TestTimeRegisters, ZeroNeurons, load_neurons

pytestmark = pytest.mark.robustness


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A tiny random causal LM with a word-level tokenizer, as a model folder."""
    return tiny_text_model_dir(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module")
def tiny():
    return zoo.load("planted-vit-tiny")


# -- neurons files ---------------------------------------------------------------------------------
TWO = [{"layer": 1, "neuron": 3, "score": 2.0}, {"layer": 1, "neuron": 7, "score": 1.0}]
BAD_NEURON_FILES = [
    ({"top_k": -2, "neurons": TWO}, "top_k must be a whole number from 1 to 2"),
    ({"top_k": 0, "neurons": TWO}, "top_k must be a whole number from 1 to 2"),
    ({"top_k": 3, "neurons": TWO}, "top_k must be a whole number from 1 to 2"),
    ({"top_k": "2", "neurons": TWO}, "top_k must be a whole number"),
    ({"top_k": 1.5, "neurons": TWO}, "top_k must be a whole number"),
    ({"top_k": True, "neurons": TWO}, "top_k must be a whole number"),
    ({"neurons": "1:3"}, "'neurons' must be a list"),
    ({"neurons": [{"neuron": 3}]}, "needs integer 'layer' and 'neuron'"),
    ({"neurons": [[1, 3]]}, "needs integer 'layer' and 'neuron'"),
    ({"neurons": [{"layer": -1, "neuron": 3}]}, "layer must be at least 0"),
    ({"neurons": [{"layer": 1.5, "neuron": 3}]}, "layer must be at least 0"),
    ({"neurons": [{"layer": 1, "neuron": "x"}]}, "neuron must be at least 0"),
    ({"neurons": [{"layer": 1, "neuron": 3}, {"layer": 1, "neuron": 3}]}, "listed twice"),
    ({"neurons": [{"layer": 1, "neuron": 3, "score": "high"}]}, "score must be a finite number"),
    ({"neurons": [{"layer": 1, "neuron": 3, "peak": [1]}]}, "peak must be a finite number"),
    ({"model": 5}, "'model' must be the model's name"),
    ({"detection_layer": -4}, "detection_layer must be at least 0"),
    ({"threshold": -1}, "threshold must be positive"),
    ({"rule": "robust"}, "'rule' must be a JSON object"),
]


@pytest.mark.parametrize("fields, message", BAD_NEURON_FILES, ids=[m.split(" must")[0][:30] + f"-{i}" for i, (_, m) in enumerate(BAD_NEURON_FILES)])
def test_neurons_file_fields(tmp_path, fields, message):
    with pytest.raises(SinklessError) as info:
        load_neurons(neurons_file(tmp_path / "n.json", **fields))
    assert message in str(info.value)


def test_neurons_file_top_k_minus_two_no_longer_applies_62_of_64(tmp_path, tiny, capsys):
    many = [{"layer": 1, "neuron": i, "score": 1.0} for i in range(64)]
    path = neurons_file(tmp_path / "n.json", neurons=many, top_k=-2)
    photos(tmp_path / "imgs", 1)
    expect_error(["scan", str(tmp_path / "imgs"), "--model", "planted-vit-tiny", "--registers", str(path), "--out", str(tmp_path / "o")],
                 capsys, contains="top_k must be a whole number from 1 to 64", root=tmp_path)


@pytest.mark.parametrize(
    "content, message",
    [(b"", "not valid JSON"), (b"{not json", "not valid JSON"), (b"\xff\xfe\x00", "not valid JSON"), (b"[1, 2]", "not a register-neurons file"),
     (b'{"model": "x"}', "not a register-neurons file")],
    ids=["empty", "broken", "binary", "a-list", "no-neurons"],
)
def test_neurons_file_not_json(tmp_path, content, message):
    (tmp_path / "n.json").write_bytes(content)
    with pytest.raises(SinklessError, match=message):
        load_neurons(tmp_path / "n.json")


def test_neurons_outside_the_model(tmp_path, tiny):
    width = tiny.adapter.mlp_width(tiny.model)
    for cls in (TestTimeRegisters, ZeroNeurons):
        with pytest.raises(SinklessError, match=r"name layers \[9\] but planted-vit-tiny has 4"):
            cls(tiny, RegisterNeurons("planted-vit-tiny", [{"layer": 9, "neuron": 1, "score": 1.0}], top_k=1))
        with pytest.raises(SinklessError, match=f"outside 0..{width - 1}"):
            cls(tiny, RegisterNeurons("planted-vit-tiny", [{"layer": 1, "neuron": width, "score": 1.0}], top_k=1))


def test_neurons_outside_the_model_through_the_cli(tmp_path, capsys):
    photos(tmp_path / "imgs", 1)
    path = neurons_file(tmp_path / "n.json", neurons=[{"layer": 1, "neuron": 100000}])
    expect_error(["scan", str(tmp_path / "imgs"), "--model", "planted-vit-tiny", "--registers", str(path), "--out", str(tmp_path / "o")],
                 capsys, contains="outside 0..", root=tmp_path)


def test_neurons_made_for_another_model_warn_for_every_caller(tmp_path, tiny, caplog):
    """ppl, scan and compare all build TestTimeRegisters / ZeroNeurons: the check lives there."""
    neurons = load_neurons(neurons_file(tmp_path / "n.json", model="smollm2-135m"))
    for cls in (TestTimeRegisters, ZeroNeurons):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            cls(tiny, neurons)
        assert "made for smollm2-135m, not planted-vit-tiny" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        TestTimeRegisters(tiny, load_neurons(neurons_file(tmp_path / "m.json")))
    assert caplog.text == ""


# -- model folders ---------------------------------------------------------------------------------
def _model_folder(tmp_path: Path, text_model: Path, broken: str) -> Path:
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(text_model, folder)
    if broken == "config-not-json":
        (folder / "config.json").write_text("{'model_type': 'llama',")
    elif broken == "config-no-type":
        (folder / "config.json").write_text(json.dumps({"hidden_size": 32}))
    elif broken == "no-weights":
        (folder / "model.safetensors").unlink()
    elif broken == "no-tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).unlink(missing_ok=True)
    elif broken == "corrupt-weights":
        (folder / "model.safetensors").write_bytes(b"\x00" * 100)
    elif broken == "no-config":
        (folder / "config.json").unlink()
    return folder


@pytest.mark.parametrize(
    "broken, message",
    [
        ("config-not-json", "config.json is not valid JSON"),
        ("config-no-type", "config.json names no model_type"),
        ("no-weights", "holds no weights"),
        ("no-tokenizer", "holds no tokenizer"),
        ("corrupt-weights", "cannot load the model in folder"),
        ("no-config", "is not a model folder (no config.json)"),
    ],
)
def test_model_folder(tmp_path, capsys, text_model, broken, message):
    folder = _model_folder(tmp_path, text_model, broken)
    err = expect_error(["scan", "--model", str(folder), "--text", words(8), "--out", str(tmp_path / "out")], capsys, contains=message, root=tmp_path)
    assert "hub could not provide" not in err


def test_offline_hub_id_fails_fast_with_one_line(tmp_path, capsys, monkeypatch):
    """No network: one probe (≤ 2 s), then the local HF cache only, instead of 30 s of retries."""
    from huggingface_hub import constants

    from sinkless import _hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1:9")  # nothing listens: unreachable, like no network
    monkeypatch.setattr(_hub, "_reachable", None)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    zoo.load("planted-vit-tiny")  # imports and the like out of the timing
    started = time.perf_counter()
    err = expect_error(["scan", "--model", "nobody/no-such-model", "--out", str(tmp_path / "out")], capsys,
                       contains=["not in the local Hugging Face cache", "cannot be reached"], root=tmp_path)
    seconds = time.perf_counter() - started
    print(f"offline hub id: {seconds:.2f} s")
    assert seconds <= 2.0
    assert "Retry" not in capsys.readouterr().err and err


def test_unknown_name_online_message_is_unchanged(tmp_path, capsys):
    """With HF_HUB_OFFLINE=1 (the tests' setting) the message says the cache lacks it."""
    expect_error(["scan", "--model", "nobody/no-such-model", "--out", str(tmp_path / "out")], capsys, contains="unknown model", root=tmp_path)


# -- outputs ---------------------------------------------------------------------------------------
def test_read_only_output_folder(tmp_path, capsys):
    photos(tmp_path / "imgs", 1)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: permissions do not stop writes (see test_unwritable_system_folder)")
        expect_error(["scan", str(tmp_path / "imgs"), "--model", "planted-vit-tiny", "--out", str(locked / "o")], capsys,
                     contains="is not writable", root=tmp_path)
    finally:
        locked.chmod(0o700)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("verb", ["scan", "fix", "compare", "distill", "denoise", "train-denoiser", "compare-attn", "train-attn"])
def test_unwritable_system_folder(tmp_path, capsys, verb):
    """/proc refuses new files even for root: the output is refused before any work, not after."""
    photos(tmp_path / "imgs", 1)
    out = "/proc/self/sinkless-out"
    argv = {
        "scan": ["scan", str(tmp_path / "imgs"), "--model", "planted-vit-tiny", "--out", out],
        "fix": ["fix", "--model", "planted-vit-tiny", "--out", out + "/n.json"],
        "compare": ["compare", "--model", "planted-vit-tiny", "--task", "lost", "--data", "synthetic", "--json", out + "/r.json"],
        "distill": ["distill", "--model", "planted-vit-tiny", "--images", str(tmp_path / "imgs"), "--out", out, "--steps", "2"],
        "denoise": ["denoise", "--model", "planted-vit-tiny", str(tmp_path / "imgs"), "--out", out],
        "train-denoiser": ["denoise", "--train-denoiser", "--model", "planted-vit-tiny", "--images", str(tmp_path / "imgs"), "--out", out],
        "compare-attn": ["compare-attn", str(tmp_path / "imgs"), "--json", out + "/t.json"],  # refused before the runs are read
        "train-attn": ["train-attn", "--variant", "gated", "--size", "tiny", "--out", out],
    }[verb]
    started = time.perf_counter()
    expect_error(argv, capsys, contains="cannot be written", root=tmp_path)  # one check and one message for every verb
    assert time.perf_counter() - started < 10  # refused up front, not after the run


def test_failed_scan_leaves_the_earlier_report_byte_identical(tmp_path, capsys):
    photos(tmp_path / "imgs", 2)
    assert main(["-q", "scan", str(tmp_path / "imgs"), "--model", "planted-vit-tiny", "--out", str(tmp_path / "o")]) == 0
    (tmp_path / "imgs" / "zz.png").write_bytes(b"garbage")
    expect_error(["scan", str(tmp_path / "imgs"), "--model", "planted-vit-tiny", "--out", str(tmp_path / "o")], capsys,
                 contains="cannot read", root=tmp_path)


# -- the model cache -------------------------------------------------------------------------------
def test_cache_entry_without_stamp_is_rebuilt_not_served(tmp_cache):
    (tmp_cache / "half").mkdir()
    (tmp_cache / "half" / "weights.bin").write_text("half")  # e.g. copied by hand, or an old crash
    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "weights.bin").write_text("whole")

    target = zoo.cached("half", "k", build)
    assert calls and (target / "weights.bin").read_text() == "whole"
    (target / "sinkless-cache.json").write_text("{broken")
    zoo.cached("half", "k", build)
    assert len(calls) == 2


def test_unwritable_cache_is_one_message(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("SINKLESS_CACHE", str(tmp_path / "file" / "cache"))
    with pytest.raises(SinklessError, match="cannot create the model cache"):
        zoo.cached("thing", "k", lambda folder: None)


def test_checkpoint_that_is_not_one(tmp_path):
    from sinkless.training import CHECKPOINT, TrainSettings, train

    (tmp_path / CHECKPOINT).write_bytes(b"not a checkpoint")
    weight = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(SinklessError, match="cannot read the checkpoint"):
        train({"w": weight}, lambda t, g: {"loss": (weight - 1).pow(2).sum()}, TrainSettings(steps=2), tmp_path, resume=True, progress=False)
    assert tree(tmp_path)[CHECKPOINT][0]  # left as it was


@pytest.mark.parametrize("verb", ["fix", "compare"])
def test_a_device_is_not_an_output_file(tmp_path, capsys, verb):
    """As root, replacing /dev/null by a regular file would break the machine: refused."""
    argv = {"fix": ["fix", "--model", "planted-vit-tiny", "--out", "/dev/null"],
            "compare": ["compare", "--model", "planted-vit-tiny", "--task", "lost", "--data", "synthetic", "--json", "/dev/null"]}[verb]
    expect_error(argv, capsys, contains="is not a regular file", root=tmp_path)
    assert Path("/dev/null").is_char_device()


def test_a_full_disk_is_one_message(tmp_path, monkeypatch):
    import errno

    from sinkless._io import atomic_write_json, staged_dir

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(SinklessError, match="No space left on device"):
        atomic_write_json(tmp_path / "r.json", {"a": 1})
    with pytest.raises(SinklessError, match="No space left on device"):
        with staged_dir(tmp_path / "out") as stage:
            (stage / "report.json").write_text("{}")
    monkeypatch.undo()
    assert tree(tmp_path) == {}


def test_an_output_behind_a_symlink_is_written_through_it(tmp_path):
    from sinkless._io import atomic_write_json

    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "r.json").write_text("{}")
    (tmp_path / "link.json").symlink_to(tmp_path / "real" / "r.json")
    atomic_write_json(tmp_path / "link.json", {"a": 1})
    assert (tmp_path / "link.json").is_symlink() and json.loads((tmp_path / "real" / "r.json").read_text()) == {"a": 1}


@pytest.mark.parametrize("flags, message", [(["--image-size", "100000"], "--image-size 100000"), (["--image-size", "3000", "--batch-size", "1"], "GiB of memory")])
def test_a_scan_that_cannot_fit_in_memory_is_refused(tmp_path, capsys, flags, message):
    photos(tmp_path / "imgs", 1)
    expect_error(["scan", str(tmp_path / "imgs"), "--model", "planted-vit-tiny", *flags, "--out", str(tmp_path / "o")], capsys,
                 contains=[message, "--no-attention"], root=tmp_path)


def test_a_long_text_context_that_cannot_fit_in_memory_is_refused(tmp_path, capsys, monkeypatch):
    import sinkless._cli.scan as scan_cli

    monkeypatch.setattr(scan_cli, "_available_bytes", lambda: 256 * 2**20)  # a small machine: 256 MiB free
    folder = tiny_text_model_dir(tmp_path / "wide", context=1_000_000)
    expect_error(["scan", "--model", str(folder), "--text", words(200_000), "--max-tokens", "200000", "--out", str(tmp_path / "o")], capsys,
                 contains="texts of 200000 tokens", root=tmp_path)


def test_the_memory_check_counts_chunked_text_attention_as_linear_in_the_tokens(tmp_path, monkeypatch):
    """A causal LM's attention runs in query chunks and its hooks keep per-token reductions: a 200k-token
    text of the tiny model needs well under 4 GiB, and refusing it for an (n x n) matrix would be wrong.
    With chunking switched off (`attention_chunk=None`) the same length is refused for its quadratic attention."""
    from types import SimpleNamespace

    import sinkless._cli.scan as scan_cli
    from sinkless import zoo
    from sinkless.scan import ScanSettings

    monkeypatch.setattr(scan_cli, "_available_bytes", lambda: 4 * 2**30)
    items = [SimpleNamespace(text=words(200_000))]
    causal = zoo.load(str(tiny_text_model_dir(tmp_path / "causal", context=1_000_000)))
    scan_cli._check_memory(causal, items, ScanSettings(max_tokens=200_000))  # no error
    with pytest.raises(SinklessError, match="texts of 200000 tokens"):  # the same text, attention never chunked
        scan_cli._check_memory(causal, items, ScanSettings(max_tokens=200_000, attention_chunk=None))


@pytest.mark.parametrize("content", ["model: x\nneurons: []\n", "layer,neuron\n1,3\n"], ids=["yaml", "csv"])
def test_neurons_file_in_another_format(tmp_path, content):
    (tmp_path / "n.json").write_text(content)
    with pytest.raises(SinklessError, match="not valid JSON"):
        load_neurons(tmp_path / "n.json")


def test_an_empty_neuron_set_is_valid_and_changes_nothing(tmp_path, tiny):
    neurons = load_neurons(neurons_file(tmp_path / "n.json", neurons=[], top_k=0))
    assert TestTimeRegisters(tiny, neurons).n == 0


def test_unknown_fields_in_a_neurons_file_are_ignored(tmp_path):
    assert load_neurons(neurons_file(tmp_path / "n.json", comment="found on my photos", extra={"a": 1})).top_k == 1


@pytest.mark.parametrize("broken, message", [("config-is-a-folder", "cannot read config.json"), ("config-empty", "not valid JSON"),
                                              ("weights-are-a-folder", "holds no weights"), ("tokenizer-broken", "has no usable tokenizer")])
def test_model_folder_more(tmp_path, capsys, text_model, broken, message):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(text_model, folder)
    if broken == "config-is-a-folder":
        (folder / "config.json").unlink()
        (folder / "config.json").mkdir()
    elif broken == "config-empty":
        (folder / "config.json").write_text("")
    elif broken == "weights-are-a-folder":
        (folder / "model.safetensors").unlink()
        (folder / "model.safetensors").mkdir()
    elif broken == "tokenizer-broken":
        (folder / "tokenizer.json").write_text("{broken")
    expect_error(["scan", "--model", str(folder), "--text", words(8), "--out", str(tmp_path / "out")], capsys, contains=message, root=tmp_path)


def test_model_given_as_a_file(tmp_path, capsys):
    (tmp_path / "weights.safetensors").write_bytes(b"\x00" * 10)
    expect_error(["scan", "--model", str(tmp_path / "weights.safetensors"), "--text", "hi", "--out", str(tmp_path / "out")], capsys,
                 contains="is not a model folder", root=tmp_path)


@pytest.mark.parametrize("content, message", [(b'{"model": "x", "neurons": []}', "not the right kind of file (no 'nll_curve')"),
                                              (b"{broken", "not valid JSON"), (b"[1]", "not the right kind of file")],
                         ids=["other-kind", "broken", "a-list"])
def test_json_input_of_another_kind(tmp_path, content, message):
    from sinkless._cli._args import json_input

    (tmp_path / "r.json").write_bytes(content)
    with pytest.raises(SinklessError, match=r"--overlay .* ") as info:
        json_input(str(tmp_path / "r.json"), "--overlay", keys=("nll_curve",), made_by="`sinkless ppl --json`")
    assert message in str(info.value)


# -- the streaming verbs' files: --text, --overlay, --registers, a model without rotary positions ------
def test_ppl_text_folder_says_folder(tmp_path, capsys):
    (tmp_path / "texts").mkdir()
    err = expect_error(["ppl", "--model", "smollm2-135m", "--text", str(tmp_path / "texts")], capsys, contains="is a folder, not a file", root=tmp_path)
    assert "does not exist" not in err


@pytest.mark.parametrize(
    "content, message",
    [
        (json.dumps({"model": "m", "modality": "text", "layers": []}), "is not the right kind of file"),  # a scan report.json
        (json.dumps({"model": "m", "mode": "full", "nll_curve": "1,2"}), "'nll_curve' is not a list of numbers"),
        (json.dumps({"model": "m", "mode": "full", "nll_curve": []}), "'nll_curve' is not a list of numbers"),
        ("[1, 2, 3]", "is not the right kind of file"),
        ("{oops", "is not valid JSON"),
    ],
    ids=["scan-report", "curve-text", "curve-empty", "a-list", "not-json"],
)
def test_ppl_overlay_of_another_kind(tmp_path, capsys, content, message):
    (tmp_path / "r.json").write_text(content)
    expect_error(["ppl", "--model", "smollm2-135m", "--overlay", str(tmp_path / "r.json"), "--plot", str(tmp_path / "p.png")],
                 capsys, contains=message, root=tmp_path)


def test_ppl_registers_made_for_another_model_warns(tmp_path, capsys, caplog, text_model):
    """`ppl --registers` gives the warning `scan` gives for a neurons file of another model."""
    path = neurons_file(tmp_path / "n.json", model="smollm2-135m")
    (tmp_path / "t.txt").write_text(words(40))
    with caplog.at_level(logging.WARNING):
        code = main(["-q", "ppl", "--model", str(text_model), "--text", str(tmp_path / "t.txt"), "--registers", str(path), "--no-progress"])
    assert code == 0
    assert f"made for smollm2-135m, not {text_model.name}" in caplog.text or "made for smollm2-135m" in caplog.text


def test_stream_on_gpt2_names_what_stream_can_do(tmp_path, capsys):
    """A model without rotary positions: the fix must not suggest a --mode that `stream` does not have."""
    folder = tiny_text_model_dir(tmp_path / "tiny-gpt2", family="gpt2")
    err = expect_error(["stream", "--model", str(folder), "--prompt", "w1 w2", "--sinks", "1", "--window", "4"], capsys,
                       contains=["has no rotary position embeddings", "sinkless ppl --mode full"], root=tmp_path)
    assert "--mode full / recompute" not in capsys.readouterr().err + err


def test_a_dangling_link_as_the_output_folder(tmp_path, capsys):
    photos(tmp_path / "imgs", 1)
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    expect_error(["scan", str(tmp_path / "imgs"), "--model", "planted-vit-tiny", "--out", str(tmp_path / "link")], capsys,
                 contains=f"is a link to {tmp_path / 'nowhere'}, which does not exist", root=tmp_path)


def test_fix_out_never_replaces_a_file_of_the_model(tmp_path, capsys, text_model):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(text_model, folder)
    expect_error(["fix", "--model", str(folder), "--out", str(folder / "config.json")], capsys, contains="is one of the inputs", root=tmp_path)
