"""StreamingLLM memory: peak RSS of `sinkless ppl --mode sink` after 2,000 vs 20,000 streamed tokens.

Each run is a fresh ``sinkless ppl`` subprocess (so neither inherits the other's heap), S=4, W=1020,
on the bundled Hamlet; its peak RSS is the ``peak_rss_mb`` it writes to its JSON. Flat memory means the
two differ by less than 10 %.

    python -m benchmarks.runner streaming_memory
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

TOKENS = (2_000, 20_000)
TARGET_GROWTH = 0.10


def _peak_rss(tokens: int, folder: Path) -> dict:
    out = folder / f"sink-{tokens}.json"
    command = [
        sys.executable, "-m", "sinkless", "-q", "ppl", "--model", "smollm2-135m", "--mode", "sink",
        "--sinks", "4", "--window", "1020", "--max-tokens", str(tokens), "--no-progress", "--json", str(out),
    ]
    subprocess.run(command, check=True)
    data = json.loads(out.read_text())
    return {"tokens": data["tokens"], "peak_rss_mb": data["peak_rss_mb"], "ppl": data["ppl"], "tokens_per_second": data["tokens_per_second"]}


def run() -> dict:
    with tempfile.TemporaryDirectory() as folder:
        small, large = (_peak_rss(n, Path(folder)) for n in TOKENS)
    growth = large["peak_rss_mb"] / small["peak_rss_mb"] - 1
    print(f"peak RSS {small['peak_rss_mb']:.0f} MB at {small['tokens']} tokens, {large['peak_rss_mb']:.0f} MB at {large['tokens']}: {growth:+.1%}")
    return {
        "name": "streaming_memory: peak RSS, 20k vs 2k streamed tokens (sink S=4, W=1020)",
        "runs": [small, large],
        "growth": growth,
        "target_growth": TARGET_GROWTH,
        "passed": abs(growth) < TARGET_GROWTH,
        "notes": "fresh `python -m sinkless ppl` subprocess per run; peak RSS from getrusage in the child",
    }
