#!/bin/bash
# The 7 planted-vit rows of docs/RESULTS.md ("How sure is a row?") with the given fixes, into the current folder.
# usage (from the folder the files go to):  bash rows.sh PREFIX --fix none --fix ttr [--fix distilled --distilled DIR] ...
# writes PREFIX_{mini,syn}_{zeroseg,lost,probe,lostv}.json; each row carries ci95 and vs_none (docs/TASKS.md)
set -euo pipefail
P=$1; shift
F="--model planted-vit $*"
sinkless -q compare $F --task zeroseg --data mini --json "${P}_mini_zeroseg.json"
sinkless -q compare $F --task lost --l2 --gram-bias median --data mini --json "${P}_mini_lost.json"
sinkless -q compare $F --task probe --probe-labels foreground --data mini --json "${P}_mini_probe.json"
sinkless -q compare $F --task zeroseg --data synthetic --json "${P}_syn_zeroseg.json"
sinkless -q compare $F --task lost --l2 --gram-bias median --data synthetic --json "${P}_syn_lost.json"
sinkless -q compare $F --task lost --features values --data synthetic --json "${P}_syn_lostv.json"
sinkless -q compare $F --task probe --data synthetic --json "${P}_syn_probe.json"
