#!/bin/bash
# usage: cmp.sh TAG MODEL DENOISER... ; planted-vit-pos rows of docs/RESULTS.md (pos-k2_*)
set -euo pipefail
TAG=$1; MODEL=$2; shift 2
D=""; for d in "$@"; do D="$D --denoiser $(realpath $d)"; done
cd "$(dirname "$0")"
F="--model $MODEL --fix none --fix dvt $D"
sinkless -q compare $F --task zeroseg --data mini --json ${TAG}_mini_zeroseg.json
sinkless -q compare $F --task lost --l2 --gram-bias median --data mini --json ${TAG}_mini_lost.json
sinkless -q compare $F --task probe --probe-labels foreground --data mini --json ${TAG}_mini_probe.json
sinkless -q compare $F --task zeroseg --data synthetic --json ${TAG}_syn_zeroseg.json
sinkless -q compare $F --task probe --data synthetic --json ${TAG}_syn_probe.json
