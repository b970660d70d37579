#!/usr/bin/env bash
# A/B/C of EAGLE steps at batch 1 and 8: old = d4001d1 (session start), mid = fb177dd (trees on the device, the final
# EAGLE code), new = the staged-catch-up variant (bce1ac3, reverted in b4c1243).
set -u
T0=$(date +%s)
cat /root/m/q0 /root/m/q1 /root/m/q2 /root/m/q3 /root/m/q4 .devmodel6/q5 > /root/m/smol.gguf
. benchmarks/device_setup.sh
export PROBE_LEARNED=eagle3,eagle
for v in old mid; do
  cp -r drafters/weights .bench/$v/drafters/ && bash .bench/$v/benchmarks/package_farm.sh .bench/$v /tmp/pkg_$v
done
for round in 1 2; do
  for v in new old mid; do
    echo "=== round $round: $v"
    if [ $v = new ]; then
      python3 -P benchmarks/probe_step.py /root/m/smol.gguf .devdata/mt_bench.jsonl 1 8 2>&1 | grep -E "^B=|host ms" | tee -a $OUT/probe_$v.txt
    else
      PYTHONPATH=/tmp/pkg_$v:/tmp/site python3 -P .bench/$v/benchmarks/probe_step.py /root/m/smol.gguf .devdata/mt_bench.jsonl 1 8 2>&1 | grep -E "^B=|host ms" | tee -a $OUT/probe_$v.txt
    fi
  done
  [ $(( $(date +%s) - T0 )) -gt 300 ] && break
done
true
