"""Small I/O helpers: UTF-8 text reading with clear errors."""

from __future__ import annotations

import pytest

from sinkless._io import read_utf8
from sinkless.errors import SinklessError


def test_read_utf8(tmp_path):
    good, empty, binary = tmp_path / "good.txt", tmp_path / "empty.txt", tmp_path / "bin.txt"
    good.write_text("héllo", encoding="utf-8")
    empty.write_text("  \n", encoding="utf-8")
    binary.write_bytes(b"\xff\xfe\x00bad")
    assert read_utf8(good) == "héllo"
    with pytest.raises(SinklessError, match="empty"):
        read_utf8(empty)
    with pytest.raises(SinklessError, match="not UTF-8"):
        read_utf8(binary)


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3456 vs 3380"),  # torch.save, disk full
    Exception("Error while serializing: I/O error: No space left on device (os error 28)"),   # safetensors
    OSError(28, "No space left on device"),
])
def test_a_full_disk_is_one_message_whichever_writer_said_it(tmp_path, error):
    from sinkless._io import _write_error

    clear = _write_error(error, tmp_path / "x")
    assert isinstance(clear, SinklessError) and "No space left on device" in clear.problem and "free some disk space" in clear.fix
    assert _write_error(RuntimeError("shape mismatch"), tmp_path / "x") is None
