"""`specserve serve|generate|bench|train-drafter`: flags spelled as vLLM spells them."""

from __future__ import annotations

import argparse
import json
import sys


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by every subcommand that builds an engine."""
    p.add_argument("--model", default=None, help="HF model dir or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--speculative-config", default=None, help='JSON: {"method": "ngram", "num_speculative_tokens": 4}')
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--kv-cache-memory-gb", type=float, default=1.0,
                   help="GiB for the KV blocks: the target's K/V plus the drafters' K/V layers and per-slot tables")
    p.add_argument("--attention-backend", default=None, choices=["torch", "triton"])
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--enforce-eager", action="store_true", default=None, help="no CUDA graphs (default on CUDA)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule the next plain-decoding step while this one runs (default on CUDA)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        model=args.model,
        speculative_config=args.speculative_config,
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_gb=args.kv_cache_memory_gb,
        attention_backend=args.attention_backend,
        load_format=args.load_format,
        enable_prefix_caching=args.enable_prefix_caching,
        seed=args.seed,
        enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling,
    )


def run_generate(args: argparse.Namespace) -> int:
    from specserve import LLM, SamplingParams

    llm = LLM(**engine_kwargs(args))
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.sampling_seed)
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
    else:
        out = llm.generate(args.prompt, params)[0]
    m = out.metrics
    print(out.outputs[0].text)
    stats = {
        "finish_reason": out.outputs[0].finish_reason,
        "num_tokens": len(out.outputs[0].token_ids),
        "num_steps": m.num_steps,
        "num_draft_tokens": m.num_draft_tokens,
        "num_accepted_tokens": m.num_accepted_tokens,
        "acceptance_rate": round(m.acceptance_rate, 4),
        "mean_accepted_length": round(m.mean_accepted_length, 4),
        "seconds": round((m.finished_time or 0) - m.arrival_time, 3),
    }
    print(json.dumps(stats), file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for one prompt and print speculation figures")
    add_engine_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.set_defaults(func=run_generate)

    from specserve.bench.cli import add_bench_args, run_bench
    from specserve.drafters.train import add_train_args, run_train
    from specserve.server.serve import add_serve_args, run_serve

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_serve_args(serve)
    serve.set_defaults(func=run_serve)
    add_bench_args(sub).set_defaults(func=run_bench)
    train = sub.add_parser("train-drafter", help="self-distil a drafter (EAGLE, EAGLE-3, Medusa, draft model)")
    add_train_args(train)
    train.set_defaults(func=run_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"specserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
