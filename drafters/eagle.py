"""EAGLE-1/2: a one-layer draft that predicts the target's next feature, drafted as an EAGLE-2 dynamic tree.

Checkpoint (SafeAILab/EAGLE `cnets1.py`): config.json (Llama spelling, plus `bias` for fc, default true) and
model.safetensors or pytorch_model.bin with fc.weight [H, 2H] (+ fc.bias), layers.{i}.* (layer 0 without
input_layernorm) and optionally embed_tokens.weight (else the target's embedding). Logits are the target's
LM head on the draft output; features are the target's last hidden state after the final norm (EAGLE's
`outputs[0]`).

Entries. The draft entry at sequence position s reads token t_s and the target feature f_{s-1} and predicts
t_{s+1}, so its K/V sits in slot s of the request's blocks, next to the target's K/V of t_s. (EAGLE stores
it one slot earlier; rope only sees relative positions, so nothing changes except that an entry depends on
tokens up to its own slot, which is what prefix-cached blocks need.) Every target forward, prefill chunks
included, writes each token's feature into a table indexed like the KV slots (model_runner.SlotFeatures, moved
with the K/V by accepted-path compaction), and propose() runs the entries not yet run with the root as one
causal chunk, however far the request lagged (a request that drafts nothing costs no draft forward). Entry 0
has no feature before it and reads zeros. A prefix-cache hit brings its blocks' features with their K/V (the
forward that filled them wrote both), so entries of cached blocks the draft KV does not trust simply run.

Tree (EAGLE-2, `topK_genrate`): the root's top_k tokens are the first level; each level, the top_k nodes by
cumulative log-prob are expanded to their top_k children, `depth` levels in all; the num_speculative_tokens
best of every scored node form the draft. A level's forward is the root plus every node expanded so far, as
a tree query (earlier nodes are recomputed from the same inputs), so the attention kernels see the same
kind of tree as verification. Every level of a step and the final rerank run on the device (eagle_tree.TreeGrower:
one graph replay, no sync; the trees reach the host when the step verifies). Drafts are deterministic top-k, so q is
one-hot in verification.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn

from specserve.attention import MAX_TREE_NODES
from specserve.config import SpeculativeConfig
from specserve.drafters.base import DeviceDrafts, DraftMemory, DraftProposal
from specserve.drafters.checkpoint import check_dim, load_module, read_config, read_tensors
from specserve.drafters.draft_kv import DraftKVCache, DraftQuery, plan_chunks
from specserve.drafters.draft_runner import DraftRunner
from specserve.drafters.eagle_tree import GrownTrees, TreeGrower
from specserve.kv_cache import kv_block_bytes
from specserve.model_runner import HIDDEN_STATES, SlotFeatures, hidden_state_rows
from specserve.models.config import ModelConfig
from specserve.models.llama import LlamaDecoderLayer, RotaryEmbedding

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CATCHUP_TOKENS = 2048  # entries per catch-up forward


def head_config(cfg: dict) -> ModelConfig:
    """The draft layers' ModelConfig from a Llama-spelled config.json."""
    from transformers import LlamaConfig

    known = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures")}
    return ModelConfig.from_hf(LlamaConfig(**known))


def draft_config(cfg: dict, target, what: str) -> ModelConfig:
    """The draft layer's ModelConfig from a Llama-spelled config.json, checked against the target."""
    mcfg = head_config(cfg)
    tcfg = target.model.config
    check_dim(what, mcfg.hidden_size, tcfg.hidden_size, "hidden_size")
    check_dim(what, mcfg.vocab_size, tcfg.vocab_size, "vocab_size")
    return mcfg


