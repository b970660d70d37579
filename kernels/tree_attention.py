"""Triton tree attention over paged KV: one entry point for decode, tree verification and prefill chunks.

Work split
    A program owns one (tile of query rows, sequence, kv head). A row is a (query token, q head of the kv
    head's group) pair, so the GROUP q heads that share a kv head read each K/V block once: verifying 16
    tokens with GQA 4 is one 64-row tile, the same K/V traffic as decoding one token.
    Keys are cut into splits of SPLIT keys at absolute positions [0, SPLIT), [SPLIT, 2 SPLIT), ... Each split
    runs a fresh online softmax (fp32, log2 domain) and yields (o_s, lse_s); splits are folded left to right:
        M' = max(M, lse_s);  num = num * 2^(M - M') + 2^(lse_s - M') * o_s;  den likewise with 1 for o_s.
    "split" mode runs one program per split and folds in a second kernel (parallelism for small batches);
    "fused" mode walks all splits in one pipelined key loop and folds at each boundary in registers (no
    workspace, for batches that fill the GPU). Both do the same operations in the same order (FMA contraction
    off), so the per-launch choice, taken from the batch shape, does not change a bit.
    Queries longer than `decode_max_q` (prefill chunks) go to a second launch ("whole" mode): 128-row tiles,
    one softmax over all keys. Which launch takes a sequence depends on its own query length only.

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

import functools

import torch
import triton
import triton.language as tl

from specserve.attention import AttentionMetadata

SPLIT = 512  # keys per split: one constant for every launch (see "Batch invariance")
DECODE_MAX_Q = 128  # longer queries are prefill chunks: the big-tile fused launch takes them
LOG2E = 1.4426950408889634


@triton.jit
def _normalize(m, l_sum, acc):
    """(o, lse) of one split's softmax state; a row that saw no key gets o = 0, lse = -inf."""
    l_ok = l_sum > 0
    l_safe = tl.where(l_ok, l_sum, 1.0)
    return acc / l_safe[:, None], tl.where(l_ok, m + tl.log2(l_safe), float("-inf"))


@triton.jit
def _fold(mx, den, num, lse, o):
    """Fold one split (lse [R], o [R, D]) into the running (max, denominator, numerator)."""
    m_new = tl.maximum(mx, lse)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    a = tl.exp2(mx - m_safe)
    w = tl.exp2(lse - m_safe)
    return m_new, den * a + w, num * a[:, None] + w[:, None] * o


@triton.jit
def _finish(num, den):
    """Folded output; pad rows (den = 0) give 0 instead of 0/0."""
    return num / tl.where(den > 0, den, 1.0)[:, None]


