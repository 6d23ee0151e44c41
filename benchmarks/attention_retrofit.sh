#!/usr/bin/env bash
# Experiment 2 of docs/RESULTS.md ("Attention without sinks"): smollm2-135m converted to softmax (the control,
# an exact no-op conversion), sinklogit and gated, each fine-tuned on the same token windows for the same
# budget on CPU (one thread per run; the control first, then the two variants side by side).
# Usage: bash benchmarks/attention_retrofit.sh [STEPS] [OUT] [--skip-control]
set -euo pipefail
STEPS=${1:-40}
OUT=${2:-out/attn-retrofit}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$OUT"
log() { echo "$(date -u +%FT%TZ) $* | load: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/timeline.txt"; }
run() { sinkless train-attn --variant "$1" --task lm --from smollm2-135m --steps "$STEPS" --device cpu --out "$OUT/$1" > "$OUT/$1.log" 2>&1; }
log "start steps=$STEPS"
if [ "${3:-}" != "--skip-control" ]; then log "start softmax"; run softmax; log "done softmax"; fi
log "start sinklogit + gated"
run sinklogit & a=$!
run gated & b=$!
wait $a; wait $b
log "done sinklogit + gated"
sinkless compare-attn "$OUT"/softmax "$OUT"/sinklogit "$OUT"/gated --deep-from 12 --plot "$OUT/compare.png" --json "$OUT/compare.json" | tee "$OUT/compare.txt" || true
log "end"
