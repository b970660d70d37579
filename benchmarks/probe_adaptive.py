"""Plain vs n-gram vs adaptive n-gram on SmolLM2 at batch 64 and 128 (GPU): per-step wall, forward and propose
times, the graph buckets replayed, sequences drafting per step, and the adaptive policy's host-cost estimates.

    python3 -P benchmarks/probe_adaptive.py SMOL.gguf mt_bench.jsonl
"""

from __future__ import annotations

import collections
import json
import statistics
import sys
import time

import torch

from specserve import LLM, SamplingParams
from specserve.model_runner import ModelRunner
from specserve.models.loader import load_model

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
ARMS = ["none", "ngram", "ngram-adaptive", "ngram-adaptive"]  # adaptive twice: its estimates warm up


def median_ms(xs) -> float:
    xs = list(xs)
    return statistics.median(xs) * 1e3 if xs else 0.0


def main(gguf: str, mt_bench: str) -> None:
    loaded = load_model(gguf, torch.bfloat16, "cuda")
    llm = LLM(loaded_model=loaded, device="cuda", dtype="bfloat16", max_num_seqs=128, enable_prefix_caching=False,
              max_model_len=2048, speculative_arms={"ngram": NGRAM, "ngram-adaptive": {**NGRAM, "adaptive": True}})
    with open(mt_bench) as f:
        prompts = [llm.encode_chat([{"role": "user", "content": json.loads(line)["turns"][0]}]) for line in f]
    eng = llm.engine
    forwards, proposals = [], []  # (graph key, tokens, seconds), (drafting sequences, seconds)

    def timed_forward(self, batch, _forward=ModelRunner.forward):
        start = time.perf_counter()
        out = _forward(self, batch)
        torch.cuda.synchronize()
        forwards.append((batch.graph_key, int(batch.input_ids.shape[0]), time.perf_counter() - start))
        return out

    def timed_propose(scheduled, _propose=eng._propose):
        start = time.perf_counter()
        props = _propose(scheduled)
        proposals.append((sum(p is not None for p in props), time.perf_counter() - start))
        return props

    ModelRunner.forward = timed_forward
    eng._propose = timed_propose
    params = SamplingParams(temperature=0.0, max_tokens=128)
    for b in (64, 128):
        for n, arm in enumerate(ARMS):
            for i in range(b):
                eng.add_request(f"{arm}-{b}-{n}-{i}", prompts[i % len(prompts)], params, spec_arm=arm)
            forwards.clear()
            proposals.clear()
            steps = []
            while eng.has_unfinished_requests():
                start = time.perf_counter()
                eng.step()
                steps.append(time.perf_counter() - start)
            print(f"B={b} {arm}: {len(steps)} steps, {sum(steps):.2f} s, step {median_ms(steps):.2f} ms, forward "
                  f"{median_ms(s for _, _, s in forwards):.2f} ms, propose {median_ms(s for _, s in proposals):.2f} "
                  f"ms; drafting sequences {statistics.median(d for d, _ in proposals) if proposals else 0}, "
                  f"tokens {statistics.median(t for _, t, _ in forwards)}", flush=True)
            print("   graph keys", collections.Counter(str(k) for k, _, _ in forwards).most_common(6), flush=True)
            pol = eng.spec_policy
            if pol is not None:
                per_seq = {k: round(v * 1e6, 1) for k, v in pol.propose_s.items()}
                print(f"   policy overhead {pol.overhead_s * 1e3:.3f} ms, propose us/sequence {per_seq}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
