"""Host time of a speculative step on the CPU, stage by stage, and the torch ops it runs outside the forward.

A tiny random Llama (tests/helpers.py) keeps the forward cheap; greedy, batch 1 and 8, arms: replay (the
target's own greedy output at acceptance 1.0, k=8), n-gram chains (k=8) and n-gram trees (4 matches, 8 nodes).
Per arm and batch: median host microseconds of each stage (probe_step.StageClock), the step outside the
forward, and the top-level torch ops per step outside the forward. On CUDA each of those ops costs ~5-10 us
of host time (dispatch and launch) while on the CPU it is nearly free, so the op count is the figure to cut
alongside the microseconds. Then a cProfile top-20 by own time of the profiled arm's steps, forward excluded.

    python3 -P benchmarks/host_step.py [--rounds 5] [--profile replay]
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, ROOT)
from probe_step import STAGES, StageClock  # noqa: E402

from specserve import LLM, SamplingParams  # noqa: E402
from specserve.drafters.replay import table_from_outputs  # noqa: E402
from tests.helpers import make_tiny_model_dir  # noqa: E402

ARMS = {
    "replay": {"method": "replay", "num_speculative_tokens": 8, "acceptance": 1.0},
    "ngram": {"method": "ngram", "num_speculative_tokens": 8, "prompt_lookup_min": 1, "prompt_lookup_max": 4},
    "ngram-tree": {"method": "ngram", "num_speculative_tokens": 8, "prompt_lookup_min": 1, "prompt_lookup_max": 4,
                   "prompt_lookup_matches": 4},
}
BATCHES = [1, 8]
PROMPT_LEN, MAX_TOKENS = 48, 160
FORWARD = "forward"  # the record_function around the forward: its ops are not counted


def prompts(vocab: int, n: int) -> list[list[int]]:
    """Token-id prompts (ids 0-2 are special) with some repetition, so n-gram drafting finds matches."""
    return [[3 + (i * 7 + j * (j % 5 + 1) * 13) % (vocab - 3) for j in range(PROMPT_LEN)] for i in range(n)]


def top_level_ops(prof) -> collections.Counter:
    """aten ops called from Python (not from inside another op) outside the forward, by name."""
    return collections.Counter(e.name for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::"))


def run_round(eng, arm: str, batch: int, params: SamplingParams, prompt_ids, clock, tag: str) -> tuple[list, int]:
    """Steps one batch to completion; the first step (every prefill) is not measured. Returns step seconds."""
    for i in range(batch):
        eng.add_request(f"{tag}-{i}", prompt_ids[i], params, spec_arm=arm)
    eng.step()
    clock.clear()
    steps, tokens = [], 0
    while eng.has_unfinished_requests():
        start = time.perf_counter()
        tokens += sum(len(o.outputs[0].token_ids) for o in eng.step(finished_only=True))
        steps.append(time.perf_counter() - start)
    return steps, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="batches run to completion per arm and batch size")
    ap.add_argument("--profile", default="replay", help="arm whose steps cProfile reports")
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = make_tiny_model_dir(os.path.join(tempfile.gettempdir(), "specserve_host_step_tiny"))
    llm = LLM(model=path, device="cpu", dtype="float32", max_num_seqs=max(BATCHES), speculative_arms=ARMS,
              enable_prefix_caching=True)
    eng = llm.engine
    vocab = eng.model.config.vocab_size
    prompt_ids = prompts(vocab, max(BATCHES))
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    eng.drafters["replay"].set_table(table_from_outputs(llm.generate(prompt_ids, params)))

    clock = StageClock(eng)
    forward = eng.runner.forward
    profiler: cProfile.Profile | None = None

    def forward_outside(batch):  # neither op counting nor cProfile sees the model forward
        if profiler is not None:
            profiler.disable()
        with torch.profiler.record_function(FORWARD):
            out = forward(batch)
        if profiler is not None:
            profiler.enable()
        return out

    eng.runner.forward = forward_outside
    header = ["arm", "B", "steps", "tok/step"] + STAGES + ["step-fwd", "ops/step"]
    print(" ".join(f"{h:>9}" for h in header))
    profiles = []
    for arm in ARMS:
        for b in BATCHES:
            host: dict[str, list[float]] = collections.defaultdict(list)
            outside, num_steps, num_tokens = [], 0, 0
            for r in range(args.rounds):
                steps, tokens = run_round(eng, arm, b, params, prompt_ids, clock, f"{arm}-{b}-{r}")
                for name in STAGES:
                    host[name] += clock.host[name]
                outside += [s - f for s, f in zip(steps, clock.host["forward"], strict=True)]
                num_steps, num_tokens = num_steps + len(steps), num_tokens + tokens
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                steps, _ = run_round(eng, arm, b, params, prompt_ids, clock, f"{arm}-{b}-ops")
            ops = top_level_ops(prof)
            if arm == args.profile:
                profiler = cProfile.Profile()
                profiler.enable()
                run_round(eng, arm, b, params, prompt_ids, clock, f"{arm}-{b}-prof")
                profiler.disable()
                profiles.append((f"{arm} B={b}", profiler, ops, len(steps) + 1))
                profiler = None
            cells = [arm, b, num_steps, f"{num_tokens / num_steps:.2f}"]
            cells += [f"{statistics.median(host[n]) * 1e6:.0f}" if host[n] else "-" for n in STAGES]
            cells += [f"{statistics.median(outside) * 1e6:.0f}", f"{sum(ops.values()) / (len(steps) + 1):.1f}"]
            print(" ".join(f"{c:>9}" for c in cells), flush=True)
    print("(host us, medians over steps after prefill; step-fwd: the step's wall time less its forward; ops/step: "
          "top-level aten ops outside the forward, the prefill step included)")
    for name, prof, ops, steps in profiles:
        print(f"\n== {name}: aten ops per step outside the forward ==")
        print(", ".join(f"{op.removeprefix('aten::')} {n / steps:.1f}" for op, n in ops.most_common()))
        print(f"== {name}: cProfile top-20 by own time, forward excluded ==")
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
