"""Paged KV bookkeeping: a block pool with reference counts and a prefix cache of full, verified blocks.

A request's block table covers its committed tokens, its root and the slots reserved for this step's drafts:

    block_size 4, 6 committed tokens, root r, drafts d1 d2 d3:
    [ t0 t1 t2 t3 ][ t4 t5 r  d1 ][ d2 d3 .  . ]
      full: hashed   partial        lookahead, given back if the drafts are rejected

Only blocks whose every token is committed are hashed, so drafts never enter the prefix cache. A hash chains
the parent block's hash with the block's token ids, so equal hashes mean equal prefixes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from specserve.request import Request


def kv_block_bytes(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, elem_size: int) -> int:
    """Bytes of one block's K and V over num_layers layers."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * elem_size


def block_hash(parent: int | None, tokens: list[int]) -> int:
    """Chained hash of one full block: equal hashes mean equal token prefixes up to this block's end."""
    return hash((parent, tuple(tokens)))


class BlockPool:
    """Fixed-size blocks with reference counts; freed blocks stay findable by hash until reused (LRU)."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def allocate(self) -> int:
        block, _ = self.free_queue.popitem(last=False)  # least recently freed first
        h = self.block_hash[block]
        if h is not None:  # evict its cached contents
            del self.cached[h]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def touch(self, block: int) -> None:
        """Take a reference to a cached block (possibly one sitting in the free queue)."""
        if self.ref_counts[block] == 0:
            del self.free_queue[block]
        self.ref_counts[block] += 1

    def release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, f"block {block} released twice"
        if self.ref_counts[block] == 0:
            self.free_queue[block] = None

    def register(self, block: int, block_hash: int) -> None:
        if block_hash not in self.cached and self.block_hash[block] is None:
            self.cached[block_hash] = block
            self.block_hash[block] = block_hash


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of which found cached


class KVCacheManager:
    """Per-request block tables over one BlockPool."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool):
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_stats = PrefixCacheStats()
        self._hashes: dict[str, list[int]] = {}  # request id -> chained hashes of its committed full blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    def blocks_needed(self, req: Request, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(req.block_ids))

    def attach_prefix(self, req: Request) -> None:
        """Give a request with no blocks the cached blocks matching its longest full-block prefix."""
        assert not req.block_ids and req.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return
        hashes: list[int] = []
        bs = self.block_size
        # Keep one token uncached: the step needs a query token to produce the next logits.
        for i in range((req.num_tokens - 1) // bs):
            h = block_hash(hashes[-1] if hashes else None, req.token_ids[i * bs : (i + 1) * bs])
            block = self.pool.cached.get(h)
            if block is None:
                break
            self.pool.touch(block)
            req.block_ids.append(block)
            hashes.append(h)
        self._hashes[req.request_id] = hashes
        req.num_computed_tokens = len(hashes) * bs
        self.prefix_stats.queries += req.num_tokens
        self.prefix_stats.hits += req.num_computed_tokens

    def allocate(self, req: Request, num_tokens: int) -> bool:
        """Grow the block table to hold num_tokens slots; False (and no change) if the pool is short."""
        need = self.blocks_needed(req, num_tokens)
        if need > self.pool.num_free_blocks:
            return False
        req.block_ids.extend(self.pool.allocate() for _ in range(need))
        return True

    def commit(self, req: Request) -> None:
        """After verification: cache newly completed blocks, return blocks that only held rejected drafts."""
        bs = self.block_size
        keep = -(-req.num_tokens // bs)  # committed tokens + the next root
        while len(req.block_ids) > keep:
            self.pool.release(req.block_ids.pop())
        if not self.enable_prefix_caching:
            return
        hashes = self._hashes.setdefault(req.request_id, [])
        for i in range(len(hashes), req.num_computed_tokens // bs):
            h = block_hash(hashes[-1] if hashes else None, req.token_ids[i * bs : (i + 1) * bs])
            hashes.append(h)
            self.pool.register(req.block_ids[i], h)

    def free(self, req: Request) -> None:
        """Return every block of a finished, aborted or preempted request (tail first, so it is evicted first)."""
        for block in reversed(req.block_ids):
            self.pool.release(block)
        req.block_ids.clear()
        req.num_computed_tokens = 0
        self._hashes.pop(req.request_id, None)
