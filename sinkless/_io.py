"""Writing outputs so that a failed command leaves nothing half-written."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_write_text", "atomic_write_json", "staged_dir", "to_jsonable"]


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

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SinklessError(f"{str(path)!r} is not UTF-8 text", fix="convert it with `iconv -t utf-8`, or pass a plain-text file") from None
    if not text.strip():
        raise SinklessError(f"text file {str(path)!r} is empty", fix="pass a file with some text in it")
    return text


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary file beside ``path`` that replaces ``path`` when the block succeeds and is removed
    when it fails. ``suffix`` keeps the extension for writers that read it (e.g. ``.png`` for matplotlib)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(to_jsonable(data), indent=2) + "\n")


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder whose files move into ``out`` only if the block succeeds."""
    out = Path(out)
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=parent))
    try:
        yield stage
        out.mkdir(parents=True, exist_ok=True)
        for item in stage.iterdir():
            target = out / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
