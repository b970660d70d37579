"""`specserve bench offline|serve|ab`: argument parsing and the three commands' top level."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from pathlib import Path

from rich.console import Console

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def add_bench_args(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `bench` and its three subcommands on the main CLI's subparsers."""
    bench = subparsers.add_parser("bench", help="benchmark drafters offline, load-test a server, compare results")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    _add_offline(sub.add_parser("offline", help="acceptance and speed of drafter arms on one engine"))
    _add_serve(sub.add_parser("serve", help="load-test an OpenAI-compatible chat endpoint"))
    _add_ab(sub.add_parser("ab", help="is result B better than result A? (tau, latency, bootstrap CIs)"))
    return bench


def _add_common(p: argparse.ArgumentParser, num_prompts: int | None, max_tokens: int) -> None:
    p.add_argument("--dataset", default="mt_bench", help="mt_bench | humaneval | FILE.jsonl (default: mt_bench)")
    p.add_argument("--num-prompts", type=int, default=num_prompts, help="prompts to use (categories round-robin)")
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="sampling, arrivals and bootstrap seed")
    p.add_argument("--out", type=Path, help="output directory (default: bench-results/<command>-<time>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_offline(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF directory or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--drafters", help="comma list of method[:PATH][:k=N] arms, e.g. none,ngram,ngram:k=8,eagle:DIR")
    p.add_argument("--drafter-config", help="TOML A/B file of the server: compare the arms it gives --model-name")
    p.add_argument("--model-name", help="model table to read in --drafter-config (default: the model's name)")
    _add_common(p, num_prompts=16, max_tokens=256)
    p.add_argument("--batch-size", type=int, default=1, help="requests run together (1: latency use case)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up request per arm")
    p.add_argument(
        "--enable-prefix-caching",
        action="store_true",
        help="let arms reuse each other's prefill (off: it would flatter every arm but the first)",
    )


def _add_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="the served model name sent in each request")
    _add_common(p, num_prompts=32, max_tokens=128)
    p.add_argument("--concurrency", type=int, help="most requests in flight (default 1 without --request-rate)")
    p.add_argument("--request-rate", type=float, help="Poisson arrivals of prompts per second")
    p.add_argument("--slo-ttft", type=float, help="TTFT SLO in seconds, for goodput")
    p.add_argument("--slo-tpot", type=float, help="TPOT SLO in seconds, for goodput")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout in seconds")
    p.add_argument("--max-duration", type=float, default=600.0, help="cancel what is left after this many seconds")
    p.add_argument("--speculative", help="specserve only: serve every request with this drafter arm")
    p.add_argument(
        "--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token (default: $OPENAI_API_KEY)"
    )


def _add_ab(p: argparse.ArgumentParser) -> None:
    p.add_argument("result_a", type=Path, help="JSON of bench offline or serve (the reference)")
    p.add_argument("result_b", type=Path, help="JSON of the candidate")
    p.add_argument("--arm-a", help="arm of result A (default: its only drafting arm)")
    p.add_argument("--arm-b", help="arm of result B (default: its only drafting arm)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also write the comparison as JSON here")


def run_bench(args: argparse.Namespace) -> int:
    """Run the chosen subcommand; bad input exits 2 with the message, a run with failed requests exits 1."""
    # Piped output gets a wide console: rich's 80-column default squeezes the arm table unreadably.
    console = Console(width=None if sys.stdout.isatty() else 180)
    command = {"offline": _offline, "serve": _serve, "ab": _ab}[args.bench_command]
    try:
        return command(args, console)
    except ValueError as e:  # DatasetError and config errors: the message says what to fix
        console.print(f"[red]error:[/red] {e}", highlight=False)
        return 2


def _out_dir(args: argparse.Namespace) -> Path:
    return args.out or Path("bench-results") / f"{args.bench_command}-{datetime.now():%Y%m%d-%H%M%S}"


def _check_counts(args: argparse.Namespace) -> None:
    if args.num_prompts is not None and args.num_prompts < 1:
        raise ValueError("--num-prompts must be >= 1")
    if args.max_tokens < 1:
        raise ValueError("--max-tokens must be >= 1")


