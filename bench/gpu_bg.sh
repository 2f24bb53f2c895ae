#!/usr/bin/env bash
# gpu_step.sh steps one after another in a process session of their own (the device keeps such a session
# running between calls), so a step is not cut by one call's 10-minute limit and no device time is lost
# between calls:
#   bash bench/gpu_bg.sh start E N R       returns at once; step S writes under /root/out/S
#   bash bench/gpu_bg.sh collect <s>       waits up to s seconds for a step to end, copies one ended step's
#                                          files (not yet collected) into $OUT/S/, shows the running one
# Per-step limits: <STEP>_STEP_S=<s> in the environment of `start` (default 600). A later `start` queues its
# steps behind those of an earlier one (one lock), so what follows can be sized to the device time left.
set -uo pipefail
cd "$(dirname "$0")/.."
root=/root/bg  # not $OUT: the device empties $OUT before every call
case $1 in
  start)
    shift; mkdir -p $root
    for s in "$@"; do echo "$s" >>$root/queue; done
    steps="$*" setsid nohup flock $root/lock bash -c '
      for s in $steps; do
        lim_var=${s}_STEP_S; lim=${!lim_var:-600}
        mkdir -p '$root'/$s; echo "$(date +%T) start $s (limit $lim s)" >>'$root'/progress
        OUT='$root'/$s timeout -k 10 $lim bash bench/gpu_step.sh $s >'$root'/$s/console.log 2>&1
        echo "$(date +%T) end $s rc=$?" >>'$root'/progress; touch '$root'/$s.done
      done' >/dev/null 2>&1 </dev/null &
    sleep 1; cat $root/progress 2>/dev/null ;;
  collect)
    end=$((SECONDS + ${2:-550}))
    while :; do
      for s in $(cat $root/queue 2>/dev/null); do
        if [ -f $root/$s.done ] && [ ! -f $root/$s.collected ]; then
          mkdir -p "$OUT/$s"; cp $root/$s/* "$OUT/$s/" 2>/dev/null; touch $root/$s.collected
          cat $root/progress; exit 0
        fi
      done
      [ $SECONDS -ge $end ] && break
      sleep 3
    done
    cat $root/progress
    for s in $(cat $root/queue); do [ -f $root/$s.done ] || { f=$(ls -t /tmp/*.log 2>/dev/null | head -1); echo "== $f"; tail -c 3000 "$f" | grep -avE "it/s\]" | tail -15 | cut -c1-300; break; }; done ;;
esac
