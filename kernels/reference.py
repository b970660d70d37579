"""Pure-torch reference of every kernel: the CPU backend, and the oracle the Triton kernels are tested against.

KV pool layout per layer: k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim].
Slot s lives at block s // block_size, offset s % block_size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from specserve.attention import AttentionMetadata


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """[..., K] @ weight[N, K].T + bias -> [..., N]."""
    return F.linear(x, weight, bias)


def rms_norm(
    x: torch.Tensor,  # [T, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [T, hidden]
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """transformers' RMSNorm (fp32, cast back, then the weight); with residual: (x + residual, norm of that)."""
    if residual is not None:
        x = x + residual
    x32 = x.float()
    out = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return out if residual is None else (x, out)


def gated_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """silu_and_mul(linear(x)) for weight rows [gate; up]: [..., K] -> [..., N / 2]."""
    return silu_and_mul(linear(x, weight, bias))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[T, 2 I] = [gate | up] -> [T, I] silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def apply_rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, head_dim] at positions [T] with fp32 tables [P, head_dim // 2], as transformers does."""
    c = cos[positions].to(x.dtype)[:, None, :]  # [T, 1, head_dim // 2]
    s = sin[positions].to(x.dtype)[:, None, :]
    x1, x2 = x.chunk(2, dim=-1)  # [T, heads, head_dim // 2] each
    # = x * cat(cos, cos) + rotate_half(x) * cat(sin, sin), half by half
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def rope_write_kv(
    q: torch.Tensor,  # [T, num_q_heads, head_dim]
    k: torch.Tensor,  # [T, num_kv_heads, head_dim]
    v: torch.Tensor,  # [T, num_kv_heads, head_dim]
    positions: torch.Tensor,  # [T] int64
    cos: torch.Tensor,  # [max_positions, head_dim // 2] fp32
    sin: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64; negative slots are skipped (padding)
) -> torch.Tensor:
    """Rotated q [T, num_q_heads, head_dim]; rotated k and v stored in their slots."""
    write_kv(apply_rope(k, positions, cos, sin), v, k_cache, v_cache, slot_mapping)
    return apply_rope(q, positions, cos, sin)


def qkv_rope_write_kv(
    x: torch.Tensor,  # [T, K]
    weight: torch.Tensor,  # [(num_q_heads + 2 num_kv_heads) head_dim, K]: rows [q; k; v]
    bias: torch.Tensor | None,
    num_q_heads: int,
    positions: torch.Tensor,  # [T] int64
    cos: torch.Tensor,  # [max_positions, head_dim // 2] fp32
    sin: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64
    linear_op=linear,  # the Triton backend's, when it runs the ops apart
    rope_op=rope_write_kv,
) -> torch.Tensor:
    """rope_write_kv of the q/k/v projection linear(x, weight, bias): rotated q [T, num_q_heads, head_dim]."""
    num_kv, head_dim = k_cache.shape[2], k_cache.shape[3]
    q, k, v = linear_op(x, weight, bias).split([num_q_heads * head_dim, num_kv * head_dim, num_kv * head_dim], -1)
    q, k, v = (t.unflatten(-1, (-1, head_dim)) for t in (q, k, v))
    return rope_op(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)


def write_kv(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int64; negative slots are skipped (padding)
) -> None:
    """Store the step's new K/V in their slots."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def copy_slots(
    kv_caches: list[torch.Tensor],  # every layer's k_cache and v_cache
    src_slots: torch.Tensor,  # [n] int64
    dst_slots: torch.Tensor,  # [n] int64
) -> None:
    """Accepted-path compaction: move K/V of accepted tree nodes to the contiguous slots after the context.

    Sources are read before any destination is written, so overlapping moves are safe.
    """
    if src_slots.numel() == 0:
        return
    for cache in kv_caches:
        flat = cache.view(-1, *cache.shape[2:])
        flat[dst_slots] = flat[src_slots].clone()


def visible_mask(meta: AttentionMetadata, b: int) -> torch.Tensor:
    """[query_len, seq_len] bool: which keys query tokens of sequence b may attend."""
    start, end = int(meta.query_start_loc[b]), int(meta.query_start_loc[b + 1])
    q_len, seq_len = end - start, int(meta.seq_lens[b])
    ctx, off = int(meta.context_lens[b]), int(meta.tree_offsets[b])
    device = meta.slot_mapping.device
    qi = torch.arange(q_len, device=device)[:, None]  # [q, 1]
    kk = torch.arange(seq_len, device=device)[None, :]  # [1, s]
    causal = kk <= ctx + qi
    node = (kk - ctx - off).clamp(0, 63)  # tree-node index of each key
    bits = (meta.tree_mask[start:end, None] >> node) & 1  # [q, s]
    in_tree = (qi >= off) & (kk >= ctx + off)
    return causal & torch.where(in_tree, bits == 1, True)


# Sequences with at most this many query tokens (decode, verify) are batched into one padded SDPA call;
# longer ones (prefill chunks) run one by one so padding never multiplies a long query by the batch.
_BATCHED_MAX_QUERY = 64


def _batched_mask(meta: AttentionMetadata, seqs: torch.Tensor, max_q: int, max_s: int) -> torch.Tensor:
    """[len(seqs), max_q, max_s] bool: visible_mask for several sequences, padded rows fully visible."""
    device = meta.slot_mapping.device
    start = meta.query_start_loc[seqs].long()[:, None, None]
    q_len = (meta.query_start_loc[seqs + 1].long() - start[:, 0, 0])[:, None, None]
    ctx = meta.context_lens[seqs].long()[:, None, None]
    off = meta.tree_offsets[seqs].long()[:, None, None]
    seq_len = meta.seq_lens[seqs].long()[:, None, None]
    qi = torch.arange(max_q, device=device)[None, :, None]  # [1, q, 1]
    kk = torch.arange(max_s, device=device)[None, None, :]  # [1, 1, s]
    tok = (start + qi).clamp(max=meta.tree_mask.shape[0] - 1)  # [n, q, 1]
    bits = (meta.tree_mask[tok] >> (kk - ctx - off).clamp(0, 63)) & 1  # [n, q, s]
    in_tree = (qi >= off) & (kk >= ctx + off)
    visible = (kk <= ctx + qi) & torch.where(in_tree, bits == 1, True) & (kk < seq_len)
    return visible | (qi >= q_len)  # padded query rows: anything, they are dropped


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_q_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of every query token over its sequence's cached keys and tree ancestors (K/V written)."""
    out = torch.empty_like(q)  # [num_tokens, num_q_heads, head_dim]
    bs = meta.block_size
    qsl = meta.query_start_loc.tolist()
    q_lens = [e - s for s, e in zip(qsl[:-1], qsl[1:], strict=True)]
    short = [b for b, n in enumerate(q_lens) if 0 < n <= _BATCHED_MAX_QUERY]
    if short:
        seqs = torch.tensor(short, device=q.device)
        max_q = max(q_lens[b] for b in short)
        max_s = int(meta.seq_lens[seqs].max())
        blocks = meta.block_tables[seqs, : -(-max_s // bs)].long()
        # Slots past a sequence's end may hold anything (even NaN): zero them so masked keys contribute 0.
        past_end = torch.arange(max_s, device=q.device) >= meta.seq_lens[seqs][:, None]  # [n, max_s]
        past_end = past_end[:, None, :, None]
        k = k_cache[blocks].flatten(1, 2)[:, :max_s].transpose(1, 2).float()  # [n, num_kv_heads, max_s, head_dim]
        v = v_cache[blocks].flatten(1, 2)[:, :max_s].transpose(1, 2).float()
        k, v = k.masked_fill(past_end, 0.0), v.masked_fill(past_end, 0.0)
        rows = (meta.query_start_loc[seqs].long()[:, None] + torch.arange(max_q, device=q.device)).clamp(
            max=q.shape[0] - 1
        )  # [n, max_q] token index of each padded query row
        qb = q[rows].transpose(1, 2).float()  # [n, num_q_heads, max_q, head_dim]
        mask = _batched_mask(meta, seqs, max_q, max_s)[:, None]
        o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        o = o.transpose(1, 2).to(q.dtype)  # [n, max_q, num_q_heads, head_dim]
        for i, b in enumerate(short):
            out[qsl[b] : qsl[b + 1]] = o[i, : q_lens[b]]
    for b in (b for b, n in enumerate(q_lens) if n > _BATCHED_MAX_QUERY):
        seq_len = int(meta.seq_lens[b])
        blocks = meta.block_tables[b, : -(-seq_len // bs)].long()
        k = k_cache[blocks].flatten(0, 1)[:seq_len].transpose(0, 1).float()  # [num_kv_heads, seq_len, head_dim]
        v = v_cache[blocks].flatten(0, 1)[:seq_len].transpose(0, 1).float()
        qb = q[qsl[b] : qsl[b + 1]].transpose(0, 1).float()  # [num_q_heads, q_len, head_dim]
        o = F.scaled_dot_product_attention(qb, k, v, attn_mask=visible_mask(meta, b), scale=scale, enable_gqa=True)
        out[qsl[b] : qsl[b + 1]] = o.transpose(0, 1).to(q.dtype)
    return out
