"""cProfile of EAGLE-3 batch-1 steps on the GPU (host Python hot spots), after warm-up."""
import cProfile
import json
import os
import pstats
import sys

import torch

sys.path.insert(0, "benchmarks")
from bench_gpu_e2e import WEIGHTS  # noqa: E402

from specserve import LLM, SamplingParams  # noqa: E402
from specserve.models.loader import load_model  # noqa: E402

gguf, mt = sys.argv[1], sys.argv[2]
arms = {"e3": {"method": "eagle3", "model": os.path.join(WEIGHTS, "eagle3"), "num_speculative_tokens": 32,
               "top_k": 6, "depth": 6}}
loaded = load_model(gguf, torch.bfloat16, "cuda")
llm = LLM(loaded_model=loaded, device="cuda", dtype="bfloat16", max_num_seqs=8, enable_prefix_caching=False,
          max_model_len=2048, speculative_arms=arms)
with open(mt) as f:
    prompts = [llm.encode_chat([{"role": "user", "content": json.loads(line)["turns"][0]}]) for line in f][:6]
eng = llm.engine
params = SamplingParams(temperature=0.0, max_tokens=256, ignore_eos=True)
for i, p in enumerate(prompts):
    eng.add_request(f"w{i}", p, params, spec_arm="e3")
    while eng.has_unfinished_requests():
        eng.step()
prof = cProfile.Profile()
steps = 0
for i, p in enumerate(prompts):
    eng.add_request(f"p{i}", p, params, spec_arm="e3")
    eng.step()
    prof.enable()
    while eng.has_unfinished_requests():
        eng.step()
        steps += 1
    prof.disable()
print("steps", steps)
st = pstats.Stats(prof)
st.sort_stats("tottime").print_stats(45)
st.sort_stats("cumulative").print_stats(60)