def _offline(args: argparse.Namespace, console: Console) -> int:
    from specserve.bench.arm_specs import arms_from_drafter_config, parse_drafters
    from specserve.bench.datasets import load_dataset
    from specserve.bench.offline import OfflineConfig, load_llm, run_offline
    from specserve.bench.plots import plot_acceptance_by_position, plot_speedup_by_category
    from specserve.bench.report import arm_table, category_table, write_json

    _check_counts(args)
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    if args.drafters and args.drafter_config:
        raise ValueError("give --drafters or --drafter-config, not both")
    if args.drafter_config:
        name = args.model_name or (Path(args.model).name if args.model else DEFAULT_MODEL_NAME)
        arms = arms_from_drafter_config(args.drafter_config, name)
    else:
        arms = parse_drafters(args.drafters or "none,ngram")
    prompts = load_dataset(args.dataset, args.num_prompts)  # before the model loads: fail fast on bad data
    config = OfflineConfig(
        arms=arms,
        dataset=args.dataset,
        num_prompts=len(prompts),
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        batch_size=args.batch_size,
        warmup=not args.no_warmup,
        ignore_eos=args.ignore_eos,
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        enable_prefix_caching=args.enable_prefix_caching,
    )
    console.print(f"arms: {', '.join(a.name for a in arms)}; {len(prompts)} prompts of {args.dataset}")
    result = run_offline(load_llm(config), config, prompts, progress=not args.no_progress)
    console.print(arm_table(result.summaries, f"bench offline: {args.dataset}, {len(prompts)} prompts"))
    by_category = category_table(result.summaries)
    if by_category is not None:
        console.print(by_category)
    out = _out_dir(args)
    write_json(out / "offline.json", result.to_json())
    plot_acceptance_by_position(result.summaries, out / "acceptance_by_position.png")
    plot_speedup_by_category(result.summaries, out / "speedup_by_category.png")
    console.print(f"wrote {out}/offline.json, acceptance_by_position.png, speedup_by_category.png")
    return 0


def _serve(args: argparse.Namespace, console: Console) -> int:
    from specserve.bench.datasets import load_dataset
    from specserve.bench.report import serve_tables, write_json
    from specserve.bench.serve_load import ServeConfig, run_serve

    _check_counts(args)
    if args.concurrency is not None and args.concurrency < 1:
        raise ValueError("--concurrency must be >= 1")
    if args.request_rate is not None and args.request_rate <= 0:
        raise ValueError("--request-rate must be > 0")
    if args.timeout <= 0 or args.max_duration <= 0:
        raise ValueError("--timeout and --max-duration must be > 0")
    prompts = load_dataset(args.dataset, args.num_prompts)
    config = ServeConfig(
        base_url=args.base_url,
        model=args.model,
        dataset=args.dataset,
        num_prompts=len(prompts),
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        concurrency=args.concurrency,
        request_rate=args.request_rate,
        slo_ttft_s=args.slo_ttft,
        slo_tpot_s=args.slo_tpot,
        timeout_s=args.timeout,
        max_duration_s=args.max_duration,
        speculative=args.speculative,
        api_key=args.api_key,
        seed=args.seed,
    )
    result = run_serve(config, prompts, progress=not args.no_progress)
    for table in serve_tables(result):
        console.print(table)
    for note in result.notes:
        console.print(f"note: {note}", highlight=False)
    out = _out_dir(args)
    write_json(out / "serve.json", result.to_json())
    console.print(f"wrote {out}/serve.json")
    return 1 if result.summary.num_errors else 0


def _ab(args: argparse.Namespace, console: Console) -> int:
    from dataclasses import asdict

    from specserve.bench.ab import ab_table, compare, headline, load_result, pick_arm
    from specserve.bench.report import write_json

    data_a, data_b = load_result(args.result_a), load_result(args.result_b)
    arm_a, arm_b = pick_arm(data_a, args.arm_a, args.result_a), pick_arm(data_b, args.arm_b, args.result_b)
    result = compare(data_a, arm_a, data_b, arm_b, seed=args.seed)
    console.print(ab_table(result, f"{args.result_a.name}:{arm_a}", f"{args.result_b.name}:{arm_b}"))
    console.print(headline(result), highlight=False)
    if args.out:
        write_json(args.out, asdict(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m specserve.bench.cli offline ...`: the bench commands without the main CLI."""
    parser = argparse.ArgumentParser(prog="specserve")
    add_bench_args(parser.add_subparsers(dest="command", required=True))
    return run_bench(parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
