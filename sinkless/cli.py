"""The ``sinkless`` command line: parses arguments and calls one library function per verb.

Each verb lives in ``sinkless/_cli/<verb>.py`` with ``add_parser(subparsers)`` and ``run(args) -> int``.
User mistakes (``SinklessError``) print one message with its fix and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys

from sinkless._version import __version__
from sinkless.errors import SinklessError

__all__ = ["main", "VERBS"]

VERBS = ("models", "scan", "fix", "ppl", "stream", "compare", "distill", "train-attn", "compare-attn", "denoise")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sinkless",
        description="Find and repair attention sinks and high-norm artifact tokens in ViTs and LMs.",
    )
    parser.add_argument("--version", action="version", version=f"sinkless {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND")
    for verb in VERBS:
        name = f"sinkless._cli.{verb.replace('-', '_')}"  # train-attn lives in _cli/train_attn.py
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name:
                raise
            continue  # verb not built yet
        module.add_parser(sub)
    return parser


def _configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    # third-party libraries stay at warning level unless --verbose
    for name in ("transformers", "huggingface_hub", "urllib3", "matplotlib", "PIL", "filelock"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.ERROR)
    # transformers sets its own logger's level when it first logs (to WARNING), undoing the line above: set it its way
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity(logging.DEBUG if verbose else logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _terminate(signum, frame) -> None:
    """SIGTERM unwinds like Ctrl-C: every ``finally`` runs, so staged outputs and temp folders are cleaned up."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    with contextlib.suppress(ValueError):  # not in the main thread (e.g. called from a worker): leave signals alone
        signal.signal(signal.SIGTERM, _terminate)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    _configure_logging(args.verbose, args.quiet)
    try:
        return int(args.run(args) or 0)
    except SinklessError as error:
        from sinkless import distributed

        rank = distributed.rank() if distributed.active() else int(os.environ.get("RANK", "0") or 0)  # torchrun sets RANK
        if rank == 0:  # under a launcher every process meets the same bad input: one of them says so
            print(f"sinkless {args.verb}: error: {error.problem}", file=sys.stderr)
            if error.fix:
                print(f"  fix: {error.fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
