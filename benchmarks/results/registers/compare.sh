#!/bin/bash
# none / ttr / distilled of planted-vit in one compare per task and data set (docs/RESULTS.md, "Registers by training").
# usage: bash benchmarks/results/registers/compare.sh STUDENT   (STUDENT: the folder `sinkless distill` wrote)
set -euo pipefail
S=$(realpath "$1"); cd "$(dirname "$0")"
F="--model planted-vit --fix none --fix ttr --fix distilled --distilled $S"
sinkless -q compare $F --task zeroseg --data mini --json cmp_mini_zeroseg.json
sinkless -q compare $F --task lost --l2 --gram-bias median --data mini --json cmp_mini_lost.json
sinkless -q compare $F --task probe --probe-labels foreground --data mini --json cmp_mini_probe.json
sinkless -q compare $F --task zeroseg --data synthetic --json cmp_syn_zeroseg.json
sinkless -q compare $F --task lost --l2 --gram-bias median --data synthetic --json cmp_syn_lost.json
sinkless -q compare $F --task lost --features values --data synthetic --json cmp_syn_lostv.json
sinkless -q compare $F --task probe --data synthetic --json cmp_syn_probe.json
