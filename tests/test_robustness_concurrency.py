"""Outputs and the cache when runs meet: earlier runs' files, the user's own files, two runs at once,
two environments sharing one cache, output folders inside input folders, file permissions."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from robustness_helpers import photos, temp_entries, tiny_text_model_dir, tree, umask_is
from sinkless import zoo
from sinkless._io import MANIFEST, atomic_write_json, staged_dir
from sinkless.cli import main

pytestmark = pytest.mark.robustness


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A tiny random causal LM with a word-level tokenizer, as a model folder."""
    return tiny_text_model_dir(tmp_path_factory.mktemp("models") / "tiny-llama")


def _scan(*argv) -> None:
    assert main(["-q", "scan", *argv]) == 0


def test_a_scan_never_deletes_the_users_files(tmp_path, capsys, monkeypatch, text_model):
    """Before: `scan --out o/dl` (the main job: a vision and a text model) deleted o/dl/<text model>/notes.txt."""
    import sinkless._cli.scan as verb

    monkeypatch.setattr(verb, "DEFAULT_VISION", "planted-vit-tiny")
    monkeypatch.setattr(verb, "DEFAULT_TEXT", str(text_model))
    out = tmp_path / "o" / "dl"
    assert main(["-q", "scan", "--out", str(out)]) == 0
    sub = next(p for p in out.iterdir() if p.is_dir())
    (sub / "notes.txt").write_text("my notes")
    (out / "draft.md").write_text("my draft")
    assert main(["-q", "scan", "--out", str(out)]) == 0
    capsys.readouterr()
    assert (sub / "notes.txt").read_text() == "my notes" and (out / "draft.md").read_text() == "my draft"
    assert (sub / "report.json").exists()


def test_figures_of_an_earlier_scan_do_not_stay_beside_a_new_report(tmp_path, capsys):
    photos(tmp_path / "many", 3)
    photos(tmp_path / "one", 1)
    out = tmp_path / "out"
    _scan(str(tmp_path / "many"), "--model", "planted-vit-tiny", "--out", str(out))
    first = set(json.loads((out / "report.json").read_text())["figures"])
    _scan(str(tmp_path / "one"), "--model", "planted-vit-tiny", "--out", str(out))
    second = set(json.loads((out / "report.json").read_text())["figures"])
    capsys.readouterr()
    assert first - second, "the test needs figures the second scan does not write"
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*.png")}
    assert on_disk == second


def test_an_earlier_figure_the_user_changed_is_kept(tmp_path):
    out = tmp_path / "out"
    with staged_dir(out, kind="scan") as stage:
        (stage / "a.png").write_text("a")
        (stage / "b.png").write_text("b")
    (out / "b.png").write_text("annotated by hand")
    with staged_dir(out, kind="scan") as stage:
        (stage / "c.png").write_text("c")
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, "b.png", "c.png"])


def test_other_kinds_of_outputs_in_the_same_folder_stay(tmp_path):
    out = tmp_path / "out"
    with staged_dir(out, kind="scan") as stage:
        (stage / "report.json").write_text("{}")
    with staged_dir(out, kind="compare-pictures") as stage:
        (stage / "lost").mkdir()
        (stage / "lost" / "0.png").write_text("x")
    assert (out / "report.json").exists() and (out / "lost" / "0.png").exists()


def test_out_inside_the_input_folder_is_not_read_back(tmp_path, capsys):
    photos(tmp_path / "imgs", 2)
    for _ in range(2):
        _scan(str(tmp_path / "imgs"), "--model", "planted-vit-tiny", "--out", str(tmp_path / "imgs"))
        data = json.loads((tmp_path / "imgs" / "report.json").read_text())
        assert [Path(i["name"]).name for i in data["inputs"]] == ["photo0.png", "photo1.png"]
    _scan(str(tmp_path / "imgs" / "*.png"), "--model", "planted-vit-tiny", "--out", str(tmp_path / "imgs"))  # a glob too
    capsys.readouterr()
    assert len(json.loads((tmp_path / "imgs" / "report.json").read_text())["inputs"]) == 2


