"""Shared pieces of the robustness tests (``pytest -m robustness``): a careless user's inputs and the checks
every bad case must pass: exit status 2, one error line naming the problem (plus its ``fix:`` line),
no traceback, and the folder exactly as it was (nothing written, nothing deleted)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sinkless.cli import main


def tree(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``root`` (hidden ones too): relative path -> (sha256, mode)."""
    out = {}
    for path in sorted(Path(root).rglob("*")):
        if path.is_file() and not path.is_symlink():
            out[str(path.relative_to(root))] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mode & 0o777)
        elif path.is_dir():
            out[str(path.relative_to(root)) + "/"] = ("dir", 0)
    return out


def temp_entries(root: Path) -> list[Path]:
    """Temporary files/folders sinkless left anywhere under ``root``."""
    return [p for p in Path(root).rglob("*") if ".sinkless-tmp-" in p.name or ".sinkless-new-" in p.name]


def expect_error(argv: list[str], capsys, *, contains: str | list[str], root: Path | None = None) -> str:
    """Run the CLI on ``argv`` and check the bad-input contract; returns the error line."""
    before = tree(root) if root is not None else None
    code = main(["-q", *argv])
    captured = capsys.readouterr()
    err = captured.err
    assert code == 2, f"exit {code} for {argv}:\n{captured.out}\n{err}"
    assert "Traceback" not in err and "Traceback" not in captured.out
    verb = argv[0]
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"sinkless {verb}: error: ")]
    assert len(errors) == 1, f"expected one error line, got:\n{err}"
    after_error = lines[lines.index(errors[0]) + 1 :]
    assert all(line.startswith("  fix: ") for line in after_error), f"unexpected lines after the error:\n{err}"
    for text in [contains] if isinstance(contains, str) else contains:
        assert text in err, f"{text!r} not in:\n{err}"
    if root is not None:
        assert tree(root) == before, f"files changed by {argv}"
    return errors[0]


def photos(folder: Path, n: int = 2, size: int = 48) -> list[Path]:
    """``n`` small natural-looking RGB PNGs in ``folder``."""
    from sinkless.images import natural_crops

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, crop in enumerate(natural_crops(n, seed=3)):
        path = folder / f"photo{i}.png"
        crop.resize((size, size)).save(path)
        paths.append(path)
    return paths


def png16(path: Path, array: np.ndarray) -> Path:
    """Write a 16-bit PNG (grey (H, W) or RGB (H, W, 3) uint16) by hand: PIL cannot write 16-bit RGB."""
    array = np.asarray(array, dtype=">u2")
    h, w = array.shape[:2]
    colour = 2 if array.ndim == 3 else 0
    raw = b"".join(b"\x00" + array[i].tobytes() for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def huge_png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that claims ``width`` x ``height`` pixels (a decompression bomb) with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    return path


def tiny_text_model_dir(folder: Path, *, family: str = "llama", context: int | None = None) -> Path:
    """A tiny random causal LM (Llama or GPT-2; or BERT) with a word-level tokenizer (words w0..w62), saved as a model folder."""
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, vocab_size=64)
    if context is not None:
        common["max_position_embeddings"] = context
    if family == "llama":
        model = T.LlamaForCausalLM(T.LlamaConfig(**common, num_key_value_heads=1))
    elif family == "bert":
        model = T.BertModel(T.BertConfig(**common))
    elif family == "gpt2":  # learned absolute positions, no rotary embedding
        model = T.GPT2LMHeadModel(T.GPT2Config(**common))
    else:
        raise KeyError(family)
    vocab = {f"w{i}": i for i in range(63)}
    vocab["[UNK]"] = 63
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]")
    folder.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def words(n: int) -> str:
    return " ".join(f"w{i % 60}" for i in range(n))


def neurons_file(path: Path, **fields) -> Path:
    data = {"model": "planted-vit-tiny", "neurons": [{"layer": 1, "neuron": 3, "score": 1.0}], "top_k": 1}
    data.update(fields)
    path.write_text(json.dumps(data))
    return path


def umask_is(mask: int):
    """Context: run with ``mask`` as the umask."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        old = os.umask(mask)
        try:
            yield
        finally:
            os.umask(old)

    return ctx()


__all__ = [
    "tree", "temp_entries", "expect_error", "photos", "png16", "huge_png_header", "tiny_text_model_dir", "words",
    "neurons_file", "umask_is", "Image", "np",
]
