"""Decode/verify attention on paged KV: Triton tree attention vs SDPA (and flex_attention) on gathered K/V.

    python benchmarks/bench_attention.py --out attention.json     # GPU sweep, < 2 min on an H200
    python benchmarks/bench_attention.py --quick --out /tmp/a.json  # tiny subset, CPU interpreter
    python benchmarks/bench_attention.py --baseline old_tree_attention.py --out a.json  # before/after, one run
    python benchmarks/bench_attention.py --configs w8f7s3,w4f5s5 --no-flex --out a.json  # 2 configs, ~1 min

--configs times our kernel in both modes under each decode launch configuration, spelled [r<FIRST_KEYS>q<FIRST_SPLIT>]
[p<SPLIT>][n<BLOCK_N>][m<BLOCK_M>]w<warps>f<fused-mode stages>s<split-mode stages> over the bf16 default of
DECODE_CONFIGS (w4f5s5, whose first 2048 keys are in 256-key splits, then 512-key ones; r1024q128w4f5s5 the first
1024 in 128-key splits; r0w4f5s5 a uniform grid; r0p128n32w4f5s5 is the engine's for head dims up to 64), and
reports the best per shape. Whatever the configs, the
run checks split == fused bit for bit on a few shapes (CHECK_SHAPES) for each, which a config needs before it can
be adopted, whether each computes the first config's bits (same numerics), and lists the registers and spilled
bytes per thread that Triton reports for each compiled kernel. The main table shows the first config.
--heads 9,3,64 times SmolLM2-135M's attention shape instead; --shapes 1,8/1,16/512 a subset of the sweep.

Sweep: batch {1, 8, 32, 64} x query tokens per sequence {1, 4, 8, 16, 64} (root + a random draft tree) x
cached context {512, 2048, 8192}; head_dim 128, 32 q heads over 8 kv heads, bf16, block size 16, blocks
shuffled over the pool. Bandwidth counts the K/V bytes of every sequence (context + query tokens) read once;
the ceiling is a device-to-device copy measured in the same run (bytes read + written over time).
SDPA and flex time includes gathering K/V out of the pages; their masks are built beforehand.

Timing, as the engine runs a step: one CUDA graph replays each implementation over L layers, every layer with
its own K/V pool (L sized so the pools total 256 MB or more: no layer finds its K/V in the 60 MB L2), and the
time is a replay's median over L calls. Eager times (triton's do_bench, L2 flushed) are listed too: they add
the host's launch cost, which graphs remove.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import random
import re
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module defines its kernels

import triton  # noqa: E402

from specserve.attention import AttentionMetadata, ancestor_masks  # noqa: E402
from specserve.kernels import reference, tree_attention  # noqa: E402

Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
BATCHES, QUERY_LENS, CONTEXTS = (1, 8, 32, 64), (1, 4, 8, 16, 64), (512, 2048, 8192)
FLEX_DEADLINE_S = 100  # stop starting flex compiles past this point of the run
MODES = ("split", "fused")
# (batch, query tokens, context) of the split == fused check: rows that see split 0 alone beside rows that
# cross into split 1 in one tile (ctx 500), split runs that close mid-loop, and the batch-64 fused shape
CHECK_SHAPES = [(1, 16, 500), (4, 64, 1000), (3, 4, 2047), (8, 8, 4000), (64, 16, 8192)]
ROTATE_BYTES = 256 << 20  # K/V pools of all graph layers together: several times the L2


def timed(fn, cuda: bool) -> float:
    """Median seconds of fn(): do_bench (L2 flushed between runs) on CUDA, two wall-clock runs elsewhere."""
    if cuda:
        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e-3
    fn()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def graph_timed(layer_fns: list, eager_s: float) -> float:
    """Median seconds per call of layer_fns[0..L) replayed back to back from one CUDA graph.

    The graph repeats the L calls until a replay takes about 2 ms (eager_s estimates a call), so the replay's
    own launch cost is noise; each call reads its own layer's pool, as a model's layers do.
    """
    for fn in layer_fns:  # compile and allocate outside the capture
        fn()
    repeats = max(1, round(2e-3 / (eager_s * len(layer_fns))))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            for fn in layer_fns:
                fn()
    graph.replay()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3 / (repeats * len(layer_fns)))
    del graph
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device: torch.device, cuda: bool) -> float:
    """Bytes/s of a large device-to-device copy, counting both the read and the write."""
    src = torch.empty(1 << (29 if cuda else 22), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / timed(lambda: dst.copy_(src), cuda)


def parse_config(spec: str) -> tree_attention.DecodeConfig:
    """A --configs entry, e.g. w4f5s5, n32w4f5s5, p128w4f5s5 (128-key splits) or r0w4f5s5 (no first region), over
    the bf16 default."""
    match = re.fullmatch(r"(?:r(\d+)(?:q(\d+))?)?(?:p(\d+))?(?:n(\d+))?(?:m(\d+))?w(\d+)f(\d+)s(\d+)", spec)
    if match is None:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected [r<FIRST_KEYS>q<FIRST_SPLIT>][p<SPLIT>][n<BLOCK_N>]"
                                         "[m<BLOCK_M>]w<warps>f<fused stages>s<split stages>")
    first_keys, first_split, split, block_n, block_m, warps, fused, split_stages = (
        None if g is None else int(g) for g in match.groups())
    default = tree_attention.DECODE_CONFIGS[torch.bfloat16]
    first = {} if first_keys is None else dict(first_keys=first_keys, first_split=first_split or 0)
    return dataclasses.replace(default, split=split or default.split, block_n=block_n or default.block_n,
                               block_m=block_m or default.block_m, num_warps=warps, fused_stages=fused,
                               split_stages=split_stages, **first)


def config_name(config: tree_attention.DecodeConfig) -> str:
    """The --configs spelling of config."""
    default = tree_attention.DECODE_CONFIGS[torch.bfloat16]
    region = (config.first_keys, config.first_split)
    first = "" if region == (default.first_keys, default.first_split) else f"r{config.first_keys}"
    first += f"q{config.first_split}" if first and config.first_keys else ""
    split = "" if config.split == default.split else f"p{config.split}"
    block_n = "" if config.block_n == default.block_n else f"n{config.block_n}"
    block_m = "" if config.block_m == default.block_m else f"m{config.block_m}"
    return f"{first}{split}{block_n}{block_m}w{config.num_warps}f{config.fused_stages}s{config.split_stages}"


def new_kernels(fn) -> list:
    """The tree-attention kernels that fn() compiles (none where it finds them compiled already); CUDA only."""
    caches = tree_attention._tree_attn_kernel.device_caches  # device -> (kernel cache, ...)
    seen = {id(k) for cache in caches.values() for k in cache[0].values()}
    fn()
    return [k for cache in caches.values() for k in cache[0].values() if id(k) not in seen]


def split_equals_fused(config, shapes, device) -> dict[str, bool]:
    """Per shape: split mode (planned runs, and runs of 3 splits) equals fused mode bit for bit under config."""
    equal = {}
    for batch, q_len, ctx in shapes:
        q, k_cache, v_cache, meta = make_case(batch, q_len, ctx, device, seed=ctx)
        outs = []
        for mode, per_program in (("fused", None), ("split", None), ("split", 3)):
            out = torch.full_like(q, float("nan"))
            tree_attention.tree_attention(q, k_cache, v_cache, meta, HEAD_DIM**-0.5, out=out, mode=mode,
                                          splits_per_program=per_program, config=config)
            outs.append(out)
        bits = [out.view(torch.int16) for out in outs]  # -0 differs from +0
        equal[f"{batch}x{q_len}x{ctx}"] = (not outs[0].isnan().any().item()
                                           and all(torch.equal(bits[0], b) for b in bits[1:]))
    return equal


def equals_first(configs: dict, shapes, device) -> dict[str, bool]:
    """Per config: on every shape its planned launch equals the first config's bit for bit (same numerics)."""
    equal = dict.fromkeys(configs, True)
    for batch, q_len, ctx in shapes:
        q, k_cache, v_cache, meta = make_case(batch, q_len, ctx, device, seed=ctx + 1)
        bits = {name: tree_attention.tree_attention(q, k_cache, v_cache, meta, HEAD_DIM**-0.5, config=c)
                .view(torch.int16) for name, c in configs.items()}
        first = next(iter(bits.values()))
        equal = {name: same and torch.equal(first, bits[name]) for name, same in equal.items()}
    return equal


