"""EAGLE-3: the draft reads low, mid and high target features fused by fc, and has its own small vocabulary.

Checkpoint (SafeAILab/EAGLE `cnets.py`): config.json in Llama spelling with draft_vocab_size and, in vLLM's
spelling, eagle_config.eagle_aux_hidden_state_layer_ids (default (2, L // 2, L - 3): the residual streams
entering those target layers); model.safetensors or pytorch_model.bin with fc.weight [H, 3H],
midlayer.* (also read as layers.0.*), norm.weight, lm_head.weight [Vd, H], d2t [Vd] (target id = draft
id + d2t[draft id]; optional when Vd = V), t2d [V] (unused here) and optionally embed_tokens.weight. A
checkpoint whose config sets `specserve_shared_lm_head` (ours, from `train-drafter --draft-vocab-size 0`)
stores no lm_head: its draft vocabulary is the target's, through the target's LM head.

The midlayer's attention reads cat(input_layernorm(embedding), hidden_norm(hidden)) [2H] and its residual
is the raw hidden. fc only fuses target features (an entry's input); inside the tree a node's input is its
parent's draft output as is, and logits are lm_head(norm(output)). Entries, KV and the EAGLE-2 tree are
EagleDrafter's.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn

from specserve.config import SpeculativeConfig
from specserve.drafters.base import DraftMemory
from specserve.drafters.checkpoint import check_dim, load_module, read_config, read_tensors
from specserve.drafters.eagle import (
    WEIGHT_FILES,
    EagleDrafter,
    _own_embedding,
    draft_config,
    head_config,
    tree_draft_memory,
)
from specserve.models.config import ModelConfig
from specserve.models.llama import LlamaDecoderLayer, RMSNorm, RotaryEmbedding, make_linear

SHARED_LM_HEAD_KEY = "specserve_shared_lm_head"  # config.json: no lm_head stored, the target's serves (full vocab)


class Eagle3Layer(LlamaDecoderLayer):
    """EAGLE-3's decoder layer: q/k/v read [normed embedding; normed hidden] (2H)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        h, a = cfg.hidden_size, self.self_attn
        self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps)
        a.qkv_proj = make_linear(2 * h, sum(a.qkv_sizes), False)

    def forward(self, emb, hidden, positions, rotary, meta, kv_cache, backend) -> torch.Tensor:
        x = torch.cat((self.input_layernorm(emb, backend=backend), self.hidden_norm(hidden, backend=backend)), dim=-1)
        h, x = self.post_attention_layernorm(self.self_attn(x, positions, rotary, meta, kv_cache, backend), hidden,
                                             backend)  # the residual is the raw hidden
        return h + self.mlp(x, backend)


class Eagle3Head(nn.Module):
    """fc over the aux features, the midlayer, norm, and an LM head over the draft vocabulary: its own, or the
    target's (target_logits: the whole vocabulary, nothing stored)."""

    def __init__(self, cfg: ModelConfig, num_aux: int, draft_vocab_size: int, target_logits=None):
        super().__init__()
        h = cfg.hidden_size
        self.fc = nn.Linear(num_aux * h, h, bias=False)
        self.midlayer = Eagle3Layer(cfg)
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(h, draft_vocab_size, bias=False) if target_logits is None else None
        self._target_logits = target_logits  # a bound method: the target's LM head stays out of this module
        self.register_buffer("d2t", torch.zeros(draft_vocab_size, dtype=torch.int64))
        self.rotary = RotaryEmbedding(cfg)

    @property
    def layers(self) -> list[nn.Module]:
        return [self.midlayer]

    def fuse(self, out) -> torch.Tensor:
        """[T, H] fc(cat(low, mid, high)) of a target forward's tokens."""
        return self.fc(torch.cat(out.aux_hidden_states, dim=-1))

    def forward(self, emb, hidden, positions, meta, kv_layers, backend) -> torch.Tensor:
        return self.midlayer(emb, hidden, positions, self.rotary, meta, kv_layers[0], backend)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, draft vocab] float32 logits of draft outputs [N, H]."""
        if self.lm_head is None:
            return self._target_logits(self.norm(hidden))
        return self.lm_head(self.norm(hidden)).float()

    def top_k(self, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs [N, k], target token ids [N, k]) of the k likeliest draft-vocabulary tokens."""
        logp, ids = self.logits(hidden).log_softmax(dim=-1).topk(k, dim=-1)
        return logp, ids + self.d2t[ids]


