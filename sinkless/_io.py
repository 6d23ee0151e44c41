"""Writing outputs so that a failed or killed command leaves nothing half-written and deletes nothing it did not write.

- ``atomic_path`` / ``atomic_write_text`` / ``atomic_write_json``: one file, written beside its target
  and renamed into place.
- ``staged_dir``: a folder of outputs, written in a staging folder and merged into ``out`` at the end.
  Files of ``out`` are replaced only where this run writes the same name; files an *earlier* run of the
  same kind wrote (recorded in ``out/.sinkless-outputs.json``, with size and mtime) are removed when
  this run does not write them again and nobody changed them. Nothing else in ``out`` is touched.
- Temporary files and folders are named ``.NAME.sinkless-tmp-XXXX`` and hold an ``flock`` while they
  live: Ctrl-C / SIGTERM remove them on the way out, and the next write into the same folder removes
  those a SIGKILL left (their lock died with the process). ``clean_stale`` does that sweep.
- Outputs get the permissions of an ordinary file (``0o666 & ~umask``), not ``mkstemp``'s 0600; a file
  that already exists keeps its own.
- ``check_writable``: is an output path usable? Called by the CLI before any long work starts.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sinkless._tempfiles import TMP_MARK, clean_stale, default_mode, deferred_signals, lock, make_temp, remove


try:
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

__all__ = [
    "atomic_path",
    "atomic_write_text",
    "atomic_write_json",
    "staged_dir",
    "to_jsonable",
    "read_utf8",
    "check_writable",
    "clean_stale",
    "deferred_signals",
    "default_mode",
    "sinkless_outputs",
    "TMP_MARK",
    "MANIFEST",
]

log = logging.getLogger(__name__)

MANIFEST = ".sinkless-outputs.json"
"""Per output folder: the files each kind of sinkless output wrote there (so later runs remove only those)."""


def to_jsonable(value: Any) -> Any:
    """Numbers from numpy/torch and dataclass-like values as plain JSON types (NaN/inf become null)."""
    import math

    import numpy as np

    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return to_jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


def read_utf8(path: Path) -> str:
    """The text of an existing file; a clear error when it is not UTF-8 or has no text."""
    from sinkless.errors import SinklessError

    path = Path(path)
    if path.is_dir():
        raise SinklessError(f"{str(path)!r} is a folder, not a text file", fix="pass a text file (or the files inside the folder)")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not text: it would be token 0
    except UnicodeDecodeError:
        raise SinklessError(f"{str(path)!r} is not UTF-8 text", fix="convert it with `iconv -t utf-8`, or pass a plain-text file") from None
    except OSError as error:
        raise SinklessError(f"cannot read {str(path)!r} ({type(error).__name__}: {error.strerror or error})", fix="check the path and its permissions") from None
    if not text.strip():
        raise SinklessError(f"text file {str(path)!r} is empty", fix="pass a file with some text in it")
    return text


# -- folders -------------------------------------------------------------------------------------
def _missing_dirs(folder: Path) -> tuple[list[Path], Path]:
    """The folders that would have to be created for ``folder`` (deepest first) and the nearest existing one."""
    missing = []
    probe = folder
    while not probe.exists() and not probe.is_symlink():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    return missing, probe


def _make_dirs(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns those created (deepest first), to undo on failure."""
    from sinkless.errors import SinklessError

    missing, existing = _missing_dirs(folder)
    if not existing.is_dir():
        raise SinklessError(f"cannot create {folder}: {existing} is a file, not a folder", fix="choose another output path")
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as error:
            _remove_dirs([p for p in missing if p.exists()])
            raise SinklessError(f"cannot create folder {path} ({error.strerror or error})", fix="choose a writable output location") from None
    return missing


def _remove_dirs(created: list[Path]) -> None:
    for path in created:  # deepest first; only if still empty
        with contextlib.suppress(OSError):
            path.rmdir()


def check_writable(path: str | os.PathLike, *, directory: bool, what: str = "output") -> Path:
    """Raise ``SinklessError`` unless ``path`` can be written as a file (``directory=False``) or a folder.

    Nothing is created: the nearest existing folder is probed with an unnamed temporary file.
    ``what`` names the path in messages (e.g. ``"--out"``).
    """
    from sinkless.errors import SinklessError

    path = Path(path).expanduser()
    if str(path) in ("", "."):
        path = Path.cwd()
    try:
        return _check_writable(path, directory, what)
    except OSError as error:  # a name too long, a loop of links, ...
        raise SinklessError(f"cannot use {what} {path} ({error.strerror or error})", fix=f"choose another path for {what}") from None


