"""Shared checks of command-line values, run before any model loads or long work starts.

Every check raises ``SinklessError(problem, fix=...)`` (the CLI prints it and exits with status 2) and
returns the value, so a verb reads::

    from sinkless._cli import _args

    def run(args):
        _args.positive_int(args.batch_size, "--batch-size")
        _args.positive_number(args.threshold, "--threshold")      # None passes: "not given"
        _args.output_file(args.json, "--json")                   # a writable file path, or None
        _args.output_dir(args.out, "--out")                      # a writable folder path
        runs = [_args.json_input(p, "--overlay", keys=("nll_curve",), made_by="`sinkless ppl --json`") for p in args.overlay]
        loaded = zoo.load(args.model)
        layer = _args.layer_index(args.layer, "--layer", loaded.num_layers)

``None`` always passes (an optional flag that was not given). Numbers must be finite: ``nan`` and
``inf`` are refused everywhere.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from sinkless._io import check_writable
from sinkless.errors import SinklessError

__all__ = [
    "positive_int",
    "non_negative_int",
    "positive_number",
    "non_negative_number",
    "finite_number",
    "fraction",
    "layer_index",
    "output_file",
    "output_dir",
    "input_file",
    "json_input",
    "not_an_input",
    "max_tokens_for",
]

log = logging.getLogger(__name__)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(value: int | None, flag: str, *, fix: str | None = None) -> int | None:
    """An integer >= 1 (counts, sizes, batch sizes)."""
    if value is not None and (not _is_int(value) or value < 1):
        raise SinklessError(f"{flag} must be at least 1 (a whole number), got {value}", fix=fix or f"pass {flag} N with N >= 1")
    return value


def non_negative_int(value: int | None, flag: str, *, fix: str | None = None) -> int | None:
    """An integer >= 0."""
    if value is not None and (not _is_int(value) or value < 0):
        raise SinklessError(f"{flag} must be at least 0 (a whole number), got {value}", fix=fix or f"pass {flag} N with N >= 0")
    return value


def finite_number(value: float | None, flag: str, *, fix: str | None = None) -> float | None:
    """Any finite number (no nan / inf)."""
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
        raise SinklessError(f"{flag} must be a finite number, got {value}", fix=fix or f"pass {flag} X with an ordinary number X")
    return value


FLOAT32_MAX = 3.4028234663852886e38


def positive_number(value: float | None, flag: str, *, fix: str | None = None, maximum: float = FLOAT32_MAX) -> float | None:
    """A finite number > 0 (thresholds, rates), at most ``maximum`` (default: what a float32 tensor holds)."""
    finite_number(value, flag, fix=fix)
    if value is not None and value <= 0:
        raise SinklessError(f"{flag} must be a positive number, got {value}", fix=fix or f"pass {flag} X with X > 0")
    if value is not None and value > maximum:
        raise SinklessError(f"{flag} {value:g} is too large (at most {maximum:g})", fix=fix or f"pass {flag} X with X <= {maximum:g}")
    return value


def non_negative_number(value: float | None, flag: str, *, fix: str | None = None) -> float | None:
    """A finite number >= 0."""
    finite_number(value, flag, fix=fix)
    if value is not None and value < 0:
        raise SinklessError(f"{flag} must be >= 0, got {value}", fix=fix or f"pass {flag} X with X >= 0")
    return value


def fraction(value: float | None, flag: str, *, open_low: bool = True, fix: str | None = None) -> float | None:
    """A share in (0, 1] (``open_low=False``: [0, 1])."""
    finite_number(value, flag, fix=fix)
    if value is not None and not ((0 < value if open_low else 0 <= value) and value <= 1):
        interval = "(0, 1]" if open_low else "[0, 1]"
        raise SinklessError(f"{flag} must be in {interval}, got {value}", fix=fix or f"pass {flag} as a share, e.g. 0.5")
    return value


def layer_index(value: int | None, flag: str, n_layers: int, *, model: str = "the model") -> int | None:
    """A layer of a model with ``n_layers`` layers: 0..n_layers-1, or -1, -2, ... counted from the last. Returns it >= 0."""
    if value is None:
        return None
    if not _is_int(value) or not -n_layers <= value < n_layers:
        raise SinklessError(
            f"{flag} {value} is not a layer of {model}, which has {n_layers} layers",
            fix=f"pass {flag} between 0 and {n_layers - 1} (or -1 for the last)",
        )
    return value % n_layers


def output_file(path: str | None, flag: str) -> str | None:
    """A path a file can be written to (its folder may be created); not a folder, not under a file."""
    if path is not None:
        if str(path).strip() == "":
            raise SinklessError(f"{flag} is empty", fix=f"give {flag} a file name")
        check_writable(path, directory=False, what=flag)
    return path


def output_dir(path: str | None, flag: str) -> str | None:
    """A path a folder of outputs can be written to (created if missing); not an existing file."""
    if path is not None:
        if str(path).strip() == "":
            raise SinklessError(f"{flag} is empty", fix=f"give {flag} a folder name")
        check_writable(path, directory=True, what=flag)
    return path


def not_an_input(path: str | None, inputs, flag: str) -> str | None:
    """An output must not overwrite one of the inputs (a file named, or one inside a folder named)."""
    if path is None:
        return None
    target = Path(path).expanduser().resolve()
    for item in inputs or []:
        given = Path(item).expanduser()
        if given.exists() and (given.resolve() == target or (given.is_dir() and target.exists() and target.parent == given.resolve())):
            raise SinklessError(f"{flag} {path} is one of the inputs: writing it would destroy that input", fix=f"choose another file for {flag}")
    return path


def input_file(path: str | None, flag: str, *, made_by: str | None = None) -> str | None:
    """An existing, readable regular file."""
    if path is None:
        return None
    target = Path(path).expanduser()
    fix = f"pass a file written by {made_by}" if made_by else "check the path"
    if not target.exists():
        raise SinklessError(f"{flag} {path}: file not found", fix=fix)
    if target.is_dir():
        raise SinklessError(f"{flag} {path} is a folder, not a file", fix=fix)
    try:
        with open(target, "rb"):
            pass
    except OSError as error:
        raise SinklessError(f"{flag} {path} cannot be read ({error.strerror or error})", fix="check its permissions") from None
    return path


def json_input(path: str | None, flag: str, *, keys: tuple[str, ...] = (), made_by: str | None = None) -> dict | None:
    """An existing JSON file holding an object with ``keys`` (e.g. a result written by another verb); its contents."""
    import json

    if path is None:
        return None
    input_file(path, flag, made_by=made_by)
    fix = f"pass a file written by {made_by}" if made_by else "pass a JSON file"
    try:
        data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SinklessError(f"{flag} {path} is not valid JSON ({error})", fix=fix) from None
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        raise SinklessError(f"{flag} {path} is not the right kind of file (no {', '.join(repr(k) for k in missing)})", fix=fix)
    return data


def max_tokens_for(loaded, max_tokens: int, flag: str = "--max-tokens") -> int:
    """``max_tokens`` checked against a text model's context (config ``max_position_embeddings``).

    Beyond the context a rotary model runs positions it never saw in training (the numbers describe
    something else): a warning. A model with learned absolute positions cannot run them at all: the
    value is lowered to the context, with a warning.
    """
    config = getattr(loaded.model, "config", None)
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not _is_int(context) or max_tokens <= context:
        return max_tokens
    if getattr(loaded.adapter, "rotary", True):
        log.warning(
            "%s %d exceeds %s's context of %d tokens: longer texts are measured at positions the model was never trained on (pass %s %d)",
            flag, max_tokens, loaded.name, context, flag, context,
        )
        return max_tokens
    log.warning("%s %d exceeds %s's context of %d tokens (learned positions): using %d", flag, max_tokens, loaded.name, context, context)
    return context
