#!/usr/bin/env bash
# Issue 2's CPU benchmark: SmolLM2-135M-Instruct fp32 on CPU, the first turns of 16 MT-bench questions, greedy,
# 128 new tokens, batch 1; plain vs n-gram k in {2, 4, 8}, all arms in one engine, interleaved per prompt.
# Usage: benchmarks/bench_cpu_ngram.sh [OUT_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-bench_out/cpu_ngram}
mkdir -p "$out"
python3 -c "
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
with open(sys.argv[2], 'w') as f:
    for r in rows:
        f.write(json.dumps({'prompt': r['turns'][0], 'category': r['category']}) + '\n')
" "$here/../../shared/data/mt_bench.jsonl" "$out/mt_bench_first_turns.jsonl"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} specserve bench offline \
  --drafters none,ngram:k=2,ngram:k=4,ngram:k=8 \
  --dataset "$out/mt_bench_first_turns.jsonl" --num-prompts 16 --max-tokens 128 --temperature 0 \
  --device cpu --dtype float32 --out "$out"