@triton.jit
def _attend(
    q, k_base, v_base, table_row, lo, hi, row_lim, bits_lo, bits_hi, tree_base, qk_scale, ws_o,
    stride_kb, stride_ks, stride_vb, stride_vs,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr, SPLIT: tl.constexpr, FOLD: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Online softmax of a row tile over keys [lo, hi): the last split's (m, l, acc) and the folded earlier ones.

    With FOLD the state restarts at every SPLIT boundary and the finished split is folded into (mx, den, num)
    inside the one loop, so the K/V pipeline never drains; without it (mx, den, num) stay empty.
    """
    d = tl.arange(0, HEAD_DIM_P)
    d_ok = d < HEAD_DIM
    mx = tl.full([BLOCK_M], float("-inf"), tl.float32)
    den = tl.zeros([BLOCK_M], tl.float32)
    num = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        if FOLD:
            if (start % SPLIT == 0) & (start > lo):
                o, lse = _normalize(m, l_sum, acc)
                o = o.to(ws_o.dtype.element_ty).to(tl.float32)  # the rounding a split-mode workspace applies
                mx, den, num = _fold(mx, den, num, lse, o)
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
    return m, l_sum, acc, mx, den, num


@triton.jit
def _tree_attn_kernel(
    q_ptr, k_cache, v_cache, out_ptr, ws_o, ws_lse,
    query_start_loc, seq_lens, context_lens, block_tables, tree_offsets, tree_mask,
    qk_scale, q_min, q_max, ws_rows_per_seq, ws_splits,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
    SPLIT: tl.constexpr, MODE: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One (query-row tile, key split or all keys, sequence x kv head) of tree attention; MODE: split|fused|whole."""
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_P
    tile = tl.program_id(0)
    split = tl.program_id(1)
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
    lo = split * SPLIT
    if lo >= kv_end:  # split mode: no row of the tile reaches this split
        return

    r = tl.arange(0, BLOCK_M)
    t = t0 + r // GROUP_P  # [BLOCK_M] query index within the sequence
    head = kvh * GROUP + r % GROUP_P  # [BLOCK_M] q head
    row_ok = (t < q_len) & (r % GROUP_P < GROUP)
    row_lim = tl.where(row_ok, ctx + t, -1)  # last causally visible key; -1 hides every key from pad rows
    row_bits = tl.load(tree_mask + q_start + t, mask=row_ok & (ctx + t >= tree_base), other=0)
    bits_lo = row_bits.to(tl.int32)  # nodes 0..31 (truncation keeps the low word): int32 saves registers
    bits_hi = (row_bits >> 32).to(tl.int32)  # nodes 32..63
    d = tl.arange(0, HEAD_DIM_P)
    io_mask = row_ok[:, None] & (d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + (q_start + t)[:, None].to(tl.int64) * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=io_mask, other=0.0)  # [BLOCK_M, HEAD_DIM_P]
    if UPCAST:
        q = q.to(tl.float32)
    out_ptrs = out_ptr + (q_start + t)[:, None].to(tl.int64) * stride_ot + head[:, None] * stride_oh + d[None, :]
    hi = kv_end if MODE != "split" else tl.minimum(lo + SPLIT, kv_end)
    m, l_sum, acc, mx, den, num = _attend(
        q, k_cache + kvh * stride_kh, v_cache + kvh * stride_vh, block_tables + b.to(tl.int64) * stride_bt,
        lo, hi, row_lim, bits_lo, bits_hi, tree_base, qk_scale, ws_o, stride_kb, stride_ks, stride_vb, stride_vs,
        BLOCK_M, BLOCK_N, BLOCK_SIZE, HEAD_DIM, HEAD_DIM_P, SPLIT, MODE == "fused", UPCAST, DOT_PREC,
    )
    o, lse = _normalize(m, l_sum, acc)
    if MODE == "whole":  # prefill chunk: one softmax over all its keys, no split grid to honour
        tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=io_mask)
        return
    o = o.to(ws_o.dtype.element_ty).to(tl.float32)
    mx, den, num = _fold(mx, den, num, lse, o)
    if MODE == "fused":
        tl.store(out_ptrs, _finish(num, den).to(out_ptr.dtype.element_ty), mask=io_mask)
        return
    # split: rows that need split 0 only are final now (the same fold the reduce would do); the others go to
    # the workspace for every split they reach, and _fold_splits_kernel finishes them
    done = row_lim < tl.where(split == 0, SPLIT, 0)
    tl.store(out_ptrs, _finish(num, den).to(out_ptr.dtype.element_ty), mask=io_mask & done[:, None])
    ws_row = ((b * ws_rows_per_seq + t).to(tl.int64) * (NUM_KV_HEADS * GROUP) + head) * ws_splits + split
    todo = row_ok & (row_lim >= SPLIT) & (row_lim >= lo)
    tl.store(ws_lse + ws_row, lse, mask=todo)
    tl.store(ws_o + ws_row[:, None] * HEAD_DIM_P + d[None, :], o.to(ws_o.dtype.element_ty), mask=todo[:, None])


