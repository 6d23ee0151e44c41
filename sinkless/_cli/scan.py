"""``sinkless scan``: is my model affected, where, how badly?

With no INPUT and no --text: the main job on the bundled defaults (sample photographs with
dinov2-s-focus, a sample paragraph with smollm2-135m).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace

from sinkless import distributed, zoo
from sinkless._cli import _args
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
    """Every flag checked before any model loads (numbers, the output folder, the registers file)."""
    _args.positive_int(args.batch_size, "--batch-size")
    _args.positive_number(args.threshold, "--threshold", fix="pass a norm above which a token is an outlier (e.g. 50), or leave it out for the automatic rule")
    _args.positive_int(args.image_size, "--image-size", fix="pass a side in pixels of at least one patch (e.g. 224), or leave it out for the model's own")
    _args.positive_int(args.max_tokens, "--max-tokens")
    _args.positive_number(args.rope_scale, "--rope-scale", fix="e.g. --rope-scale 4 to stretch positions 4x past the model's context")
    _args.input_file(args.registers, "--registers", made_by="`sinkless fix --out`")
    _args.output_dir(args.out, "--out")
    if args.threshold is not None and args.rule != Rule.ROBUST.value:
        log.warning("--threshold %g replaces the --rule %s: tokens with a norm above it are outliers", args.threshold, args.rule)
    rule = OutlierRule(rule=Rule(args.rule), absolute=args.threshold)
    return ScanSettings(rule=rule, batch_size=args.batch_size, image_size=args.image_size,
                        max_tokens=args.max_tokens, attention=not args.no_attention, rope_scale=args.rope_scale)


def _check_for_model(loaded, settings: ScanSettings) -> ScanSettings:
    """The checks that need the model: image size against its patch, max tokens against its context."""
    if loaded.modality is Modality.VISION:
        patch = loaded.image_spec.patch_size
        if settings.image_size is not None and settings.image_size < patch:
            raise SinklessError(
                f"--image-size {settings.image_size} is smaller than one {patch}-pixel patch of {loaded.name}",
                fix=f"pass --image-size of at least {patch} (the model's own is {loaded.image_spec.size})",
            )
        return settings
    return replace(settings, max_tokens=_args.max_tokens_for(loaded, settings.max_tokens))


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


def _available_bytes() -> int | None:
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_memory(loaded, items, settings: ScanSettings) -> None:
    """Refuse a scan whose captures cannot fit in memory (a huge --image-size or --max-tokens): one message
    instead of the machine swapping until the kernel kills the process."""
    available = _available_bytes()
    if available is None or not items:
        return
    config = getattr(loaded.model, "config", None)
    config = getattr(config, "vision_config", config)
    width = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0) or 1)
    if not width:
        return
    n_layers = len(settings.layers) if settings.layers is not None else loaded.num_layers
    try:
        mlp = loaded.adapter.mlp_width(loaded.model)
    except SinklessError:  # a mixture of experts has no single MLP width; scan does not capture it
        mlp = 0
    batch = min(settings.batch_size, len(items))
    if loaded.modality is Modality.VISION:
        side = (settings.image_size or loaded.image_spec.size) // loaded.image_spec.patch_size
        tokens, kept_heads = side * side + 1, 1  # vision keeps attention averaged over heads
        what = f"--image-size {settings.image_size or loaded.image_spec.size} ({tokens} tokens per image)"
    else:
        tokens = max(len(loaded.tokenizer(item.text, truncation=True, max_length=settings.max_tokens)["input_ids"]) for item in items)
        kept_heads = heads  # text keeps every head (Sink_eps)
        what = f"texts of {tokens} tokens (--max-tokens {settings.max_tokens})"
    floats = batch * tokens * (width * (n_layers + 2) + mlp)  # residuals of every scanned layer, one MLP activation
    if settings.attention:
        floats += batch * tokens * tokens * (kept_heads * n_layers + 2 * heads)  # captured + one layer's eager attention
    needed = 4 * floats * 1.25
    if needed > 0.9 * available:
        raise SinklessError(
            f"scanning {what} at --batch-size {batch} needs about {needed / 2**30:.1f} GiB of memory; {available / 2**30:.1f} GiB are available",
            fix="lower --batch-size, --image-size or --max-tokens, or add --no-attention (attention grows with the square of the tokens)",
        )


def _registers(loaded, neurons, path: str):
    from sinkless.registers import TestTimeRegisters

    ttr = TestTimeRegisters(loaded, neurons)  # warns when the file was made for another model
    extra = {"registers": {"file": path, "model": neurons.model, "top_k": neurons.top_k, "layers": {str(k): v for k, v in neurons.by_layer().items()}, "n_registers": ttr.n}}
    return ttr, extra


def run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    neurons = None
    if args.registers:
        from sinkless.registers import load_neurons

        neurons = load_neurons(args.registers)
    device, dtype = distributed.placement(args.device, args.dtype)
    scans = []
    for name, inputs, texts in _jobs(args):
        loaded = zoo.load(name, device=device, dtype=dtype)
        job_settings = _check_for_model(loaded, settings)
        items = resolve_inputs(inputs, texts, loaded.modality)
        layers = parse_layers(args.layers, loaded.num_layers)
        job_settings = replace(job_settings, layers=layers)
        if loaded.modality is Modality.TEXT:
            job_settings = replace(job_settings, batch_size=min(job_settings.batch_size, 4))
        _check_memory(loaded, items, job_settings)
        intervention, extra = None, {}
        if neurons is not None:
            intervention, extra = _registers(loaded, neurons, args.registers)
        report, records = scan(loaded, items, job_settings, intervention=intervention, extra_settings=extra, progress=not args.quiet)
        scans.append((report, records, items))
    if not distributed.is_main():  # every process holds the merged records; the main one writes them
        return 0
    written = write_reports(args.out, scans)
    for report, _, _ in scans:
        print("\n".join(summary_lines(report)))
    print(f"report: {args.out}/report.html ({', '.join(str(p) for p in written)})")
    return 0
