"""SmolLM2 plain decoding: two plain engines and the plain arm of bench_gpu_e2e's multi-arm engine, in one process.

    python3 -P benchmarks/results/fold_medusa_h100_2026-11-23/plain_vs_arms.py SMOL.gguf mt_bench.jsonl
(run from the repo root; the twelfth session ran it as .bench/plain_vs_arms.py, same code)
"""

import argparse
import json
import statistics
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
import bench_gpu_e2e as e2e  # noqa: E402

from specserve import LLM, SamplingParams  # noqa: E402
from specserve.models.loader import load_model  # noqa: E402

gguf, mt = sys.argv[1], sys.argv[2]
args = argparse.Namespace(device=torch.device("cuda"), kv_gb=4.0, eager=False)
loaded = load_model(gguf, torch.bfloat16, args.device)
turns = [json.loads(line)["turns"][0] for line in open(mt)][:20]
multi = {"ngram": e2e.NGRAM, **e2e.learned_arms(e2e.LEARNED)}
params = SamplingParams(temperature=0.0, max_tokens=256)
engines = [("plain engine, max_num_seqs 128", {}, 128), ("plain engine, max_num_seqs 8", {}, 8),
           ("multi-arm engine", multi, 128)]
for rnd in range(2):
    for name, arms, max_num_seqs in engines:
        t = time.perf_counter()
        llm = LLM(loaded_model=loaded, device="cuda", dtype="bfloat16", max_num_seqs=max_num_seqs,
                  kv_cache_memory_gb=4.0, speculative_arms=arms, enable_prefix_caching=False, max_model_len=2048)
        build = time.perf_counter() - t
        ps = [llm.encode_chat([{"role": "user", "content": x}]) for x in turns]
        for p in ps:
            e2e.run(llm, [p], SamplingParams(temperature=0.0, max_tokens=16), "none")
        per = [e2e.run(llm, [p], params, "none") for p in ps]
        toks, wall = sum(r["tokens"] for r in per), sum(r["wall_s"] for r in per)
        dec = [s for r in per for s in r["step_log"] if not s[3]]
        pre = [s for r in per for s in r["step_log"] if s[3]]
        print(f"round {rnd} | {name} | build {build:.1f} s | {toks / wall:.0f} tok/s e2e | decode "
              f"{sum(s[2] for s in dec) / sum(s[0] for s in dec):.0f} tok/s, median step "
              f"{statistics.median(s[0] for s in dec) * 1e3:.3f} ms | prefill steps {len(pre)} "
              f"{sum(s[0] for s in pre) * 1e3:.1f} ms | steps {len(dec)} tokens {toks} | wall {wall:.2f} s", flush=True)
        del llm
        torch.cuda.empty_cache()
