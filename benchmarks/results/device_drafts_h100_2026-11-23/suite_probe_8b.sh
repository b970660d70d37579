#!/usr/bin/env bash
set -u
cat /root/m/q0 /root/m/q1 /root/m/q2 /root/m/q3 /root/m/q4 .devmodel6/q5 > /root/m/smol.gguf
. benchmarks/device_setup.sh
PROBE_LEARNED=eagle3 python3 -P benchmarks/probe_step.py /root/m/smol.gguf .devdata/mt_bench.jsonl 1 > $OUT/probe_eagle3_b1.txt 2>&1
grep -E "^B=|host ms" $OUT/probe_eagle3_b1.txt
python3 -P -m pytest -q -p no:cacheprovider -n 8 tests/test_kernels.py tests/test_skinny_linear.py tests/test_cuda_graphs.py tests/test_backend_equivalence.py tests/test_fused_ops.py tests/test_async_scheduling.py tests/test_drafters.py tests/test_drafters_tree.py tests/test_engine_lossless.py tests/test_verify.py tests/test_adaptive.py -k "not long_contexts" 2>&1 | tail -3
python3 -P benchmarks/bench_gpu_e2e.py floor verify --out $OUT/e2e8b 2>&1 | grep -v -i "warn" | grep "|" 
