set -x
M=planted-vit-clean
sinkless -q compare --model $M --fix none --task zeroseg --data mini --json clean_mini_zeroseg.json
sinkless -q compare --model $M --fix none --task lost --l2 --gram-bias median --data mini --json clean_mini_lost.json
sinkless -q compare --model $M --fix none --task probe --probe-labels foreground --data mini --json clean_mini_probe.json
sinkless -q compare --model $M --fix none --task zeroseg --data synthetic --json clean_syn_zeroseg.json
sinkless -q compare --model $M --fix none --task lost --l2 --gram-bias median --data synthetic --json clean_syn_lost.json
sinkless -q compare --model $M --fix none --task lost --features values --data synthetic --json clean_syn_lostv.json
sinkless -q compare --model $M --fix none --task probe --data synthetic --json clean_syn_probe.json
sinkless -q fix --model planted-vit --out /tmp/issue12/cmp/neurons.json