def make_case(batch: int, q_len: int, ctx: int, device: torch.device, seed: int):
    """Queries, a paged bf16 pool with shuffled blocks, and metadata: every sequence = ctx + a q_len tree."""
    rng = random.Random(seed)
    parents = [rng.randrange(j + 1) for j in range(q_len - 1)]  # same random tree for every sequence
    seq_len = ctx + q_len
    blocks_per_seq = triton.cdiv(seq_len, BLOCK_SIZE)
    perm = torch.randperm(batch * blocks_per_seq, device=device).int()
    tables = perm.view(batch, blocks_per_seq)  # [B, blocks_per_seq]
    shape = (batch * blocks_per_seq, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, dtype=torch.bfloat16, device=device)
    v_cache = torch.randn(shape, dtype=torch.bfloat16, device=device)
    q = torch.randn(batch * q_len, Q_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=device)
    i32 = dict(dtype=torch.int32, device=device)
    pos = torch.arange(ctx, seq_len, device=device)
    meta = AttentionMetadata(
        query_start_loc=torch.arange(0, batch * q_len + 1, q_len, **i32),
        seq_lens=torch.full((batch,), seq_len, **i32),
        context_lens=torch.full((batch,), ctx, **i32),
        block_tables=tables,
        slot_mapping=(tables[:, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE).flatten(),
        tree_offsets=torch.zeros(batch, **i32),
        tree_mask=torch.tensor(ancestor_masks(parents) * batch, dtype=torch.int64, device=device),
        max_query_len=q_len,
        max_seq_len=seq_len,
        block_size=BLOCK_SIZE,
    )
    return q, k_cache, v_cache, meta


def gathered(q, k_cache, v_cache, meta, batch, q_len):
    """The SDPA layout: q [B, Hq, q_len, D], K/V [B, Hkv, seq_len, D] gathered out of the pages."""
    k = k_cache[meta.block_tables.long()].flatten(1, 2)[:, : meta.max_seq_len].transpose(1, 2)
    v = v_cache[meta.block_tables.long()].flatten(1, 2)[:, : meta.max_seq_len].transpose(1, 2)
    return q.view(batch, q_len, Q_HEADS, HEAD_DIM).transpose(1, 2), k, v


def run_case(batch, q_len, ctx, device, cuda, copy_bw, flex, started, baseline, configs, compiled) -> dict:
    """Time every implementation on one shape (ours under each of configs); check the kernel against SDPA.

    compiled collects (registers, spilled bytes) per thread of the kernels each (config, mode) compiles.
    """
    q, k_cache, v_cache, meta = make_case(batch, q_len, ctx, device, seed=batch * 1000 + q_len)
    scale = HEAD_DIM**-0.5
    mask = torch.stack([reference.visible_mask(meta, b) for b in range(batch)])[:, None]  # [B, 1, q, seq]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    kv_bytes = batch * meta.max_seq_len * KV_HEADS * HEAD_DIM * 2 * k_cache.element_size()
    # one pool per graph layer; layer 0 is the pool the checks below read
    pools = [(k_cache, v_cache)] + [(torch.randn_like(k_cache), torch.randn_like(v_cache))
                                    for _ in range(min(-(-ROTATE_BYTES // kv_bytes), 128) - 1 if cuda else 0)]

    def layers(fn):
        return [lambda k=k, v=v: fn(k, v) for k, v in pools]

    def run_sdpa(k_cache, v_cache):
        qb, k, v = gathered(q, k_cache, v_cache, meta, batch, q_len)
        return sdpa(qb, k, v, attn_mask=mask, scale=scale, enable_gqa=True)

    def time_layers(fn) -> tuple[float, float]:
        """(graph, eager) microseconds of fn(k_cache, v_cache); eager only off CUDA."""
        eager = timed(lambda: fn(k_cache, v_cache), cuda)
        return (graph_timed(layers(fn), eager) if cuda else eager) * 1e6, eager * 1e6

    row = dict(batch=batch, q_len=q_len, ctx=ctx, configs={})
    for name, config in configs.items():
        times = row["configs"][name] = {}
        tiles = triton.cdiv(q_len, max(config.block_m // triton.next_power_of_2(Q_HEADS // KV_HEADS), 1))
        times["mode"], *_ = tree_attention.decode_plan(tiles * batch * KV_HEADS, meta.max_seq_len, config, device)
        for m in MODES:
            def fn(k, v, m=m, config=config):
                return tree_attention.tree_attention(q, k, v, meta, scale, mode=m, config=config)

            if cuda:
                for kernel in new_kernels(lambda fn=fn: fn(k_cache, v_cache)):
                    regs, spills = compiled.setdefault(name, {}).get(m, (0, 0))
                    compiled[name][m] = max(regs, kernel.n_regs), max(spills, kernel.n_spills)
            times[f"{m}_us"], times[f"{m}_eager_us"] = time_layers(fn)
        times["planned_us"] = times[f"{times['mode']}_us"]
    first = next(iter(configs))
    row["mode"] = row["configs"][first]["mode"]
    for key in ("split_us", "split_eager_us", "fused_us", "fused_eager_us"):
        row[key] = row["configs"][first][key]
    row["ours_us"], row["ours_eager_us"] = row[f"{row['mode']}_us"], row[f"{row['mode']}_eager_us"]
    row["best_config"] = min(configs, key=lambda n: row["configs"][n]["planned_us"])  # each in its planned mode
    row["best_any"] = min(((n, m) for n in configs for m in MODES), key=lambda nm: row["configs"][nm[0]][f"{nm[1]}_us"])
    row["before_us"] = None
    if baseline is not None:
        row["before_us"], _ = time_layers(lambda k, v: baseline.tree_attention(q, k, v, meta, scale))
    row["GBps"] = kv_bytes / row["ours_us"] * 1e-3
    row["copy_frac"] = row["GBps"] * 1e9 / copy_bw
    expected = run_sdpa(k_cache, v_cache).transpose(1, 2).flatten(0, 1)  # [B * q_len, Hq, D]
    ours = tree_attention.tree_attention(q, k_cache, v_cache, meta, scale, mode=row["mode"], config=configs[first])
    row["max_err"] = (ours.float() - expected.float()).abs().max().item()
    row["sdpa_us"], row["sdpa_eager_us"] = time_layers(run_sdpa)
    row["flex_us"] = None
    flex_shape = not cuda or (q_len in (1, 16) and ctx == 2048)  # it compiles per shape: a subset only
    if flex is not None and flex_shape and time.perf_counter() - started < FLEX_DEADLINE_S:
        flex_attention, create_block_mask = flex
        vis = mask[:, 0]  # [B, q, seq]
        block_mask = create_block_mask(lambda b, h, qi, ki: vis[b, qi, ki], batch, None, q_len,
                                       meta.max_seq_len, device=device)

        def run_flex(k_cache, v_cache):
            qb, k, v = gathered(q, k_cache, v_cache, meta, batch, q_len)
            return flex_attention(qb, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)

        try:
            row["flex_us"], _ = time_layers(run_flex)
        except Exception as exc:  # flex is an optional comparison: report and go on
            print(f"flex_attention failed on {row}: {exc!r}"[:300], file=sys.stderr)
    return row


def load_flex(cuda: bool):
    """(compiled flex_attention, create_block_mask), or None where flex_attention does not import."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    torch._dynamo.config.cache_size_limit = 64  # one compile per shape and mask
    return (torch.compile(flex_attention) if cuda else flex_attention), create_block_mask


def markdown(rows: list[dict]) -> str:
    """The sweep as a markdown table, then the verify-16 / decode-1 cost ratios."""
    fmt = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
    lines = ["| batch | q/seq | ctx | mode | ours us | split us | fused us | before us | GB/s | % copy BW | SDPA us"
             " | flex us | SDPA/ours | ours eager us | SDPA eager us | max err |", "|" + "---|" * 16]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['q_len']} | {r['ctx']} | {r['mode']} | {fmt(r['ours_us'])} | {fmt(r['split_us'])}"
            f" | {fmt(r['fused_us'])} | {fmt(r['before_us'])} | {r['GBps']:.0f} | {100 * r['copy_frac']:.0f}"
            f" | {fmt(r['sdpa_us'])} | {fmt(r['flex_us'])} | {r['sdpa_us'] / r['ours_us']:.2f}"
            f" | {fmt(r['ours_eager_us'])} | {fmt(r['sdpa_eager_us'])} | {r['max_err']:.3g} |"
        )
    by_shape = {(r["batch"], r["ctx"], r["q_len"]): r["ours_us"] for r in rows}
    lines += ["", "| batch | ctx | verify 16 / decode 1 |", "|---|---|---|"]
    for (b, c, ql), us in by_shape.items():
        if ql == 16 and (b, c, 1) in by_shape:
            lines.append(f"| {b} | {c} | {us / by_shape[(b, c, 1)]:.2f} |")
    return "\n".join(lines)


def config_markdown(rows: list[dict], bitwise: dict, same_numerics: dict, compiled: dict) -> str:
    """Per config: the split == fused check, spills, speed against the first; with several, per shape the best."""
    names = list(bitwise)
    lines = ["| config | split == fused bitwise | = first config bitwise | split regs / spill B | fused regs / spill B"
             f" | planned-mode time / {names[0]}'s (geomean) | best at |", "|---|---|---|---|---|---|---|"]
    for n in names:
        failed = [shape for shape, ok in bitwise[n].items() if not ok]
        check = f"{len(bitwise[n]) - len(failed)}/{len(bitwise[n])} shapes" + (f", fails {failed}" if failed else "")
        regs = " | ".join("/".join(map(str, compiled.get(n, {}).get(m, ("-", "-")))) for m in MODES)
        ratios = [r["configs"][n]["planned_us"] / r["configs"][names[0]]["planned_us"] for r in rows]
        geomean = math.exp(sum(map(math.log, ratios)) / len(ratios))
        wins = sum(r["best_config"] == n for r in rows)
        lines.append(f"| {n} | {check} | {same_numerics[n]} | {regs} | {geomean:.3f} | {wins}/{len(rows)} shapes |")
    if len(names) == 1:
        return "\n".join(lines)
    lines += ["", "| batch | q/seq | ctx | " + " | ".join(f"{n} mode | {n} split us | {n} fused us" for n in names)
              + " | best (planned mode) | best (any mode) |", "|" + "---|" * (5 + 3 * len(names))]
    for r in rows:
        times = " | ".join(f"{r['configs'][n]['mode']} | {r['configs'][n]['split_us']:.1f} | "
                           f"{r['configs'][n]['fused_us']:.1f}" for n in names)
        any_name, any_mode = r["best_any"]
        lines.append(f"| {r['batch']} | {r['q_len']} | {r['ctx']} | {times} | {r['best_config']}"
                     f" | {any_name} {any_mode} |")
    return "\n".join(lines)


def main() -> None:
    """Run the sweep, print the table, write the JSON."""
    global Q_HEADS, KV_HEADS, HEAD_DIM
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON results path")
    parser.add_argument("--quick", action="store_true", help="tiny subset (runs on CPU under the interpreter)")
    parser.add_argument("--no-flex", action="store_true", help="skip flex_attention")
    parser.add_argument("--baseline", help="another tree_attention.py to time beside this one (before us)")
    parser.add_argument("--configs", type=lambda text: [parse_config(c) for c in text.split(",")],
                        help="decode launch configs to time side by side, e.g. w8f7s3,w4f5s5 (see above); default:"
                        " the engine's for the --heads head dim")
    parser.add_argument("--heads", default="32,8,128",
                        help="q heads, kv heads, head dim (SmolLM2-135M: 9,3,64)")
    parser.add_argument("--shapes", help="batches/query lens/contexts to time, e.g. 1,8/1,4,16/512,2048")
    args = parser.parse_args()
    Q_HEADS, KV_HEADS, HEAD_DIM = map(int, args.heads.split(","))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    started = time.perf_counter()
    copy_bw = copy_bandwidth(device, cuda)
    flex = None if args.no_flex else load_flex(cuda)
    baseline = None
    if args.baseline:
        spec = importlib.util.spec_from_file_location("baseline_tree_attention", args.baseline)
        baseline = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = baseline  # its dataclasses look their module up there
        spec.loader.exec_module(baseline)
    configs = {config_name(c): c for c in args.configs or [tree_attention.decode_config(torch.bfloat16, HEAD_DIM)]}
    batches, query_lens, contexts = BATCHES, QUERY_LENS, CONTEXTS
    if args.shapes:
        batches, query_lens, contexts = ([int(n) for n in part.split(",")] for part in args.shapes.split("/"))
    shapes = [(b, ql, c) for c in contexts for b in batches for ql in query_lens]
    check_shapes = CHECK_SHAPES
    if args.quick:
        shapes, check_shapes = [(1, 1, 64), (1, 16, 64), (2, 4, 100)], [(1, 16, 500)]
    bitwise = {n: split_equals_fused(c, check_shapes, device) for n, c in configs.items()}
    same_numerics = equals_first(configs, check_shapes + [(b, 1, 700) for b in (1, 3)], device)
    print(f"split == fused bitwise: {bitwise}; equal to the first config: {same_numerics}", file=sys.stderr,
          flush=True)
    rows, compiled = [], {}
    for batch, q_len, ctx in shapes:
        rows.append(run_case(batch, q_len, ctx, device, cuda, copy_bw, flex, started, baseline, configs, compiled))
        print(f"{batch=} {q_len=} {ctx=}: {rows[-1]['ours_us']:.1f} us", file=sys.stderr, flush=True)
    name = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)"
    print(f"# Tree attention on {name}; copy bandwidth {copy_bw * 1e-9:.0f} GB/s; ours: {next(iter(configs))}\n")
    print(markdown(rows))
    print("\n" + config_markdown(rows, bitwise, same_numerics, compiled))
    with open(args.out, "w") as f:
        json.dump(dict(device=name, copy_GBps=copy_bw * 1e-9, seconds=time.perf_counter() - started,
                       configs={n: dataclasses.asdict(c) for n, c in configs.items()}, bitwise=bitwise,
                       same_numerics=same_numerics, heads=args.heads,
                       compiled=compiled, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
