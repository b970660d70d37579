"""Triton kernels against the torch reference, and the reference against brute-force dense attention.

Without CUDA the kernels run in Triton's CPU interpreter on small shapes (a covering subset of the matrix);
with CUDA the whole matrix runs, plus contexts to 32k. Every kernel output starts as NaN, and every cache
slot outside the sequences is NaN, so a row left unwritten or a masked key that gets read shows up. On one GPU
run the long-context cases with at most 2 xdist workers (-k long_contexts -n 2; on an H100 two group-8 references
ran out of memory at 4) and the rest with up to 8.
"""

import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must come before the process first imports triton

import dataclasses  # noqa: E402
import itertools  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import pytest  # noqa: E402
import triton.language as tl  # noqa: E402

from specserve.attention import AttentionMetadata, ancestor_masks  # noqa: E402
from specserve.kernels import kv_ops, reference, tree_attention, triton_backend  # noqa: E402

# Triton's own jit helpers (tl.zeros, ...) are defined when triton is imported: if another test imported it
# before TRITON_INTERPRET was set, no kernel can run on CPU in this process, and test_in_fresh_process
# runs this file again in a new one.
IN_PROCESS = CUDA or type(tl.zeros).__name__ == "InterpretedFunction"
DEVICE = torch.device("cuda" if CUDA else "cpu")
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
# small splits and a low prefill threshold let small CPU shapes reach every path; CUDA runs the defaults
CPU_SPLIT = 64  # the CPU's split (at least one key step)
DECODE_MAX_Q = tree_attention.DECODE_MAX_Q if CUDA else 72
# Decode launch configurations as overrides of the cache's decode_config; candidates are named as
# bench_attention.py --configs spells them. Warps change the MMA layouts, so a candidate must keep split == fused
# bit for bit before it can be adopted. The interpreter ignores warps and stages: on CPU the candidates run in
# the chain test only, to cover the plumbing, and "first" (a grid of two split sizes) in the long-context test too.
UNIFORM = dict(first_split=0, first_keys=0)
CONFIGS = {"default": {}, "w8f7s3": dict(num_warps=8, fused_stages=7, split_stages=3), "uniform": UNIFORM,
           "p128": dict(split=128, **UNIFORM), "first": dict(first_split=128, first_keys=1024)}
GPU_CONFIGS = list(CONFIGS) if CUDA else ["default"]
LONG_CONFIGS = ["default", "uniform", "first"] if CUDA else ["default", "first"]


@pytest.fixture(autouse=True)
def _kernels_can_run(request):
    """Skip in-process tests where this process cannot run the kernels (see IN_PROCESS)."""
    if not IN_PROCESS and request.function is not test_in_fresh_process:
        pytest.skip("triton was imported before TRITON_INTERPRET was set: test_in_fresh_process runs this")