def test_two_scans_into_one_folder_at_once(tmp_path):
    """Two writers merging into one folder take turns (a lock on the folder): one complete result, no debris."""
    out = tmp_path / "out"
    errors = []

    def write(tag: str):
        try:
            with staged_dir(out, kind="scan") as stage:
                for i in range(20):
                    (stage / f"fig{i}.png").write_text(tag)
                    time.sleep(0.005)
                (stage / "report.json").write_text(json.dumps({"tag": tag}))
        except Exception as error:  # pragma: no cover
            errors.append(error)

    threads = [threading.Thread(target=write, args=(tag,)) for tag in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not temp_entries(tmp_path)
    tag = json.loads((out / "report.json").read_text())["tag"]
    assert all((out / f"fig{i}.png").read_text() == tag for i in range(20))  # whole runs, not a mix
    assert set(json.loads((out / MANIFEST).read_text())["outputs"]["scan"]) == {f"fig{i}.png" for i in range(20)} | {"report.json"}


def test_two_builders_of_one_cache_entry_build_it_once(tmp_cache):
    calls = []

    def build(folder):
        calls.append(1)
        time.sleep(0.5)
        (folder / "weights.bin").write_text("w")

    results = []
    threads = [threading.Thread(target=lambda: results.append(zoo.cached("shared", "k", build))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and (results[0] / "weights.bin").read_text() == "w"
    assert not temp_entries(tmp_cache)


def test_cache_key_is_the_content_not_the_install_path(tmp_path):
    """Two environments install the same package at different paths: one cache entry, no rebuilds."""
    first = tmp_path / "env-a" / "model.onnx"
    second = tmp_path / "env-b" / "lib" / "model.onnx"
    first.parent.mkdir(parents=True)
    second.parent.mkdir(parents=True)
    first.write_bytes(b"weights" * 1000)
    shutil.copy(first, second)
    assert zoo._fingerprint(first) == zoo._fingerprint(second)
    changed = tmp_path / "env-c.onnx"
    changed.write_bytes(b"weights" * 999 + b"WEIGHTS")
    assert zoo._fingerprint(changed) != zoo._fingerprint(first)


def test_an_entry_built_by_another_environment_is_used(tmp_cache, tmp_path):
    package = tmp_path / "site-packages-a" / "weights.gguf"
    package.parent.mkdir()
    package.write_bytes(b"gguf" * 500)
    zoo.cached("env-shared", zoo._fingerprint(package), lambda folder: (folder / "w").write_text("built by a"))
    other = tmp_path / "site-packages-b" / "weights.gguf"
    other.parent.mkdir()
    shutil.copy2(package, other)
    folder = zoo.cached("env-shared", zoo._fingerprint(other), lambda folder: pytest.fail("rebuilt"))
    assert (folder / "w").read_text() == "built by a"


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_outputs_follow_the_umask(tmp_path, capsys, mask, file_mode, dir_mode):
    """Before: JSON and PNGs 0600 (mkstemp) beside a 0644 HTML."""
    photos(tmp_path / "imgs", 1)
    with umask_is(mask):
        _scan(str(tmp_path / "imgs"), "--model", "planted-vit-tiny", "--out", str(tmp_path / "out"))
        atomic_write_json(tmp_path / "single" / "r.json", {"a": 1})
    capsys.readouterr()
    modes = {p.suffix: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir() if p.is_file() and not p.name.startswith(".")}
    assert set(modes) >= {".json", ".html", ".png"} and set(modes.values()) == {file_mode}
    assert (tmp_path / "single" / "r.json").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "single").stat().st_mode & 0o777 == dir_mode


def test_safetensors_outputs_follow_the_umask_too(tmp_path):
    """safetensors writes its files 0600 (by name, past atomic_path's fchmod): staged and atomic outputs get the umask's mode."""
    import torch
    from safetensors.torch import save_file

    from sinkless._io import atomic_path, staged_dir

    with umask_is(0o022):
        with atomic_path(tmp_path / "one.safetensors", suffix=".safetensors") as tmp:
            save_file({"x": torch.zeros(2)}, str(tmp))
        with staged_dir(tmp_path / "out") as stage:
            save_file({"x": torch.zeros(2)}, str(stage / "two.safetensors"))
    assert (tmp_path / "one.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "out" / "two.safetensors").stat().st_mode & 0o777 == 0o644


def test_an_existing_file_keeps_its_permissions(tmp_path):
    target = tmp_path / "private.json"
    target.write_text("{}")
    target.chmod(0o600)
    with umask_is(0o022):
        atomic_write_json(target, {"b": 2})
    assert target.stat().st_mode & 0o777 == 0o600


def test_the_cache_entry_is_readable_by_the_other_environment(tmp_cache):
    with umask_is(0o022):
        folder = zoo.cached("perm", "k", lambda folder: (folder / "w").write_text("w"))
    assert folder.stat().st_mode & 0o777 == 0o755
    assert tree(folder)["w"][1] == 0o644


def test_a_corrupt_manifest_deletes_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.png").write_text("mine")
    (out / MANIFEST).write_text("{not json")
    with staged_dir(out, kind="scan") as stage:
        (stage / "report.json").write_text("{}")
    assert (out / "mine.png").read_text() == "mine"


def test_a_manifest_never_reaches_outside_its_folder(tmp_path):
    """A hand-edited (or hostile) manifest naming ../ or absolute paths: those files stay."""
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    stat = victim.stat()
    info = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    (out / MANIFEST).write_text(json.dumps({"outputs": {"scan": {"../victim.txt": info, str(victim): info}}}))
    with staged_dir(out, kind="scan") as stage:
        (stage / "report.json").write_text("{}")
    assert victim.read_text() == "keep me"


def test_a_temp_entry_of_a_live_run_is_never_swept(tmp_path):
    """Another process (here: another open file description) still holds its temp folder: it stays."""
    from sinkless._tempfiles import clean_stale, make_temp

    stage, fd = make_temp(tmp_path, "out", directory=True)
    (stage / "half.png").write_text("being written")
    try:
        assert clean_stale(tmp_path) == [] and (stage / "half.png").exists()
    finally:
        import os

        os.close(fd)
    assert clean_stale(tmp_path) == [stage] and not stage.exists()


def test_an_entry_still_being_created_is_swept_only_when_old(tmp_path):
    import os

    from sinkless._tempfiles import clean_stale

    young, old = tmp_path / ".r.json.sinkless-new-a", tmp_path / ".r.json.sinkless-new-b"
    young.write_text("x")
    old.write_text("x")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert clean_stale(tmp_path) == [old] and young.exists()


def test_two_writers_of_one_json_file(tmp_path):
    target = tmp_path / "r.json"
    payloads = [{"writer": i, "data": list(range(2000))} for i in range(4)]
    threads = [threading.Thread(target=atomic_write_json, args=(target, p)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert json.loads(target.read_text()) in payloads and not temp_entries(tmp_path)


def test_a_reader_of_an_outdated_cache_entry_keeps_reading_during_a_rebuild(tmp_cache):
    old = zoo.cached("rebuilt", "v1", lambda folder: (folder / "w.bin").write_bytes(b"old" * 10000))
    with open(old / "w.bin", "rb") as reader:
        head = reader.read(3)
        zoo.cached("rebuilt", "v2", lambda folder: (folder / "w.bin").write_bytes(b"new" * 10000))
        assert head + reader.read() == b"old" * 10000  # the old files were moved away in one rename, not truncated
    assert (old / "w.bin").read_bytes() == b"new" * 10000 and not temp_entries(tmp_cache)
