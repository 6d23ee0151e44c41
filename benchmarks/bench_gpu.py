"""The GPU rows of issues 12 and 14, prepared for a session that is lent a GPU (none has been so far).

    python -m benchmarks.bench_gpu --device cuda [--weights FOLDER] [--json OUT]
    python -m benchmarks.runner gpu            # the same on CUDA when this machine has a GPU, else one "skipped" row

Timing does not depend on the weights, so by default the model is a seeded random ``Dinov2Model`` with the
configuration of ``dinov2-s-focus`` (ViT-S/14: width 384, 12 layers, 6 heads, patch 14, 518-px position table):
nothing has to travel to the GPU machine but this repository. ``--weights FOLDER`` (a ``save_pretrained``
folder, e.g. dinov2-s-focus saved from this machine) measures the same on real weights and adds the figures
that need them. Every time is the median of repeats after a warm-up, timed by ``benchmarks.runner`` with
``torch.cuda.synchronize`` around each run; the same rows on the CPU of the same machine give the ratio.

Rows:

1. Stage 1 of DVT per image (default budget: 24 crops + the whole image, 300 steps; bf16 autocast on CUDA) at
   224 px and at 518 px (the reference's resolution; its time: 100-160 s per image on a GPU).
2. PH-Reg's teacher: 10 shifted/flipped views of one 224-px image in one batch, and one plain forward.
3. The Stage-2 denoiser hook: a batch of 8 at 224 px with the hook vs without.
4. Stage 2 trained on the device: Stage 1 of 4 images, 500 steps, one held out, ``--select best``.
5. ``sinkless distill`` with ``PHOTO_SETTINGS`` (16 registers, 300 steps, a pool of 512 crops of 224 px) on the
   12 bundled photos: teacher targets and training seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.runner import compare, time_once

STAGE1_IMAGES = 3
QUICK = False  # --quick: the smallest run of every row, to check the script on a CPU (its figures mean nothing)


def _model(weights: str | None, device: str):
    from transformers import Dinov2Config, Dinov2Model

    from sinkless.pretrained import as_loaded

    if weights:
        model = Dinov2Model.from_pretrained(weights, dtype=torch.float32)
        name = weights
    else:
        torch.manual_seed(0)
        config = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                              patch_size=14, image_size=518, layerscale_value=1e-5)
        model = Dinov2Model(config)
        name = "random ViT-S/14 (dinov2-s-focus's configuration)"
    loaded = as_loaded(model.eval().to(device), name=name)
    return loaded


def _sync(device: str):
    """What the runner's timing calls around each run: the GPU's queue is drained, so its work counts."""
    return torch.cuda.synchronize if device.startswith("cuda") else None


def _stage1(loaded, device: str, images) -> list[dict]:
    from sinkless.denoise import Stage1Settings, denoise_image
    from sinkless.images import to_pixels

    rows = []
    for size in (224,) if QUICK else (224, 518):
        pixels = to_pixels(images, loaded.image_spec, size).to(device)
        settings = Stage1Settings(views=2, steps=3) if QUICK else Stage1Settings()
        timings, order = [], itertools.cycle(range(len(pixels)))  # the warm-up on one image, then one image per repeat

        def one():
            result = denoise_image(loaded, pixels[next(order)][None], settings)
            timings.append(result.timings)

        row = time_once(f"stage 1 per image, {'quick' if QUICK else 'default'} budget, {size} px", one,
                        repeats=1 if QUICK else STAGE1_IMAGES, warmup=1, sync=_sync(device))
        rows.append(row | {"views_s": statistics.median(t["views_s"] for t in timings[1:]),
                           "fit_s": statistics.median(t["fit_s"] for t in timings[1:])})
    return rows


def _teacher(loaded, device: str, images) -> list[dict]:
    from sinkless.images import to_pixels
    from sinkless.registers import ViewSettings, denoise_views

    pixels = to_pixels(images[:1], loaded.image_spec, 224).to(device)
    settings = ViewSettings(views=10, max_shift=3)
    amp = "bf16" if device.startswith("cuda") else "auto"

    def plain():
        with torch.no_grad():
            loaded.model(pixels)

    def teacher():
        denoise_views(loaded, pixels, settings, generator=torch.Generator().manual_seed(0), amp=amp)

    row = compare(f"teacher: 10 views in one batch ({amp} autocast) vs one plain forward, 224 px, per image", teacher, plain,
                  repeats=9, warmup=2, sync=_sync(device))
    return [row | {"target_s": 0.2, "passed": row["candidate_s"] <= 0.2}]


def _stage2(loaded, device: str, images) -> list[dict]:
    from benchmarks.bench_dvt import _stage2_row
    from sinkless.images import to_pixels

    return [_stage2_row(loaded, to_pixels((images * 8)[:8], loaded.image_spec, 224).to(device), _sync(device))]


def _train2(loaded, device: str, images) -> list[dict]:
    """Stage 2 end to end on the device (Stage 1 of 4 images, then the block), with a held-out image and --select best."""
    from sinkless.denoise import DenoiserSettings, Stage1Settings, train_denoiser

    settings = DenoiserSettings(steps=20 if QUICK else 500, holdout=1, select="best")
    stage1 = Stage1Settings(views=2, steps=3) if QUICK else Stage1Settings()
    named = [(f"image{i}", image) for i, image in enumerate(images)]
    with tempfile.TemporaryDirectory() as folder:
        log = train_denoiser(loaded, named, Path(folder) / "den", settings, stage1, device=device, progress=False)
    return [{"name": f"stage 2 training: Stage 1 of {len(named)} images, then {settings.steps} steps", "seconds": log["total_s"],
             "stage1_s": log["stage1_timing"]["total_s"], "selected": log["selected"], "holdout": log["holdout"]}]


def _distill(loaded, device: str) -> list[dict]:
    from sinkless.registers import distill, training_photos
    from sinkless.registers.distill import PHOTO_SETTINGS

    photos = training_photos()
    settings = dataclasses.replace(PHOTO_SETTINGS, steps=2, pool=8) if QUICK else PHOTO_SETTINGS
    with tempfile.TemporaryDirectory() as folder:
        result = distill(loaded, photos, Path(folder) / "student", settings, device=device, progress=False)
    log = result.log
    return [{"name": f"distill, PHOTO_SETTINGS, {len(photos)} bundled photos", "seconds": log["seconds"]["total_this_run"],
             "teacher_targets_s": log["seconds"]["teacher_targets"], "training_s": log["seconds"]["training"],
             "precision": log.get("precision"), "final_loss": log["loss_curve"][-1]}]


def measure(device: str = "cuda", weights: str | None = None, parts=("stage1", "teacher", "stage2", "train2", "distill")) -> list[dict]:
    from sinkless.images import natural_crops

    loaded = _model(weights, device)
    images = natural_crops(STAGE1_IMAGES + 1, seed=777, names=("astronaut", "chelsea", "coins", "coffee"))
    rows = [{"name": "device", "device": device, "model": loaded.name,
             "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None}]
    steps = {"stage1": _stage1, "teacher": _teacher, "stage2": _stage2, "train2": _train2}
    for part in parts:
        started = time.perf_counter()
        rows += _distill(loaded, device) if part == "distill" else steps[part](loaded, device, images)
        print(f"{part}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return rows


def run() -> list[dict]:
    """``python -m benchmarks.runner gpu``: on CUDA where there is a GPU."""
    if not torch.cuda.is_available():
        return [{"name": "gpu rows: skipped, this machine has no CUDA GPU"}]
    return measure("cuda")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--weights", help="a save_pretrained Dinov2 folder (default: random weights, same shapes)")
    parser.add_argument("--parts", default="stage1,teacher,stage2,train2,distill", help="comma-separated subset")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--quick", action="store_true", help="the smallest run of every row (checks the script; figures mean nothing)")
    parser.add_argument("--save-weights", metavar="DIR", help="(on this machine) save dinov2-s-focus in float16 to DIR for --weights, and stop")
    args = parser.parse_args(argv)
    global QUICK
    QUICK = args.quick
    if args.save_weights:  # 43 MB: fits the device tool's 64 MiB transfer beside this repository (float32: 85 MB does not)
        from sinkless import zoo

        zoo.load("dinov2-s-focus").model.to(torch.float16).save_pretrained(args.save_weights)
        print(f"wrote {args.save_weights}: pass it with carry and --weights (WEIGHTS=... bash scripts/gpu_check.sh)")
        return 0
    rows = measure(args.device, args.weights, tuple(args.parts.split(",")))
    text = json.dumps(rows, indent=2, default=str)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
