"""Claims for test-time registers:

- inference overhead of the registers vs. the plain forward: at most 1.03x (ViT-S/14, 224 px, batch 8, CPU);
- discovery on 100 images of dinov2-s-focus: at most 60 s on CPU.
"""

from __future__ import annotations

import torch

from benchmarks.runner import compare, time_once
from sinkless import zoo
from sinkless.images import natural_crops, to_pixels
from sinkless.registers import DiscoverySettings, TestTimeRegisters, discover
from sinkless.scan import ImageInput


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

    focus = zoo.load("dinov2-s-focus")
    images = [ImageInput(f"c{i}", im) for i, im in enumerate(natural_crops(100, seed=0))]
    held = [ImageInput(f"h{i}", im) for i, im in enumerate(natural_crops(16, seed=1))]
    timing = time_once(
        "register-neuron discovery, dinov2-s-focus, 100 images (+16 held out)",
        lambda: discover(focus, images, held, progress=False),
        target_s=60.0,
    )
    return [overhead, timing]
