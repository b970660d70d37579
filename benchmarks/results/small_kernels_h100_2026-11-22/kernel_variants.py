"""Diagnostic: time edited copies of kernels/tree_attention.py at small-batch decode shapes (not for the repo)."""
import importlib.util
import json
import os
import sys

import torch

sys.path.insert(0, "benchmarks")
import bench_attention as ba

from specserve.kernels import tree_attention as ta

SRC = open("kernels/tree_attention.py").read()
HOIST_OLD = """    q_start = tl.load(query_start_loc + b)
    q_len = tl.load(query_start_loc + b + 1) - q_start
    t0 = tile * BLOCK_Q
    if (q_len < q_min) | (q_len > q_max) | (t0 >= q_len):  # another launch's sequence, or past its query
        return
    ctx = tl.load(context_lens + b)
    tree_base = ctx + tl.load(tree_offsets + b)  # sequence position of the root
    kv_end = tl.minimum(tl.load(seq_lens + b), ctx + tl.minimum(t0 + BLOCK_Q, q_len))  # past every row's limit
"""
HOIST_NEW = """    q_start = tl.load(query_start_loc + b)
    q_end = tl.load(query_start_loc + b + 1)
    ctx = tl.load(context_lens + b)
    tree_off = tl.load(tree_offsets + b)
    seq_len_b = tl.load(seq_lens + b)
    q_len = q_end - q_start
    t0 = tile * BLOCK_Q
    if (q_len < q_min) | (q_len > q_max) | (t0 >= q_len):  # another launch's sequence, or past its query
        return
    tree_base = ctx + tree_off
    kv_end = tl.minimum(seq_len_b, ctx + tl.minimum(t0 + BLOCK_Q, q_len))  # past every row's limit
"""
assert HOIST_OLD in SRC
EDITS = {
    "base": [],
    "hoist": [(HOIST_OLD, HOIST_NEW)],
    "maskall": [("        if start + BLOCK_N > open_end:\n", "        if True:\n")],
    "nosplitif": [("            if (start % SPLIT == 0) & (start > lo):\n", "            if False:\n")],
    "hoist_maskall_nosplitif": [(HOIST_OLD, HOIST_NEW),
                                ("        if start + BLOCK_N > open_end:\n", "        if True:\n"),
                                ("            if (start % SPLIT == 0) & (start > lo):\n", "            if False:\n")],
}
mods = {}
os.makedirs("/tmp/variants", exist_ok=True)
for name, edits in EDITS.items():
    src = SRC
    for old, new in edits:
        assert old in src, (name, old)
        src = src.replace(old, new)
    path = f"/tmp/variants/ta_{name}.py"
    open(path, "w").write(src)
    spec = importlib.util.spec_from_file_location(f"ta_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    mods[name] = mod

dev = torch.device("cuda")
out = {}
cfgs = {"f5": None, "f3": dict(fused_stages=3, split_stages=3), "f2": dict(fused_stages=2, split_stages=2),
        "f7": dict(fused_stages=7, split_stages=7)}
for heads in ("9,3,64", "32,8,128"):
    ba.Q_HEADS, ba.KV_HEADS, ba.HEAD_DIM = map(int, heads.split(","))
    shapes = [(1, 1, 512), (1, 1, 2048), (1, 16, 512), (8, 1, 512), (8, 1, 2048), (8, 16, 2048), (32, 1, 2048)]
    for batch, q_len, ctx in shapes:
        q, k, v, meta = ba.make_case(batch, q_len, ctx, dev, seed=1)
        kv_bytes = batch * meta.max_seq_len * ba.KV_HEADS * ba.HEAD_DIM * 4
        layers = min(-(-ba.ROTATE_BYTES // kv_bytes), 128)
        pools = [(k, v)] + [(torch.randn_like(k), torch.randn_like(v)) for _ in range(layers - 1)]
        ref = ta.tree_attention(q, k, v, meta, ba.HEAD_DIM**-0.5)
        row = {}
        for name, mod in mods.items():
            for cname, over in cfgs.items():
                if cname != "f5" and name not in ("base", "hoist"):
                    continue
                config = ta.DECODE_CONFIGS[torch.bfloat16]
                import dataclasses
                config = mod.DecodeConfig(**dataclasses.asdict(config))
                if over:
                    config = dataclasses.replace(config, **over)
                def fn(kk, vv, mod=mod, config=config, q=q, meta=meta):
                    return mod.tree_attention(q, kk, vv, meta, ba.HEAD_DIM**-0.5, config=config)
                o = fn(k, v)
                same = torch.equal(o.view(torch.int16), ref.view(torch.int16))
                eager = ba.timed(lambda fn=fn, k=k, v=v: fn(k, v), True)
                us = ba.graph_timed([lambda kk=kk, vv=vv, fn=fn: fn(kk, vv) for kk, vv in pools], eager) * 1e6
                row[f"{name}/{cname}"] = (round(us, 1), same)
        cells = " ".join(f"{n}={t}{'' if s else '!'}" for n, (t, s) in row.items())
        line = f"{heads} b{batch} q{q_len} ctx{ctx}: {cells}"
        print(line, flush=True)
        out[f"{heads} {batch} {q_len} {ctx}"] = row
# PTX facts of the base and hoist kernels
for name, mod in mods.items():
    for cache in mod._tree_attn_kernel.device_caches.values():
        for kern in cache[0].values():
            ptx = kern.asm.get("ptx", "")
            print(name, "n_regs", kern.n_regs, "spills", kern.n_spills,
                  "cp.async", ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
                  "wait_group", ptx.count("cp.async.wait_group"), "wgmma", ptx.count("wgmma.mma_async"),
                  "mma.sync", ptx.count("mma.sync"), "ld.global", ptx.count("ld.global"))
json.dump(out, open(os.environ.get("OUT", "/tmp") + "/variants.json", "w"), indent=1)
for cache in mods["base"]._tree_attn_kernel.device_caches.values():
    for i, kern in enumerate(cache[0].values()):
        open(os.environ.get("OUT", "/tmp") + f"/base_{i}.ptx", "w").write(kern.asm["ptx"])
        open(os.environ.get("OUT", "/tmp") + f"/base_{i}.ttgir", "w").write(kern.asm.get("ttgir", ""))
