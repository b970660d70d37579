"""Triton tree attention over paged KV: one entry point for decode, tree verification and prefill chunks.

Work split
    A program owns one (tile of query rows, sequence, kv head) and a run of keys. A row is a (query token, q head
    of the kv head's group) pair, so the GROUP q heads that share a kv head read each K/V block once: verifying
    16 tokens with GQA 4 is one 64-row tile, the same K/V traffic as decoding one token.
    Keys are cut into splits at absolute positions: the first FIRST_KEYS keys into splits of FIRST_SPLIT (short
    splits give a small batch more programs), the rest into splits of SPLIT (fewer folds). Each split
    runs a fresh online softmax (fp32, log2 domain) and yields (o_s, lse_s); splits are folded left to right:
        M' = max(M, lse_s);  num = num * 2^(M - M') + 2^(lse_s - M') * o_s;  den likewise with 1 for o_s.
    "split" mode gives each program a run of whole splits (decode_plan), writes every split's (o_s, lse_s) to
    a workspace and folds them in a second kernel (parallelism for small batches); "fused" mode walks all
    splits in one program and folds at each boundary in registers (no workspace, for batches that fill the
    GPU). Either way a split closes inside the one pipelined key loop, and both modes do the same operations in
    the same order (FMA contraction off), so the per-launch choice, taken from the batch shape, does not change
    a bit. Split mode finishes the rows that see split 0 alone in its first kernel, with the same fold from the
    empty state, and carries no fold state through its key loop (registers). Queries longer than `decode_max_q`
    (prefill chunks) go to a second launch ("whole" mode): 128-row tiles, one softmax over all keys. Which
    launch takes a sequence depends on its own query length only.

Speed (H200 tables in benchmarks/RESULTS.md)
    Decode streams K/V, yet on the H200 this loop behaves as bound by instruction issue more than by memory:
    deeper K/V pipelines barely moved it, fewer instructions per key block did (a 64-row tile does the softmax
    of 64 rows even when a decode fills 4 of them). So blocks that every row of the tile sees skip the mask,
    and fused mode pipelines deeper (DECODE_CONFIGS).

Batch invariance (architecture.md, "Numerics")
    A row's result depends only on its visible keys and their slots: the split grid is absolute, keys it
    cannot see add exact zeros (p = 0 with alpha = 1), splits it cannot see fold in as exact no-ops, and no
    split count depends on the query length or the batch. So a verify root equals the plain decode of that
    token bit for bit, and so does every node of a chain (its ancestors already sit in the slots they keep
    once committed). A branching tree's accepted path is compacted after verification, so its rows add the
    same terms in another order: equal up to rounding, not bitwise.

Masking, worked example: 100 cached tokens, query [c0 | r d1 d2 d3], tree_offsets = 1, parents [0, 0, 1]
    keys 0..99 are cached, c0 is key 100, the root r key 101 = tree_base (context_len + tree_offset),
    d1 key 102, d2 key 103, d3 key 104; tree_mask: c0 0, r 0b1, d1 0b11, d2 0b101, d3 0b1011.
    Row d3 (query index 4): causal limit 100 + 4 = 104; keys below tree_base are visible; key 101 + n is
    visible iff bit n of 0b1011 is set: r (n=0) yes, d1 (1) yes, d2 (2) no, d3 itself (3) yes.
    Row c0 (index 0) sees keys 0..100 by the causal limit alone; its mask is 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from specserve.attention import AttentionMetadata
from specserve.kernels import num_sms, pdl

DECODE_MAX_Q = 128  # longer queries are prefill chunks: the big-tile fused launch takes them
LOG2E = 1.4426950408889634


def _cover(num_keys: int, first_keys: int, first_len: int, rest_len: int) -> int:
    """Pieces that cover keys [0, num_keys): first_len keys each among the first first_keys (which they divide),
    rest_len keys each past them. Splits of a grid, and split-mode runs, are such pieces."""
    return triton.cdiv(min(num_keys, first_keys), first_len) + triton.cdiv(max(num_keys - first_keys, 0), rest_len)


@dataclass(frozen=True)
class DecodeConfig:
    """Decode/verify launch. split, block_n and num_warps belong to the numerics, so both modes share them; stages
    do not."""

    split: int  # keys per split past first_keys: the absolute split grid, one per cache (see "Batch invariance")
    block_n: int  # keys per loop step: where the online softmax rescales
    block_m: int  # rows per tile (query tokens x padded group): sets the MMA instruction, so the sums' rounding
    num_warps: int  # sets the MMA layouts, so the order of each row's sums
    fused_stages: int  # pipeline depth per mode, speed only
    split_stages: int
    first_split: int = 0  # keys per split among the first first_keys keys (0: no such region)
    first_keys: int = 0

    def __post_init__(self):
        assert self.split % self.block_n == 0, "splits start on key-block boundaries"
        assert self.first_keys == 0 or self.first_split % self.block_n == self.first_keys % self.first_split == 0
        assert self.first_keys % self.split == 0, "long sequences run the first region in runs of whole long splits"

    @property
    def grid(self) -> tuple[int, int, int]:
        """(SPLIT, FIRST_SPLIT, FIRST_KEYS) as the kernels take them: a uniform grid is all SPLIT."""
        return self.split, self.first_split or self.split, self.first_keys

    def num_splits(self, keys: int) -> int:
        """Splits that cover keys [0, keys)."""
        split, first_split, first_keys = self.grid
        return _cover(keys, first_keys, first_split, split)


# Per cache dtype and head size, never per batch (see "Batch invariance"). Stages: the K/V copies of a key block
# depend on a block-table load; for that chain Triton (3.6) keeps (stages + 1) / 2 K/V buffers, so at 3 stages a
# block's copies start only after the previous block's dots, and at 7 three blocks are in flight behind the one
# being multiplied. Head dims over 128 take 3 stages: deeper buffers would not fit in shared memory. Candidates are
# timed with `bench_attention.py --configs`, and one that changes warps or block_n is adoptable only once the
# split == fused tests (parametrized over tests/test_kernels.py CONFIGS) pass with it on the GPU.
# bf16/fp16 at 4 warps and 5 stages: 0.77x the time of 8 warps / 7 + 3 stages over the bench's 60 shapes on an
# H200, 73-83% of copy bandwidth at batch >= 32 and context >= 2048 (RESULTS.md); fp32 keeps 8 warps (untimed).
# The first 2048 keys in 256-key splits: at batch 1 a 512-key context then has 24 programs, not 8, and takes 15.3
# against 22.7 us on an H100 (16.5 against 24.1 at 2048 keys, both now faster than SDPA); batches that fill the GPU
# run fused within 0-4% of the uniform grid (RESULTS.md, eleventh session).
DECODE_CONFIGS = {
    torch.float32: DecodeConfig(split=512, block_n=32, block_m=64, num_warps=8, fused_stages=7, split_stages=3),
    **{dtype: DecodeConfig(split=512, block_n=64, block_m=64, num_warps=4, fused_stages=5, split_stages=5,
                           first_split=256, first_keys=2048) for dtype in (torch.float16, torch.bfloat16)},
}
# Head dims up to 64 (SmolLM2-135M: 9 q over 3 kv heads) in 128-key splits of 32-key steps: at small batches a
# program's key loop is a chain of round trips (0.7-0.9 us a step on an H100), so shorter splits give a sequence more
# programs with shorter chains. H100, `bench_attention.py --heads 9,3,64`: 8.0 / 9.0 / 10.2 us at batch 1 and 256 /
# 512 / 1024 keys against 10.1 / 10.3 / 10.8 for 256-key splits of 64-key steps (the ninth session's, which beat 512-
# key splits by 4 us); batch 32 0-18% slower. Engine A/B (`bench_linear.py fusion --gguf`, SmolLM2 plain decode of 8
# MT-bench turns): forward 0.82 against 0.87 ms, 1,080 against 1,040 tok/s at batch 1, 7,600 against 7,270 at 8.
SMALL_HEAD_DIM = 64
SMALL_HEAD_CONFIGS = {
    dtype: DecodeConfig(split=128, block_n=32, block_m=64, num_warps=4, fused_stages=5, split_stages=5)
    for dtype in (torch.float16, torch.bfloat16)
}


def decode_config(dtype: torch.dtype, head_dim: int) -> DecodeConfig:
    """The decode/verify launch config of a KV cache: it fixes the numerics, so it follows the model only."""
    if head_dim <= SMALL_HEAD_DIM and dtype in SMALL_HEAD_CONFIGS:
        return SMALL_HEAD_CONFIGS[dtype]
    return DECODE_CONFIGS[dtype]


FUSED_TILES_PER_SM = 0.75  # fused once the row tiles nearly fill the SMs: no workspace and no second kernel
FOLD_BATCH = 16  # splits whose workspace rows the fold kernel loads at once
SPLIT_PROGRAMS_PER_SM = 4  # split mode groups splits into runs so that about this many programs per SM remain


@triton.jit
def _normalize(m, l_sum, acc):
    """(o, lse) of one split's softmax state; a row that saw no key gets o = 0, lse = -inf."""
    l_ok = l_sum > 0
    l_safe = tl.where(l_ok, l_sum, 1.0)
    return acc / l_safe[:, None], tl.where(l_ok, m + tl.log2(l_safe), float("-inf"))


