"""Claim: a norms-only scan costs at most 1.3x a plain forward pass (dinov2-s-focus, 224 px, batch 8, CPU).

Both sides start from the same PIL images, so both include preprocessing; the scan adds its capture
hooks and the per-input, per-layer statistics (norms, outlier rule, massive-activation search).
"""

from __future__ import annotations

import torch

from benchmarks.runner import compare
from sinkless import zoo
from sinkless.images import natural_crops, to_pixels
from sinkless.scan import ImageInput, ScanSettings
from sinkless.scan.measure import measure_batch


def run() -> dict:
    torch.manual_seed(0)
    loaded = zoo.load("dinov2-s-focus")
    images = natural_crops(8, seed=0)
    items = [ImageInput(f"crop{i}", im) for i, im in enumerate(images)]
    settings = ScanSettings(attention=False, batch_size=8)

    def plain():
        with torch.no_grad():
            loaded.model(to_pixels(images, loaded.image_spec))

    def scan_norms():
        measure_batch(loaded, items, settings)

    return compare("scan norms-only vs plain forward (ViT-S/14, 224 px, batch 8)", scan_norms, plain, repeats=9, target=1.3)
