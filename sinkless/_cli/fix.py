"""``sinkless fix``: find the register neurons that make the artifacts, for test-time registers.

Prints the chosen neurons, the top_k sweep and before/after outlier counts on held-out inputs, and
writes the neurons file that ``sinkless scan --registers`` (and ``compare --fix ttr``) use.
Without INPUTs, vision models use crops of the bundled photographs and language models use
passages of the bundled Hamlet; held-out inputs never overlap the discovery inputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sinkless import distributed, zoo
from sinkless._cli import _args
from sinkless.devices import add_device_args
from sinkless.registers import DiscoverySettings, discover
from sinkless.registers.inputs import discovery_inputs
from sinkless.scan import OutlierRule, Rule


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("fix", help="find register neurons for test-time registers", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="images / text files / folders / globs (a quarter is held out)")
    parser.add_argument("--model", required=True, help="zoo name, HF hub id or local folder")
    parser.add_argument("--text", action="append", default=[], metavar="STR", help="text inline (repeatable)")
    parser.add_argument("--top-k", type=int, metavar="K", help="number of register neurons (default: smallest k that removes the outliers on held-out inputs)")
    parser.add_argument("--threshold", type=float, metavar="X", help="absolute norm threshold for outliers (default: the scan's automatic rule)")
    parser.add_argument("--rule", choices=[r.value for r in Rule], default=Rule.ROBUST.value)
    parser.add_argument("--detection-layer", type=int, metavar="L", help="layer whose outliers define the scores (default: the one with most outliers)")
    parser.add_argument("--sparsity", action="store_true", help="keep only neurons quiet (|a| < 0.5) on at least half the tokens")
    parser.add_argument("--n-inputs", type=int, default=64, metavar="N", help="bundled discovery inputs when none are given (default 64)")
    parser.add_argument("--n-heldout", type=int, default=16, metavar="N", help="bundled held-out inputs when none are given (default 16)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N")
    parser.add_argument("--out", required=True, metavar="FILE", help="where to write the neurons JSON")
    add_device_args(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    _args.positive_int(args.top_k, "--top-k", fix="pass --top-k K with K >= 1, or leave it out to choose k by the sweep")
    _args.positive_number(args.threshold, "--threshold", fix="pass a norm above which a token is an outlier, or leave it out for the automatic rule")
    _args.positive_int(args.n_inputs, "--n-inputs", fix="pass --n-inputs N >= 1 (default 64): discovery needs inputs to find the neurons on")
    _args.positive_int(args.n_heldout, "--n-heldout", fix="pass --n-heldout N >= 1 (default 16): the fix is checked on held-out inputs")
    _args.positive_int(args.batch_size, "--batch-size")
    _args.output_file(args.out, "--out")
    model_folder = [args.model] if isinstance(args.model, str) and Path(args.model).expanduser().is_dir() else []
    _args.not_an_input(args.out, [*(args.inputs or []), *model_folder], "--out")  # an input, or a file of the model's folder
    device, dtype = distributed.placement(args.device, args.dtype)
    loaded = zoo.load(args.model, device=device, dtype=dtype)
    detection = _args.layer_index(args.detection_layer, "--detection-layer", loaded.num_layers, model=loaded.name)
    inputs, heldout = discovery_inputs(loaded, args.inputs, args.text, args.n_inputs, args.n_heldout)
    settings = DiscoverySettings(
        rule=OutlierRule(rule=Rule(args.rule), absolute=args.threshold),
        detection_layer=detection,
        top_k=args.top_k,
        sparsity=args.sparsity,
        batch_size=args.batch_size,
    )
    found = discover(loaded, inputs, heldout, settings, progress=not args.quiet)
    if not distributed.is_main():  # every process found the same neurons; the main one reports them
        return 0
    found.save(args.out)
    print(f"{loaded.name}: {len(inputs)} discovery inputs, {len(heldout)} held out")
    before, after = found.heldout.get("before") or {}, found.heldout.get("after") or {}
    if not found.neurons:
        if before.get("has_artifacts"):
            print(
                f"no outlier tokens in the {len(inputs)} discovery inputs, but {before.get('outlier_tokens')} in the {len(heldout)} held-out ones: "
                "no neurons found; pass more (or other) discovery inputs. Wrote an empty neuron set"
            )
        else:
            print(f"no outlier tokens found: nothing to fix (held-out max/median norm {before.get('max_ratio') or 0:.2f}); wrote an empty neuron set")
        print(f"wrote {args.out}")
        return 0
    print(f"outliers first appear at layer {found.highest_layer}; scores from detection layer {found.detection_layer}")
    if found.sweep:
        print("top_k sweep (held-out outlier tokens):")
        for row in found.sweep:
            count = f"{row['outlier_tokens']:<6d}" if "inputs_measured" not in row else f">= {row['outlier_tokens']:<3d}"
            stopped = f"  (stopped after {row['inputs_measured']} inputs: artifacts remain)" if "inputs_measured" in row else ""
            print(f"  k={row['k']:<3d} outliers {count} max/median {row['max_ratio']:.2f}{'  <- chosen' if row['k'] == found.top_k else ''}{stopped}")
    print(f"register neurons (top_k={found.top_k}):")
    for entry in found.neurons[: found.top_k]:
        print(f"  layer {entry['layer']:>2d} neuron {entry['neuron']:>5d}  score {entry['score']:.3f}")
    print(
        f"held-out outlier tokens: {before.get('outlier_tokens')} before -> {after.get('outlier_tokens')} with test-time registers "
        f"(max/median norm {before.get('max_ratio') or 0:.2f} -> {after.get('max_ratio') or 0:.2f})"
    )
    print(f"wrote {args.out}")
    return 0
