"""``sinkless models``: the offline model zoo and how to make each name available."""

from __future__ import annotations

import argparse
import json

from sinkless import zoo
from sinkless.devices import add_device_args, resolve_device, resolve_dtype


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("models", help="list the named models that work offline", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    parser.add_argument("--load", metavar="NAME", help="load NAME once (converting and caching it) and print its shape")
    add_device_args(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.load:
        loaded = zoo.load(args.load, device=resolve_device(args.device), dtype=resolve_dtype(args.dtype))
        params = sum(p.numel() for p in loaded.model.parameters())
        first = next(loaded.model.parameters())
        print(
            f"{loaded.name}: {type(loaded.model).__name__}, {loaded.modality.value}, "
            f"{loaded.num_layers} layers, {params / 1e6:.1f}M parameters, {first.dtype} on {first.device}, from {loaded.source}"
        )
        return 0
    rows = zoo.list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    print(f"{'name':<{width}}  {'available':<9}  {'make available with':<40}  description")
    for r in rows:
        mark = "yes" if r["available"] else "no"
        print(f"{r['name']:<{width}}  {mark:<9}  {r['install']:<40}  {r['description']}")
    print("\nAny other --model value is read as a Hugging Face hub id or a local save_pretrained folder.")
    return 0
