"""Many processes: under torchrun, 2 CPU processes (gloo) write what one process writes (scan, fix, compare)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from sinkless import distributed

DRIVER = textwrap.dedent(
    """
    import sys
    from sinkless.cli import main

    out = sys.argv[1]
    codes = [
        main(["-q", "scan", "--model", "planted-vit-tiny", "--batch-size", "2", "--out", out + "/scan"] + sys.argv[2:]),
        main(["-q", "fix", "--model", "planted-vit-tiny", "--n-inputs", "12", "--n-heldout", "4", "--batch-size", "2", "--out", out + "/neurons.json"]),
        main(["-q", "compare", "--model", "planted-vit-tiny", "--fix", "none", "--task", "lost", "--data", "synthetic", "--limit", "5",
              "--json", out + "/lost.json"]),
    ]
    sys.exit(max(codes))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(n: int, out, images, tmp_path) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", str(_free_port()),
               str(driver), str(out), str(images)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


def _without_timing(data):
    if isinstance(data, dict):
        return {k: _without_timing(v) for k, v in data.items() if k not in ("seconds", "setup_seconds", "timing")}
    if isinstance(data, list):
        return [_without_timing(v) for v in data]
    return data


@pytest.mark.slow
def test_two_processes_write_what_one_writes(tmp_path):
    from sinkless.images import natural_crops

    images = tmp_path / "images"
    images.mkdir()
    for i, crop in enumerate(natural_crops(7, seed=8)):  # 4 batches of 2: uneven shares
        crop.save(images / f"{i}.png")
    for n in (1, 2):
        _launch(n, tmp_path / f"p{n}", images, tmp_path)
    one, two = tmp_path / "p1", tmp_path / "p2"
    assert json.loads((one / "scan" / "report.json").read_text()) == json.loads((two / "scan" / "report.json").read_text())
    assert sorted(p.name for p in (one / "scan").iterdir()) == sorted(p.name for p in (two / "scan").iterdir())
    assert json.loads((one / "neurons.json").read_text()) == json.loads((two / "neurons.json").read_text())
    lost_one, lost_two = (json.loads((d / "lost.json").read_text()) for d in (one, two))
    assert _without_timing(lost_one) == _without_timing(lost_two)
    assert lost_one["results"][0]["n_images"] == 5


def test_single_process_helpers_are_the_identity():
    assert not distributed.active() and distributed.is_main() and distributed.world_size() == 1
    assert distributed.shard(range(5)) == [0, 1, 2, 3, 4]
    assert distributed.gather_dict({1: "a"}) == {1: "a"}
    assert distributed.map_ordered(lambda i: i * i, 4) == [0, 1, 4, 9]
