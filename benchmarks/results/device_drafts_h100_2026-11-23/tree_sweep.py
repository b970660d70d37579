"""Batch-1 tok/s of EAGLE-3 trees of several shapes against plain, one engine, interleaved rounds (H100)."""
import json
import os
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
from bench_gpu_e2e import WEIGHTS  # noqa: E402

from specserve import LLM, SamplingParams  # noqa: E402
from specserve.models.loader import load_model  # noqa: E402

gguf, mt = sys.argv[1], sys.argv[2]
TREES = [(6, 6, 32), (4, 4, 16), (4, 5, 16), (5, 4, 20), (6, 5, 24), (8, 4, 32), (3, 4, 12), (8, 8, 63)]
arms = {f"e3_k{k}_d{d}_n{n}": {"method": "eagle3", "model": os.path.join(WEIGHTS, "eagle3"),
                               "num_speculative_tokens": n, "top_k": k, "depth": d} for k, d, n in TREES}
loaded = load_model(gguf, torch.bfloat16, "cuda")
llm = LLM(loaded_model=loaded, device="cuda", dtype="bfloat16", max_num_seqs=8, enable_prefix_caching=False,
          max_model_len=2048, speculative_arms=arms)
with open(mt) as f:
    prompts = [llm.encode_chat([{"role": "user", "content": json.loads(line)["turns"][0]}]) for line in f][:20]
params = SamplingParams(temperature=0.0, max_tokens=256)
eng = llm.engine


def run(arm: str) -> tuple[float, float]:
    toks, steps, secs = 0, 0, 0.0
    for i, p in enumerate(prompts):
        eng.add_request(f"{arm}-{i}-{time.time()}", p, params, spec_arm=arm)
        torch.cuda.synchronize()
        t = time.perf_counter()
        while eng.has_unfinished_requests():
            toks += sum(len(o.outputs[0].token_ids) for o in eng.step() if o.finished)
            steps += 1
        secs += time.perf_counter() - t
    return toks / secs, toks / steps


results = {}
for rnd in range(2):
    for arm in ["none", *arms]:
        tps, per_step = run(arm)
        results.setdefault(arm, []).append(tps)
        print(f"round {rnd} {arm}: {tps:.0f} tok/s, {per_step:.2f} tokens a step", flush=True)
plain = max(results["none"])
for arm, v in results.items():
    print(f"{arm}: best {max(v):.0f} tok/s = {max(v) / plain:.2f}x plain's best")
