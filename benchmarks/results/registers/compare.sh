#!/bin/bash
# none / ttr / distilled of planted-vit in one compare per task and data set (docs/RESULTS.md, "Registers by training").
# usage: bash benchmarks/results/registers/compare.sh STUDENT   (STUDENT: the folder `sinkless distill` wrote)
set -euo pipefail
S=$(realpath "$1"); cd "$(dirname "$0")"
bash ../ci/rows.sh cmp --fix none --fix ttr --fix distilled --distilled "$S"