def aux_layers(raw: dict, num_layers: int, what: str) -> tuple[int, ...]:
    """The target layers whose input EAGLE-3 fuses: the checkpoint's choice, else (2, L // 2, L - 3)."""
    layers = tuple((raw.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
                   or (2, num_layers // 2, num_layers - 3))
    if any(not 0 <= i <= num_layers for i in layers):
        raise ValueError(f"{what}: aux layers {list(layers)} are outside the target's 0..{num_layers}")
    return layers


def load_eagle3(path: str, target) -> tuple[Eagle3Head, nn.Embedding | None, tuple[int, ...]]:
    """EAGLE-3 head (and its own embedding, if any) on the target's device/dtype, and the aux layers it reads."""
    what = f"EAGLE-3 checkpoint {path!r}"
    raw = read_config(path)
    cfg = draft_config(raw, target, what)
    tcfg = target.model.config
    layers = aux_layers(raw, tcfg.num_layers, what)
    draft_vocab = int(raw.get("draft_vocab_size") or cfg.vocab_size)
    shared = bool(raw.get(SHARED_LM_HEAD_KEY))
    if shared and draft_vocab != tcfg.vocab_size:
        raise ValueError(f"{what} sets {SHARED_LM_HEAD_KEY} (it drafts through the target's LM head), so its "
                         f"draft_vocab_size {draft_vocab} must be the target's vocab_size {tcfg.vocab_size}")
    tensors = {k.replace("layers.0.", "midlayer.", 1) if k.startswith("layers.0.") else k: v
               for k, v in read_tensors(path, WEIGHT_FILES).items()}
    tensors.pop("t2d", None)  # the target -> draft map: training needs it, drafting does not
    if draft_vocab == cfg.vocab_size:
        tensors.setdefault("d2t", torch.zeros(draft_vocab, dtype=torch.int64))  # the identity map
    if "fc.weight" in tensors:
        check_dim(what, tensors["fc.weight"].shape[1], len(layers) * tcfg.hidden_size, "fc input size")
    embed = _own_embedding(tensors, target, what)
    logits = functools.partial(target.model.compute_logits, backend=target.backend) if shared else None
    head = Eagle3Head(cfg, len(layers), draft_vocab, logits).to(device=target.device, dtype=target.dtype)
    load_module(head, tensors, what)
    return head.requires_grad_(False).eval(), embed, layers


class Eagle3Drafter(EagleDrafter):
    """EAGLE-2 dynamic trees drafted by an EAGLE-3 head; the target hands it its aux layers' features."""

    def load_head(self, path: str, target) -> tuple[nn.Module, nn.Embedding | None]:
        head, embed, layers = load_eagle3(path, target)
        target.model.aux_layers = layers  # from now on every target forward returns these features
        return head, embed

    @staticmethod
    def feature_key(spec: SpeculativeConfig) -> tuple:
        """EAGLE-3's features come through its checkpoint's fc: arms of one checkpoint share them."""
        return ("eagle3", os.path.realpath(spec.model))


def draft_memory(spec: SpeculativeConfig, target_config: ModelConfig, block_size: int, elem_size: int,
                 max_num_seqs: int) -> DraftMemory:
    """EAGLE-3's allocations: the midlayer is its one K/V layer; its fused features get a table of their own."""
    head = head_config(read_config(spec.model))
    return tree_draft_memory(head, 1, Eagle3Drafter.feature_key(spec), target_config, block_size, elem_size,
                             max_num_seqs)
