#!/usr/bin/env bash
# A/B of drafting steps at batch 1 and 8: the session's starting tree (.bench/old, d4001d1) against this one.
set -u
T0=$(date +%s)
cat /root/m/q0 /root/m/q1 /root/m/q2 /root/m/q3 /root/m/q4 .devmodel6/q5 > /root/m/smol.gguf
md5sum /root/m/smol.gguf
. benchmarks/device_setup.sh
export PROBE_LEARNED=eagle3,eagle,medusa
cp -r drafters/weights .bench/old/drafters/ && bash .bench/old/benchmarks/package_farm.sh .bench/old /tmp/pkg_old
for round in 1 2; do
  echo "=== round $round: new (working tree)"
  python3 -P benchmarks/probe_step.py /root/m/smol.gguf .devdata/mt_bench.jsonl 1 8 2>&1 | grep -E "^B=|host ms" | tee -a $OUT/probe_new.txt
  echo "=== round $round: old (d4001d1)"
  PYTHONPATH=/tmp/pkg_old:/tmp/site python3 -P .bench/old/benchmarks/probe_step.py /root/m/smol.gguf .devdata/mt_bench.jsonl 1 8 2>&1 | grep -E "^B=|host ms" | tee -a $OUT/probe_old.txt
  [ "$round" = 1 ] && [ $(( $(date +%s) - T0 )) -gt 330 ] && break
done
