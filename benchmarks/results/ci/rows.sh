#!/bin/bash
# The 7 rows of docs/RESULTS.md's planted-vit tables (zeroseg, LOST keys, probe on the mini photos; zeroseg, LOST keys,
# LOST values, probe on the synthetic scenes) with the given fixes, into the current folder.
# usage (from the folder the files go to):  [MODEL=planted-vit-clean] bash rows.sh PREFIX --fix none [--fix ttr ...]
# writes PREFIX_{mini,syn}_*.json; each row carries ci95 and, beside none, vs_none (docs/TASKS.md). MODEL: planted-vit.
set -euo pipefail
P=$1; shift
F="--model ${MODEL:-planted-vit} $*"
sinkless -q compare $F --task zeroseg --data mini --json "${P}_mini_zeroseg.json"
sinkless -q compare $F --task lost --l2 --gram-bias median --data mini --json "${P}_mini_lost.json"
sinkless -q compare $F --task probe --probe-labels foreground --data mini --json "${P}_mini_probe.json"
sinkless -q compare $F --task zeroseg --data synthetic --json "${P}_syn_zeroseg.json"
sinkless -q compare $F --task lost --l2 --gram-bias median --data synthetic --json "${P}_syn_lost.json"
sinkless -q compare $F --task lost --features values --data synthetic --json "${P}_syn_lostv.json"
sinkless -q compare $F --task probe --data synthetic --json "${P}_syn_probe.json"
