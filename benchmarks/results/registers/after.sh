#!/bin/bash
# runs after the distillation: benchmark, held-out eval, scan of the student, compare --fix distilled rows
cd /work/wt/issue-12 && . .venv/bin/activate
S=/tmp/issue12/run/student
while kill -0 25167 2>/dev/null; do sleep 5; done
test -f $S/distill_log.json || { echo "distill did not finish"; exit 1; }
date -u
set -x
date -u
python scripts/planted_distill.py eval $S --json /tmp/issue12/run/eval.json > /tmp/issue12/run/eval.log 2>&1 &
M=sinkless/data/mini
sinkless -q scan --model $S --image-size 224 --out /tmp/issue12/run/scan-student $M/*.jpg $M/*.png > /tmp/issue12/run/scan-student.log 2>&1 &
cd /tmp/issue12/cmp
F="--fix distilled --distilled $S"
M=planted-vit
sinkless -q compare --model $M $F --task zeroseg --data mini --json dist_mini_zeroseg.json
sinkless -q compare --model $M $F --task lost --l2 --gram-bias median --data mini --json dist_mini_lost.json
sinkless -q compare --model $M $F --task probe --probe-labels foreground --data mini --json dist_mini_probe.json
sinkless -q compare --model $M $F --task lost --features values --data synthetic --json dist_syn_lostv.json
sinkless -q compare --model $M $F --task zeroseg --data synthetic --json dist_syn_zeroseg.json
sinkless -q compare --model $M $F --task probe --data synthetic --json dist_syn_probe.json
sinkless -q compare --model $M $F --task lost --l2 --gram-bias median --data synthetic --json dist_syn_lost.json
wait
date -u
