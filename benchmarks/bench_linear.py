"""Few-row matmuls of the Llama-3.1-8B shape: cuBLAS vs our Triton skinny matmul, and what it does to a step.

    python3 -P benchmarks/bench_linear.py shapes step kernels --out DIR

Parts (each prints a markdown table and writes DIR/<part>.json):
  shapes   every linear layer of the 8B shape at M = 1..16 rows: cuBLAS (F.linear) vs the skinny kernel under
           a grid of configs, each timed as CUDA-graph replays over rotating weight copies (> L2, as in a
           step); achieved GB/s over the weight bytes and the ratio to the device's copy bandwidth.
  step     8B shape, random weights, batch 1, context 512: plain decode ms/step and the graph-replayed decode
           forward, with the skinny kernel and with cuBLAS (engines built in turn, one process).
  kernels  device time per kernel family of one eager 8B decode step (torch.profiler), skinny vs cuBLAS.
  timeline where the device time of a graph-replayed 8B decode step goes (torch.profiler; PDL overlaps charged
           once), per kernel family, and its idle time.
  fusion   the 8B shape or (--gguf) SmolLM2: engines built in turn with rope + K/V store inside the q/k/v launch and
           SiLU-and-multiply inside gate_up's (the defaults), the same with programmatic dependent launch in the
           graphs ("fused+PDL", kernels/pdl.py; its trigger follows SPECSERVE_PDL_TRIGGER, read at import: set it
           per process), and with both ops apart, two
           rounds: graph-replayed forward at batch 1 and 8, plain decode step and tok/s at batch 1, tok/s of all
           prompts at once. --attention-configs adds a variant per decode attention config of 16-bit caches, any
           head dim (bench_attention.py's spelling, e.g. r0w4f5s5 for the uniform 512-key grid), --skinny-configs one
           per few-row matmul config of long rows (block_n/block_k/num_warps/num_stages, @NxK for [N, K] weights
           only, e.g. 32/256/4/3@6144x4096); --variants keeps only the named variants.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import random
import statistics
import sys
import traceback

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_attention  # noqa: E402
import bench_gpu_e2e as e2e  # noqa: E402
import e2e_models as em  # noqa: E402

from specserve import SamplingParams  # noqa: E402
from specserve.kernels import num_sms, pdl, reference, tree_attention, triton_backend  # noqa: E402
from specserve.kernels import skinny_linear as sk  # noqa: E402
from specserve.models.loader import load_model  # noqa: E402

H, INTER, V, QKV = 4096, 14336, 128256, 6144
SHAPES = {"qkv": (QKV, H), "o": (H, H), "gate_up": (2 * INTER, H), "down": (H, INTER), "lm_head": (V, H)}
SMOL_SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}
ROWS = (1, 2, 4, 8, 16)
CONFIGS = [sk.SkinnyConfig(bn, bk, w, s) for bn in (16, 32) for bk in (256, 512) for w in (4, 8) for s in (3, 4, 6)]
# small weights are latency-bound: more, shorter programs
SMOL_CONFIGS = [sk.SkinnyConfig(bn, bk, w, s) for bn in (16, 32, 64) for bk in (64, 128, 256, 512) for w in (2, 4)
                for s in (2, 3, 4)]
ROTATE_BYTES = 512 << 20  # weight copies per shape: past the 50 MB L2, as every layer's weights are in a step


def graph_time(fn, calls: int) -> float:
    """Seconds per call of fn(i) for i in range(calls), captured once in a CUDA graph (median of 20 replays)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(calls):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3 / calls)
    return statistics.median(times)


