#!/bin/bash
# The clean twin's 7 rows (as rows.sh), into the current folder: clean_*.json
set -euo pipefail
F="--model planted-vit-clean --fix none"
sinkless -q compare $F --task zeroseg --data mini --json clean_mini_zeroseg.json
sinkless -q compare $F --task lost --l2 --gram-bias median --data mini --json clean_mini_lost.json
sinkless -q compare $F --task probe --probe-labels foreground --data mini --json clean_mini_probe.json
sinkless -q compare $F --task zeroseg --data synthetic --json clean_syn_zeroseg.json
sinkless -q compare $F --task lost --l2 --gram-bias median --data synthetic --json clean_syn_lost.json
sinkless -q compare $F --task lost --features values --data synthetic --json clean_syn_lostv.json
sinkless -q compare $F --task probe --data synthetic --json clean_syn_probe.json
