"""Medusa-1: extra heads on the target's last hidden state guess the tokens 2, 3, ... positions ahead.

Checkpoint (FasterDecoding/Medusa): config.json with medusa_num_heads and medusa_num_layers, weights in
medusa_lm_head.safetensors (or .pt) keyed `{head}.{layer}.linear.weight/bias` for the ResBlocks
(x + SiLU(linear(x))) and `{head}.{num_layers}.weight` for each head's LM head. With `"share_lm_head": true`
in config.json the heads have no LM head of their own and use the target's.

The hidden state h_t (after the final norm) at the last accepted node gives the bonus token through the
LM head; head i on h_t guesses the token at depth i + 1 below it. The draft is a static tree of top-k ranks,
so it is deterministic (verification takes q as one-hot, which stays exact for sampled requests): the paths of
`SpeculativeConfig.tree` (Medusa's mc_sim lists) when given; else the first num_speculative_tokens of the
checkpoint's `specserve_medusa_choices` when its config.json has them; else tree.default_tree from a prior.

`specserve_medusa_choices` (benchmarks/medusa_accuracy.py --write): rank paths like Medusa's mc_sim lists, most
often fully accepted first, each after its parent path. A path counts on an answer position when it is a prefix of
the ranks (r1, r2, ...) of the true next tokens under heads 0, 1, ...; greedy verification accepts exactly the tree
paths that do, so the first n paths are the n-node tree of most accepted tokens on the calibration answers.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from specserve.attention import MAX_TREE_NODES
from specserve.config import SpeculativeConfig
from specserve.drafters.base import DraftMemory, DraftProposal
from specserve.drafters.checkpoint import check_dim, load_module, read_config, read_tensors
from specserve.drafters.tree import choices_tree, default_tree, static_tree
from specserve.model_runner import HIDDEN_STATES, SlotFeatures, hidden_state_rows
from specserve.models.config import ModelConfig

WEIGHT_FILES = ("medusa_lm_head.safetensors", "medusa_lm_head.pt")
# config.json: the default tree's paths, best first (module docstring; benchmarks/medusa_accuracy.py writes them)
CHOICES_KEY = "specserve_medusa_choices"


class ResBlock(nn.Module):
    """Medusa's residual block: x + SiLU(linear(x))."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


def medusa_heads(hidden: int, vocab: int, num_heads: int, num_layers: int, share_lm_head: bool) -> nn.ModuleList:
    """Heads named as Medusa saves them: head i is Sequential(ResBlock x num_layers[, Linear(hidden, vocab)])."""
    return nn.ModuleList(
        nn.Sequential(*[ResBlock(hidden) for _ in range(num_layers)],
                      *([] if share_lm_head else [nn.Linear(hidden, vocab, bias=False)]))
        for _ in range(num_heads)
    )


def load_medusa(path: str, target) -> tuple[nn.ModuleList, bool]:
    """(heads on the target's device and dtype, share_lm_head) from a Medusa checkpoint directory."""
    cfg = read_config(path)
    what = f"Medusa checkpoint {path!r}"
    if "medusa_num_heads" not in cfg:
        raise ValueError(f"{what}: config.json lacks medusa_num_heads")
    num_heads, num_layers = int(cfg["medusa_num_heads"]), int(cfg.get("medusa_num_layers", 1))
    share = bool(cfg.get("share_lm_head", False))
    tensors = read_tensors(path, WEIGHT_FILES)
    tcfg = target.model.config
    for name, t in tensors.items():  # shapes say what the config may not: hidden size and vocabulary
        if name.endswith("linear.weight"):
            check_dim(what, t.shape[1], tcfg.hidden_size, "hidden_size")
        elif name.endswith(f".{num_layers}.weight"):
            check_dim(what, t.shape[0], tcfg.vocab_size, "vocab_size")
            check_dim(what, t.shape[1], tcfg.hidden_size, "hidden_size")
    heads = medusa_heads(tcfg.hidden_size, tcfg.vocab_size, num_heads, num_layers, share)
    heads.to(device=target.device, dtype=target.dtype)
    load_module(heads, tensors, what)
    return heads.requires_grad_(False).eval(), share


def draft_memory(spec: SpeculativeConfig, target_config: ModelConfig, block_size: int, elem_size: int,
                 max_num_seqs: int) -> DraftMemory:
    """Medusa has no K/V: only the table of the target's hidden states its heads read."""
    return DraftMemory(slot_tables={HIDDEN_STATES: target_config.hidden_size})


class MedusaDrafter:
    """Static-tree drafter over Medusa heads; no KV of its own."""

    num_kv_layers = 0

    def __init__(self, spec: SpeculativeConfig, target):
        self.heads, share = load_medusa(spec.model, target)
        self.lm_head = functools.partial(target.model.compute_logits, backend=target.backend) if share else None
        num_heads, choices = len(self.heads), read_config(spec.model).get(CHOICES_KEY)
        source = "speculative_config.tree" if spec.tree or choices is None else f"{CHOICES_KEY} of {spec.model!r}"
        if spec.tree:
            self.tree = static_tree(spec.tree)
        elif choices is None:
            self.tree = default_tree(spec.num_speculative_tokens, num_heads)
        else:
            try:
                self.tree = choices_tree(choices, spec.num_speculative_tokens)
            except ValueError as e:
                raise ValueError(f"Medusa checkpoint {spec.model!r}: {CHOICES_KEY}: {e}") from None
        if self.tree.depth > num_heads:
            raise ValueError(f"{source} is {self.tree.depth} deep, but the checkpoint has {num_heads} Medusa heads")
        if self.tree.num_nodes >= MAX_TREE_NODES:
            raise ValueError(f"speculative_config.tree has {self.tree.num_nodes} nodes; at most "
                             f"{MAX_TREE_NODES - 1} fit a verify tree")
        self.max_num_tokens = self.tree.num_nodes
        # the target's hidden state of each position, by KV slot, filled by the target's forwards
        self.hidden = SlotFeatures.get(target, HIDDEN_STATES, target.model.config.hidden_size, hidden_state_rows)

    @torch.inference_mode()
    def propose(self, requests: Sequence, max_tokens: Sequence[int]) -> list[DraftProposal | None]:
        idx = [i for i, k in enumerate(max_tokens) if k > 0]
        out: list[DraftProposal | None] = [None] * len(requests)
        if not idx:
            return out
        trees = [self.tree.prefix(max_tokens[i]) for i in idx]
        depth = max(t.depth for t in trees)
        # [B, H] at each root's parent, the last position the target ran
        hidden = self.hidden.read([(requests[i].block_ids, requests[i].num_computed_tokens - 1) for i in idx])
        # every head's rows through one LM head product and one top-k (each a kernel launch and host work)
        guesses = torch.cat([self.heads[d](hidden) for d in range(depth)])  # [depth * B, H or vocab]
        logits = self.lm_head(guesses) if self.lm_head is not None else guesses.float()
        ranked = logits.topk(self.tree.top_k, dim=-1).indices.view(depth, len(idx), -1).transpose(0, 1).tolist()
        for i, tree, r in zip(idx, trees, ranked, strict=True):
            out[i] = DraftProposal(tree.tokens(r), list(tree.parents))
        return out

    def observe(self, requests, results, out) -> None:
        """Nothing to follow: the target's forwards fill the hidden states propose reads."""
