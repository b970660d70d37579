"""Pure-torch reference of every kernel: the CPU backend, and the oracle the Triton kernels are tested against.

KV pool layout per layer: k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim].
Slot s lives at block s // block_size, offset s % block_size.
"""

from __future__ import annotations

import torch

from specserve.attention import AttentionMetadata


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


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_q_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of every query token over its sequence's cached keys and tree ancestors (K/V written)."""
    out = torch.empty_like(q)  # [num_tokens, num_q_heads, head_dim]
    num_q_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    bs = meta.block_size
    for b in range(meta.num_seqs):
        start, end = int(meta.query_start_loc[b]), int(meta.query_start_loc[b + 1])
        if end == start:
            continue
        seq_len = int(meta.seq_lens[b])
        blocks = meta.block_tables[b, : (seq_len + bs - 1) // bs].long()
        k = k_cache[blocks].flatten(0, 1)[:seq_len]  # [seq_len, num_kv_heads, head_dim]
        v = v_cache[blocks].flatten(0, 1)[:seq_len]
        k = k.repeat_interleave(group, dim=1).transpose(0, 1).float()  # [num_q_heads, seq_len, head_dim]
        v = v.repeat_interleave(group, dim=1).transpose(0, 1).float()
        qb = q[start:end].transpose(0, 1).float()  # [num_q_heads, q_len, head_dim]
        mask = visible_mask(meta, b)
        o = torch.nn.functional.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale)
        out[start:end] = o.transpose(0, 1).to(q.dtype)
    return out
