"""``sinkless ppl``: streaming perplexity of a long text (full, window, sink or recompute attention)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sinkless._cli import _args
from sinkless.devices import add_device_args
from sinkless.errors import SinklessError


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "ppl",
        help="perplexity of a long text under full / window / sink (StreamingLLM) / recompute attention",
        description=__doc__ + " Default text: the bundled Hamlet (public domain, ~56k SmolLM2 tokens).",
    )
    parser.add_argument("--model", required=True, help="zoo name (see `sinkless models`), hub id or local folder")
    parser.add_argument("--text", metavar="FILE", help="UTF-8 text file (default: the bundled Hamlet)")
    parser.add_argument("--mode", default="full", choices=["full", "window", "sink", "recompute"], help="attention mode (default: full)")
    parser.add_argument("--sinks", type=int, default=None, help="attention sinks kept: the stream's first S tokens (sink: 4; recompute: 0; window: 0)")
    parser.add_argument(
        "--window", type=int, default=1020,
        help="recent tokens each token sees besides the sinks and itself (default 1020): --sinks 4 --window 1020 keeps "
        "1024 tokens between steps and attends to 1025, the paper's setting",
    )
    parser.add_argument("--max-tokens", type=int, default=None, metavar="N", help="score the first N tokens (default: all)")
    parser.add_argument("--batch-size", type=int, default=1, help="cut the text into this many streams run side by side")
    parser.add_argument(
        "--chunk-size", type=int, default=None,
        help="tokens per forward (identical results; recompute: windows per forward). 1 = token by token as in the paper",
    )
    parser.add_argument("--every", type=int, default=1, metavar="K", help="recompute only: score one token in K (an estimate)")
    parser.add_argument("--json", metavar="OUT", help="write the result (settings, ppl, nll_curve, ...) to this JSON file")
    parser.add_argument("--plot", metavar="PNG", help="write the running perplexity plot here")
    parser.add_argument("--overlay", nargs="+", metavar="JSON", default=[], help="earlier --json results to draw on the same plot")
    parser.add_argument("--registers", metavar="FILE", help="full mode: apply test-time registers from a `sinkless fix` neurons file")
    parser.add_argument("--zero-neurons", metavar="FILE", help="full mode: zero the neurons of a `sinkless fix` file instead (the ablation)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_args(parser)
    parser.set_defaults(run=run)


def _check(args: argparse.Namespace) -> list[dict]:
    """Every flag checked before the model loads (issue 15): numbers, the text, outputs, overlays."""
    _args.non_negative_int(args.sinks, "--sinks", fix="pass --sinks N with N >= 0 (the paper keeps 4)")
    _args.positive_int(args.window, "--window", fix="pass --window N with N >= 1 (the paper uses 1020)")
    for value, flag in ((args.max_tokens, "--max-tokens"), (args.batch_size, "--batch-size"), (args.chunk_size, "--chunk-size"), (args.every, "--every")):
        _args.positive_int(value, flag)
    if args.text is not None and Path(args.text).expanduser().is_dir():  # a missing file: text.read_text says so
        raise SinklessError(f"--text {args.text} is a folder, not a file", fix="pass one UTF-8 text file, or leave --text out for the bundled Hamlet")
    _args.input_file(args.registers, "--registers", made_by="`sinkless fix --out`")
    _args.input_file(args.zero_neurons, "--zero-neurons", made_by="`sinkless fix --out`")
    _args.output_file(args.json, "--json")
    _args.output_file(args.plot, "--plot")
    overlays = [_args.json_input(p, "--overlay", keys=("nll_curve", "model", "mode"), made_by="`sinkless ppl --json`") for p in args.overlay]
    for path, data in zip(args.overlay, overlays):
        curve = data["nll_curve"]
        if not isinstance(curve, list) or not curve or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in curve):
            raise SinklessError(f"--overlay {path}: 'nll_curve' is not a list of numbers", fix="pass JSON files written by `sinkless ppl --json`")
    return overlays


def run(args: argparse.Namespace) -> int:
    from sinkless import zoo
    from sinkless._io import atomic_write_json
    from sinkless.devices import resolve_device, resolve_dtype
    from sinkless.streaming import check_streamable, ppl, text

    overlays = _check(args)
    config = ppl.PplConfig(
        mode=ppl.Mode(args.mode), sinks=args.sinks, window=args.window, batch_size=args.batch_size,
        chunk_size=args.chunk_size, every=args.every, max_tokens=args.max_tokens,
    ).resolved()  # user mistakes surface before the model loads
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    body = text.read_text(args.text)
    neurons_file = args.registers or args.zero_neurons
    if args.registers and args.zero_neurons:
        raise SinklessError("--registers and --zero-neurons exclude each other", fix="pass one of them")
    if neurons_file and config.mode is not ppl.Mode.FULL:
        raise SinklessError(f"--registers/--zero-neurons work with --mode full, not {config.mode.value}", fix="add --mode full")
    loaded = zoo.load(args.model, dtype=dtype, device=device)
    if config.mode in (ppl.Mode.SINK, ppl.Mode.WINDOW):
        check_streamable(loaded.model, config.sinks, config.window)  # before the text is tokenized
    tokens = text.tokenize(loaded.tokenizer, body)
    intervention, applied = None, None
    if neurons_file:
        from sinkless.registers import TestTimeRegisters, ZeroNeurons, load_neurons

        neurons = load_neurons(neurons_file)
        fix = TestTimeRegisters(loaded, neurons) if args.registers else ZeroNeurons(loaded, neurons)
        intervention = lambda model: fix()  # noqa: E731
        applied = {"kind": "test-time registers" if args.registers else "zeroed neurons", "file": neurons_file,
                   "top_k": neurons.top_k, "layers": {str(k): v for k, v in neurons.by_layer().items()}}
    result = ppl.perplexity(
        loaded.model, tokens, config, model_name=loaded.name,
        text_name=str(args.text or text.DEFAULT_TEXT.name), progress=not (args.no_progress or args.quiet), intervention=intervention,
    )
    settings = f"sinks={result.sinks} window={result.window} " if result.mode != "full" else ""
    print(
        f"{result.model} {result.mode}: {settings}ppl {result.ppl:.3f} over {result.tokens} tokens, "
        f"{result.tokens_per_second:.1f} tokens/s, peak RSS {result.peak_rss_mb:.0f} MB"
    )
    if applied:
        print(f"with {applied['kind']} from {applied['file']} (top_k={applied['top_k']})")
    if args.json:
        atomic_write_json(args.json, {**result.to_json(), **({"intervention": applied} if applied else {})})
        print(f"wrote {args.json}")
    if args.plot:
        ppl.plot_running_ppl([*overlays, result], args.plot, title=f"{result.model}: running perplexity")
        print(f"wrote {args.plot}")
    return 0
