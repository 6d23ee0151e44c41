"""``sinkless compare-attn``: one table (and a figure) of several `sinkless train-attn` runs."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "compare-attn",
        help="tabulate and plot train-attn runs: held-out loss, first-token attention, Sink_eps, largest activation",
        description=__doc__,
    )
    parser.add_argument("runs", nargs="+", metavar="DIR", help="folders written by `sinkless train-attn --out DIR`")
    parser.add_argument("--deep-from", type=int, default=None, metavar="L",
                        help="first layer of the 'deep' first-token attention column (default: the deeper half)")
    parser.add_argument("--plot", metavar="PNG", help="write loss curves and first-token attention per layer here")
    parser.add_argument("--json", metavar="OUT", help="write the table's rows as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from sinkless._cli import _args
    from sinkless.attention.compare import compare_runs

    _args.output_file(args.json, "--json")  # before reading the runs: refused up front, nothing written
    _args.output_file(args.plot, "--plot")
    text, _ = compare_runs(args.runs, plot=args.plot, json_out=args.json, deep_from=args.deep_from)
    print(text)
    return 0
