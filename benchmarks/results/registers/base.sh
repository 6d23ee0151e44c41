set -x
M=planted-vit
F="--fix none --fix ttr --registers /tmp/issue12/cmp/neurons.json"
sinkless -q compare --model $M $F --task zeroseg --data mini --json base_mini_zeroseg.json
sinkless -q compare --model $M $F --task lost --l2 --gram-bias median --data mini --json base_mini_lost.json
sinkless -q compare --model $M $F --task probe --probe-labels foreground --data mini --json base_mini_probe.json
sinkless -q compare --model $M $F --task zeroseg --data synthetic --json base_syn_zeroseg.json
sinkless -q compare --model $M $F --task lost --l2 --gram-bias median --data synthetic --json base_syn_lost.json
sinkless -q compare --model $M $F --task lost --features values --data synthetic --json base_syn_lostv.json
sinkless -q compare --model $M $F --task probe --data synthetic --json base_syn_probe.json