def part_shapes(args) -> dict:
    dev, bw = torch.device("cuda"), em.copy_bandwidth(torch.device("cuda"))
    rows, gen = [], torch.Generator(device=dev).manual_seed(0)
    shapes, configs, row_counts = (SMOL_SHAPES, SMOL_CONFIGS, (1, 8, 16)) if args.smol else (SHAPES, CONFIGS, ROWS)
    for name, (n, k) in shapes.items():
        copies = max(2, ROTATE_BYTES // (n * k * 2))
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=gen) * 0.02 for _ in range(copies)]
        wbytes = n * k * 2
        for m in row_counts:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=gen)
            ref = F.linear(x, ws[0])
            cublas = graph_time(lambda i, x=x, ws=ws: F.linear(x, ws[i % len(ws)]), 2 * copies)
            timed = []
            for cfg in configs:
                try:
                    err = (sk.skinny_linear(x, ws[0], None, cfg).float() - ref.float()).abs().max().item()
                    t = graph_time(lambda i, x=x, ws=ws, cfg=cfg: sk.skinny_linear(x, ws[i % len(ws)], None, cfg),
                                   2 * copies)
                except Exception as e:  # a config that does not compile (shared memory) is skipped, reported
                    print(f"{name} m={m} {cfg}: {type(e).__name__}", flush=True)
                    continue
                timed.append((t, cfg, err))
            t, cfg, err = min(timed, key=lambda r: r[0])
            want = sk.config_for(n, k, num_sms(dev))
            default = next((r for r in timed if r[1] == want), (float("nan"), None, 0.0))
            rows.append(dict(shape=name, n=n, k=k, m=m, cublas_us=cublas * 1e6, cublas_bw=wbytes / cublas / bw,
                             best_us=t * 1e6, best_bw=wbytes / t / bw, best_config=str(cfg),
                             default_us=default[0] * 1e6,
                             default_bw=wbytes / default[0] / bw, cublas_over_default=cublas / default[0],
                             max_err=err, all=[(str(c), tt * 1e6) for tt, c, _ in timed]))
            print(em.markdown([rows[-1]], ["shape", "m", "cublas_us", "cublas_bw", "best_us", "best_bw",
                                           "best_config", "default_us", "default_bw", "max_err"]), flush=True)
        ws = None
        torch.cuda.empty_cache()
    return dict(copy_TBps=bw / 1e12, rows=rows)


def build(args, skinny: bool):
    """The 8B-shape engine with the skinny kernel on or off (decided at capture time, so one engine each)."""
    triton_backend.MAX_ROWS = sk.MAX_ROWS if skinny else 0
    if "loaded" not in args.cache:
        path = em.write_config(os.path.join(args.work, "llama31_8b"), False)
        args.cache["loaded"] = em.dummy_model(path, torch.device("cuda"), torch.bfloat16, repeat=True)
    ns = argparse.Namespace(device=torch.device("cuda"), kv_gb=4.0, eager=args.eager_kernels)
    return e2e.engine(ns, args.cache["loaded"], {}, max_model_len=1024, max_num_batched_tokens=2048)


def part_step(args) -> dict:
    rng = random.Random(0)
    prompt = [rng.randrange(V) for _ in range(512)]
    params = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
    rows, outputs = [], {}
    for skinny in (True, False, True):
        args.eager_kernels = False
        llm = build(args, skinny)
        e2e.run(llm, [prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), "none")
        res = e2e.run(llm, [prompt], params, "none")
        fwd = llm.engine.runner.profile([(1, 1)])  # the one graph bucket of a plain engine
        outputs[skinny] = res["outputs"]
        rows.append(dict(linear="skinny" if skinny else "cublas", step_ms=e2e.median_ms(res["step_log"]),
                         fwd_ms=fwd[(1, 1)] * 1e3))
        print(em.markdown([rows[-1]], list(rows[-1])), flush=True)
        del llm
        torch.cuda.empty_cache()
    bw = em.copy_bandwidth(torch.device("cuda"))
    read = em.weight_bytes(args.cache["loaded"].model) - V * H * 2  # the embedding table is not streamed
    return dict(copy_TBps=bw / 1e12, streamed_GB=read / 1e9, floor_ms=read / bw * 1e3, rows=rows,
                same_tokens=outputs[True] == outputs[False])


def family(name: str) -> str:
    n = name.lower()
    for key in ("skinny", "tree_attn", "fold_splits", "rms", "rope", "silu", "gemv", "gemm", "sm90", "cutlass",
                "nvjet", "copy", "index", "embedding", "elementwise", "reduce"):
        if key in n:
            return key
    return n[:60]


def part_kernels(args) -> dict:
    from torch.profiler import ProfilerActivity, profile

    rng = random.Random(1)
    prompt = [rng.randrange(V) for _ in range(512)]
    out = {}
    for skinny in (True, False):
        args.eager_kernels = True
        llm = build(args, skinny)
        steps = 16
        e2e.run(llm, [prompt], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), "none")
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True))
        fam = collections.Counter()
        for ev in prof.key_averages():
            if ev.device_type.name == "CUDA" or getattr(ev, "self_device_time_total", 0):
                fam[family(ev.key)] += ev.self_device_time_total / steps
        out["skinny" if skinny else "cublas"] = dict(sorted(fam.items(), key=lambda kv: -kv[1]))
        print("skinny" if skinny else "cublas", json.dumps({k: round(v, 1) for k, v in fam.most_common(14)}),
              flush=True)
        del llm
        torch.cuda.empty_cache()
    return dict(note="us per step, prefill included once (divided by the steps)", families=out)


