#!/usr/bin/env bash
# The GPU rows of issues 12 and 14 (benchmarks/bench_gpu.py), as one command for the device tool's `run`:
#   run(command="bash scripts/gpu_check.sh", timeout_s=540)
# Uses the GPU machine's own python3 (PyTorch, transformers, scikit-image, matplotlib are in its image) with this
# checkout on PYTHONPATH: nothing to install or carry (random ViT-S/14 weights: timing does not depend on them).
# Real weights (the figures that need them): here `echo /.gpu/ >> .git/info/exclude; python -m benchmarks.bench_gpu
# --save-weights .gpu/dinov2-s-focus-fp16`, then run(command="WEIGHTS=.gpu/dinov2-s-focus-fp16 bash scripts/gpu_check.sh",
# carry=[".gpu"]). Writes $OUT/gpu.json and $OUT/gpu.log; check it here first: DEVICE=cpu QUICK=1 bash scripts/gpu_check.sh.
# Checks first that transformers is >= 5.23 (sinkless's adapters need its module layout); if not, carry wheels as
# /work/.library/device/README.md says and install them first.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 DEVICE=${DEVICE:-cuda}
python3 - <<'PY' 2>&1 | tee "$OUT/gpu.log" || exit 3
import os, sys, torch, transformers
print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__,
      "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
cuda_ok = torch.cuda.is_available() or not os.environ["DEVICE"].startswith("cuda")
sys.exit(0 if (major, minor) >= (5, 23) and cuda_ok else 3)
PY
timeout 500 python3 -m benchmarks.bench_gpu --device "$DEVICE" ${QUICK:+--quick} ${WEIGHTS:+--weights "$WEIGHTS"} --json "$OUT/gpu.json" 2>&1 | tee -a "$OUT/gpu.log"
