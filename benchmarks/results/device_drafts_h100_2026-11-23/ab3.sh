#!/usr/bin/env bash
# A/B of EAGLE steps: prev = the tree before the static depth table (HEAD~1), new = the working tree; 3 rounds.
set -u
T0=$(date +%s)
cat /root/m/q0 /root/m/q1 /root/m/q2 /root/m/q3 /root/m/q4 .devmodel6/q5 > /root/m/smol.gguf
. benchmarks/device_setup.sh
export PROBE_LEARNED=eagle3,eagle
cp -r drafters/weights .bench/prev/drafters/ && bash .bench/prev/benchmarks/package_farm.sh .bench/prev /tmp/pkg_prev
for round in 1 2 3; do
  for v in new prev; do
    echo "=== round $round: $v"
    if [ $v = new ]; then
      python3 -P benchmarks/probe_step.py /root/m/smol.gguf .devdata/mt_bench.jsonl 1 8 2>&1 | grep -E "^B=|host ms" | tee -a $OUT/probe_$v.txt
    else
      PYTHONPATH=/tmp/pkg_prev:/tmp/site python3 -P .bench/prev/benchmarks/probe_step.py /root/m/smol.gguf .devdata/mt_bench.jsonl 1 8 2>&1 | grep -E "^B=|host ms" | tee -a $OUT/probe_$v.txt
    fi
  done
  [ $(( $(date +%s) - T0 )) -gt 420 ] && break
done
true
