"""Claims for test-time registers:

- inference overhead of the registers vs. the plain forward: at most 1.03x (ViT-S/14, 224 px, batch 8, CPU);
- the whole of ``sinkless fix`` on a model that has artifacts (``planted-vit``): discovery on 100 crops,
  16 held-out crops, the top_k sweep and the final check, at most 10 s on CPU. The result also says
  where the time goes (the discovery pass, the held-out passes) and the floor: plain forwards of the
  same images without any capture.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

import torch

from benchmarks.runner import compare, time_once
from sinkless import zoo
from sinkless.images import natural_crops, to_pixels
from sinkless.registers import DiscoverySettings, TestTimeRegisters, discover
from sinkless.registers import discovery as discovery_module
from sinkless.scan import ImageInput


def _timed(spent: dict, name: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - start

    return wrapper


def _full_fix(planted, images, held, repeats: int = 3) -> dict:
    """Time ``discover`` (the library call behind ``sinkless fix``) and split the time by phase."""
    runs = []
    originals = discovery_module._tally, discovery_module._outlier_count
    try:
        for _ in range(repeats):
            spent: dict = defaultdict(float)
            discovery_module._tally = _timed(spent, "discovery pass", originals[0])
            discovery_module._outlier_count = _timed(spent, "held-out passes", originals[1])
            start = time.perf_counter()
            found = discover(planted, images, held, progress=False)
            total = time.perf_counter() - start
            runs.append((total, dict(spent), found))
    finally:
        discovery_module._tally, discovery_module._outlier_count = originals
    total, spent, found = sorted(runs, key=lambda r: r[0])[len(runs) // 2]  # the median run
    # held-out inputs measured: the "before" count, each k of the sweep (a rejected k stops once its verdict is
    # settled), and a final count unless the sweep's last try is the kept k, counted in full
    final = 0 if found.sweep and found.sweep[-1]["k"] == found.top_k and "inputs_measured" not in found.sweep[-1] else len(held)
    held_inputs = [len(held)] + [row.get("inputs_measured", len(held)) for row in found.sweep] + ([final] if final else [])
    held_passes = len(held_inputs)

    pixels_main = [to_pixels([i.image for i in images[s : s + 8]], planted.image_spec) for s in range(0, len(images), 8)]
    pixels_held = [to_pixels([i.image for i in held[s : s + 8]], planted.image_spec) for s in range(0, len(held), 8)]

    def floor():
        with torch.no_grad():
            for batch in pixels_main:
                planted.model(batch)
            for measured in held_inputs:
                for batch in pixels_held[: -(-measured // 8)]:
                    planted.model(batch)

    floor_s = statistics.median(_seconds(floor) for _ in range(repeats))
    return {
        "name": f"sinkless fix on planted-vit: discovery on {len(images)} crops + {len(held)} held out + top_k sweep",
        "seconds": total,
        "times_s": [r[0] for r in runs],
        "repeats": repeats,
        "target_s": 10.0,
        "passed": total <= 10.0,
        "breakdown_s": {**spent, "other": total - sum(spent.values())},
        "held_out_passes": held_passes,
        "held_out_inputs_per_pass": held_inputs,
        "sweep": [{"k": row["k"], "outlier_tokens": row["outlier_tokens"], **({"inputs_measured": row["inputs_measured"]} if "inputs_measured" in row else {})}
                  for row in found.sweep],
        "top_k": found.top_k,
        "neurons": [(n["layer"], n["neuron"]) for n in found.neurons[: found.top_k]],
        "forward_floor_s": floor_s,
        "notes": f"floor: plain forwards (no hooks) of the {len(images)} + {sum(held_inputs)} held-out images discovery runs; "
                 f"torch threads {torch.get_num_threads()}",
    }


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run() -> list[dict]:
    torch.manual_seed(0)
    planted = zoo.load("planted-vit")
    pixels = to_pixels(natural_crops(8, seed=0), planted.image_spec)
    inputs = [ImageInput(f"c{i}", im) for i, im in enumerate(natural_crops(48, seed=0))]
    heldout = [ImageInput(f"h{i}", im) for i, im in enumerate(natural_crops(16, seed=1))]
    neurons = discover(planted, inputs, heldout, DiscoverySettings(top_k=4), progress=False)

    def plain():
        with torch.no_grad():
            planted.model(pixels)

    ttr = TestTimeRegisters(planted, neurons)

    def candidate():
        with torch.no_grad(), ttr():
            planted.model(pixels)

    overhead = compare("test-time registers vs plain forward (planted-vit, 224 px, batch 8)", candidate, plain, repeats=15, warmup=3, target=1.03)

    images = [ImageInput(f"c{i}", im) for i, im in enumerate(natural_crops(100, seed=0))]
    held = [ImageInput(f"h{i}", im) for i, im in enumerate(natural_crops(16, seed=1))]
    full = _full_fix(planted, images, held)

    focus = zoo.load("dinov2-s-focus")  # the easy case: no outliers, one pass and a held-out count
    easy = time_once("register-neuron discovery, dinov2-s-focus (no artifacts), 100 images (+16 held out)",
                     lambda: discover(focus, images, held, progress=False), target_s=10.0)
    return [overhead, full, easy]
