"""Fault injection: SIGTERM and SIGKILL in the middle of a write, for ``scan`` (figures), ``fix`` (the
neurons file), a model-cache build and a training checkpoint (the long writes of ``distill``).

Each run is a subprocess that stalls inside the write it is named for (a patch of ``sinkless._io``),
says so by creating a file, and is then signalled. Afterwards the earlier outputs must be
byte-identical, and no temporary file or folder may remain after SIGTERM; after SIGKILL (nothing can
run) the next ordinary run must remove what was left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from robustness_helpers import photos, temp_entries, tree
from sinkless.cli import main

pytestmark = pytest.mark.robustness

STALL = r"""
import contextlib, os, sys, time
import sinkless._io as io
_original = io.atomic_path
MATCH, READY, SKIP = os.environ["STALL_MATCH"], os.environ["STALL_READY"], int(os.environ.get("STALL_SKIP", "0"))
seen = []

@contextlib.contextmanager
def stalled(path, suffix=""):
    with _original(path, suffix) as tmp:
        yield tmp  # the caller has written its bytes into tmp: stall before the rename
        if MATCH in str(path):
            seen.append(path)
            if len(seen) > SKIP and not os.path.exists(READY):
                with open(tmp, "r+b") as handle:  # half a file, as a slow disk would leave it
                    handle.truncate(max(1, os.path.getsize(tmp) // 2))
                open(READY, "w").close()
                time.sleep(300)

io.atomic_path = stalled
"""

CLI = STALL + r"""
from sinkless.cli import main
sys.exit(main(sys.argv[1:]))
"""

CACHE = STALL + r"""
import signal, time
from pathlib import Path
from sinkless.cli import _terminate
from sinkless import zoo
signal.signal(signal.SIGTERM, _terminate)

def build(folder):
    (folder / "weights.bin").write_bytes(b"half" * 1000)
    open(os.environ["STALL_READY"], "w").close()
    time.sleep(300)

try:
    zoo.cached("entry", "k2", build)
except KeyboardInterrupt:
    sys.exit(130)
"""

TRAIN = STALL + r"""
import signal
import torch
from sinkless.cli import _terminate
from sinkless.training import TrainSettings, train
signal.signal(signal.SIGTERM, _terminate)
weight = torch.nn.Parameter(torch.zeros(1000))
try:
    train({"w": weight}, lambda t, g: {"loss": (weight - 1).pow(2).sum()}, TrainSettings(steps=10_000, checkpoint_every=2, log_every=1),
          sys.argv[1], progress=False, resume=True)
except KeyboardInterrupt:
    sys.exit(130)
"""


def _run_until_stalled(script: str, args: list[str], tmp_path: Path, match: str, *, skip: int = 0, env: dict | None = None) -> subprocess.Popen:
    ready = tmp_path / "READY"
    ready.unlink(missing_ok=True)
    environ = {**os.environ, "STALL_MATCH": match, "STALL_READY": str(ready), "STALL_SKIP": str(skip), **(env or {})}
    proc = subprocess.Popen([sys.executable, "-c", script, *args], env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before stalling (exit {proc.returncode}):\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the run never reached the write")
        time.sleep(0.05)
    return proc


def _signal(proc: subprocess.Popen, sig: int) -> tuple[int, str]:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _without_temp(snapshot: dict) -> dict:
    return {k: v for k, v in snapshot.items() if ".sinkless-tmp-" not in k and ".sinkless-new-" not in k}


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory) -> Path:
    """A tiny random ViT saved as a model folder: loads in a fraction of a second in a subprocess."""
    from conftest import tiny_model

    folder = tmp_path_factory.mktemp("models") / "tiny-dinov2"
    tiny_model("dinov2").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_scan_interrupted_while_writing_figures(tmp_path, capsys, vit_folder, sig):
    photos(tmp_path / "imgs", 2)
    out = tmp_path / "out"
    argv = ["-q", "scan", str(tmp_path / "imgs"), "--model", str(vit_folder), "--out", str(out)]
    assert main(argv) == 0  # the earlier outputs
    (out / "my-notes.txt").write_text("mine")
    before = tree(tmp_path)
    proc = _run_until_stalled(CLI, argv, tmp_path, ".png")
    code, err = _signal(proc, sig)
    (tmp_path / "READY").unlink()
    if sig == signal.SIGTERM:
        assert code == 130 and "interrupted" in err and "Traceback" not in err
        assert tree(tmp_path) == before and not temp_entries(tmp_path)
    else:
        assert code == -signal.SIGKILL
        assert temp_entries(tmp_path), "SIGKILL during the figures should leave the stage folder"
        assert _without_temp(tree(tmp_path)) == before
    assert main(argv) == 0  # the next run
    capsys.readouterr()
    assert not temp_entries(tmp_path)
    assert (out / "my-notes.txt").read_text() == "mine"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_fix_interrupted_while_writing_the_neurons_file(tmp_path, capsys, vit_folder, sig):
    photos(tmp_path / "imgs", 3)
    neurons = tmp_path / "n.json"
    neurons.write_text('{"earlier": "neurons file"}\n')
    before = tree(tmp_path)
    argv = ["-q", "fix", str(tmp_path / "imgs"), "--model", str(vit_folder), "--out", str(neurons)]
    proc = _run_until_stalled(CLI, argv, tmp_path, "n.json")
    code, err = _signal(proc, sig)
    (tmp_path / "READY").unlink()
    if sig == signal.SIGTERM:
        assert code == 130 and "Traceback" not in err
        assert tree(tmp_path) == before and not temp_entries(tmp_path)
    else:
        assert temp_entries(tmp_path)
        assert _without_temp(tree(tmp_path)) == before
    assert main(argv) == 0
    capsys.readouterr()
    assert not temp_entries(tmp_path) and "earlier" not in neurons.read_text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_cache_build_interrupted(tmp_path, monkeypatch, sig):
    from sinkless import zoo

    cache = tmp_path / "cache"
    monkeypatch.setenv("SINKLESS_CACHE", str(cache))
    zoo.cached("entry", "k1", lambda folder: (folder / "weights.bin").write_bytes(b"earlier" * 100))
    before = tree(cache)
    proc = _run_until_stalled(CACHE, [], tmp_path, "(the build stalls itself)", env={"SINKLESS_CACHE": str(cache)})
    code, err = _signal(proc, sig)
    if sig == signal.SIGTERM:
        assert code == 130
        assert tree(cache) == before and not temp_entries(cache)
    else:
        assert temp_entries(cache)
        assert _without_temp(tree(cache)) == before
    assert (zoo.cached("entry", "k1", lambda folder: None) / "weights.bin").read_bytes() == b"earlier" * 100
    assert not temp_entries(cache)  # even a run that builds nothing sweeps what a killed build left
    started = time.perf_counter()
    zoo.cached("entry", "k2", lambda folder: (folder / "weights.bin").write_bytes(b"new"))  # the lock died with the process
    assert time.perf_counter() - started < 30 and not temp_entries(cache)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_training_checkpoint_interrupted(tmp_path, sig):
    """The distill-style long write: a checkpoint cut in half is never what is left on disk."""
    from sinkless.training import CHECKPOINT

    out = tmp_path / "run"
    proc = _run_until_stalled(TRAIN, [str(out)], tmp_path, CHECKPOINT, skip=2)  # stall on the third checkpoint
    earlier = (out / CHECKPOINT).read_bytes()
    step = torch.load(out / CHECKPOINT, weights_only=False)["step"]
    code, err = _signal(proc, sig)
    state = torch.load(out / CHECKPOINT, weights_only=False)  # loads: never half-written
    if sig == signal.SIGTERM:
        # Ctrl-C / SIGTERM between steps saves one more (complete) checkpoint, by design
        assert code == 130 and "Traceback" not in err
        assert (out / CHECKPOINT).read_bytes() == earlier or state["step"] >= step
        assert not temp_entries(tmp_path)
    else:
        assert (out / CHECKPOINT).read_bytes() == earlier
        assert temp_entries(tmp_path)
    from sinkless.training import TrainSettings, train

    weight = torch.nn.Parameter(torch.zeros(1000))
    result = train({"w": weight}, lambda t, g: {"loss": (weight - 1).pow(2).sum()},
                   TrainSettings(steps=state["step"] + 2, checkpoint_every=2, log_every=1), out, progress=False, resume=True)
    assert result.steps_done == state["step"] + 2 and not temp_entries(tmp_path)


# -- in-process interruptions (Ctrl-C lands as KeyboardInterrupt wherever Python is) ---------------
def test_ctrl_c_while_a_figure_is_written(tmp_path, capsys, monkeypatch, vit_folder):
    import matplotlib.figure

    photos(tmp_path / "imgs", 1)
    argv = ["-q", "scan", str(tmp_path / "imgs"), "--model", str(vit_folder), "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    before = tree(tmp_path)

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", interrupted)
    assert main(argv) == 130
    assert "interrupted" in capsys.readouterr().err
    assert tree(tmp_path) == before and not temp_entries(tmp_path)


def test_ctrl_c_while_measuring_touches_nothing(tmp_path, capsys, monkeypatch, vit_folder):
    import sinkless._cli.scan as verb

    photos(tmp_path / "imgs", 1)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report.json").write_text("earlier")
    before = tree(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(verb, "scan", interrupted)
    assert main(["-q", "scan", str(tmp_path / "imgs"), "--model", str(vit_folder), "--out", str(tmp_path / "out")]) == 130
    capsys.readouterr()
    assert tree(tmp_path) == before


def test_signals_are_held_for_the_renames_then_delivered(tmp_path):
    """SIGTERM in the middle of moving outputs into place waits until they are all moved."""
    from sinkless._tempfiles import deferred_signals
    from sinkless.cli import _terminate

    previous = signal.signal(signal.SIGTERM, _terminate)
    moved = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with deferred_signals():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                moved.append("all")  # still runs: the signal is held
        assert moved == ["all"]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_cache_build_interrupted_in_process(tmp_cache):
    from sinkless import zoo

    zoo.cached("ki", "k1", lambda folder: (folder / "w").write_text("earlier"))
    before = tree(tmp_cache / "ki")

    def build(folder):
        (folder / "w").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        zoo.cached("ki", "k2", build)
    assert tree(tmp_cache / "ki") == before and not temp_entries(tmp_cache)
