"""Claims: `torchrun --nproc_per_node 2 -m sinkless scan` on 64 images writes the report one process writes,
and how much faster it is on this machine; and how fast a bfloat16 scan runs against float32 on the CPU.

Processes: whole commands timed (start-up, model load and the scan of 64 crops of the bundled photos with
dinov2-s-focus at 224 px, attention included), one process with 2 threads against two processes with
1 thread each (the same 2 cores), interleaved, 3 repeats. Precision: the in-process scan of 16 crops in
bfloat16 against float32, same model and inputs.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.runner import compare
from sinkless import zoo
from sinkless.images import natural_crops
from sinkless.scan import ImageInput, ScanSettings, measure

MODEL = "dinov2-s-focus"
N_IMAGES = 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scan_command(n: int, images: Path, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(2 // n), "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", str(_free_port()),
               "-m", "sinkless", "-q", "scan", str(images), "--model", MODEL, "--batch-size", "8", "--out", str(out)]
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=1800)


def _processes() -> dict:
    work = Path(tempfile.mkdtemp(prefix="scan-scaling-"))
    images = work / "images"
    images.mkdir()
    for i, crop in enumerate(natural_crops(N_IMAGES, seed=0)):
        crop.save(images / f"{i:03d}.png")
    result = compare(
        f"scan {N_IMAGES} images ({MODEL}): 2 processes x 1 thread vs 1 process x 2 threads (whole command)",
        lambda: _scan_command(2, images, work / "two"),
        lambda: _scan_command(1, images, work / "one"),
        warmup=0, repeats=3,
    )
    one = json.loads((work / "one" / "report.json").read_text())
    two = json.loads((work / "two" / "report.json").read_text())
    result["speedup"] = 1 / result["ratio"]
    result["identical_report"] = one == two
    result["passed"] = result["identical_report"]
    return result


def _precision() -> dict:
    torch.manual_seed(0)
    full = zoo.load(MODEL)
    half = copy.copy(full)
    half.model = copy.deepcopy(full.model).to(torch.bfloat16)
    items = [ImageInput(f"crop{i}", im) for i, im in enumerate(natural_crops(16, seed=1))]
    settings = ScanSettings(batch_size=8)
    result = compare(
        f"scan 16 images ({MODEL}, attention on): bfloat16 vs float32 on the CPU ({torch.get_num_threads()} threads)",
        lambda: measure(half, items, settings, progress=False),
        lambda: measure(full, items, settings, progress=False),
        warmup=1, repeats=5,
    )
    result["speedup"] = 1 / result["ratio"]
    return result


def run() -> list[dict]:
    return [_processes(), _precision()]
