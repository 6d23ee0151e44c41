"""``sinkless compare``: a dense task before/after each artifact fix, as one table (and JSON)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from sinkless import distributed
from sinkless._cli import _args
from sinkless._io import atomic_write_json, to_jsonable
from sinkless.errors import SinklessError
from sinkless.devices import add_device_args
from sinkless.tasks.compare import TASKS, compare, write_pictures
from sinkless.tasks.fixes import fix_names

EPILOG = """\
data: 'synthetic' (built-in scenes), 'mini' (shipped photos), a Pascal VOC folder, a COCO JSON,
or a folder with annotations.json / annotations.csv. Protocols and formats: docs/TASKS.md.

example:
  sinkless compare --model planted-vit --fix none --fix ttr --task lost --data synthetic --json lost.json
  sinkless compare --model planted-vit --fix none --fix ttr --fix distilled --distilled planted-vit-reg --task zeroseg --data mini
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "compare", help="LOST / zero-shot segmentation / probes before and after fixes", description=__doc__,
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="zoo name (see `sinkless models`), hub id or local folder")
    parser.add_argument("--fix", action="append", metavar="FIX", help=f"repeatable; one of {', '.join(fix_names())} (default: none)")
    tasks_help = "; ".join(f"{t.name}: {t.description}" for t in TASKS.values()).replace("%", "%%")
    parser.add_argument("--task", required=True, choices=list(TASKS), help=tasks_help)
    parser.add_argument("--data", required=True, help="synthetic, mini, or a path (see below)")
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT")
    parser.add_argument("--limit", type=int, metavar="N", help="use the first N images only")
    parser.add_argument("--registers", metavar="FILE", help="ttr: the neurons file from `sinkless fix` (default: found on the bundled photos)")
    parser.add_argument("--registers-model", metavar="PATH",
                        help="registers: a model with trained registers (a `sinkless distill` folder, a DINOv2-with-registers checkpoint)")
    parser.add_argument("--distilled", metavar="DIR",
                        help="distilled: a finished `sinkless distill` folder (default: distil --model here on bundled photos that are not evaluation images; cached)")
    parser.add_argument("--denoiser", action="append", metavar="DIR",
                        help="dvt: a `sinkless denoise --train-denoiser` folder, repeatable (default: Stage 1 on every image, seconds each)")
    parser.add_argument("--dvt-output", choices=["clean", "raw-minus-artifact"],
                        help="dvt without --denoiser: what Stage 1 gives each image: clean (default, DVT's smooth field F) or "
                             "raw-minus-artifact (the features minus the fitted position-tied map G, detail kept)")
    parser.add_argument("--split", help="Pascal VOC: the ImageSets/Main list to use (e.g. trainval)")
    parser.add_argument("--images", metavar="DIR", help="COCO: the image folder (default: found beside the JSON)")
    parser.add_argument("--out-dir", metavar="DIR", help="write qualitative pictures (boxes, masks) per fix and image")
    parser.add_argument("--resamples", type=int, default=2000, metavar="N",
                        help="bootstrap resamples of the images for each row's 95%% interval and its paired difference to none "
                             "(default 2000; 0: no intervals)")
    protocol = parser.add_argument_group("protocol (defaults: the papers'; recorded in every result)")
    protocol.add_argument("--max-side", type=int, help="downscale images whose longer side exceeds this (default 448; 0: full size)")
    protocol.add_argument("--layer", type=int, help="lost: attention layer to read features from (default -1: the last)")
    protocol.add_argument("--features", choices=["keys", "queries", "values", "tokens"], help="lost: which features (default keys)")
    protocol.add_argument("--l2", action=argparse.BooleanOptionalAction, default=None, help="lost: L2-normalise features (default: no)")
    protocol.add_argument("--gram-bias", type=_bias, metavar="B|median",
                          help="lost: add B to the Gram matrix before counting positives, or subtract its median per image (default 0)")
    protocol.add_argument("--k", type=int, help="lost: expansion size (default 100)")
    protocol.add_argument("--mass", type=float, help="zeroseg: share of CLS attention kept as foreground (default 0.6)")
    protocol.add_argument("--probe-labels", dest="labels", choices=["classes", "foreground"], help="probe: dense targets (default classes)")
    protocol.add_argument("--knn-k", type=int, help="probe: neighbours of the k-NN probe (default 20)")
    add_device_args(parser)
    parser.set_defaults(run=run)


def _bias(text: str) -> float | str:
    if text == "median":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'median', got {text!r}") from None


def _overrides(args: argparse.Namespace) -> dict:
    keys = ("layer", "features", "l2", "gram_bias", "k", "mass", "labels", "knn_k")
    out = {k: getattr(args, k) for k in keys}
    if args.max_side is not None:
        _args.non_negative_int(args.max_side, "--max-side", fix="pass --max-side N with N >= 0 (0 keeps images at full size)")
        out["max_side"] = args.max_side or None
    return out