@triton.jit
def _fold(mx, den, num, lse, o):
    """Fold one split (lse [R], o [R, D] as the workspace holds it) into the running (max, denominator, numerator)."""
    m_new = tl.maximum(mx, lse)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    a = tl.exp2(mx - m_safe)
    w = tl.exp2(lse - m_safe)
    return m_new, den * a + w, num * a[:, None] + w[:, None] * o.to(tl.float32)


@triton.jit
def _finish(num, den):
    """Folded output; pad rows (den = 0) give 0 instead of 0/0."""
    return num / tl.where(den > 0, den, 1.0)[:, None]


@triton.jit
def _row_ptrs(base, row, head, stride_t, stride_h, HEAD_DIM_P: tl.constexpr):
    """[R, HEAD_DIM_P] pointers to (token row, head) rows of a [tokens, heads, head_dim] tensor."""
    return base + row[:, None] * stride_t + head[:, None] * stride_h + tl.arange(0, HEAD_DIM_P)[None, :]


@triton.jit
def _split_start(s, SPLIT: tl.constexpr, FIRST_SPLIT: tl.constexpr, FIRST_KEYS: tl.constexpr):
    """First key of split s of the grid (DecodeConfig.grid)."""
    first_splits: tl.constexpr = FIRST_KEYS // FIRST_SPLIT
    return tl.where(s < first_splits, s * FIRST_SPLIT, FIRST_KEYS + (s - first_splits) * SPLIT)