def scratch_blocks(max_num_seqs: int, block_size: int) -> int:
    """Draft KV blocks past the pool: a tree reaches MAX_TREE_NODES past its root, at most this many blocks past a
    request's own, for every sequence of a batch."""
    return max_num_seqs * (MAX_TREE_NODES // block_size + 2)


def tree_draft_memory(head: ModelConfig, num_kv_layers: int, feature_key: tuple, target_config: ModelConfig,
                      block_size: int, elem_size: int, max_num_seqs: int) -> DraftMemory:
    """An EAGLE head's K/V layers per pool block, its scratch blocks, and its feature table (target hidden wide)."""
    per_block = kv_block_bytes(num_kv_layers, head.num_kv_heads, head.head_dim, block_size, elem_size)
    return DraftMemory(per_block, scratch_blocks(max_num_seqs, block_size) * per_block,
                       {feature_key: target_config.hidden_size})


def draft_memory(spec: SpeculativeConfig, target_config: ModelConfig, block_size: int, elem_size: int,
                 max_num_seqs: int) -> DraftMemory:
    """EAGLE-1's allocations: every decoder layer of its config.json has K/V; it reads the target's hidden states."""
    head = head_config(read_config(spec.model))
    return tree_draft_memory(head, head.num_layers, HIDDEN_STATES, target_config, block_size, elem_size, max_num_seqs)


class Eagle1Head(nn.Module):
    """fc over [embedding; feature], then decoder layers (the first without input_layernorm)."""

    def __init__(self, cfg: ModelConfig, bias: bool, target_logits):
        super().__init__()
        h = cfg.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=bias)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.layers[0].input_layernorm = None  # EAGLE's first layer reads fc's output as is
        self.rotary = RotaryEmbedding(cfg)
        self._target_logits = target_logits  # a bound method: the target's LM head stays out of this module

    fuse = staticmethod(hidden_state_rows)  # [T, H] inputs of the entries after a target forward's tokens

    def forward(self, emb, hidden, positions, meta, kv_layers, backend) -> torch.Tensor:
        """Draft outputs [T, H] from token embeddings and input features/hiddens, both [T, H]."""
        h, residual = self.fc(torch.cat((emb, hidden), dim=-1)), None
        for layer, kv in zip(self.layers, kv_layers, strict=True):
            h, residual = layer(h, residual, positions, self.rotary, meta, kv, backend)
        return h + residual

    def top_k(self, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs [N, k], target token ids [N, k]) of the k likeliest next tokens."""
        return self._target_logits(hidden).log_softmax(dim=-1).topk(k, dim=-1)


def load_eagle1(path: str, target) -> tuple[Eagle1Head, nn.Embedding | None]:
    """EAGLE-1/2 head (and its own embedding, if the checkpoint has one) on the target's device/dtype."""
    what = f"EAGLE checkpoint {path!r}"
    raw = read_config(path)
    cfg = draft_config(raw, target, what)
    tensors = read_tensors(path, WEIGHT_FILES)
    head = Eagle1Head(cfg, bool(raw.get("bias", True)), functools.partial(target.model.compute_logits,
                                                                         backend=target.backend))
    if "fc.weight" in tensors:
        check_dim(what, tensors["fc.weight"].shape[1], 2 * target.model.config.hidden_size, "fc input size")
    embed = _own_embedding(tensors, target, what)
    head.to(device=target.device, dtype=target.dtype)
    load_module(head, tensors, what)
    return head.requires_grad_(False).eval(), embed


def _own_embedding(tensors: dict, target, what: str) -> nn.Embedding | None:
    """Pop embed_tokens.weight from tensors into an embedding checked against the target's vocabulary."""
    weight = tensors.pop("embed_tokens.weight", None)
    if weight is None:
        return None
    tcfg = target.model.config
    check_dim(what, weight.shape[0], tcfg.vocab_size, "vocab_size")
    check_dim(what, weight.shape[1], tcfg.hidden_size, "hidden_size")
    return nn.Embedding.from_pretrained(weight.to(device=target.device, dtype=target.dtype))


