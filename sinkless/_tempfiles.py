"""Temporary files and folders that a killed run can leave behind, and the sweep that removes them.

Every temporary entry sinkless creates is named ``.NAME.sinkless-tmp-XXXX`` and holds an ``flock`` for
as long as its owner lives. Ctrl-C and SIGTERM (which the CLI turns into ``KeyboardInterrupt``) remove
it on the way out; after a SIGKILL nothing can run, but the kernel drops the lock, so the next writer
into the same folder (``clean_stale``) knows it is debris and removes it. Also here: holding signals
for a few renames, and the permissions outputs get (``0o666 & ~umask``, not ``mkstemp``'s 0600).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

try:  # POSIX; elsewhere temp entries are still removed on errors, but stale ones are not swept
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

__all__ = ["TMP_MARK", "default_mode", "deferred_signals", "clean_stale", "make_temp", "remove", "lock"]

log = logging.getLogger(__name__)

TMP_MARK = ".sinkless-tmp-"
"""In the name of every temporary file or folder sinkless creates (and may sweep when its owner died)."""
_NEW_MARK = ".sinkless-new-"  # a temp entry between its creation and its lock (microseconds)


# -- permissions ---------------------------------------------------------------------------------
def _umask() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # no /proc: read it the only portable way (and put it back)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode ``open()`` / ``mkdir()`` would give a new file / folder: 0o666 / 0o777 minus the umask."""
    return (0o777 if directory else 0o666) & ~_umask()


# -- signals -------------------------------------------------------------------------------------
@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM for the few renames/removals inside: they act right after the block.

    Only in the main thread (the only one Python runs signal handlers in); elsewhere a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def hold(signum, frame) -> None:
        received.append(signum)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if handler is None:  # installed outside Python: cannot be put back, leave it alone
            continue
        previous[sig] = signal.signal(sig, hold)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            signal.raise_signal(received[0])


# -- temporary entries that a later run can sweep ------------------------------------------------
def lock(fd: int, block: bool) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def make_temp(parent: Path, name: str, *, directory: bool, suffix: str = "") -> tuple[Path, int]:
    """A new temporary file or folder in ``parent`` named after ``name``, locked by the returned fd."""
    prefix = f".{name}{_NEW_MARK}"
    if directory:
        made = tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent)
        fd = os.open(made, os.O_RDONLY)
    else:
        fd, made = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=parent)
    lock(fd, block=True)  # fresh entry: nobody else holds it
    final = Path(made).with_name(Path(made).name.replace(_NEW_MARK, TMP_MARK, 1))
    try:
        os.rename(made, final)  # only now can a sweeper see it, and it is already locked
    except BaseException:
        os.close(fd)
        remove(Path(made))
        raise
    return final, fd


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_stale(folder: str | os.PathLike, *, new_after_s: float = 600.0) -> list[Path]:
    """Remove the temporary entries in ``folder`` whose owner is gone (killed): those nobody holds locked.

    Entries still being created (``.sinkless-new-``) are removed only when older than ``new_after_s``.
    Returns what was removed.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if fcntl is None:
        return removed
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if TMP_MARK in name:
            try:
                fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                if lock(fd, block=False):
                    remove(entry)
                    removed.append(entry)
            finally:
                os.close(fd)
        elif _NEW_MARK in name:
            with contextlib.suppress(OSError):
                if time.time() - entry.lstat().st_mtime > new_after_s:
                    remove(entry)
                    removed.append(entry)
    if removed:
        log.info("removed %d temporary file(s) an interrupted sinkless run left in %s", len(removed), folder)
    return removed


