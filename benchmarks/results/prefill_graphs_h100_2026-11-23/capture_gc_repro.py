"""Trigger capture failure, tiny models. argv: which engines, comma list of plain|ngram|dm|arms; 'nogc' optional."""
import gc
import os
import sys
import tempfile
import traceback

sys.path.insert(0, "tests")
from helpers import make_tiny_model_dir  # noqa: E402

from specserve import LLM, SamplingParams  # noqa: E402

d = tempfile.mkdtemp()
target = make_tiny_model_dir(os.path.join(d, "t"))
draft = make_tiny_model_dir(os.path.join(d, "d"), seed=1)
params = SamplingParams(temperature=0.0, max_tokens=32)
kinds = {"plain": {}, "ngram": {"ngram": {"method": "ngram", "num_speculative_tokens": 4}},
         "dm": {"dm": {"method": "draft_model", "model": draft, "num_speculative_tokens": 3}},
         "arms": {"ngram": {"method": "ngram", "num_speculative_tokens": 4},
                  "dm": {"method": "draft_model", "model": draft, "num_speculative_tokens": 3}}}
if "nogc" in sys.argv:
    gc.disable()
for name in sys.argv[1].split(","):
    try:
        llm = LLM(model=target, device="cuda", dtype="bfloat16", speculative_arms=kinds[name], max_model_len=512,
                  kv_cache_memory_gb=0.5)
        out = llm.generate([[1, 2, 3, 4, 5]], params)
        print(name, "ok", out[0].outputs[0].token_ids[:8], flush=True)
        del llm
    except Exception:  # noqa: BLE001
        print(name, "FAILED", flush=True)
        traceback.print_exc(limit=-12)
        break
