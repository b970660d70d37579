"""Mean accepted length (tau) of drafter arms on MT-bench first turns, greedy, one engine for all arms.

Every arm runs the same prompts batched together (tau does not depend on batching under greedy decoding);
the `none` arm gives the reference tokens, and each arm reports how many prompts match it exactly.
Usage: python benchmarks/eval_drafters_tau.py --model M --mt-bench FILE --arm NAME=JSON [--arm ...] --out F
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from specserve import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--mt-bench", required=True)
    ap.add_argument("--arm", action="append", default=[], help='NAME={"method": ..., ...}')
    ap.add_argument("--num-prompts", type=int, default=80)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    arms = dict(a.split("=", 1) for a in args.arm)
    llm = LLM(model=args.model, device=args.device, dtype=args.dtype, max_num_seqs=128, max_num_batched_tokens=16384,
              kv_cache_memory_gb=8.0, enable_prefix_caching=False,
              speculative_arms={k: json.loads(v) for k, v in arms.items()})
    rows = [json.loads(line) for line in open(args.mt_bench)][: args.num_prompts]
    prompts = [llm.encode_chat([{"role": "user", "content": r["turns"][0]}]) for r in rows]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    results, reference = {}, None
    for arm in ["none", *arms]:
        t0 = time.time()
        outs = llm.generate(prompts, params, spec_arm=arm)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.time() - t0
        tokens = [o.outputs[0].token_ids for o in outs]
        reference = reference or tokens
        gen = sum(o.metrics.num_generated_tokens for o in outs)
        steps = sum(o.metrics.num_steps for o in outs)
        drafted = sum(o.metrics.num_draft_tokens for o in outs)
        accepted = sum(o.metrics.num_accepted_tokens for o in outs)
        results[arm] = {
            "config": json.loads(arms[arm]) if arm in arms else None,
            "tau": gen / steps,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "equal_to_none": sum(a == b for a, b in zip(tokens, reference, strict=True)),
            "num_prompts": len(prompts),
            "batched_tok_s": gen / wall,
        }
        print(f"| {arm} | {results[arm]['tau']:.2f} | {results[arm]['acceptance_rate']:.3f} | "
              f"{results[arm]['equal_to_none']}/{len(prompts)} | {gen / wall:.0f} |", flush=True)
    json.dump({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "max_tokens": args.max_tokens, "arms": results}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