def _fix_options(args: argparse.Namespace) -> dict:
    """Each fix's own flags, checked against the fixes asked for (a flag for a fix not compared is a mistake)."""
    fixes = args.fix or ["none"]
    flags = {"ttr": ("registers", "--registers"), "registers": ("registers_model", "--registers-model"), "distilled": ("distilled", "--distilled"),
             "dvt": ("denoiser", "--denoiser")}
    options = {}
    for fix, (key, flag) in flags.items():
        value = getattr(args, key)
        if value and fix not in fixes:
            raise SinklessError(f"{flag} applies to --fix {fix}, which is not among the fixes compared", fix=f"add --fix {fix}, or drop {flag}")
        if value:
            options[fix] = {key: value}
    if args.dvt_output:
        if "dvt" not in fixes:
            raise SinklessError("--dvt-output applies to --fix dvt, which is not among the fixes compared", fix="add --fix dvt, or drop --dvt-output")
        if args.denoiser:
            raise SinklessError("--dvt-output applies to Stage 1 on every image, not to a trained --denoiser",
                                fix="drop --dvt-output, or drop --denoiser")
        options.setdefault("dvt", {})["output"] = args.dvt_output
    if "registers" in fixes and not args.registers_model:
        raise SinklessError("--fix registers compares a model trained with registers: none given",
                            fix="pass --registers-model PATH (a `sinkless distill` folder, or a DINOv2-with-registers checkpoint)")
    return options


def _check(args: argparse.Namespace) -> None:
    """Every flag, before the model loads and the task runs."""
    _args.positive_int(args.limit, "--limit")
    _args.non_negative_int(args.resamples, "--resamples", fix="pass --resamples 0 to skip the intervals, or e.g. 2000")
    _args.positive_int(args.k, "--k")
    _args.positive_int(args.knn_k, "--knn-k")
    _args.fraction(args.mass, "--mass")
    if args.gram_bias != "median":
        _args.finite_number(args.gram_bias, "--gram-bias")
    _args.input_file(args.registers, "--registers", made_by="`sinkless fix --out`")
    _args.output_file(args.json, "--json")
    _args.output_dir(args.out_dir, "--out-dir")
    if args.data not in ("synthetic", "mini"):  # the annotation file, its folder's images, --images: none is overwritten
        data = Path(args.data).expanduser()
        _args.not_an_input(args.json, [str(data), *([str(data.parent)] if data.is_file() else []), *([args.images] if args.images else [])], "--json")
    if args.json and args.out_dir and Path(args.json).expanduser().resolve() == Path(args.out_dir).expanduser().resolve():
        raise SinklessError(f"--json and --out-dir are the same path ({args.json})", fix="give --json a file name and --out-dir a folder")


def run(args: argparse.Namespace) -> int:
    from sinkless.tasks.data import open_dataset

    _check(args)
    device, dtype = distributed.placement(args.device, args.dtype)
    data = args.data
    if args.split or args.images:
        data = open_dataset(args.data, split=args.split, image_dir=args.images)
        data.name = args.data
    comparison, pictures = compare(
        args.model, args.task, data, args.fix or ["none"], overrides=_overrides(args), limit=args.limit,
        progress=not args.quiet, visuals=bool(args.out_dir), fix_options=_fix_options(args), device=device, dtype=dtype,
        resamples=args.resamples,
    )
    if not distributed.is_main():  # every process holds the merged results; the main one writes them
        return 0
    result = comparison.to_json()
    json.dumps(to_jsonable(result))  # fail here, before writing anything, if something is not serialisable
    if args.out_dir:
        if not pictures:
            logging.getLogger(__name__).warning("--task %s draws no pictures: --out-dir %s gets none (LOST and zeroseg draw them)",
                                                args.task, args.out_dir)
        write_pictures(pictures, args.out_dir)
    if args.json:
        atomic_write_json(args.json, result)
    print(_table(result))
    return 0


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _interval(row: dict) -> str:
    """The paired 95 % interval of the row's difference to none (its own interval for none)."""
    paired = row.get("vs_none")
    low, high = paired["ci95"] if paired else row.get("ci95") or (None, None)
    if low is None or low != low:  # absent or NaN
        return ""
    return f"[{low:+.1f}, {high:+.1f}] {_WORDS[paired.get('verdict')]}".rstrip() if paired else f"[{low:.1f}, {high:.1f}]"


_WORDS = {"higher": "higher", "lower": "lower", "within the spread": "~", None: ""}


def _table(result: dict) -> str:
    metrics = {"lost": ["corloc"], "zeroseg": ["miou", "pixel_accuracy"], "probe": ["miou", "accuracy"]}[result["task"]]
    headline = metrics[0]
    base = next((r for r in result["results"] if r["fix"] == "none"), None) if len(result["results"]) > 1 else None
    intervals = [_interval(r) for r in result["results"]]
    width = max([len(i) for i in intervals] + [0])
    dataset = result["dataset"]
    shown = {k: v for k, v in result["protocol"].items() if k not in ("preprocessing", "attention", "task")}
    lines = [
        f"{result['model']} · task {result['task']} · data {result['data']} ({dataset['n_images']} images)",
        "protocol: " + ", ".join(f"{k}={v}" for k, v in shown.items()),
        "",
        f"{'fix':<10}" + "".join(f"{m:>16}" for m in metrics) + (f"{'Δ vs none':>12}" if base else "")
        + (f"  {'95% CI':<{width}}" if width else "") + f"{'images':>8}{'seconds':>10}",
    ]
    for r, interval in zip(result["results"], intervals):
        delta = f"{r[headline] - base[headline]:+12.1f}" if base and r[headline] is not None and base[headline] is not None else ""
        lines.append(
            f"{r['fix']:<10}" + "".join(f"{_fmt(r.get(m)):>16}" for m in metrics)
            + (f"{delta:>12}" if base else "") + (f"  {interval:<{width}}" if width else "") + f"{r['n_images']:>8}{r['seconds']:>10.1f}"
        )
    if width:
        lines += ["", f"95% CI: bootstrap over the images ({headline}; beside none: of the difference, the same images resampled for both;",
                  "higher / lower: the interval excludes 0; ~: the images cannot tell the fix from none)"]
    return "\n".join(lines)
