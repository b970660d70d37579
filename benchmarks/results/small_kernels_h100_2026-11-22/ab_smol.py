"""A/B in one process: SmolLM2 plain decode at batch 1 under attention / skinny config variants."""
import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, "benchmarks")
import bench_gpu_e2e as e2e

from specserve import SamplingParams
from specserve.kernels import skinny_linear as sk
from specserve.kernels import tree_attention as ta
from specserve.kernels import triton_backend as tb
from specserve.models.loader import load_model

gguf, mt = sys.argv[1], sys.argv[2]
loaded = load_model(gguf, torch.bfloat16, torch.device("cuda"))
new_cfg = sk.config_for
ADOPTED = dict(ta.SMALL_HEAD_CONFIGS)
fused = tb.silu_mul_linear
unfused = lambda x, w, b=None: tb.linear(tb.silu_and_mul(x), w, b)
VARIANTS = {"old": ({}, lambda k: sk.DEFAULT_CONFIG, unfused), "skinny+p256": (ADOPTED, new_cfg, unfused),
            "skinny+p256+gated": (ADOPTED, new_cfg, fused)}
ns = argparse.Namespace(device=torch.device("cuda"), kv_gb=4.0, eager=False)
params = SamplingParams(temperature=0.0, max_tokens=256, ignore_eos=True)
res = {}
prompts = None
for rnd in range(2):
    for name, (attn, cfg, mlp) in VARIANTS.items():
        ta.SMALL_HEAD_CONFIGS.clear()
        ta.SMALL_HEAD_CONFIGS.update(attn)
        sk.config_for = cfg
        tb.silu_mul_linear = mlp
        llm = e2e.engine(ns, loaded, {}, max_model_len=2048)
        if prompts is None:
            with open(mt) as f:
                turns = [json.loads(line)["turns"][0] for line in f][:8]
            prompts = [llm.encode_chat([{"role": "user", "content": t}]) for t in turns]
        e2e.run(llm, [prompts[0]], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), "none")
        fwd = llm.engine.runner.profile([(1, 1)])[(1, 1)] * 1e3
        toks, secs, steps = 0, 0.0, []
        outs = []
        for p in prompts:
            r = e2e.run(llm, [p], params, "none")
            dec = [s for s in r["step_log"] if not s[3]]
            toks += sum(s[2] for s in dec)
            secs += sum(s[0] for s in dec)
            steps += [s[0] for s in dec]
            outs.append(r["outputs"])
        row = res.setdefault(name, [])
        row.append(dict(fwd_ms=fwd, decode_tok_s=toks / secs, step_ms=statistics.median(steps) * 1e3))
        res.setdefault("tokens", {})[name] = outs
        print(f"round {rnd} {name}: forward {fwd:.3f} ms, decode {toks / secs:.0f} tok/s, "
              f"median step {statistics.median(steps) * 1e3:.3f} ms", flush=True)
        del llm
        torch.cuda.empty_cache()
json.dump(res, open(os.environ.get("OUT", "/tmp") + "/ab_smol.json", "w"), indent=1)
toks = res["tokens"]
print("same tokens as old:", {n: toks[n] == toks["old"] for n in toks}, flush=True)
