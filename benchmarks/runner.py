"""Time a function against a baseline in the same process: warm-up, interleaved repeats, medians, ratio.

Shared machines are noisy, so a claim is a *ratio* to a baseline measured in the same run, with
runs interleaved (baseline, candidate, baseline, ...) so drift hits both alike.

    python -m benchmarks.runner                 # every benchmarks/bench_*.py
    python -m benchmarks.runner scan_overhead   # one of them
    python -m benchmarks.runner distill         # PH-Reg's 10-view teacher vs one plain forward (bench_distill.py)

Each ``bench_<name>.py`` defines ``run() -> dict`` (usually built with ``compare``); the result is
written to ``benchmarks/results/<name>.json`` with the machine, versions and date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _time(fn: Callable[[], object], sync: Callable[[], object] | None = None) -> float:
    """Wall time of ``fn``; ``sync`` (e.g. ``torch.cuda.synchronize``) runs before and after, so that work queued on
    an accelerator counts where it was asked for."""
    if sync is not None:
        sync()
    start = time.perf_counter()
    fn()
    if sync is not None:
        sync()
    return time.perf_counter() - start


def compare(
    name: str,
    candidate: Callable[[], object],
    baseline: Callable[[], object],
    *,
    warmup: int = 2,
    repeats: int = 7,
    target: float | None = None,
    higher_is_better: bool = False,
    notes: str = "",
    sync: Callable[[], object] | None = None,
) -> dict:
    """Median seconds of ``candidate`` and ``baseline`` and their ratio (candidate / baseline), interleaved.

    ``target``: the ratio the claim needs; ``passed`` says whether the median ratio meets it
    (ratio <= target, or >= with ``higher_is_better``). ``sync``: see ``_time``.
    """
    for _ in range(warmup):
        baseline()
        candidate()
    base_times, cand_times = [], []
    for _ in range(repeats):
        base_times.append(_time(baseline, sync))
        cand_times.append(_time(candidate, sync))
    base, cand = statistics.median(base_times), statistics.median(cand_times)
    ratio = cand / base
    # per-pair ratios show the spread of the claim itself
    pair_ratios = sorted(c / b for c, b in zip(cand_times, base_times))
    result = {
        "name": name,
        "baseline_s": base,
        "candidate_s": cand,
        "ratio": ratio,
        "pair_ratio_min": pair_ratios[0],
        "pair_ratio_max": pair_ratios[-1],
        "repeats": repeats,
        "warmup": warmup,
        "baseline_times_s": base_times,
        "candidate_times_s": cand_times,
        "notes": notes,
    }
    if target is not None:
        result["target"] = target
        result["passed"] = ratio >= target if higher_is_better else ratio <= target
    return result


def time_once(name: str, fn: Callable[[], object], *, target_s: float | None = None, repeats: int = 1, notes: str = "",
              warmup: int = 0, sync: Callable[[], object] | None = None) -> dict:
    """Median wall time of ``fn`` over ``repeats`` runs (after ``warmup`` untimed ones), against an absolute target in
    seconds. ``sync``: see ``_time``."""
    for _ in range(warmup):
        fn()
    times = [_time(fn, sync) for _ in range(repeats)]
    seconds = statistics.median(times)
    result = {"name": name, "seconds": seconds, "times_s": times, "repeats": repeats, "notes": notes}
    if target_s is not None:
        result["target_s"] = target_s
        result["passed"] = seconds <= target_s
    return result


def environment() -> dict:
    import torch

    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    from sinkless import __version__

    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "sinkless_version": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": tf_version,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def write(name: str, result: dict | list) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "environment": environment(), "results": result}, indent=2) + "\n")
    return path


def available() -> list[str]:
    here = Path(__file__).resolve().parent
    return sorted(p.stem[len("bench_") :] for p in here.glob("bench_*.py"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {available()})")
    args = parser.parse_args(argv)
    names = args.names or available()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; available: {available()}")
    failed = False
    for name in names:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        result = module.run()
        path = write(name, result)
        rows = result if isinstance(result, list) else [result]
        for row in rows:
            verdict = "" if "passed" not in row else ("  PASS" if row["passed"] else "  FAIL")
            if "ratio" in row:
                print(f"{row['name']}: ratio {row['ratio']:.3f} (baseline {row['baseline_s']:.4f}s, candidate {row['candidate_s']:.4f}s){verdict}")
            elif "seconds" in row:
                print(f"{row['name']}: {row['seconds']:.2f}s{verdict}")
            failed |= row.get("passed") is False
        print(f"  -> {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