@triton.jit
def _fold_splits_kernel(
    out_ptr, ws_o, ws_lse, query_start_loc, context_lens, q_max, ws_rows_per_seq, ws_splits,
    stride_ot, stride_oh,
    NUM_Q_HEADS: tl.constexpr, HEADS_P: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """Fold the split results of one query token (all heads) left to right and store its output."""
    row = tl.program_id(0)
    b = row // ws_rows_per_seq
    t = row % ws_rows_per_seq
    q_start = tl.load(query_start_loc + b)
    q_len = tl.load(query_start_loc + b + 1) - q_start
    row_lim = tl.load(context_lens + b) + t
    if (q_len > q_max) | (t >= q_len) | (row_lim < SPLIT):  # not ours, or finished by the split kernel
        return
    h = tl.arange(0, HEADS_P)
    d = tl.arange(0, HEAD_DIM_P)
    h_ok = h < NUM_Q_HEADS
    ws_row = (row.to(tl.int64) * NUM_Q_HEADS + h) * ws_splits  # [HEADS_P]
    mx = tl.full([HEADS_P], float("-inf"), tl.float32)
    den = tl.zeros([HEADS_P], tl.float32)
    num = tl.zeros([HEADS_P, HEAD_DIM_P], tl.float32)
    for s in range(0, row_lim // SPLIT + 1):
        lse = tl.load(ws_lse + ws_row + s, mask=h_ok, other=float("-inf"))
        o = tl.load(ws_o + (ws_row + s)[:, None] * HEAD_DIM_P + d[None, :], mask=h_ok[:, None], other=0.0)
        mx, den, num = _fold(mx, den, num, lse, o.to(tl.float32))
    out_ptrs = out_ptr + (q_start + t).to(tl.int64) * stride_ot + h[:, None] * stride_oh + d[None, :]
    tl.store(out_ptrs, _finish(num, den).to(out_ptr.dtype.element_ty),
             mask=h_ok[:, None] & (d[None, :] < HEAD_DIM))


@functools.cache
def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_mode(num_programs: int, num_splits: int, device: torch.device) -> str:
    """Fused when one program per (tile, sequence, kv head) fills the GPU twice over, else split.

    Only speed depends on this: fused reads K/V once with no workspace traffic, split gives small batches
    (and long contexts) the parallelism of one program per split.
    """
    if num_splits == 1 or (device.type == "cuda" and num_programs >= 2 * _num_sms(device)):
        return "fused"
    return "split"


def tree_attention(
    q: torch.Tensor,  # [num_tokens, num_q_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    *,
    out: torch.Tensor | None = None,  # [num_tokens, num_q_heads, head_dim]; rows of empty queries untouched
    mode: str = "auto",  # "split" | "fused" | "auto": numerically identical, only speed differs
    split_size: int = SPLIT,
    decode_max_q: int = DECODE_MAX_Q,
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
    common = dict(
        NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_P=group_p, BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
        HEAD_DIM_P=head_dim_p, SPLIT=split_size, UPCAST=upcast, DOT_PREC="ieee" if fp32 else "tf32",
        enable_fp_fusion=False,  # fused and split mode must round alike (see "Work split")
    )
    tables = meta.block_tables
    args = (meta.query_start_loc, meta.seq_lens, meta.context_lens, tables, meta.tree_offsets, meta.tree_mask)
    strides = (q.stride(0), q.stride(1), out.stride(0), out.stride(1), *k_cache.stride()[:3],
               *v_cache.stride()[:3], tables.stride(0))
    qk_scale = scale * LOG2E

    # decode / verify: 64-row tiles (block_q tokens x group_p heads) over fixed splits
    block_q = max(64 // group_p, 1)
    q_cap = min(max_q, decode_max_q)  # workspace rows per sequence
    tiles = triton.cdiv(q_cap, block_q)
    num_splits = triton.cdiv(max_seq, split_size)
    if mode == "auto":
        mode = decode_mode(tiles * num_seqs * num_kv_heads, num_splits, q.device)
    fused = mode == "fused"
    block_n = 32 if fp32 else 64  # fp32 tiles are twice the bytes: halve them to stay in registers
    assert split_size % block_n == 0, "splits start on key-block boundaries"
    ws_dtype = torch.float32 if fp32 else q.dtype
    if fused:
        ws_o = ws_lse = torch.empty(0, device=q.device, dtype=ws_dtype)
    else:
        ws_o = torch.empty(num_seqs * q_cap, num_q_heads, num_splits, head_dim_p, device=q.device, dtype=ws_dtype)
        ws_lse = torch.empty(num_seqs * q_cap, num_q_heads, num_splits, device=q.device, dtype=torch.float32)
    grid = (tiles, 1 if fused else num_splits, num_seqs * num_kv_heads)
    _tree_attn_kernel[grid](
        q, k_cache, v_cache, out, ws_o, ws_lse, *args, qk_scale, 1, decode_max_q, q_cap, num_splits, *strides,
        BLOCK_Q=block_q, BLOCK_N=block_n, MODE=mode, num_warps=8, num_stages=3, **common,
    )
    if not fused:
        _fold_splits_kernel[(num_seqs * q_cap,)](
            out, ws_o, ws_lse, meta.query_start_loc, meta.context_lens, decode_max_q, q_cap, num_splits,
            out.stride(0), out.stride(1), NUM_Q_HEADS=num_q_heads, HEADS_P=triton.next_power_of_2(num_q_heads),
            HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p, SPLIT=split_size, enable_fp_fusion=False,
        )

    # prefill chunks: bigger tiles, one softmax over all keys of the tile
    if max_q > decode_max_q:
        block_q = max((64 if fp32 else 128) // group_p, 1)  # fp32 at 128 rows spills registers
        grid = (triton.cdiv(max_q, block_q), 1, num_seqs * num_kv_heads)
        _tree_attn_kernel[grid](
            q, k_cache, v_cache, out, out, out, *args, qk_scale, decode_max_q + 1, 2**31 - 1, 0, 0, *strides,
            BLOCK_Q=block_q, BLOCK_N=block_n, MODE="whole", num_warps=8, num_stages=3, **common,
        )
    return out
