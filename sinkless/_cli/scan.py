"""``sinkless scan``: is my model affected, where, how badly?

With no INPUT and no --text: the main job on the bundled defaults (sample photographs with
dinov2-s-focus, a sample paragraph with smollm2-135m).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace

from sinkless import distributed, zoo
from sinkless.adapters import Modality
from sinkless.devices import add_device_args
from sinkless.errors import SinklessError
from sinkless.images import IMAGE_SUFFIXES
from sinkless.scan import OutlierRule, Rule, ScanSettings, parse_layers, resolve_inputs, scan, summary_lines, write_reports
from sinkless.scan.inputs import TEXT_SUFFIXES

log = logging.getLogger(__name__)

DEFAULT_VISION = "dinov2-s-focus"
DEFAULT_TEXT = "smollm2-135m"


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("scan", help="measure artifacts and sinks layer by layer", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="image files, text files, directories or globs")
    parser.add_argument("--model", help=f"zoo name, HF hub id or local folder (default: {DEFAULT_VISION} for images, {DEFAULT_TEXT} for text)")
    parser.add_argument("--text", action="append", default=[], metavar="STR", help="text to scan inline (repeatable)")
    parser.add_argument("--threshold", type=float, metavar="X", help="absolute norm threshold for outliers (default: automatic rule)")
    parser.add_argument("--rule", choices=[r.value for r in Rule], default=Rule.ROBUST.value,
                        help="automatic outlier rule: robust (>= 3x median and median + 6 MAD; default) or meanstd (mean + 3 sigma)")
    parser.add_argument("--layers", metavar="SPEC", help="layers to scan: all (default), '3', '0-5,11', '-1'")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N")
    parser.add_argument("--image-size", type=int, metavar="PX", help="square input side for vision models (default: the model's)")
    parser.add_argument("--max-tokens", type=int, default=512, metavar="N", help="truncate text inputs (default 512)")
    parser.add_argument("--registers", metavar="FILE", help="apply test-time registers from a neurons file written by `sinkless fix`")
    parser.add_argument("--no-attention", action="store_true", help="norms only (no eager attention): faster, no sink shares")
    parser.add_argument("--rope-scale", type=float, default=1.0, metavar="F",
                        help="rotary LMs: read inputs F x longer than the trained context by linear position interpolation "
                        "(positions / F while scanning; e.g. 4 for 32k tokens on an 8k model)")
    parser.add_argument("--out", default="sinkless-out", metavar="DIR", help="output folder (default: sinkless-out)")
    add_device_args(parser)
    parser.set_defaults(run=run)


def _settings(args: argparse.Namespace) -> ScanSettings:
    if args.batch_size < 1:
        raise SinklessError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.threshold is not None and args.threshold <= 0:
        raise SinklessError(f"--threshold must be positive, got {args.threshold}")
    if not args.rope_scale > 0:
        raise SinklessError(f"--rope-scale must be positive, got {args.rope_scale}", fix="e.g. --rope-scale 4")
    rule = OutlierRule(rule=Rule(args.rule), absolute=args.threshold)
    return ScanSettings(rule=rule, batch_size=args.batch_size, image_size=args.image_size,
                        max_tokens=args.max_tokens, attention=not args.no_attention, rope_scale=args.rope_scale)


def _jobs(args: argparse.Namespace) -> list[tuple[str, list[str], list[str]]]:
    """(model, inputs, texts) per scan to run."""
    if args.model:
        return [(args.model, args.inputs, args.text)]
    if not args.inputs and not args.text:
        return [(DEFAULT_VISION, [], []), (DEFAULT_TEXT, [], [])]
    texty = bool(args.text) or all(a.lower().endswith(TEXT_SUFFIXES) for a in args.inputs)
    imagey = all(a.lower().endswith(IMAGE_SUFFIXES) for a in args.inputs) and not args.text
    if not (texty or imagey):
        raise SinklessError("cannot tell which default model to use for these inputs", fix="pass --model NAME")
    return [(DEFAULT_TEXT if texty else DEFAULT_VISION, args.inputs, args.text)]


def _registers(loaded, path: str):
    from sinkless.registers import TestTimeRegisters, load_neurons

    neurons = load_neurons(path)
    if neurons.model != loaded.name:
        log.warning("%s was made for %s, not %s", path, neurons.model, loaded.name)
    ttr = TestTimeRegisters(loaded, neurons)
    extra = {"registers": {"file": path, "model": neurons.model, "top_k": neurons.top_k, "layers": {str(k): v for k, v in neurons.by_layer().items()}, "n_registers": ttr.n}}
    return ttr, extra


def run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    device, dtype = distributed.placement(args.device, args.dtype)
    scans = []
    for name, inputs, texts in _jobs(args):
        loaded = zoo.load(name, device=device, dtype=dtype)
        items = resolve_inputs(inputs, texts, loaded.modality)
        layers = parse_layers(args.layers, loaded.num_layers)
        job_settings = replace(settings, layers=layers)
        if loaded.modality is Modality.TEXT:
            job_settings = replace(job_settings, batch_size=min(job_settings.batch_size, 4))
        intervention, extra = None, {}
        if args.registers:
            intervention, extra = _registers(loaded, args.registers)
        report, records = scan(loaded, items, job_settings, intervention=intervention, extra_settings=extra, progress=not args.quiet)
        scans.append((report, records, items))
    if not distributed.is_main():  # every process holds the merged records; the main one writes them
        return 0
    written = write_reports(args.out, scans)
    for report, _, _ in scans:
        print("\n".join(summary_lines(report)))
    print(f"report: {args.out}/report.html ({', '.join(str(p) for p in written)})")
    return 0
