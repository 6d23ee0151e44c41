"""``sinkless stream``: generate from a prompt (or chat) through a StreamingLLM sink + window cache."""

from __future__ import annotations

import argparse
import sys
import time

from sinkless._cli import _args
from sinkless.errors import SinklessError


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "stream",
        help="generate endlessly in constant memory (StreamingLLM attention sinks)",
        description=__doc__ + " The prompt comes from --prompt or standard input.",
    )
    parser.add_argument("--model", required=True, help="zoo name (see `sinkless models`), hub id or local folder")
    parser.add_argument("--sinks", type=int, default=4, help="attention sinks kept (default 4)")
    parser.add_argument("--window", type=int, default=1020, help="recent tokens kept (default 1020)")
    parser.add_argument("--prompt", help="the prompt (default: read standard input)")
    parser.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="tokens to generate (per turn with --chat)")
    parser.add_argument("--chat", action="store_true", help="multi-turn chat with an instruct model: one user turn per input line")
    parser.add_argument("--system", help="--chat: a system message")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--chunk-size", type=int, default=512, help="prompt tokens per forward during prefill")
    parser.set_defaults(run=run)


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def _stats(n: int, seconds: float, cache) -> None:
    print(
        f"\n[{n} tokens in {seconds:.1f} s, {n / max(seconds, 1e-9):.1f} tokens/s; cache holds {cache.get_seq_length()} "
        f"of {cache.seen} tokens seen (sinks {cache.sinks} + window {cache.window})]",
        file=sys.stderr,
    )


def _chat(args: argparse.Namespace, loaded, sampling) -> int:
    from sinkless.streaming.generate import Chat

    chat = Chat(loaded.model, loaded.tokenizer, sinks=args.sinks, window=args.window, system=args.system)
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
        if interactive:
            print("assistant> ", end="", file=sys.stderr, flush=True)
        start, n = time.perf_counter(), 0
        for piece in chat.send(line, sampling):
            _write(piece)
            n += 1
        _write("\n")
        if interactive:
            _stats(n, time.perf_counter() - start, chat.cache)
    return 0


def run(args: argparse.Namespace) -> int:
    from sinkless import zoo
    from sinkless.streaming import SinkCache
    from sinkless.streaming.cache import check_streamable
    from sinkless.streaming.generate import Detokenizer, Sampling, eos_ids, generate_tokens
    from sinkless.streaming.text import tokenize

    _args.non_negative_int(args.sinks, "--sinks", fix="pass --sinks N with N >= 0 (the paper keeps 4)")
    _args.positive_int(args.window, "--window", fix="pass --window N with N >= 1 (the paper uses 1020)")
    _args.positive_int(args.max_new_tokens, "--max-new-tokens")
    _args.positive_int(args.chunk_size, "--chunk-size")
    _args.non_negative_number(args.temperature, "--temperature", fix="pass --temperature 0 for greedy decoding, or a positive number such as 0.7")
    sampling = Sampling(args.max_new_tokens, args.temperature, args.seed, args.chunk_size)
    if args.window <= args.sinks:
        raise SinklessError(f"window ({args.window}) must be larger than the number of sinks ({args.sinks})", fix="e.g. --sinks 4 --window 1020")
    prompt = args.prompt
    if prompt is None and not args.chat:
        if sys.stdin.isatty():
            raise SinklessError("no prompt", fix="pass --prompt TEXT, pipe a file (`sinkless stream --model M < prompt.txt`) or use --chat")
        prompt = sys.stdin.read()
    loaded = zoo.load(args.model)
    check_streamable(loaded.model, args.sinks, args.window, no_rope_fix=(
        "stream a rotary model (Llama family incl. SmolLM2, Qwen3, Mistral); "
        "`sinkless ppl --mode full` or `--mode recompute` measures this one"
    ))
    if args.chat:
        return _chat(args, loaded, sampling)
    cache = SinkCache(loaded.model, sinks=args.sinks, window=args.window)
    ids = tokenize(loaded.tokenizer, prompt)
    detok = Detokenizer(loaded.tokenizer)
    start, n = time.perf_counter(), 0
    for token in generate_tokens(loaded.model, cache, ids, sampling, stop=eos_ids(loaded.model, loaded.tokenizer)):
        _write(detok.push(token))
        n += 1
    _write("\n")
    _stats(n, time.perf_counter() - start, cache)
    return 0
