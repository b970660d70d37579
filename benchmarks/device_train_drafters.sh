#!/usr/bin/env bash
# One GPU call (< 10 min wall): self-distil SmolLM2-135M-Instruct once, train EAGLE, EAGLE-3, Medusa and the draft
# model at the same time against one deadline, measure tau on MT-bench, and return each checkpoint as a tar.
#
#   benchmarks/device_train_drafters.sh [GGUF] [OUT]      (default /root/m/smol.gguf and $OUT)
#
# From the repo root on the device, after `source benchmarks/device_setup.sh`, with .devdata/train_prompts.jsonl
# and .devdata/mt_bench.jsonl carried. OUT receives up to 7 files: {eagle,eagle3,medusa,draft_model}.tar
# (config, weights, training_curves.json), distill.self_instruct.jsonl (the prompts the target wrote), tau.json
# and log.txt. The answers stay in /root/td/distill.safetensors (too large to come back at ~4M tokens).
#
# Timeline of RECIPE.md's round 4 (H200, SELF_INSTRUCT=10000, TEMPERATURES=0,0.8, NUM_SAMPLES=2):
#   0-30 s     the first kind's run loads the target (~30 s per process)
#   30-170 s   it writes the prompts (28 s) and answers all 10,427 three times (31k answers, 5.1M tokens, 108 s) in
#              static batches of 1024 sampled on the device, cached as /root/td/distill.safetensors
#   170-260 s  the other three load and run their teacher pass (~45 s at 7.1M tokens)
#   -> END     training, all four at once (their steps are mostly host time, so they interleave on the GPU);
#              batch 32 (929 steps an epoch), length-grouped, best validated epoch kept; --time-budget ends every
#              run by TRAIN_END, its learning rate annealed by then. On an 80 GB H100 (6,000 prompts) the other
#              three ran out of memory beside EAGLE's run, which held 46 GB; the 139 GB H200 holds all four.
#   END-+190 s the tau sweep (device_tau_sweep.sh: engine start ~45 s, 14 arms ~130 s)
# Knobs (environment): TRAIN_END, EVAL_LIMIT (seconds; 0 skips the tau sweep, device_tau_sweep.sh, which a
# later call can run on /root/td), SELF_INSTRUCT (prompts the target writes first, drafters/self_instruct.py),
# TEMPERATURES, NUM_SAMPLES (answers per prompt and temperature above 0), EAGLE_EPOCHS, EAGLE3_EPOCHS,
# MEDUSA_EPOCHS, MEDUSA_LAYERS (ResBlocks per head, default 1), DRAFT_MODEL_EPOCHS, DRAFT_VOCAB (EAGLE-3's draft
# vocabulary; 0, the default: the target's LM head), INIT (a folder of checkpoints, e.g.
# drafters/weights/smollm2-135m-instruct: each kind starts from its own with train-drafter --init, tensors of the
# same names and shapes), LR (peak learning rate of every kind; default per kind), KINDS (which, the first one
# distilling), RESUME=1 (continue each kind from /root/td/KIND/train_state.pt: a second call on the same machine
# trains longer than one call's 10 minutes allow; its learning rate rises again and anneals by the new deadline).
set -uo pipefail
gguf=${1:-/root/m/smol.gguf} out=${2:-$OUT}
TRAIN_END=${TRAIN_END:-330} EVAL_LIMIT=${EVAL_LIMIT:-180}
td=/root/td
T0=$(date +%s)
phase() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
mkdir -p "$td" "$out"
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -l 10 > "$td/gpu.log" 2>&1 &
smi=$!

common=(--model "$gguf" --prompts .devdata/train_prompts.jsonl --distill-cache "$td/distill.safetensors"
        --temperatures "${TEMPERATURES:-0,0.7,1.0}" --num-samples "${NUM_SAMPLES:-8}" --self-instruct "${SELF_INSTRUCT:-0}"
        --max-tokens 256 --max-num-seqs 1024 --device cuda
        --batch-size 32 --group-by-length --keep-best --val-fraction 0.05 ${RESUME:+--resume} ${LR:+--lr "$LR"})
declare -A kind_args=(
  [eagle]="--epochs ${EAGLE_EPOCHS:-5} --feature-noise 0.2"
  [eagle3]="--epochs ${EAGLE3_EPOCHS:-4} --draft-vocab-size ${DRAFT_VOCAB:-0}"
  [medusa]="--epochs ${MEDUSA_EPOCHS:-3} --medusa-layers ${MEDUSA_LAYERS:-1}"
  [draft_model]="--epochs ${DRAFT_MODEL_EPOCHS:-3}"
)
pids=()
train() {  # in the background; its log (progress bars dropped) in $td/KIND.log
  local kind=$1 budget=$(( T0 + TRAIN_END - $(date +%s) )) init=()
  (( budget < 30 )) && budget=30
  [ -n "${INIT:-}" ] && [ -f "$INIT/$kind/config.json" ] && init=(--init "$INIT/$kind")
  # shellcheck disable=SC2086  # kind_args are word lists
  timeout $(( budget + 30 )) python3 -P -m specserve.cli train-drafter --kind "$kind" --out "$td/$kind" \
    "${common[@]}" ${kind_args[$kind]} "${init[@]}" --time-budget "$budget" 2>&1 \
    | tr '\r' '\n' | grep --line-buffered -v -e 'it/s\]' -e 's/it\]' > "$td/$kind.log" &
  pids+=($!)
}

read -r -a kinds <<< "${KINDS:-eagle eagle3 medusa draft_model}"
phase "start: ${kinds[0]} run (load, distill)"
train "${kinds[0]}"
until [ -f "$td/distill.safetensors" ]; do
  if ! kill -0 "${pids[0]}" 2>/dev/null; then phase "${kinds[0]} run ended before the answers were cached"; break; fi
  sleep 2
done
phase "answers cached"
for k in "${kinds[@]:1}"; do train "$k"; done
wait "${pids[@]}"
phase "training done"

for k in eagle eagle3 medusa draft_model; do
  echo "--- $k"
  grep -h -e '^train-drafter' -e 'Error' -e 'error' "$td/$k.log" | grep -v -e '--kind' | tail -6
  if [ -f "$td/$k/config.json" ]; then
    (cd "$td" && tar -cf "$out/$k.tar" --exclude=train_state.pt "$k")
    python3 - "$td/$k/training_curves.json" <<'EOF'
import json, sys
c = json.load(open(sys.argv[1]))
t = {k: round(v) for k, v in c["times"].items()}
print(f"times {t}; steps {c['log']['step'][-1] if c['log']['step'] else 0}/{c['total_steps']} "
      f"({c['steps_per_epoch']} an epoch); saved step {c['saved_step']}: validation {c.get('saved_val')}")
EOF
  fi
done
cp "$td"/distill.self_instruct.jsonl "$out/" 2>/dev/null
if (( EVAL_LIMIT > 0 )); then
  phase "tau on MT-bench"
  timeout "$EVAL_LIMIT" bash benchmarks/device_tau_sweep.sh "$td" "$gguf" "$out/tau.json"
fi
phase "done"
kill "$smi"
for f in "$td"/{eagle,eagle3,medusa,draft_model}.log "$td/gpu.log"; do echo "=== $f"; cat "$f"; done > "$out/log.txt"
ls -l "$out"