def _creation_error(folder: str | os.PathLike) -> OSError | None:
    """Why no file can be made in the existing ``folder`` (None: one can), found by making an unnamed temporary file."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as error:
        return error


def can_create_in(folder: str | os.PathLike) -> bool:
    """Whether a file can really be made in the existing ``folder`` (``os.access`` says yes to root everywhere, even in /proc)."""
    return _creation_error(folder) is None


def _check_writable(path: Path, directory: bool, what: str) -> Path:
    from sinkless.errors import SinklessError

    kind = "folder" if directory else "file"
    if directory and path.is_symlink() and not path.exists():
        raise SinklessError(f"{what} {path} is a link to {os.readlink(path)}, which does not exist",
                            fix=f"create the folder it points to, or choose another folder for {what}")
    if path.exists():
        if directory and not path.is_dir():
            raise SinklessError(f"{what} {path} is an existing file, not a folder", fix=f"choose a folder for {what} (it is created if missing)")
        if not directory and path.is_dir():
            raise SinklessError(f"{what} {path} is a folder, not a file", fix=f"give {what} a file name, e.g. {path / 'result.json'}")
        if not directory and not path.is_file():
            raise SinklessError(f"{what} {path} is not a regular file (a device, pipe or socket)", fix=f"give {what} the name of an ordinary file")
        probe = path if directory else Path(os.path.realpath(path)).parent
    else:
        missing, probe = _missing_dirs(path.parent if not directory else path)
        if not probe.is_dir():
            raise SinklessError(f"{what} {path} cannot be created: {probe} is a file, not a folder", fix=f"choose another {kind} for {what}")
    error = _creation_error(probe)
    if error is not None:
        raise SinklessError(
            f"{what} {path} cannot be written: folder {probe} is not writable ({error.strerror or type(error).__name__})",
            fix=f"choose a writable location for {what}",
        )
    return path


_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG, errno.ENAMETOOLONG}


def _write_error(error: BaseException, path: Path):
    """A failed write (disk full, read-only, ...) as one clear message, or None for other errors."""
    from sinkless.errors import SinklessError

    if isinstance(error, OSError) and error.errno in _WRITE_ERRORS:
        return SinklessError(f"cannot write {path} ({error.strerror or error})", fix="free some disk space or choose another output location")
    text = str(error)
    # writers that do not raise OSError: safetensors ("No space left on device (os error 28)"), torch.save on a full
    # disk ("[enforce fail at inline_container.cc] . unexpected pos ..." / "file write failed")
    if "No space left on device" in text or "os error 28" in text or ("inline_container" in text and ("unexpected pos" in text or "write failed" in text)):
        return SinklessError(f"cannot write {path} (No space left on device)", fix="free some disk space or choose another output location")
    return None


# -- single files --------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary file beside ``path`` that replaces ``path`` when the block succeeds and is removed
    when it fails. ``suffix`` keeps the extension for writers that read it (e.g. ``.png`` for matplotlib)."""
    from sinkless.errors import SinklessError

    path = Path(path).expanduser()
    if path.is_symlink():  # write through a link, not over it
        path = Path(os.path.realpath(path))
    if path.exists() and not path.is_file():
        raise SinklessError(f"cannot write {path}: it is not a regular file", fix="give the output the name of an ordinary file")
    created = _make_dirs(path.parent)
    clean_stale(path.parent)
    try:
        mode = path.stat().st_mode & 0o7777 if path.is_file() else default_mode()
        tmp, fd = make_temp(path.parent, path.name, directory=False, suffix=suffix)
    except BaseException as error:
        _remove_dirs(created)
        raise _write_error(error, path) or error
    try:
        os.fchmod(fd, mode)
        yield tmp
        os.chmod(tmp, mode)  # again: a writer that replaced the file by name (safetensors) made it 0600
        with deferred_signals():
            os.replace(tmp, path)
    except BaseException as error:
        with deferred_signals():
            remove(tmp)
            _remove_dirs(created)
        clear = _write_error(error, path)
        if clear is not None:
            raise clear from None
        raise
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(to_jsonable(data), indent=2) + "\n")


