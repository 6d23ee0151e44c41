"""Claim: writing the report (figures, report.json, the self-contained HTML) of the bundled main job
costs at most 0.5x its scan (dinov2-s-focus on the 6 sample photos + smollm2-135m on the sample
paragraph, CPU). Models are loaded once, outside the timings; both sides run interleaved.
"""

from __future__ import annotations

import tempfile

import torch

from benchmarks.runner import compare
from sinkless import zoo
from sinkless.scan import ScanSettings, resolve_inputs, scan, write_reports


def run() -> dict:
    torch.manual_seed(0)
    jobs = []
    for name, batch in (("dinov2-s-focus", 8), ("smollm2-135m", 4)):
        loaded = zoo.load(name)
        jobs.append((loaded, resolve_inputs([], [], loaded.modality), ScanSettings(batch_size=batch)))
    scans = [(*scan(loaded, items, settings, progress=False), items) for loaded, items, settings in jobs]

    def scan_main_job():
        for loaded, items, settings in jobs:
            scan(loaded, items, settings, progress=False)

    def write_main_job():
        with tempfile.TemporaryDirectory() as out:
            write_reports(f"{out}/report", scans)

    return compare("report writing vs scan (bundled main job)", write_main_job, scan_main_job, warmup=1, repeats=5, target=0.5)
