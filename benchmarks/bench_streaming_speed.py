"""StreamingLLM decoding speed: tokens/s of the sink cache vs. a sliding window with re-computation.

Both give each token 1025 tokens of context on SmolLM2-135M: ``sink`` decodes one token at a time through a
SinkCache of 4 sinks + a window of 1020 (already full: steady state, 1024 kept, 1025 attended); ``recompute``
re-encodes the last 1025 tokens from scratch for every token (the baseline of Xiao et al. 2024, who report
up to 22.2x).
Same process, interleaved repeats, medians (``benchmarks.runner.compare``); the claim is the ratio.

    python -m benchmarks.runner streaming_speed
"""

from __future__ import annotations

import torch

from benchmarks.runner import compare

SINKS, WINDOW, SPAN = 4, 1020, 1025
TOKENS_PER_CALL = 2  # decoded tokens per timed call, same for both
TARGET_SPEEDUP = 22.0


def run() -> dict:
    from sinkless import zoo
    from sinkless.streaming import SinkCache
    from sinkless.streaming.text import read_text, tokenize

    loaded = zoo.load("smollm2-135m")
    model = loaded.model
    ids = tokenize(loaded.tokenizer, read_text(), max_tokens=SPAN + 4000)[None]  # (1, N)
    cache = SinkCache(model, sinks=SINKS, window=WINDOW)
    with torch.no_grad():
        for i in range(0, SPAN + 64, 512):  # fill the cache past the window: every later step evicts
            model(input_ids=ids[:, i : min(i + 512, SPAN + 64)], past_key_values=cache, logits_to_keep=1)
    cursor = {"sink": SPAN + 64, "recompute": SPAN}

    @torch.no_grad()
    def sink() -> None:
        for _ in range(TOKENS_PER_CALL):
            t = cursor["sink"]
            model(input_ids=ids[:, t : t + 1], past_key_values=cache, logits_to_keep=1)
            cursor["sink"] = t + 1

    @torch.no_grad()
    def recompute() -> None:
        for _ in range(TOKENS_PER_CALL):
            t = cursor["recompute"]
            model(input_ids=ids[:, t - SPAN + 1 : t + 1], logits_to_keep=1)
            cursor["recompute"] = t + 1

    result = compare(
        "streaming_speed: sink (S=4, W=1020) vs recompute (1025 tokens), seconds per token",
        sink,
        recompute,
        warmup=1,
        repeats=5,
        target=1 / TARGET_SPEEDUP,
        notes=f"{TOKENS_PER_CALL} decoded tokens per call; ratio = sink time / recompute time; speedup = 1 / ratio; "
        f"torch threads {torch.get_num_threads()}",
    )
    result["speedup"] = 1 / result["ratio"]
    result["speedup_target"] = TARGET_SPEEDUP
    result["sink_tokens_per_second"] = TOKENS_PER_CALL / result["candidate_s"]
    result["recompute_tokens_per_second"] = TOKENS_PER_CALL / result["baseline_s"]
    print(f"speedup (sink tokens/s / recompute tokens/s): {result['speedup']:.1f}x (target {TARGET_SPEEDUP}x)")
    return result