def part_timeline(args) -> dict:
    """Where a graph-replayed 8B decode step's device time goes. PDL starts a kernel before its predecessor ends, so
    each kernel is charged from the later of its start and the previous kernel's end to its own end; time with no
    kernel running is idle. Few-row matmuls are told apart by the kernel before them."""
    from torch.profiler import ProfilerActivity, profile

    rng = random.Random(1)
    prompt = [rng.randrange(V) for _ in range(512)]
    args.eager_kernels = False
    llm = build(args, True)
    e2e.run(llm, [prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), "none")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=65, ignore_eos=True))
    kernels = sorted(((e.time_range.start, e.time_range.end, family(e.name)) for e in prof.events()
                      if e.device_type.name == "CUDA"), key=lambda k: k[0])
    prefill_end = max((i for i, k in enumerate(kernels) if k[2] in ("gemm", "sm90", "cutlass", "nvjet")), default=-1)
    kernels = kernels[prefill_end + 1:]  # decode steps only
    charged, gaps, last_end, prev = collections.Counter(), collections.Counter(), kernels[0][0], ""
    for start, end, fam in kernels:
        if fam == "skinny":
            fam = {"fold_splits": "skinny o", "rms": "skinny gate_up or lm_head", "skinny": "skinny down"}.get(
                prev.split(" ")[0], f"skinny after {prev}")
        gaps[f"{prev} -> {fam}"] += max(0.0, start - last_end)
        charged[fam] += max(0.0, end - max(start, last_end))
        last_end, prev = max(last_end, end), fam
    steps = sum(1 for k in kernels if k[2] == "rope") / 32  # one q/k/v launch a layer
    per_step = {fam: us / steps for fam, us in charged.most_common()}
    per_step["idle"] = sum(gaps.values()) / steps
    idle = {pair: us / steps for pair, us in gaps.most_common(12)}
    print(json.dumps({k: round(v, 1) for k, v in per_step.items()}), flush=True)
    print("idle before each kernel, us a step:", json.dumps({k: round(v, 1) for k, v in idle.items()}), flush=True)
    del llm
    torch.cuda.empty_cache()
    return dict(note="us per decode step, graph replays, batch 1, context 512-576", steps=steps, per_step=per_step,
                idle=idle)


def silu_apart(x, weight, bias=None):
    """gated_linear's work in two launches: a fusion's baseline."""
    return triton_backend.silu_and_mul(triton_backend.linear(x, weight, bias))


def rope_apart(x, weight, bias, num_q_heads, *rope_args):
    """qkv_rope_write_kv's work in two launches: a fusion's baseline."""
    return reference.qkv_rope_write_kv(x, weight, bias, num_q_heads, *rope_args, linear_op=triton_backend.linear,
                                       rope_op=triton_backend.rope_write_kv)


def skinny_variant(spec: str) -> dict:
    """Backend patches that give rows longer than SHORT_K one few-row matmul config: spec is
    block_n/block_k/num_warps/num_stages, with @NxK to give it only to [N, K] weights."""
    cfg, _, only = spec.partition("@")
    fixed = sk.SkinnyConfig(*map(int, cfg.split("/")))

    def pick(weight: torch.Tensor) -> sk.SkinnyConfig | None:
        n, k = weight.shape
        return fixed if k > sk.SHORT_K and (not only or only == f"{n}x{k}") else None

    def linear(x, weight, bias=None, config=None, gated=False):
        return sk.skinny_linear(x, weight, bias, config or pick(weight), gated)

    def qkv_rope(x, weight, *args, config=None):
        return sk.skinny_qkv_rope(x, weight, *args, config=config or pick(weight))

    return {(triton_backend, "skinny_linear"): linear, (triton_backend, "skinny_qkv_rope"): qkv_rope}


