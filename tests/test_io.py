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