@triton.jit
def _opens_split(key, SPLIT: tl.constexpr, FIRST_SPLIT: tl.constexpr, FIRST_KEYS: tl.constexpr):
    """Whether key is the first key of its split: _split_start(_split_of(key)) == key."""
    return tl.where(key < FIRST_KEYS, key % FIRST_SPLIT == 0, (key - FIRST_KEYS) % SPLIT == 0)


@triton.jit
def _split_of(key, SPLIT: tl.constexpr, FIRST_SPLIT: tl.constexpr, FIRST_KEYS: tl.constexpr):
    """The split holding key (>= 0)."""
    return tl.where(key < FIRST_KEYS, key // FIRST_SPLIT, FIRST_KEYS // FIRST_SPLIT + (key - FIRST_KEYS) // SPLIT)


@triton.jit
def _close_split(m, l_sum, acc, ws_o):
    """(o, lse) of the split that just ended, o in the workspace dtype: both modes apply that rounding."""
    o, lse = _normalize(m, l_sum, acc)
    return o.to(ws_o.dtype.element_ty), lse


@triton.jit
def _store_split(
    o, lse, s, row_lim, ws_o, ws_lse, ws_row, out_ptr, out_row, head, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, SPLIT: tl.constexpr, FIRST_SPLIT: tl.constexpr,
    FIRST_KEYS: tl.constexpr,
):
    """Split mode: hand split s of a row tile to the fold kernel; rows that see split 0 only are final here."""
    # the fold kernel takes splits 0.._split_of(row_lim) of rows past split 0 (which is FIRST_SPLIT keys)
    todo = (row_lim >= FIRST_SPLIT) & (row_lim >= _split_start(s, SPLIT, FIRST_SPLIT, FIRST_KEYS))
    d = tl.arange(0, HEAD_DIM_P)
    tl.store(ws_lse + ws_row + s, lse, mask=todo)
    tl.store(ws_o + (ws_row + s)[:, None] * HEAD_DIM_P + d[None, :], o, mask=todo[:, None])
    if s == 0:
        # the fold of split 0 into the empty state, as fused mode computes it (these rows' later splits fold in
        # there as exact no-ops); storing o itself would differ in the sign of zero (0 + -0 is +0) and would
        # count on Triton's approximate fp32 divide being exact by 1
        _, den, num = _fold(tl.full(lse.shape, float("-inf"), tl.float32), tl.zeros(lse.shape, tl.float32),
                            tl.zeros(o.shape, tl.float32), lse, o)
        done = ((row_lim >= 0) & (row_lim < FIRST_SPLIT))[:, None] & (d < HEAD_DIM)[None, :]  # -1: pad rows
        tl.store(_row_ptrs(out_ptr, out_row, head, stride_ot, stride_oh, HEAD_DIM_P),
                 _finish(num, den).to(out_ptr.dtype.element_ty), mask=done)


# the ints that follow the batch's shape are not specialized (== 1, multiple of 16): each new combination would
# compile another variant in the middle of serving, seconds of stall
@triton.jit(do_not_specialize=["q_min", "q_max", "ws_rows_per_seq", "ws_splits", "first_run", "long_run", "rest_run"])
def _tree_attn_kernel(
    q_ptr, k_cache, v_cache, out_ptr, ws_o, ws_lse,
    query_start_loc, seq_lens, context_lens, block_tables, tree_offsets, tree_mask,
    qk_scale, q_min, q_max, ws_rows_per_seq, ws_splits, first_run, long_run, rest_run,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
    SPLIT: tl.constexpr, FIRST_SPLIT: tl.constexpr, FIRST_KEYS: tl.constexpr, MODE: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, PDL: tl.constexpr,
):
    """One (query-row tile, run of keys, sequence x kv head) of tree attention; MODE: split|fused|whole.

    Split mode's runs are first_run keys long among the first FIRST_KEYS, rest_run keys past them (whole splits);
    fused and whole mode take every key in one run. A sequence of more than 2 FIRST_KEYS keys, whose rest region
    gives it programs enough, runs its first region in long_run-key runs instead: which program computes a split
    never changes its bits.
    """
    pdl.enter(PDL)
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_P
    tile = tl.program_id(0)
    b = tl.program_id(2) // NUM_KV_HEADS
    kvh = tl.program_id(2) % NUM_KV_HEADS
    q_start = tl.load(query_start_loc + b)
    q_len = tl.load(query_start_loc + b + 1) - q_start
    t0 = tile * BLOCK_Q
    if (q_len < q_min) | (q_len > q_max) | (t0 >= q_len):  # another launch's sequence, or past its query
        return
    ctx = tl.load(context_lens + b)
    tree_base = ctx + tl.load(tree_offsets + b)  # sequence position of the root
    kv_end = tl.minimum(tl.load(seq_lens + b), ctx + tl.minimum(t0 + BLOCK_Q, q_len))  # past every row's limit
    if MODE == "split":
        first_run = tl.where(kv_end > 2 * FIRST_KEYS, long_run, first_run)
        run, first_runs = tl.program_id(1), FIRST_KEYS // first_run
        lo = tl.where(run < first_runs, run * first_run, FIRST_KEYS + (run - first_runs) * rest_run)
        if lo >= kv_end:  # no row of the tile reaches this run
            return
        hi = tl.minimum(lo + tl.where(run < first_runs, first_run, rest_run), kv_end)
    else:
        lo = 0
        hi = kv_end

    r = tl.arange(0, BLOCK_M)
    t = t0 + r // GROUP_P  # [BLOCK_M] query index within the sequence
    head = kvh * GROUP + r % GROUP_P  # [BLOCK_M] q head
    row_ok = (t < q_len) & (r % GROUP_P < GROUP)
    row_lim = tl.where(row_ok, ctx + t, -1)  # last causally visible key; -1 hides every key from pad rows
    row_bits = tl.load(tree_mask + q_start + t, mask=row_ok & (ctx + t >= tree_base), other=0)
    bits_lo = row_bits.to(tl.int32)  # nodes 0..31 (truncation keeps the low word): int32 saves registers
    bits_hi = (row_bits >> 32).to(tl.int32)  # nodes 32..63
    d = tl.arange(0, HEAD_DIM_P)
    d_ok = d < HEAD_DIM
    io_mask = row_ok[:, None] & d_ok[None, :]
    tok = (q_start + t).to(tl.int64)  # [BLOCK_M] token row in q and out
    q = tl.load(_row_ptrs(q_ptr, tok, head, stride_qt, stride_qh, HEAD_DIM_P), mask=io_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    ws_row = ((b * ws_rows_per_seq + t).to(tl.int64) * (NUM_KV_HEADS * GROUP) + head) * ws_splits  # [BLOCK_M]
    k_base = k_cache + kvh * stride_kh
    v_base = v_cache + kvh * stride_vh
    table_row = block_tables + b.to(tl.int64) * stride_bt

    # keys below open_end are visible to every real row of the tile: below hi, within the first row's causal
    # limit (ctx + t0) and before the root (from the root on, the ancestor bits decide)
    open_end = tl.minimum(tl.minimum(hi, ctx + t0 + 1), tree_base)
    mx = tl.full([BLOCK_M], float("-inf"), tl.float32)  # fused mode: the splits folded so far
    den = tl.zeros([BLOCK_M], tl.float32)
    num = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # the current split's online softmax
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        if MODE != "whole":
            # a split ends: close it inside the one loop, so the K/V pipeline never drains
            if _opens_split(start, SPLIT, FIRST_SPLIT, FIRST_KEYS) & (start > lo):
                o, lse = _close_split(m, l_sum, acc, ws_o)
                if MODE == "fused":
                    mx, den, num = _fold(mx, den, num, lse, o)
                else:  # split mode carries no fold state through the loop (it spilled registers at 4 warps)
                    _store_split(o, lse, _split_of(start - 1, SPLIT, FIRST_SPLIT, FIRST_KEYS), row_lim, ws_o, ws_lse,
                                 ws_row, out_ptr, tok, head, stride_ot, stride_oh, HEAD_DIM, HEAD_DIM_P, SPLIT,
                                 FIRST_SPLIT, FIRST_KEYS)
                m = tl.full([BLOCK_M], float("-inf"), tl.float32)
                l_sum = tl.zeros([BLOCK_M], tl.float32)
                acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
        kpos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] sequence positions
        k_ok = kpos < hi  # keys past hi are never read: they may be unwritten (NaN) slots
        blk = tl.load(table_row + kpos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        slot = kpos % BLOCK_SIZE
        k = tl.load(
            k_base + blk[None, :] * stride_kb + slot[None, :] * stride_ks + d[:, None],
            mask=k_ok[None, :] & d_ok[:, None], other=0.0,
        )  # [HEAD_DIM_P, BLOCK_N]
        v = tl.load(
            v_base + blk[:, None] * stride_vb + slot[:, None] * stride_vs + d[None, :],
            mask=k_ok[:, None] & d_ok[None, :], other=0.0,
        )  # [BLOCK_N, HEAD_DIM_P]
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PREC) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        # only blocks that reach past open_end need the mask, which costs several instructions per score (see
        # "Speed"); pad rows score the unmasked blocks too, and are never stored
        if start + BLOCK_N > open_end:
            vis = k_ok[None, :] & (kpos[None, :] <= row_lim[:, None])
            if start + BLOCK_N > tree_base:  # the block reaches into the tree: apply the ancestor bits
                node = kpos - tree_base  # [BLOCK_N] tree node of each key (negative: before the root)
                word = tl.where(node[None, :] < 32, bits_lo[:, None], bits_hi[:, None])
                bit = (word >> (node[None, :] & 31)) & 1
                vis = vis & ((node[None, :] < 0) | (bit != 0))
            s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet stay at 0
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_sum = l_sum * alpha + tl.sum(p, 1)
        p = p.to(v.dtype)  # the MMA takes P in the cache dtype, as flash attention does
        if UPCAST:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=DOT_PREC)
        m = m_new

    out_ptrs = _row_ptrs(out_ptr, tok, head, stride_ot, stride_oh, HEAD_DIM_P)
    if MODE == "whole":  # prefill chunk: one softmax over all its keys, no split grid to honour
        o, _ = _normalize(m, l_sum, acc)
        tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=io_mask)
        return
    o, lse = _close_split(m, l_sum, acc, ws_o)
    if MODE == "fused":
        mx, den, num = _fold(mx, den, num, lse, o)
        tl.store(out_ptrs, _finish(num, den).to(out_ptr.dtype.element_ty), mask=io_mask)
    else:
        _store_split(o, lse, _split_of(hi - 1, SPLIT, FIRST_SPLIT, FIRST_KEYS), row_lim, ws_o, ws_lse, ws_row,
                     out_ptr, tok, head, stride_ot, stride_oh, HEAD_DIM, HEAD_DIM_P, SPLIT, FIRST_SPLIT, FIRST_KEYS)


