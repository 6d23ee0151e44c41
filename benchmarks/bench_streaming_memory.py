"""StreamingLLM memory: peak RSS of ``model.generate()`` with a SinkCache after 2,000 vs 50,000 generated tokens.

Each run is a fresh subprocess (so neither inherits the other's heap): SmolLM2-135M, ``SinkCache(model,
sinks=4, window=1020)``, a 64-token prompt of Hamlet, greedy decoding with ``min_new_tokens`` so it never
stops early. Peak RSS comes from getrusage in the child; the cache's own tensors are summed too. Flat memory
means the two peaks differ by less than 10 %. (A DynamicCache would hold 30 layers x 2 x 3 heads x 64 dims x
4 bytes = 46 KB per token: 2.3 GB more at 50,000 tokens.)

    python -m benchmarks.runner streaming_memory          # ~50k decode steps: long on a CPU
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOKENS = (2_000, 50_000)
TARGET_GROWTH = 0.10
PROMPT = 64


def _child(tokens: int, out: Path) -> None:
    import torch

    from sinkless import zoo
    from sinkless.streaming import SinkCache
    from sinkless.streaming.text import read_text, tokenize

    loaded = zoo.load("smollm2-135m")
    model = loaded.model
    ids = tokenize(loaded.tokenizer, read_text(), max_tokens=PROMPT)[None]  # (1, 64)
    cache = SinkCache(model, sinks=4, window=1020)
    start = time.perf_counter()
    result = model.generate(ids, past_key_values=cache, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    seconds = time.perf_counter() - start
    cache_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values, layer.sink_keys))
    out.write_text(json.dumps({
        "generated": int(result.shape[1] - PROMPT), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cache_mb": cache_bytes / 2**20, "kept": cache.kept()[0], "seen": cache.seen()[0], "seconds": seconds,
        "tokens_per_second": tokens / seconds, "torch_threads": torch.get_num_threads(),
    }))


def _measure(tokens: int, folder: Path) -> dict:
    out = folder / f"generate-{tokens}.json"
    subprocess.run([sys.executable, "-m", "benchmarks.bench_streaming_memory", "--tokens", str(tokens), "--json", str(out)], check=True)
    return json.loads(out.read_text())


def run() -> dict:
    with tempfile.TemporaryDirectory() as folder:
        small, large = (_measure(n, Path(folder)) for n in TOKENS)
    growth = large["peak_rss_mb"] / small["peak_rss_mb"] - 1
    print(f"peak RSS {small['peak_rss_mb']:.0f} MB after {small['generated']} generated tokens, "
          f"{large['peak_rss_mb']:.0f} MB after {large['generated']}: {growth:+.1%} (cache {small['cache_mb']:.1f} / {large['cache_mb']:.1f} MB)")
    return {
        "name": "streaming_memory: peak RSS of generate() with SinkCache (S=4, W=1020), 50k vs 2k generated tokens",
        "runs": [small, large],
        "growth": growth,
        "target_growth": TARGET_GROWTH,
        "passed": abs(growth) < TARGET_GROWTH,
        "notes": "fresh subprocess per run; peak RSS from getrusage in the child; SmolLM2-135M fp32, greedy, min_new_tokens",
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    _child(args.tokens, args.json)