class EagleDrafter:
    """EAGLE-2 dynamic-tree drafter; subclasses swap the head (EAGLE-3)."""

    def __init__(self, spec: SpeculativeConfig, target):
        self.head, embed = self.load_head(spec.model, target)
        self.embed = embed or target.model.model.embed_tokens
        self.head.rotary.reserve(target.model.config.max_position_embeddings + MAX_TREE_NODES, target.device)
        self.top_k, self.depth = spec.top_k, spec.depth
        if spec.top_k < 1 or spec.depth < 1 or 1 + spec.top_k * (spec.depth - 1) > MAX_TREE_NODES:
            raise ValueError(f"EAGLE needs top_k >= 1, depth >= 1 and 1 + top_k * (depth - 1) <= "
                             f"{MAX_TREE_NODES}; got top_k {spec.top_k}, depth {spec.depth}")
        attn = self.head.layers[0].self_attn
        self.num_kv_layers = len(self.head.layers)
        self.kv = DraftKVCache(target, self.num_kv_layers, attn.num_kv_heads, attn.head_dim,
                               scratch_blocks(target.max_num_seqs, target.block_size))
        self.backend = target.backend
        self.max_num_tokens = spec.num_speculative_tokens
        # the fused target feature of each position, by KV slot, filled by the target's forwards
        self.features = SlotFeatures.get(target, self.feature_key(spec), target.model.config.hidden_size,
                                         self.head.fuse)
        # a step's entries: the tokens it committed (at most depth + 1) and the root
        self.runner = DraftRunner(self.kv, self._head_forward, target, [spec.depth + 2], CATCHUP_TOKENS,
                                  hidden_size=target.model.config.hidden_size)
        self.grower = TreeGrower(self._head_forward, self.head.top_k, self.runner, target, spec.top_k, spec.depth,
                                 self.max_num_tokens)

    def load_head(self, path: str, target) -> tuple[nn.Module, nn.Embedding | None]:
        return load_eagle1(path, target)

    @staticmethod
    def feature_key(spec: SpeculativeConfig) -> tuple:
        """EAGLE-1's features are the target's last hidden states."""
        return HIDDEN_STATES

    # ---- following the target -----------------------------------------------------------------------

    def observe(self, requests, results, out) -> None:
        """Forget finished requests; the target's forwards store the features their entries read."""
        for r in requests:
            if r.finished:
                self.kv.forget(r)

    def _inputs(self, reqs: list, spans: list[tuple[int, int]]) -> torch.Tensor:
        """[sum of span lengths, H] the input of entries [start, end) per request: f_{p - 1} for entry p (entry 0
        reads zeros)."""
        return self.features.read([(r.block_ids, p - 1) for r, (s, e) in zip(reqs, spans, strict=True)
                                   for p in range(s, e)])

    def _run_entries(self, reqs: list, spans: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run entries [start, end) of each request; (inputs, outputs) [B, H] of each span's last entry."""
        ends: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for forward in plan_chunks(spans, CATCHUP_TOKENS):
            queries = [DraftQuery(reqs[i].block_ids, s, e - s) for i, s, e in forward]
            ids = [t for i, s, e in forward for t in reqs[i].token_ids[s:e]]
            hidden = self._inputs([reqs[i] for i, _, _ in forward], [(s, e) for _, s, e in forward])
            outs, qsl = self._forward(queries, ids, hidden)
            last = [(i, qsl[j + 1] - 1) for j, (i, _, e) in enumerate(forward) if e == spans[i][1]]
            if last:  # copied out now: the next forward may replay a graph into the same memory
                ins, got = torch.stack([hidden[r] for _, r in last]), torch.stack([outs[r] for _, r in last])
                ends.update(zip([i for i, _ in last], zip(ins, got, strict=True), strict=True))
        return tuple(torch.stack([ends[i][j] for i in range(len(reqs))]) for j in (0, 1))

    def _forward(self, queries: list[DraftQuery], ids, hidden: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        return self.runner.run(queries, ids, hidden)

    def _head_forward(self, input_ids, positions, meta, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids), hidden, positions, meta, self.kv.layers, self.backend)

    # ---- drafting -----------------------------------------------------------------------------------

    @torch.inference_mode()
    def propose(self, requests: Sequence, max_tokens: Sequence[int]) -> list[DraftProposal | None]:
        idx = [i for i, k in enumerate(max_tokens) if k > 0]
        out: list[DraftProposal | None] = [None] * len(requests)
        if not idx:
            return out
        reqs = [requests[i] for i in idx]
        roots = [r.num_computed_tokens for r in reqs]
        # 1. entries not run yet and the root, one causal chunk each: the root's output starts the tree
        spans = [(self.kv.num_valid(r), n + 1) for r, n in zip(reqs, roots, strict=True)]
        root_in, g_root = self._run_entries(reqs, spans)
        for r, n in zip(reqs, roots, strict=True):
            self.kv.set_valid(r, n + 1)
        # 2. EAGLE-2 levels and the rerank, on the device: the verify forward is queued behind them
        budgets = [min(max_tokens[i], self.grower.max_kept) for i in idx]
        drafts = DeviceDrafts(self._grow(reqs, roots, root_in, g_root, budgets).nodes)
        for row, (i, k) in enumerate(zip(idx, budgets, strict=True)):
            out[i] = drafts.proposal(row, k)
        return out

    def _grow(self, reqs, roots, root_in, g_root, budgets) -> GrownTrees:
        return self.grower.grow(reqs, roots, root_in, g_root, budgets)
