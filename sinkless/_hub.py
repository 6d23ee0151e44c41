"""Where a ``--model`` that is not a zoo name comes from: a local folder or the Hugging Face hub.

Clear errors instead of the loaders' own: a folder whose config.json does not parse, that has no
weights or no tokenizer; and the hub is probed once per process (≤ 2 s): when it cannot be reached,
loading works offline from the local Hugging Face cache at once instead of retrying for half a minute.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from sinkless.errors import SinklessError

__all__ = ["check_model_folder", "hub_reachable", "go_offline_if_unreachable", "WEIGHT_FILES", "TOKENIZER_FILES"]

log = logging.getLogger(__name__)

WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
_FOLDER_FIX = "pass a folder written by `model.save_pretrained(...)` (and `tokenizer.save_pretrained(...)` for text models)"

_reachable: bool | None = None


def check_model_folder(folder: Path, name: str) -> dict:
    """The parsed config.json of a local model folder; a ``SinklessError`` naming what is wrong with it."""
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SinklessError(f"model folder {folder}: config.json is not valid JSON ({error})", fix=_FOLDER_FIX) from None
    except OSError as error:
        raise SinklessError(f"model folder {folder}: cannot read config.json ({error.strerror or error})", fix="check its permissions") from None
    if not isinstance(config, dict) or not config.get("model_type"):
        raise SinklessError(f"model folder {folder}: config.json names no model_type", fix=_FOLDER_FIX)
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise SinklessError(f"model folder {folder} holds no weights (none of {', '.join(WEIGHT_FILES)})", fix=_FOLDER_FIX)
    return config


def check_tokenizer_files(folder: Path) -> None:
    """A text model's folder must hold its tokenizer."""
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise SinklessError(f"model folder {folder} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)})", fix=_FOLDER_FIX)


@contextlib.contextmanager
def folder_errors(folder: Path | None) -> Iterator[None]:
    """Loading from a local folder: any failure of the loaders is a problem with the folder's files."""
    if folder is None:
        yield
        return
    try:
        yield
    except (SinklessError, KeyboardInterrupt, MemoryError):
        raise
    except Exception as error:  # safetensors, tokenizers and torch raise their own types
        raise SinklessError(f"cannot load the model in folder {folder} ({type(error).__name__}: {error})", fix=_FOLDER_FIX) from None


def hub_reachable(timeout: float = 1.5) -> bool:
    """Can the Hugging Face endpoint be reached? Probed once per process (a TCP connection, at most ``timeout`` s)."""
    global _reachable
    if _reachable is not None:
        return _reachable
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:  # name resolution has no timeout of its own: run it where we can stop waiting
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    _reachable = bool(result and result[0])
    return _reachable


def go_offline_if_unreachable() -> bool:
    """Switch the hub client to offline mode (local cache only) when the hub cannot be reached; True if offline."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    if hub_reachable():
        return False
    log.info("the Hugging Face hub cannot be reached: using the local Hugging Face cache only")
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    return True


def unknown_model(name: str, zoo_names, error: BaseException, offline: bool) -> SinklessError:
    """The error for a name that is neither a zoo name, nor a folder, nor a model the hub (or its cache) provides."""
    zoo = ", ".join(zoo_names)
    if offline:
        return SinklessError(
            f"unknown model {name!r}: not a zoo name, not a local folder, and not in the local Hugging Face cache "
            "(the hub cannot be reached from here)",
            fix=f"use a name that works offline ({zoo}), a folder written by save_pretrained, or download it where there is network",
        )
    return SinklessError(
        f"unknown model {name!r}: not a zoo name, not a local folder, and the Hugging Face hub could not provide it ({type(error).__name__})",
        fix=f"check the hub id, run `sinkless models` for the names that work offline ({zoo}), or pass a folder written by save_pretrained",
    )