@triton.jit(do_not_specialize=["q_max", "ws_rows_per_seq", "ws_splits"])
def _fold_splits_kernel(
    out_ptr, ws_o, ws_lse, query_start_loc, context_lens, q_max, ws_rows_per_seq, ws_splits,
    stride_ot, stride_oh,
    NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, SPLIT: tl.constexpr,
    FIRST_SPLIT: tl.constexpr, FIRST_KEYS: tl.constexpr, FOLD_BATCH: tl.constexpr, PDL: tl.constexpr,
):
    """Fold the split results of one (query token, q head) left to right and store its output.

    The loads of FOLD_BATCH splits at a time do not wait on each other's folds, so a batch costs one memory round
    trip, not one per split; splits past the row's last fold in as exact no-ops, as in fused mode.
    """
    pdl.enter(PDL)
    row = tl.program_id(0)
    h = tl.program_id(1)
    b = row // ws_rows_per_seq
    t = row % ws_rows_per_seq
    q_start = tl.load(query_start_loc + b)
    q_len = tl.load(query_start_loc + b + 1) - q_start
    row_lim = tl.load(context_lens + b) + t
    if (q_len > q_max) | (t >= q_len) | (row_lim < FIRST_SPLIT):  # not ours, or finished by the split kernel
        return
    num_splits = _split_of(row_lim, SPLIT, FIRST_SPLIT, FIRST_KEYS) + 1
    d = tl.arange(0, HEAD_DIM_P)
    ws_row = (row.to(tl.int64) * NUM_Q_HEADS + h) * ws_splits + tl.arange(0, 1)  # [1]: _fold's row shapes
    mx = tl.full([1], float("-inf"), tl.float32)
    den = tl.zeros([1], tl.float32)
    num = tl.zeros([1, HEAD_DIM_P], tl.float32)
    for first in range(0, num_splits, FOLD_BATCH):
        for j in tl.static_range(FOLD_BATCH):
            s = first + j
            ok = s + tl.arange(0, 1) < num_splits  # [1]
            lse = tl.load(ws_lse + ws_row + s, mask=ok, other=float("-inf"))
            o = tl.load(ws_o + (ws_row + s)[:, None] * HEAD_DIM_P + d[None, :], mask=ok[:, None], other=0.0)
            mx, den, num = _fold(mx, den, num, lse, o)
    out_ptrs = out_ptr + (q_start + t).to(tl.int64) * stride_ot + h * stride_oh + d[None, :]
    tl.store(out_ptrs, _finish(num, den).to(out_ptr.dtype.element_ty), mask=(d < HEAD_DIM)[None, :])


