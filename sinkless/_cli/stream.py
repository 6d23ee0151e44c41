"""``sinkless stream``: generate from a prompt, or chat, through a StreamingLLM sink + window cache."""

from __future__ import annotations

import argparse
import sys

from sinkless._cli import _args
from sinkless.devices import add_device_args
from sinkless.errors import SinklessError


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "stream",
        help="generate endlessly in constant memory (StreamingLLM attention sinks)",
        description=__doc__ + " The prompt comes from --prompt or standard input; with --chat each input line is "
        "a user turn. Decoding is transformers' own generate(); Ctrl-C stops cleanly.",
    )
    parser.add_argument("--model", required=True, help="zoo name (see `sinkless models`), hub id or local folder")
    parser.add_argument("--sinks", type=int, default=4, help="attention sinks kept: the stream's first S tokens (default 4)")
    parser.add_argument(
        "--window", type=int, default=1020,
        help="recent tokens each new token sees besides the sinks and itself (default 1020): --sinks 4 --window 1020 "
        "keeps 1024 tokens between steps and attends to 1025, the paper's setting",
    )
    parser.add_argument("--prompt", help="the prompt (default: read standard input)")
    parser.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="tokens to generate (per turn with --chat)")
    parser.add_argument("--chat", action="store_true", help="multi-turn chat with an instruct model's chat template: one user turn per input line, one cache for the whole conversation")
    parser.add_argument("--system", help="--chat: a system message")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-k", type=int, default=None, help="sampling: keep the K most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="sampling: nucleus probability mass")
    parser.add_argument("--repetition-penalty", type=float, default=1.2, help="> 1 discourages repeating tokens (default 1.2: small models loop without it; 1 = off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--chunk-size", type=int, default=512, help="prompt tokens per forward during prefill (results do not depend on it)")
    add_device_args(parser)
    parser.set_defaults(run=run)


def _stats(result) -> None:
    cache = result.cache
    print(
        f"[{result.tokens} tokens in {result.seconds:.1f} s, {result.tokens_per_second:.1f} tokens/s; cache holds "
        f"{cache.kept()[0]} of {cache.seen()[0]} tokens seen (sinks {cache.sinks} + window {cache.window})]",
        file=sys.stderr,
    )


def _chat(args: argparse.Namespace, loaded, generate_kwargs: dict, streamer) -> int:
    from sinkless.streaming import Chat

    chat = Chat(loaded.model, loaded.tokenizer, sinks=args.sinks, window=args.window, chunk_size=args.chunk_size, system=args.system)
    interactive = sys.stdin.isatty()
    turns = [args.prompt] if args.prompt else []
    while True:
        if turns:
            line = turns.pop(0)
        else:
            if interactive:
                print("you> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:
                break
            line = line.rstrip("\n")
        if not line.strip():
            continue
        if not interactive:  # a log of the conversation on stderr; the replies alone on stdout
            print(f"you> {line}", file=sys.stderr, flush=True)
        print("assistant> ", end="", file=sys.stderr, flush=True)
        result = chat.send(line, streamer=streamer, seed=args.seed, **generate_kwargs)
        sys.stdout.flush()
        _stats(result)
    return 0


def run(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    from sinkless import zoo
    from sinkless.devices import resolve_device, resolve_dtype
    from sinkless.streaming import check_streamable, complete
    from sinkless.streaming.generate import sampling_kwargs

    _args.non_negative_int(args.sinks, "--sinks", fix="pass --sinks N with N >= 0 (the paper keeps 4)")
    _args.positive_int(args.window, "--window", fix="pass --window N with N >= 1 (the paper uses 1020)")
    _args.positive_int(args.max_new_tokens, "--max-new-tokens")
    _args.positive_int(args.chunk_size, "--chunk-size")
    _args.non_negative_number(args.temperature, "--temperature", fix="pass --temperature 0 for greedy decoding, or a positive number such as 0.7")
    generate_kwargs = {
        "max_new_tokens": args.max_new_tokens,
        **sampling_kwargs(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty),
    }
    if args.system is not None and not args.chat:
        raise SinklessError("--system is the system message of a --chat", fix="add --chat, or drop --system")
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    prompt = args.prompt
    if prompt is None and not args.chat:
        if sys.stdin.isatty():
            raise SinklessError("no prompt", fix="pass --prompt TEXT, pipe a file (`sinkless stream --model M < prompt.txt`) or use --chat")
        prompt = sys.stdin.read()
    loaded = zoo.load(args.model, dtype=dtype, device=device)
    check_streamable(loaded.model, args.sinks, args.window, no_rope_fix=(
        "stream a rotary model (Llama family incl. SmolLM2, Qwen3, Mistral); "
        "`sinkless ppl --mode full` or `--mode recompute` measures this one"
    ))
    if loaded.tokenizer is None:
        raise SinklessError("this model has no tokenizer", fix="use a zoo name or a folder that holds a tokenizer")
    streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    if args.chat:
        return _chat(args, loaded, generate_kwargs, streamer)
    result = complete(
        loaded.model, loaded.tokenizer, prompt, sinks=args.sinks, window=args.window, chunk_size=args.chunk_size,
        streamer=streamer, seed=args.seed, **generate_kwargs,
    )
    _stats(result)
    return 0
