#!/usr/bin/env bash
# Experiment 1 of docs/RESULTS.md ("Attention without sinks"): softmax vs sigmoid vs gated vs sinklogit,
# trained from scratch on the LM task with identical data, seed and budget (CPU, one thread per run,
# two runs side by side). Usage: bash benchmarks/attention_scratch.sh [STEPS] [OUT]
set -euo pipefail
STEPS=${1:-1600}
OUT=${2:-out/attn-scratch}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$OUT"
log() { echo "$(date -u +%FT%TZ) $* | load: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/timeline.txt"; }
run() { sinkless train-attn --variant "$1" --task lm --size small --steps "$STEPS" --device cpu --out "$OUT/$1" > "$OUT/$1.log" 2>&1; }
log "start steps=$STEPS"
for pair in "softmax sigmoid" "gated sinklogit"; do
  set -- $pair
  log "start $1 + $2"
  run "$1" & a=$!
  run "$2" & b=$!
  wait $a; wait $b
  log "done $1 + $2"
done
sinkless compare-attn "$OUT"/softmax "$OUT"/sigmoid "$OUT"/gated "$OUT"/sinklogit --plot "$OUT/compare.png" --json "$OUT/compare.json" | tee "$OUT/compare.txt" || true
log "end"