def _first_run(first_split: int, first_keys: int, splits: int) -> int:
    """Keys of a first-region run of about `splits` splits: a power of two of them that divides the region."""
    run = first_split * triton.next_power_of_2(splits)
    while first_keys % run:
        run //= 2
    return run


def decode_plan(num_tiles: int, num_keys: int, config: DecodeConfig, device: torch.device) -> tuple[str, int, int]:
    """(mode, split-mode run keys among the first first_keys, past them) of the decode launch for num_tiles (row
    tile, sequence, kv head) over num_keys keys.

    Only speed depends on this. Fused once the tiles alone fill the GPU, or when there are at most two runs
    (a second kernel costs what the extra parallelism saves): K/V read once, no workspace. Otherwise split mode,
    with runs of splits long enough to keep the pipeline full but short enough to leave about
    SPLIT_PROGRAMS_PER_SM programs per SM (small batches, long contexts). The first region's short splits run
    alone while a long split's keys in short runs make programs for at most half the SMs, and are grouped up to a
    long split's keys as the batch grows (a short run cannot fill the pipeline). That grouping follows the batch
    alone: a CUDA graph's launch is planned for max_model_len keys, whatever the context it then serves.
    """
    sms = num_sms(device)
    split, first_split, first_keys = config.grid
    rest_run = max(1, num_tiles * triton.cdiv(num_keys, split) // (SPLIT_PROGRAMS_PER_SM * sms)) * split
    first_run = _first_run(first_split, first_keys, min(math.ceil(2 * num_tiles * split / first_split / sms),
                                                        split // first_split))
    fills_gpu = device.type == "cuda" and num_tiles >= FUSED_TILES_PER_SM * sms
    if _cover(num_keys, first_keys, first_run, rest_run) <= 2 or fills_gpu:
        return "fused", first_run, rest_run
    return "split", first_run, rest_run


def tree_attention(
    q: torch.Tensor,  # [num_tokens, num_q_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    *,
    out: torch.Tensor | None = None,  # [num_tokens, num_q_heads, head_dim]; rows of empty queries untouched
    mode: str = "auto",  # "split" | "fused" | "auto": numerically identical, only speed differs
    splits_per_program: int | None = None,  # split mode's splits per run (first region: a power of two); None: planned
    decode_max_q: int = DECODE_MAX_Q,
    config: DecodeConfig | None = None,  # None: decode_config of the cache; benchmarks try others
) -> torch.Tensor:
    """Paged tree attention (semantics of reference.paged_attention); no host syncs."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    assert num_q_heads % num_kv_heads == 0 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    assert q.stride(2) == 1 and block_size == meta.block_size
    out = torch.empty_like(q) if out is None else out
    num_seqs, max_q, max_seq = meta.num_seqs, int(meta.max_query_len), int(meta.max_seq_len)
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = num_q_heads // num_kv_heads
    group_p = triton.next_power_of_2(group)
    head_dim_p = triton.next_power_of_2(head_dim)
    fp32 = q.dtype == torch.float32
    # the CPU interpreter mis-multiplies bf16 dots: there the operands are upcast after the same roundings
    upcast = q.device.type != "cuda" and k_cache.dtype == torch.bfloat16
    config = config or decode_config(k_cache.dtype, head_dim)
    split, first_split, first_keys = config.grid
    common = dict(
        NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_P=group_p, BLOCK_N=config.block_n, BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p, SPLIT=split, FIRST_SPLIT=first_split, FIRST_KEYS=first_keys,
        UPCAST=upcast,
        DOT_PREC="ieee" if fp32 else "tf32", **pdl.flags(),
        enable_fp_fusion=False,  # fused and split mode must round alike (see "Work split")
    )
    tables = meta.block_tables
    args = (meta.query_start_loc, meta.seq_lens, meta.context_lens, tables, meta.tree_offsets, meta.tree_mask)
    strides = (q.stride(0), q.stride(1), out.stride(0), out.stride(1), *k_cache.stride()[:3],
               *v_cache.stride()[:3], tables.stride(0))
    qk_scale = scale * LOG2E

    # decode / verify: tiles of block_m rows (block_q tokens x group_p heads) over fixed splits
    block_q = max(config.block_m // group_p, 1)
    q_cap = min(max_q, decode_max_q)  # workspace rows per sequence
    tiles = triton.cdiv(q_cap, block_q)
    num_splits = config.num_splits(max_seq)
    planned, first_run, rest_run = decode_plan(tiles * num_seqs * num_kv_heads, max_seq, config, q.device)
    mode = planned if mode == "auto" else mode
    if splits_per_program:
        first_run, rest_run = _first_run(first_split, first_keys, splits_per_program), split * splits_per_program
    fused = mode == "fused"
    ws_dtype = torch.float32 if fp32 else q.dtype
    if fused:
        ws_o = ws_lse = torch.empty(0, device=q.device, dtype=ws_dtype)
    else:
        ws_o = torch.empty(num_seqs * q_cap, num_q_heads, num_splits, head_dim_p, device=q.device, dtype=ws_dtype)
        ws_lse = torch.empty(num_seqs * q_cap, num_q_heads, num_splits, device=q.device, dtype=torch.float32)
    # long sequences: the first region in runs as long as the rest's where they divide it, else of one long split
    long_run = max(first_run, rest_run if first_keys % rest_run == 0 else split)
    runs = 1 if fused else _cover(max_seq, first_keys, first_run, rest_run)
    num_stages = (config.fused_stages if fused else config.split_stages) if head_dim_p <= 128 else 3
    _tree_attn_kernel[(tiles, runs, num_seqs * num_kv_heads)](
        q, k_cache, v_cache, out, ws_o, ws_lse, *args, qk_scale, 1, decode_max_q, q_cap, num_splits, first_run,
        long_run, rest_run, *strides,
        BLOCK_Q=block_q, MODE=mode, num_warps=config.num_warps, num_stages=num_stages, **common,
    )
    if not fused:
        _fold_splits_kernel[(num_seqs * q_cap, num_q_heads)](
            out, ws_o, ws_lse, meta.query_start_loc, meta.context_lens, decode_max_q, q_cap, num_splits,
            out.stride(0), out.stride(1), NUM_Q_HEADS=num_q_heads, HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p,
            SPLIT=split, FIRST_SPLIT=first_split, FIRST_KEYS=first_keys, FOLD_BATCH=FOLD_BATCH, num_warps=1,
            enable_fp_fusion=False, **pdl.flags(),
        )

    # prefill chunks: bigger tiles, one softmax over all keys of the tile
    if max_q > decode_max_q:
        block_q = max((64 if fp32 else 128) // group_p, 1)  # fp32 at 128 rows spills registers
        grid = (triton.cdiv(max_q, block_q), 1, num_seqs * num_kv_heads)
        _tree_attn_kernel[grid](
            q, k_cache, v_cache, out, out, out, *args, qk_scale, decode_max_q + 1, 2**31 - 1, 0, 0, 1, 1, 1,
            *strides, BLOCK_Q=block_q, MODE="whole", num_warps=8, num_stages=3, **common,
        )
    return out
