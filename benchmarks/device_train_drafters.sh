#!/usr/bin/env bash
# On the GPU machine: self-distil drafters for SmolLM2-135M-Instruct, then measure tau on MT-bench.
# Usage: benchmarks/device_train_drafters.sh GGUF OUT "KIND[ KIND...]" [EVAL_ARMS...]
# Needs `source benchmarks/device_setup.sh` first and .devdata/{train_prompts,mt_bench}.jsonl carried.
set -uo pipefail
gguf=$1 out=$2 kinds=$3
shift 3
mkdir -p /root/td
for k in $kinds; do
  start=$(date +%s)
  timeout 240 python3 -P -m specserve.cli train-drafter --kind "$k" --model "$gguf" \
    --prompts .devdata/train_prompts.jsonl --out "/root/td/$k" --distill-cache /root/td/distill.json \
    --device cuda 2>&1 | tr '\r' '\n' | grep -v 'it/s\]' | tail -25
  echo "train $k: $(( $(date +%s) - start )) s"
  cp "/root/td/$k/training_curves.json" "$out/curves_$k.json" 2>/dev/null
done
if [ $# -gt 0 ]; then
  args=()
  for a in "$@"; do args+=(--arm "$a"); done
  timeout 280 python3 -P benchmarks/eval_drafters_tau.py --model "$gguf" --mt-bench .devdata/mt_bench.jsonl \
    --device cuda --dtype bfloat16 --out "$out/tau.json" "${args[@]}" 2>&1 | grep -v -i 'warn\|Convert'
fi
