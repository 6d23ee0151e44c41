"""Extra figures for docs/RESULTS.md's attention experiments, read from train-attn run folders.

Usage: python -m benchmarks.attention_summary RUN_DIR... : wall/train time, threads, and what the new
parameters did (sink logits: min/mean/max; gate weights: RMS; mean gate on held-out text).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open


def summarise(folder: Path) -> dict:
    result = json.loads((folder / "result.json").read_text())
    row = {"run": folder.name, "variant": result["variant"], "steps": result["steps_done"], "train_seconds": result["train_seconds"],
           "wall_seconds": result["wall_seconds"], "threads": result["torch_threads"], "parameters": result["parameters"]}
    tensors = {}
    for path in sorted((folder / "model").glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                if name.endswith(".sinks") or name.endswith("attn.gate_proj.weight"):
                    tensors[name] = handle.get_tensor(name).float()
    sinks = [t for n, t in tensors.items() if n.endswith(".sinks")]
    if sinks:
        s = torch.cat(sinks)
        row["sink_logits"] = {"min": float(s.min()), "mean": float(s.mean()), "max": float(s.max())}
    gates = [t for n, t in tensors.items() if n.endswith("gate_proj.weight")]
    if gates:
        row["gate_weight_rms"] = float(torch.cat([g.flatten() for g in gates]).square().mean().sqrt())
    m = result["metrics"]
    row["first_token_attention"] = [round(v, 3) if v is not None else None for v in m["first_token_attention"]]
    if result.get("metrics_before"):
        row["first_token_attention_before"] = [round(v, 3) if v is not None else None for v in result["metrics_before"]["first_token_attention"]]
    return row


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(json.dumps(summarise(Path(arg))))
