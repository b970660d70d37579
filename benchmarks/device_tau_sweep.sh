#!/usr/bin/env bash
# tau on the 80 MT-bench first turns (greedy, 256 tokens, our engine, bf16) for n-gram and every drafter found
# under DIR, each at several tree / chain sizes, in one engine:
#
#   benchmarks/device_tau_sweep.sh DIR [GGUF] [OUT_JSON]
#
# DIR holds any of eagle/, eagle3/, medusa/, draft_model/ (train-drafter outputs, or drafters/weights/...).
# Trees stay within the verify kernel's 64 nodes (EAGLE: 1 + top_k x (depth - 1) <= 64 as well).
set -uo pipefail
dir=$1 gguf=${2:-/root/m/smol.gguf} out=${3:-$OUT/tau.json}
arms=(--arm 'ngram8={"method":"ngram","num_speculative_tokens":8}')
declare -A sizes=(
  [eagle]='48/8/7 63/8/8 63/7/9'
  [eagle3]='48/8/7 63/8/8 63/7/9'
  [medusa]='16 32 63'
  [draft_model]='3 5 7'
)
for k in eagle eagle3 medusa draft_model; do
  [ -f "$dir/$k/config.json" ] || continue
  for s in ${sizes[$k]}; do
    IFS=/ read -r n top depth <<< "$s"
    extra=${top:+,\"top_k\":$top,\"depth\":$depth}
    arms+=(--arm "${k}_$n${top:+_k${top}_d$depth}={\"method\":\"$k\",\"num_speculative_tokens\":$n$extra,\"model\":\"$dir/$k\"}")
  done
done
python3 -P benchmarks/eval_drafters_tau.py --model "$gguf" --mt-bench .devdata/mt_bench.jsonl \
  --device cuda --dtype bfloat16 --out "$out" "${arms[@]}" 2>&1 | grep -v -i 'warn\|convert'