@pytest.mark.skipif(IN_PROCESS, reason="the kernel tests run in this process")
def test_in_fresh_process():
    """Run this file in a new Python that sets TRITON_INTERPRET before anything imports triton."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:]


@dataclass
class Seq:
    ctx: int  # tokens cached before this step
    n: int = 1  # committed query tokens; the last one is the tree root
    parents: list[int] = field(default_factory=list)  # draft nodes 1..m: parents[j] is node j + 1's parent


@dataclass
class Batch:
    q: torch.Tensor  # [num_tokens, num_q_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim], NaN outside the sequences
    v_cache: torch.Tensor
    meta: AttentionMetadata


def random_tree(rng: random.Random, m: int) -> list[int]:
    """Parents of m draft nodes, each under a random earlier node."""
    return [rng.randrange(j + 1) for j in range(m)]


def make_batch(seqs, *, kv_heads=2, group=2, head_dim=64, block_size=16, dtype=torch.float32, seed=0) -> Batch:
    """Random queries and K/V for `seqs` over shuffled blocks of a NaN-poisoned pool."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    q_lens = [s.n + len(s.parents) for s in seqs]
    seq_lens = [s.ctx + ql for s, ql in zip(seqs, q_lens, strict=True)]
    num_blocks = [-(-sl // block_size) for sl in seq_lens]
    pool = list(range(sum(num_blocks) + 4))  # 4 blocks nobody owns
    rng.shuffle(pool)
    tables = torch.zeros(len(seqs), max(num_blocks), dtype=torch.int32)  # [B, max_blocks], padded with 0
    k_cache = torch.full((len(pool), block_size, kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    slots, masks = [], []
    for b, (s, sl, nb) in enumerate(zip(seqs, seq_lens, num_blocks, strict=True)):
        tables[b, :nb] = torch.tensor(pool[:nb])
        del pool[:nb]
        pos = torch.arange(sl)
        seq_slots = tables[b, pos // block_size].long() * block_size + pos % block_size  # [seq_len]
        k_cache.view(-1, kv_heads, head_dim)[seq_slots] = torch.randn(sl, kv_heads, head_dim, generator=gen).to(dtype)
        v_cache.view(-1, kv_heads, head_dim)[seq_slots] = torch.randn(sl, kv_heads, head_dim, generator=gen).to(dtype)
        slots.append(seq_slots[s.ctx :])
        masks += [0] * (s.n - 1) + ancestor_masks(s.parents)
    q = torch.randn(sum(q_lens), kv_heads * group, head_dim, generator=gen).to(dtype)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        context_lens=torch.tensor([s.ctx for s in seqs], dtype=torch.int32, device=DEVICE),
        block_tables=tables.to(DEVICE),
        slot_mapping=torch.cat(slots).to(DEVICE),
        tree_offsets=torch.tensor([s.n - 1 for s in seqs], dtype=torch.int32, device=DEVICE),
        tree_mask=torch.tensor(masks, dtype=torch.int64, device=DEVICE),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        block_size=block_size,
    )
    return Batch(q.to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE), meta)


def launch_config(dtype: torch.dtype, head_dim: int, config: str) -> tree_attention.DecodeConfig:
    """The cache's decode_config with config's overrides; on CPU with small splits (every path at small shapes)."""
    launch = dataclasses.replace(tree_attention.decode_config(dtype, head_dim), **CONFIGS[config])
    if CUDA:
        return launch
    step = launch.block_n
    if launch.first_keys:  # one-step splits, then two-step ones: [0, n), [n, 2n), [2n, 4n), ...
        return dataclasses.replace(launch, first_split=step, first_keys=2 * step, split=2 * step)
    return dataclasses.replace(launch, split=max(CPU_SPLIT, step))


def run_triton(batch: Batch, mode: str, scale: float, splits_per_program: int = 1, config: str = "default"):
    """Kernel output written over a NaN-filled buffer; `scale` has no default so that it matches the reference's."""
    out = torch.full_like(batch.q, float("nan"))
    launch = launch_config(batch.k_cache.dtype, batch.k_cache.shape[-1], config)
    tree_attention.tree_attention(batch.q, batch.k_cache, batch.v_cache, batch.meta, scale, out=out, mode=mode,
                                  splits_per_program=splits_per_program, decode_max_q=DECODE_MAX_Q, config=launch)
    return out


def same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bitwise equality: unlike torch.equal, -0 differs from +0."""
    ints = {4: torch.int32, 2: torch.int16}[x.element_size()]
    return x.dtype == y.dtype and torch.equal(x.view(ints), y.view(ints))


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error over max abs reference value."""
    return ((x.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def scenario(kind: str, rng: random.Random, scale: int) -> list[Seq]:
    """Sequences of one kind; `scale` multiplies context lengths (CPU 1, CUDA larger)."""
    ctx = lambda: rng.randrange(0, 150 * scale)  # noqa: E731
    prefill = DECODE_MAX_Q + rng.randrange(1, 40)  # long enough for the prefill launch
    if kind == "tree":
        sizes = [1, 5, 31, 32, 63]  # 63 drafts = 64 nodes: the sign bit of the int64 ancestor mask
        return [Seq(ctx(), 1, random_tree(rng, m)) for m in sizes]
    if kind == "chain":
        return [Seq(ctx(), 1, list(range(m))) for m in (0, 3, 15)] + [Seq(ctx(), 4, list(range(7)))]
    if kind == "prefill":
        return [Seq(0, prefill), Seq(ctx(), prefill), Seq(ctx(), 9)]
    return [Seq(ctx(), 1), Seq(ctx(), 3, random_tree(rng, 12)), Seq(ctx(), prefill), Seq(0, 2, [0, 0, 1, 1])]


KINDS = ["tree", "chain", "prefill", "mixed"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (kind, group, dtype, block_size, head_dim): on CPU a set that covers every value of every axis
# head_dim 16 (the tiny test models) and 80 (padded to 128) ride along in both
ODD_HEAD_DIMS = [("mixed", 2, torch.float32, 16, 16), ("tree", 2, torch.float16, 32, 80)]
CASES = ODD_HEAD_DIMS + (list(itertools.product(KINDS, [1, 2, 4], DTYPES, [16, 32], [64, 128])) if CUDA else [
    ("tree", 4, torch.float32, 16, 64),
    ("tree", 1, torch.bfloat16, 32, 128),
    ("chain", 2, torch.float16, 32, 64),
    ("prefill", 2, torch.float32, 32, 128),
    ("prefill", 4, torch.bfloat16, 16, 64),
    ("mixed", 1, torch.float16, 16, 128),
    ("mixed", 4, torch.float32, 32, 64),
])


@pytest.mark.parametrize("config", GPU_CONFIGS)
@pytest.mark.parametrize("kind,group,dtype,block_size,head_dim", CASES)
def test_attention_matches_reference(kind, group, dtype, block_size, head_dim, config):
    rng = random.Random(f"{kind}{group}{dtype}{block_size}{head_dim}")
    seqs = scenario(kind, rng, scale=20 if CUDA else 1)
    batch = make_batch(seqs, kv_heads=2, group=group, head_dim=head_dim, block_size=block_size, dtype=dtype,
                       seed=rng.randrange(1 << 30))
    ref = reference.paged_attention(batch.q, batch.k_cache, batch.v_cache, batch.meta, 0.125)
    # split programs walking runs of 2 splits: one closes inside its key loop, one at the end
    split = run_triton(batch, "split", 0.125, splits_per_program=2, config=config)
    fused = run_triton(batch, "fused", 0.125, config=config)
    assert not split.isnan().any() and not ref.isnan().any()
    assert rel_err(split, ref) < TOL[dtype]
    assert same_bits(split, fused)  # the two modes fold the same splits in the same order


def test_entry_point_runs_default_configuration():
    batch = make_batch([Seq(40, 1, [0, 0, 1]), Seq(7, 30)], dtype=torch.float32, seed=3)
    out = triton_backend.paged_attention(batch.q, batch.k_cache, batch.v_cache, batch.meta, 0.3)
    ref = reference.paged_attention(batch.q, batch.k_cache, batch.v_cache, batch.meta, 0.3)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chain_verify_equals_plain_decode_bitwise(dtype, config):
    """Verify rows of a chain equal plain decodes of the same tokens in other batches, bit for bit."""
    ctx, k = 2 * launch_config(dtype, 64, config).split - 3, 6  # the chain crosses a split boundary
    verify = make_batch([Seq(ctx, 1, list(range(k))), Seq(50, 1, [0, 0])], dtype=dtype, seed=5)
    verified = run_triton(verify, "split", 0.125, config=config)
    for j in range(k + 1):
        m = verify.meta
        # token j of the chain decoded alone after j committed drafts: same slots, q_len 1, batch of 1
        meta = AttentionMetadata(
            query_start_loc=torch.tensor([0, 1], dtype=torch.int32, device=DEVICE),
            seq_lens=torch.tensor([ctx + j + 1], dtype=torch.int32, device=DEVICE),
            context_lens=torch.tensor([ctx + j], dtype=torch.int32, device=DEVICE),
            block_tables=m.block_tables[:1], slot_mapping=m.slot_mapping[j : j + 1],
            tree_offsets=torch.zeros(1, dtype=torch.int32, device=DEVICE),
            tree_mask=torch.ones(1, dtype=torch.int64, device=DEVICE),
            max_query_len=1, max_seq_len=ctx + j + 1, block_size=m.block_size,
        )
        decode = Batch(verify.q[j : j + 1], verify.k_cache, verify.v_cache, meta)
        for mode in ("split", "fused"):
            assert same_bits(run_triton(decode, mode, 0.125, config=config)[0], verified[j]), (j, mode)


def brute_force(q, keys, values, seq: Seq, scale) -> torch.Tensor:
    """Dense float64 attention of one sequence with the mask built from its parents list."""
    q_len = seq.n + len(seq.parents)
    allowed = torch.zeros(q_len, seq.ctx + q_len, dtype=torch.bool)  # [q, keys]
    for i in range(q_len):
        if i < seq.n:  # committed tokens, root included: causal
            allowed[i, : seq.ctx + i + 1] = True
            continue
        allowed[i, : seq.ctx + seq.n] = True  # cached, committed and the root
        node = i - seq.n + 1
        while node > 0:  # walk up to the root: self and every ancestor
            allowed[i, seq.ctx + seq.n - 1 + node] = True
            node = seq.parents[node - 1]
    group = q.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, 1)  # [s, heads, d]
    v = values.double().repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def test_reference_matches_brute_force():
    seqs = [Seq(21, 1, [0, 0, 1, 2, 2, 0]), Seq(0, 5), Seq(13, 3, [0, 1, 2]), Seq(40, 2, [0, 0, 0])]
    batch = make_batch(seqs, kv_heads=2, group=3, head_dim=16, block_size=16, seed=11)
    ref = reference.paged_attention(batch.q, batch.k_cache, batch.v_cache, batch.meta, 0.25).cpu()
    m = batch.meta
    for b, s in enumerate(seqs):
        start, end, seq_len = int(m.query_start_loc[b]), int(m.query_start_loc[b + 1]), int(m.seq_lens[b])
        pos = torch.arange(seq_len, device=DEVICE)
        slots = m.block_tables[b, pos // m.block_size].long() * m.block_size + pos % m.block_size
        keys = batch.k_cache.view(-1, *batch.k_cache.shape[2:])[slots].cpu()
        values = batch.v_cache.view(-1, *batch.v_cache.shape[2:])[slots].cpu()
        dense = brute_force(batch.q[start:end].cpu(), keys, values, s, 0.25)
        assert rel_err(ref[start:end], dense) < 1e-5


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_write_kv_matches_reference(cache_dtype):
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(12, 3, 64, generator=gen).to(DEVICE)  # [tokens, kv_heads, head_dim], fp32 into any cache
    v = torch.randn(12, 3, 64, generator=gen).to(DEVICE)
    slots = torch.randperm(5 * 16, generator=gen)[:12].to(DEVICE)
    slots[[2, 7]] = -1  # padding tokens
    caches = [torch.full((5, 16, 3, 64), float("nan"), dtype=cache_dtype, device=DEVICE) for _ in range(4)]
    triton_backend.write_kv(k, v, caches[0], caches[1], slots)
    reference.write_kv(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0].nan_to_num(7.0), caches[2].nan_to_num(7.0))
    assert torch.equal(caches[1].nan_to_num(7.0), caches[3].nan_to_num(7.0))


@pytest.mark.parametrize("strip", [kv_ops.STRIP, 2])  # 2: more rows than a strip, the torch fallback
def test_copy_slots_matches_reference_with_overlaps(strip, monkeypatch):
    monkeypatch.setattr(kv_ops, "STRIP", strip)
    gen = torch.Generator().manual_seed(1)
    # 3 layers x (k, v) plus a drafter layer with other heads: two cache shapes, two launches
    shapes = [(6, 16, 2, 32)] * 6 + [(6, 16, 1, 64)] * 2
    caches = [torch.randn(shape, generator=gen).to(DEVICE) for shape in shapes]
    before, expected = caches[0].clone(), [c.clone() for c in caches]
    # accepted path root -> node 2 -> node 5 of a tree at slot 40: 42 -> 41 and 45 -> 42 (42 is read and
    # written); a second sequence's path at 70: 73 -> 71, 74 -> 72, 76 -> 73
    src = torch.tensor([42, 45, 73, 74, 76], device=DEVICE)
    dst = torch.tensor([41, 42, 71, 72, 73], device=DEVICE)
    triton_backend.copy_slots(caches, src, dst)
    reference.copy_slots(expected, src, dst)
    for got, want in zip(caches, expected, strict=True):
        assert torch.equal(got, want)
    rows, old = caches[0].view(-1, 2, 32), before.view(-1, 2, 32)
    assert torch.equal(rows[41], old[42]) and torch.equal(rows[42], old[45])  # sources read before writes


# CUDA: every dtype and group at 32k keys, and the small-head config (8k); CPU: the same sequences in units of its
# 64-key split (64 splits)
LONG_CASES = ([(dtype, group, 128) for dtype, group in itertools.product(DTYPES, [1, 4, 8])]
              + [(torch.bfloat16, 3, 64)] if CUDA else [(torch.float32, 1, 128)])


@pytest.mark.parametrize("config", LONG_CONFIGS)
@pytest.mark.parametrize("dtype,group,head_dim", LONG_CASES)
def test_long_contexts(dtype, group, head_dim, config):
    """64 splits of context, a chain and a 64-node tree at the end of it, a prefill chunk over 23 splits.

    On CUDA a unit is the config's split (512 keys at head dim 128: contexts 32704, 20000, 8191, 12000 and 513, a
    300-token chunk). Each call passes the reference's scale: this test once gave the kernel run_triton's old
    default (0.125) and the reference 1/sqrt(128), an error of 1.48 that the CPU never saw because the test was
    CUDA-only.
    """
    unit = launch_config(dtype, head_dim, config).split
    chunk, kv_heads = (300, 8) if CUDA else (DECODE_MAX_Q + 8, 1)
    rng = random.Random(f"long{dtype}{group}")
    seqs = [Seq(64 * unit - 64, 1, random_tree(rng, 63)), Seq(39 * unit + 32, 1, list(range(15))),
            Seq(16 * unit - 1, 1), Seq(23 * unit + 224, chunk), Seq(unit + 1, 1, random_tree(rng, 20))]
    batch = make_batch(seqs, kv_heads=kv_heads, group=group, head_dim=head_dim, block_size=16, dtype=dtype, seed=7)
    scale = head_dim**-0.5
    ref = reference.paged_attention(batch.q, batch.k_cache, batch.v_cache, batch.meta, scale)
    split, fused = run_triton(batch, "split", scale, config=config), run_triton(batch, "fused", scale, config=config)
    assert not split.isnan().any()
    assert rel_err(split, ref) < TOL[dtype]
    assert same_bits(split, fused)
    assert same_bits(split, run_triton(batch, "split", scale, splits_per_program=5, config=config))  # runs of 5
