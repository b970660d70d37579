"""Where a step's time goes on the GPU: SmolLM2 plain / n-gram / adaptive n-gram at several batch sizes.

Per arm and batch: median step wall time, the host time of each stage of LLMEngine.step, the forward's GPU
time (CUDA events), the graph buckets replayed, and the adaptive policy's cost estimates.

    python3 -P benchmarks/probe_step.py SMOL.gguf mt_bench.jsonl [BATCH ...]
    python3 -P benchmarks/probe_step.py 8b - 1         # the Llama-3.1-8B shape, random weights, plain
    PROBE_LEARNED=eagle,eagle-63,medusa python3 -P benchmarks/probe_step.py SMOL.gguf mt_bench.jsonl 1
        # arms of bench_gpu_e2e.LEARNED (the trained drafters of drafters/weights/) instead, the first profiled
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_models as em  # noqa: E402
from bench_gpu_e2e import learned_arms  # noqa: E402

import specserve.engine as engine_mod  # noqa: E402
import specserve.verify as verify_mod  # noqa: E402
from specserve import LLM, SamplingParams  # noqa: E402
from specserve.models.loader import load_model  # noqa: E402

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
ARMS = ["none", "ngram", "ngram-adaptive", "ngram-adaptive"]  # adaptive twice: its estimates warm up
BATCHED_CHAINS = verify_mod._walk_chains
CUDA = torch.cuda.is_available()  # on a CPU the probe still runs (a dry run): no GPU times
STAGES = ["schedule", "propose", "prepare", "forward", "verify", "commit", "observe", "outputs"]


def median_ms(xs) -> float:
    xs = list(xs)
    return statistics.median(xs) * 1e3 if xs else 0.0


class StageClock:
    """Wraps the callables a step runs so each records its host seconds; the forward also gets CUDA events."""

    def __init__(self, eng):
        self.host: dict[str, list[float]] = collections.defaultdict(list)
        self.gpu: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.keys: list[str] = []
        sched, runner = eng.scheduler, eng.runner
        sched.schedule = self._timed("schedule", sched.schedule)
        eng._propose = self._timed("propose", eng._propose)
        runner.prepare = self._timed("prepare", runner.prepare)
        eng._commit = self._timed("commit", eng._commit)
        eng._observe = self._timed("observe", eng._observe)
        eng._outputs = self._timed("outputs", eng._outputs)
        engine_mod.verify = self._timed("verify", engine_mod.verify)
        forward = self._timed("forward", runner.forward)

        def gpu_forward(batch):
            self.keys.append(str(batch.graph_key))
            if not CUDA:
                return forward(batch)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = forward(batch)
            end.record()
            self.gpu.append((start, end))
            return out

        runner.forward = gpu_forward

    def _timed(self, name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.host[name].append(time.perf_counter() - start)
            return out

        return wrapper

    def clear(self) -> None:
        self.host.clear()
        self.gpu.clear()
        self.keys.clear()

    def report(self) -> str:
        if CUDA:
            torch.cuda.synchronize()
        gpu = median_ms(s.elapsed_time(e) * 1e-3 for s, e in self.gpu)
        stages = ", ".join(f"{name} {median_ms(self.host[name]):.3f}" for name in STAGES if self.host[name])
        top = collections.Counter(self.keys).most_common(4)
        return f"   host ms (median): {stages}; forward GPU {gpu:.3f} ms; buckets {top}"


def kernel_table(eng, prompt: list[int], arm: str = "none") -> None:
    """torch.profiler over 20 batch-1 decode steps of arm: GPU kernels by total time, host ops by own time."""
    eng.add_request("profile", prompt, SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True), spec_arm=arm)
    for _ in range(30):  # prefill and warm-up
        eng.step()
    activities = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * CUDA
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(20):
            eng.step()
        if CUDA:
            torch.cuda.synchronize()
    while eng.has_unfinished_requests():
        eng.step()
    table = prof.key_averages()
    if CUDA:
        print(table.table(sort_by="cuda_time_total", row_limit=12), flush=True)
    print(table.table(sort_by="self_cpu_time_total", row_limit=25), flush=True)


def walk_each(items, probs):
    """The node-by-node walk for every chain (several host syncs per request): what verify did before."""
    starts = itertools.accumulate((it.num_nodes for it in items), initial=0)
    return [verify_mod._walk_sampling(it, probs[s : s + it.num_nodes]) for it, s in zip(items, starts, strict=False)]


def main(model: str, mt_bench: str, *batches: str) -> None:
    """model: a SmolLM2 GGUF, or "8b" for the Llama-3.1-8B shape with random weights (plain, 512-token prompt)."""
    device, dtype = ("cuda", "bfloat16") if CUDA else ("cpu", "float32")
    arms = {"ngram": NGRAM, "ngram-adaptive": {**NGRAM, "adaptive": True}}
    learned = [m for m in os.environ.get("PROBE_LEARNED", "").split(",") if m]
    if learned:
        arms = learned_arms(learned)
    if model == "8b":
        loaded = em.dummy_model(em.write_config("/tmp/probe_8b", quick=not CUDA), device, getattr(torch, dtype),
                                repeat=True)
        arms = {}
    else:
        loaded = load_model(model, getattr(torch, dtype), device)
    llm = LLM(loaded_model=loaded, device=device, dtype=dtype, max_num_seqs=128, enable_prefix_caching=False,
              max_model_len=2048, speculative_arms=arms)
    if model == "8b":
        prompts = [[(7 * i + 3) % loaded.config.vocab_size for i in range(512)]]
    else:
        with open(mt_bench) as f:
            prompts = [llm.encode_chat([{"role": "user", "content": json.loads(line)["turns"][0]}]) for line in f]
    eng = llm.engine
    clock = StageClock(eng)
    params = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
    kernel_table(eng, prompts[0], learned[0] if learned else "none")
    sampled = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=128, ignore_eos=True, seed=0)
    # plain twice: with async scheduling (the CUDA default) and without (sync)
    runs = [("none", params, "sync")] + [(arm, params, "") for arm in (ARMS if arms else ARMS[:1])]
    runs += [(arm, sampled, mode) for arm in ("none", "ngram") if arm == "none" or arms for mode in ("batched", "walk")]
    if learned:
        runs = [("none", params, "")] + [(arm, params, "") for arm in learned]
        # the draft model again with its greedy chains stepped from the host (graph per step), as before
        runs += [(arm, params, "loop") for arm in learned if arms[arm]["method"] == "draft_model"]
    for b in [int(x) for x in batches] or [1, 16, 64, 128]:
        for n, (arm, params, mode) in enumerate(runs):
            # sampled runs: chains verified in one batch (batched), or node by node as before (walk)
            verify_mod._walk_chains = walk_each if mode == "walk" else BATCHED_CHAINS
            eng.async_scheduling = CUDA and mode != "sync"
            chains = getattr(eng.drafters.get(arm), "chains", None)
            if chains is not None:
                chains.batches = [] if mode == "loop" else sorted({key[0] for key in chains.graphs})
            for i in range(b):
                eng.add_request(f"{arm}-{b}-{n}-{i}", prompts[i % len(prompts)], params, spec_arm=arm)
            arm = f"{arm} {mode}" if mode in ("sync", "loop") else f"{arm} sampled {mode}" if mode else arm
            clock.clear()
            steps, tokens = [], 0
            while eng.has_unfinished_requests():
                start = time.perf_counter()
                tokens += sum(len(o.outputs[0].token_ids) for o in eng.step() if o.finished)
                steps.append(time.perf_counter() - start)
            print(f"B={b} {arm}: {len(steps)} steps, {tokens / sum(steps):.0f} tok/s, step {median_ms(steps):.3f} "
                  "ms", flush=True)
            print(clock.report(), flush=True)
            pol = eng.spec_policy
            if pol is not None and arm.endswith("adaptive"):
                per_seq = {k: round(v * 1e6, 1) for k, v in pol.propose_s.items()}
                print(f"   policy overhead {pol.overhead_s * 1e3:.3f} ms, propose us/sequence {per_seq}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
