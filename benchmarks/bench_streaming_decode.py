"""StreamingLLM decode step: SinkCache vs transformers' DynamicCache, SmolLM2-135M, one token per forward.

- ``sink``: a SinkCache of 4 sinks + a window of 1020 in steady state (holds 1024 tokens, every step evicts one
  and attends to 1025);
- ``dynamic (1024)``: a plain DynamicCache holding the same 1024 tokens (cropped back after each step);
- ``dynamic (16k)``: a DynamicCache after 16,384 tokens: what an unbounded cache costs once a stream is long.

The 1024-token states are a real prefill of Hamlet; the 16k cache is filled with random states of the right
shape (a decode step's cost does not depend on the values, and a real 16k prefill takes minutes on a CPU).
Same process, interleaved repeats, medians (``benchmarks.runner.compare``); the claims are the ratios:
sink / dynamic (1024) <= 1.10, sink / dynamic (16k) < 1. The CPU time of each call (``process_time``) is
recorded too: on a shared machine wall time also counts waiting for a core, CPU time does not.

    flock /tmp/sinkless-timing.lock python -m benchmarks.runner streaming_decode
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.runner import compare

SINKS, WINDOW = 4, 1020
HELD = SINKS + WINDOW
LONG = 16_384
STEPS = 4  # decoded tokens per timed call, same for all


def run() -> list[dict]:
    from transformers import DynamicCache

    from sinkless import zoo
    from sinkless.streaming import SinkCache
    from sinkless.streaming.text import read_text, tokenize

    model = zoo.load("smollm2-135m").model
    tokenizer = zoo.load("smollm2-135m").tokenizer
    ids = tokenize(tokenizer, read_text(), max_tokens=HELD + 200)[None]  # (1, N)
    config = model.config
    heads, dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    with torch.no_grad():
        sink = SinkCache(model, sinks=SINKS, window=WINDOW)
        model(input_ids=ids[:, : HELD + 100], past_key_values=sink, logits_to_keep=1)  # full: every step evicts
        short = DynamicCache(config=config)
        model(input_ids=ids[:, :HELD], past_key_values=short, logits_to_keep=1)
        long = DynamicCache(config=config)
        g = torch.Generator().manual_seed(0)
        for layer in range(config.num_hidden_layers):
            k, v = (torch.randn(1, heads, LONG, dim, generator=g) * 0.1 for _ in range(2))
            long.update(k, v, layer)
    token = ids[:, HELD + 100 : HELD + 101]  # (1, 1)

    cpu: dict[str, list[float]] = {}

    def decode(name: str, cache, held: int | None):
        cpu[name] = []

        @torch.no_grad()
        def step() -> None:
            start = time.process_time()
            for _ in range(STEPS):
                model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
                if held is not None:
                    cache.crop(held - cache.get_seq_length())  # negative: drop the new token
            cpu[name].append(time.process_time() - start)

        return step

    def cpu_ratio(candidate: str, baseline: str, warmup: int) -> float:
        return statistics.median(cpu[candidate][warmup:]) / statistics.median(cpu[baseline][warmup:])

    assert sink.kept() == [HELD] and short.get_seq_length() == HELD and long.get_seq_length() == LONG
    threads = torch.get_num_threads()
    results = [
        compare(
            "streaming_decode: SinkCache (S=4, W=1020, holds 1024) vs DynamicCache holding 1024, seconds per step",
            decode("sink", sink, None), decode("short", short, HELD), warmup=2, repeats=9, target=1.10,
            notes=f"{STEPS} decoded tokens per call; ratio = sink / dynamic; torch threads {threads}",
        ),
        compare(
            "streaming_decode: SinkCache (holds 1024) vs DynamicCache after 16,384 tokens, seconds per step",
            decode("sink16", sink, None), decode("long", long, LONG), warmup=1, repeats=7, target=1.0,
            notes=f"{STEPS} decoded tokens per call; the 16k cache holds random states of the right shape; torch threads {threads}",
        ),
    ]
    assert sink.kept() == [HELD]
    results[0]["cpu_ratio"] = cpu_ratio("sink", "short", 2)
    results[1]["cpu_ratio"] = cpu_ratio("sink16", "long", 1)
    for row in results:
        row["sink_tokens_per_second"] = STEPS / row["candidate_s"]
        row["dynamic_tokens_per_second"] = STEPS / row["baseline_s"]
        print(f"{row['name']}: ratio {row['ratio']:.3f} (pairs {row['pair_ratio_min']:.3f}-{row['pair_ratio_max']:.3f}), "
              f"CPU-time ratio {row['cpu_ratio']:.3f}")
    return results