# -- folders of outputs --------------------------------------------------------------------------
def _read_manifest(out: Path) -> dict:
    try:
        data = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) and isinstance(data.get("outputs"), dict) else {"outputs": {}}
    except (OSError, ValueError):
        return {"outputs": {}}


def sinkless_outputs(folder: str | os.PathLike) -> set[Path]:
    """Absolute paths of the files sinkless wrote into ``folder`` (any kind), from its manifest."""
    folder = Path(folder).resolve()
    files = set()
    for entries in _read_manifest(folder)["outputs"].values():
        if isinstance(entries, dict):
            files.update(folder / rel for rel in entries if _inside(rel))
    return files


def _inside(rel: str) -> bool:
    """A manifest entry names a file inside its folder (a hand-edited manifest can never reach outside)."""
    path = Path(rel)
    return isinstance(rel, str) and bool(rel) and not path.is_absolute() and ".." not in path.parts


def _relative_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink())


@contextlib.contextmanager
def folder_lock(folder: Path, busy: Exception | None = None) -> Iterator[None]:
    """Exclusive lock on ``folder`` for the ``with`` block: two runs into one folder take turns, or with ``busy`` the
    second does not wait and ``busy`` is raised (e.g. while one run trains into it)."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        if not lock(fd, block=busy is None):
            raise busy
        yield
    finally:
        os.close(fd)


def _unchanged(path: Path, info: dict) -> bool:
    try:
        stat = path.lstat()
    except OSError:
        return False
    return path.is_file() and stat.st_size == info.get("size") and stat.st_mtime_ns == info.get("mtime_ns")


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike, *, kind: str = "outputs") -> Iterator[Path]:
    """A temporary folder whose files move into ``out`` only if the block succeeds.

    Files in ``out`` with the names this run writes are replaced; files the previous run of the same
    ``kind`` wrote and this one does not are removed (if nobody changed them since); anything else in
    ``out`` is left alone. On failure ``out`` is exactly as before (folders created for it removed).
    """
    from sinkless.errors import SinklessError

    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise SinklessError(f"output folder {out} is an existing file", fix="choose a folder name for the outputs")
    # stage beside the outputs (same file system, so moving them in is a rename): inside ``out`` when
    # it exists (only ``out`` need be writable), else in its parent, which must be writable to create it
    parent = out.resolve() if out.is_dir() else out.resolve().parent
    created = _make_dirs(parent)
    clean_stale(parent)
    try:
        stage, fd = make_temp(parent, out.resolve().name or "out", directory=True)
    except BaseException:
        _remove_dirs(created)
        raise
    succeeded = False
    try:
        yield stage
        with deferred_signals():
            created = ([out] if not out.exists() else []) + created
            out.mkdir(exist_ok=True)
            with folder_lock(out):
                _merge(stage, out, kind)
        succeeded = True
    except Exception as error:  # a full disk says so through OSError, or through a writer's own error type
        clear = _write_error(error, out)
        if clear is not None:
            raise clear from None
        raise
    finally:
        with deferred_signals():
            os.close(fd)
            shutil.rmtree(stage, ignore_errors=True)
            if not succeeded:
                _remove_dirs(created)


def _merge(stage: Path, out: Path, kind: str) -> None:
    """Move the staged files into ``out``, drop the previous same-kind files not written again, record the new ones."""
    from sinkless.errors import SinklessError

    manifest = _read_manifest(out)
    previous = manifest["outputs"].get(kind) or {}
    written = _relative_files(stage)
    for rel in written:
        target = out / rel
        if target.is_dir() and not target.is_symlink():
            raise SinklessError(f"cannot write {target}: a folder of that name exists", fix="move that folder away or choose another output folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        # an ordinary file's permissions, whichever writer made it (safetensors and mkstemp make 0600 files)
        os.chmod(stage / rel, target.stat().st_mode & 0o7777 if target.is_file() else default_mode())
        os.replace(stage / rel, target)
    for rel, info in previous.items():
        if rel in written or not isinstance(info, dict) or not _inside(rel):
            continue
        target = out / rel
        if _unchanged(target, info):
            target.unlink()
            folder = target.parent
            while folder != out and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
                folder = folder.parent
    entries = {}
    for rel in written:
        with contextlib.suppress(OSError):
            stat = (out / rel).lstat()
            entries[rel] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    manifest["outputs"][kind] = entries
    from sinkless._version import __version__

    manifest["sinkless_version"] = __version__
    atomic_write_json(out / MANIFEST, manifest)