def part_fusion(args) -> dict:
    ns = argparse.Namespace(device=torch.device("cuda"), kv_gb=4.0, eager=False)
    rng = random.Random(0)
    models = {"8b": (lambda: em.dummy_model(em.write_config(os.path.join(args.work, "llama31_8b"), False),
                                            torch.device("cuda"), torch.bfloat16, repeat=True),
                     lambda llm: [[rng.randrange(V) for _ in range(512)]], 128, 1024)}
    if args.gguf:
        if not args.with_8b:
            models.clear()

        def mt_prompts(llm):
            with open(args.mt_bench) as f:
                turns = [json.loads(line)["turns"][0] for line in f][:8]
            return [llm.encode_chat([{"role": "user", "content": t}]) for t in turns]

        models["smollm2"] = (lambda: load_model(args.gguf, torch.bfloat16, torch.device("cuda")), mt_prompts, 256,
                             2048)
    targets = [(triton_backend, "gated_linear"), (triton_backend, "qkv_rope_write_kv"), (pdl, "ENABLED"),
               (tree_attention, "decode_config"), (triton_backend, "skinny_linear"),
               (triton_backend, "skinny_qkv_rope")]
    defaults = {(mod, attr): getattr(mod, attr) for mod, attr in targets}
    no_pdl = {(pdl, "ENABLED"): False}
    variants = {"fused": no_pdl, "fused+PDL": {(pdl, "ENABLED"): True},
                "rope and silu apart": {**no_pdl, (triton_backend, "qkv_rope_write_kv"): rope_apart,
                                        (triton_backend, "gated_linear"): silu_apart}}
    for spec in args.attention_configs.split(",") if args.attention_configs else []:
        config = bench_attention.parse_config(spec)  # the 16-bit caches' config, any head dim; fp32 keeps its own
        pick = functools.partial(lambda config, dtype, head_dim: config if dtype != torch.float32 else
                                 defaults[tree_attention, "decode_config"](dtype, head_dim), config)
        variants[f"attention {spec}"] = {(pdl, "ENABLED"): True, (tree_attention, "decode_config"): pick}
    for spec in args.skinny_configs.split(",") if args.skinny_configs else []:
        variants[f"skinny {spec}"] = {(pdl, "ENABLED"): True, **skinny_variant(spec)}
    if args.variants:
        variants = {name: variants[name] for name in args.variants.split(",")}
    rows, tokens = [], {}
    for name, (load, make_prompts, new_tokens, max_len) in models.items():
        loaded, prompts = load(), None
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        for rnd in range(2):
            for variant, patches in variants.items():
                for (mod, attr), value in {**defaults, **patches}.items():
                    setattr(mod, attr, value)
                llm = e2e.engine(ns, loaded, {}, max_model_len=max_len, max_num_batched_tokens=2048)
                prompts = prompts or make_prompts(llm)
                e2e.run(llm, prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), "none")
                fwd = llm.engine.runner.profile([(1, 1), (8, 8)])
                steps, toks, secs, outs = [], 0, 0.0, []
                for p in prompts:
                    r = e2e.run(llm, [p], params, "none")
                    dec = [st for st in r["step_log"] if not st[3]]
                    steps += [st[0] for st in dec]
                    toks += sum(st[2] for st in dec)
                    secs += sum(st[0] for st in dec)
                    outs.append(r["outputs"])
                batch = e2e.run(llm, prompts, params, "none")  # all prompts at once (8 for SmolLM2)
                tokens.setdefault(name, {})[variant] = outs
                rows.append(dict(model=name, round=rnd, variant=variant, fwd_b1_ms=fwd[(1, 1)] * 1e3,
                                 fwd_b8_ms=fwd[(8, 8)] * 1e3, step_b1_ms=statistics.median(steps) * 1e3,
                                 decode_b1_tok_s=toks / secs, batch_tok_s=batch["tok_s"]))
                print(em.markdown([rows[-1]], list(rows[-1])), flush=True)
                del llm
                torch.cuda.empty_cache()
        del loaded
        torch.cuda.empty_cache()
    for (mod, attr), value in defaults.items():
        setattr(mod, attr, value)
    first = next(iter(variants))
    same = {m: {v: sum(a == b for a, b in zip(t[v], t[first], strict=True)) for v in t} for m, t in tokens.items()}
    print(f"outputs equal to the {first} variant's (of 1 / 8 prompts):", same, flush=True)
    return dict(rows=rows, same_outputs=same)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("parts", nargs="+", choices=["shapes", "step", "kernels", "timeline", "fusion"])
    p.add_argument("--out", required=True)
    p.add_argument("--work", default="/tmp/bench_linear")
    p.add_argument("--smol", action="store_true", help="shapes: SmolLM2-135M's weights (and a config grid for them)")
    p.add_argument("--gguf", default=None, help="fusion: SmolLM2's GGUF instead of the 8B shape (both: --with-8b)")
    p.add_argument("--with-8b", action="store_true")
    p.add_argument("--attention-configs", help="fusion: a variant per decode attention config, e.g. r0w4f5s5")
    p.add_argument("--skinny-configs", help="fusion: a PDL variant per few-row matmul config for rows longer than "
                   "SHORT_K, as block_n/block_k/num_warps/num_stages[@NxK: [N, K] weights only]; comma-separated")
    p.add_argument("--variants", help="fusion: the variants to run, comma-separated (default: all)")
    p.add_argument("--mt-bench", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                      "mt_bench.jsonl"))
    args = p.parse_args()
    args.cache = {}
    os.makedirs(args.out, exist_ok=True)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}", flush=True)
    for part in args.parts:
        try:
            res = globals()[f"part_{part}"](args)
        except Exception:  # the other parts still run
            traceback.print_exc()
            continue
        with open(os.path.join(args.out, f"{part}.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
