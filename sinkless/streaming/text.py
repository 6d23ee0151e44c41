"""The long English text bundled for the offline StreamingLLM evaluation (Xiao et al. 2024, "Efficient
Streaming Language Models with Attention Sinks", scored PG19 books), and reading the user's own text files.

Bundled: Shakespeare's *Hamlet* (public domain), about 56,000 SmolLM2 tokens; see
``sinkless/data/hamlet.README.md`` for where it comes from.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sinkless._io import read_utf8
from sinkless.errors import SinklessError

__all__ = ["DEFAULT_TEXT", "read_text", "tokenize"]

DEFAULT_TEXT = Path(__file__).resolve().parent.parent / "data" / "hamlet.txt"


def read_text(path: str | Path | None = None) -> str:
    """The text of ``path`` (UTF-8), or the bundled *Hamlet* when ``path`` is None."""
    path = DEFAULT_TEXT if path is None else Path(path).expanduser()
    if not path.is_file():
        raise SinklessError(f"text file {str(path)!r} does not exist", fix="pass --text with a UTF-8 text file, or leave it out for the bundled Hamlet")
    return read_utf8(path)


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids ``(N,)`` of ``text`` without added special tokens, cut to ``max_tokens`` (None: all)."""
    if tokenizer is None:
        raise SinklessError("this model has no tokenizer", fix="use a zoo name or a folder that holds a tokenizer")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:  # bytes that were not UTF-8, kept as lone surrogates (a prompt from argv or stdin)
        raise SinklessError(f"the text is not valid UTF-8 (at character {error.start})",
                            fix="convert it first, e.g. iconv -f latin1 -t utf-8 FILE") from None
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids if max_tokens is None else ids[:max_tokens]
