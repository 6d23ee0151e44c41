#!/usr/bin/env bash
# Experiment 2 of docs/RESULTS.md ("Attention without sinks"): smollm2-135m converted to softmax (the control,
# an exact no-op conversion), sinklogit and gated, each fine-tuned on the same token windows for the same
# budget on CPU. Usage: bash benchmarks/attention_retrofit.sh [STEPS] [OUT]
set -euo pipefail
STEPS=${1:-150}
OUT=${2:-out/attn-retrofit}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$OUT"
log() { echo "$(date -u +%FT%TZ) $* | load: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/timeline.txt"; }
log "start steps=$STEPS"
for variant in softmax sinklogit gated; do
  log "start $variant"
  sinkless train-attn --variant "$variant" --task lm --from smollm2-135m --steps "$STEPS" --device cpu --out "$OUT/$variant" > "$OUT/$variant.log" 2>&1
  log "done $variant"
done
sinkless compare-attn "$OUT"/softmax "$OUT"/sinklogit "$OUT"/gated --plot "$OUT/compare.png" --json "$OUT/compare.json" | tee "$OUT/compare.txt" || true
log "end"
