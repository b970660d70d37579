"""Prefill in CUDA graphs vs eager at batch 1: time to first token and end-to-end tok/s, one process.

    python3 -P benchmarks/bench_prefill.py --gguf SMOL.gguf --mt-bench mt_bench.jsonl [--out DIR]
    python3 -P benchmarks/bench_prefill.py --llama-8b WORKDIR [--out DIR]

--llama-8b: the Llama-3.1-8B shape with dummy weights instead: prompts of random tokens, 16-512 long, 8 new tokens
each (time to first token only; a graph pads a prompt to its bucket, which costs compute on a model this size).

Engines alternate over rounds: the default (prefill buckets captured) and one built with no prefill buckets
(cuda_graphs.PREFILL_SEQS set to 0 for its build: every prompt's forward eager, as before the buckets). Each runs
the MT-bench first turns one at a time, 256 new tokens, greedy, on the plain arm and the learned arms named.
Time to first token: the engine's steps from the request's arrival through the first that returns a token (with async
scheduling the prefill is launched by one step and its token returned by the next).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_gpu_e2e as e2e  # noqa: E402

from specserve import LLM, SamplingParams, cuda_graphs  # noqa: E402
from specserve.models.loader import load_model  # noqa: E402


def build(loaded, arms: dict, prefill_graphs: bool, device: str) -> tuple[LLM, float]:
    saved = cuda_graphs.PREFILL_SEQS
    cuda_graphs.PREFILL_SEQS = saved if prefill_graphs else 0
    try:
        t = time.perf_counter()
        llm = LLM(loaded_model=loaded, device=device, dtype="bfloat16", max_num_seqs=128, kv_cache_memory_gb=4.0,
                  speculative_arms=arms, enable_prefix_caching=False, max_model_len=2048, enforce_eager=False)
        return llm, time.perf_counter() - t
    finally:
        cuda_graphs.PREFILL_SEQS = saved


def first_token_s(steps: list[tuple]) -> float:
    """Seconds of run()'s steps up to and including the first that emitted a token."""
    total = 0.0
    for secs, _, emitted, _ in steps:
        total += secs
        if emitted:
            return total
    raise ValueError("no step emitted a token")


def measure(llm: LLM, prompts: list[list[int]], arm: str, tokens: int) -> dict:
    e2e.run(llm, [prompts[0]], SamplingParams(temperature=0.0, max_tokens=32), arm)  # the arm's first shapes
    per = [e2e.run(llm, [p], SamplingParams(temperature=0.0, max_tokens=tokens), arm) for p in prompts]
    first = [first_token_s(r["step_log"]) for r in per]
    return dict(arm=arm, tok_s=sum(r["tokens"] for r in per) / sum(r["wall_s"] for r in per),
                ttft_ms_median=statistics.median(first) * 1e3, ttft_ms_mean=statistics.fmean(first) * 1e3,
                tokens_per_step=sum(r["tokens"] for r in per) / sum(r["steps"] for r in per),
                outputs=[r["outputs"][0] for r in per])


def ttft_8b(workdir: str, out: str | None) -> int:
    """Time to first token of random prompts on the 8B shape, graphs vs eager prefill, two rounds."""
    path = e2e.em.write_config(os.path.join(workdir, "llama31_8b"), False)
    loaded = e2e.em.dummy_model(path, torch.device("cuda"), torch.bfloat16, repeat=True)
    gen = torch.Generator().manual_seed(0)
    lengths = [16, 60, 128, 200, 300, 384, 500]
    prompts = [torch.randint(0, loaded.config.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    rows = []
    for rnd in range(2):
        for prefill_graphs in (True, False):
            llm, build_s = build(loaded, {}, prefill_graphs, "cuda")
            for p in prompts:  # warm-up: each prompt's shape
                e2e.run(llm, [p], params, "none")
            for p in prompts:
                runs = [e2e.run(llm, [p], params, "none") for _ in range(3)]
                first = statistics.median(first_token_s(r["step_log"]) for r in runs)
                rows.append(dict(round=rnd, prefill="graphs" if prefill_graphs else "eager", prompt_tokens=len(p),
                                 ttft_ms=first * 1e3, build_s=build_s))
            del llm
            torch.cuda.empty_cache()
    print(e2e.em.markdown(rows, ["round", "prefill", "prompt_tokens", "ttft_ms", "build_s"]))
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "prefill_graphs_8b.json"), "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows, argv=sys.argv), f, indent=1)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf")
    ap.add_argument("--mt-bench")
    ap.add_argument("--llama-8b", metavar="WORKDIR", help="time the 8B shape's prefill instead (dummy weights)")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--arms", default="eagle3-63,eagle3", help="LEARNED arms of bench_gpu_e2e besides plain")
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of the script (buckets replayed eagerly)")
    args = ap.parse_args()
    if args.llama_8b:
        return ttft_8b(args.llama_8b, args.out)
    if not (args.gguf and args.mt_bench):
        ap.error("--gguf and --mt-bench are required (or --llama-8b)")
    loaded = load_model(args.gguf, torch.bfloat16, torch.device(args.device))
    arms = e2e.learned_arms(args.arms.split(",")) if args.arms else {}
    with open(args.mt_bench) as f:
        turns = [json.loads(line)["turns"][0] for line in f][: args.prompts]
    rows = []
    for rnd in range(args.rounds):
        for prefill_graphs in (True, False):
            llm, build_s = build(loaded, arms, prefill_graphs, args.device)
            prompts = [llm.encode_chat([{"role": "user", "content": t}]) for t in turns]
            for p in prompts:  # warm-up: every prompt's prefill shape (eager JIT compiles, allocator growth)
                e2e.run(llm, [p], SamplingParams(temperature=0.0, max_tokens=4), "none")
            for arm in ["none", *arms]:
                row = dict(round=rnd, prefill="graphs" if prefill_graphs else "eager", build_s=build_s,
                           graphs=len(llm.engine.runner.graphs.entries), **measure(llm, prompts, arm, args.tokens))
                rows.append(row)
                print(e2e.em.markdown([row], ["round", "prefill", "arm", "tok_s", "ttft_ms_median", "ttft_ms_mean",
                                              "tokens_per_step", "build_s", "graphs"]), flush=True)
            del llm
            torch.cuda.empty_cache()
    # outputs equal to the same round's plain arm: of this engine, and of the eager-prefill engine
    plain = {(r["round"], r["prefill"]): r["outputs"] for r in rows if r["arm"] == "none"}
    for r in rows:
        outs = r.pop("outputs")
        r["same_as_plain"] = sum(a == b for a, b in zip(outs, plain[(r["round"], r["prefill"])], strict=True))
        r["same_as_eager_plain"] = sum(a == b for a, b in zip(outs, plain[(r["round"], "eager")], strict=True))
    print(e2e.em.markdown(rows, ["round", "prefill", "arm", "tok_s", "ttft_ms_median", "ttft_ms_mean",
                                 "tokens_per_step", "same_as_plain", "same_as_eager_plain", "build_s", "graphs"]))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "prefill_graphs.json"), "w") as f:
            name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
            json.dump(dict(device=name, rows=rows, argv=sys.argv), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
