"""Self-distillation data for drafter training: the target's own answers, then its features on them.

1. `distill`: the target answers the training prompts through our engine (`LLM.chat`, batched), so a drafter
   learns the distribution it will be verified against, not some other model's text. Cached as JSON.
2. `collect_features`: one teacher-forced target forward per batch of (prompt + answer) sequences, through
   our own model over a scratch paged-KV pool (plain causal chunks), keeping what the drafters read at run
   time: the last hidden state after the final norm (EAGLE's and Medusa's input; it also gives the target's
   logits through the LM head, so the full distribution is never stored) and the EAGLE-3 aux layers.
3. `Batches`: padded [B, S] index views over the flat features for training.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from tqdm import tqdm

from specserve.attention import AttentionMetadata


def load_prompts(path: str, max_prompts: int | None = None) -> list[str]:
    """User prompts of a JSONL file (`prompt`, or the first of `turns`); refuses the MT-bench eval set."""
    if os.path.basename(path).startswith("mt_bench"):
        raise ValueError(f"{path} is an evaluation set: drafters must never be trained on MT-bench")
    prompts = []
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                prompts.append(row["prompt"] if "prompt" in row else row["turns"][0])
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts[:max_prompts] if max_prompts else prompts


@dataclass
class Distilled:
    """Token ids of (prompt + target answer) per sequence; answers start at prompt_lens[i]."""

    sequences: list[list[int]]
    prompt_lens: list[int]
    meta: dict

    @property
    def num_answer_tokens(self) -> int:
        return sum(len(s) - p for s, p in zip(self.sequences, self.prompt_lens, strict=True))

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump({"meta": self.meta, "sequences": self.sequences, "prompt_lens": self.prompt_lens}, f)
        os.replace(path + ".tmp", path)  # a run killed mid-write leaves no half cache

    @classmethod
    def load(cls, path: str) -> Distilled:
        with open(path) as f:
            d = json.load(f)
        return cls(d["sequences"], d["prompt_lens"], d["meta"])


def distill(llm, prompts: list[str], params, meta: dict) -> Distilled:
    """The target's answers to every prompt (params.n each), generated in one batched engine run."""
    outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=True)
    seqs, plens = [], []
    for out in outs:
        for comp in out.outputs:
            if comp.token_ids:
                seqs.append(list(out.prompt_token_ids) + list(comp.token_ids))
                plens.append(len(out.prompt_token_ids))
    return Distilled(seqs, plens, meta)


@dataclass
class FeatureSet:
    """Flat per-token target data of all sequences (N tokens), on the training device."""

    tokens: torch.Tensor  # [N] int64
    hidden: torch.Tensor  # [N, H] last hidden state after the final norm (logits = lm_head(hidden))
    aux: torch.Tensor | None  # [N, len(aux_layers) * H] EAGLE-3's concatenated low/mid/high features
    starts: torch.Tensor  # [M] int64: first flat index of each sequence
    lens: torch.Tensor  # [M] int64
    prompt_lens: torch.Tensor  # [M] int64

    @property
    def num_seqs(self) -> int:
        return self.lens.shape[0]


def causal_meta(query_lens: list[int], block_size: int, device) -> tuple[AttentionMetadata, torch.Tensor]:
    """Metadata of whole sequences prefilled at once (no cache, no drafts) over consecutive blocks.

    Sequence b owns blocks [first_b, first_b + ceil(len_b / block_size)); returns (meta, positions [T]).
    """
    nblocks = [-(-q // block_size) for q in query_lens]
    first = torch.tensor([0, *nblocks]).cumsum(0)
    width = max(nblocks)
    tables = torch.zeros(len(query_lens), width, dtype=torch.int32)
    for b, n in enumerate(nblocks):
        tables[b, :n] = torch.arange(first[b], first[b] + n)
    positions = torch.cat([torch.arange(q) for q in query_lens])  # [T]
    seq_of = torch.repeat_interleave(torch.arange(len(query_lens)), torch.tensor(query_lens))
    slots = first[seq_of] * block_size + positions  # blocks are consecutive, so slots are too
    # The last token of each sequence is the tree root (mask 0b1); the others attend causally.
    ends = torch.tensor(query_lens).cumsum(0) - 1
    tree_mask = torch.zeros(len(positions), dtype=torch.int64)
    tree_mask[ends] = 1
    lens = torch.tensor(query_lens, dtype=torch.int32)
    meta = AttentionMetadata(
        query_start_loc=torch.cat([torch.zeros(1, dtype=torch.int32), lens.cumsum(0, dtype=torch.int32)]).to(device),
        seq_lens=lens.to(device),
        context_lens=torch.zeros_like(lens).to(device),
        block_tables=tables.to(device),
        slot_mapping=slots.to(device),
        tree_offsets=(lens - 1).to(device),
        tree_mask=tree_mask.to(device),
        max_query_len=max(query_lens),
        max_seq_len=max(query_lens),
        block_size=block_size,
    )
    return meta, positions.to(device)


def _token_batches(lens: list[int], max_tokens: int) -> list[list[int]]:
    """Consecutive sequence indices grouped to at most max_tokens tokens (a longer sequence goes alone)."""
    groups, cur, total = [], [], 0
    for i, n in enumerate(lens):
        if cur and total + n > max_tokens:
            groups.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += n
    return groups + [cur] if cur else groups


@torch.no_grad()  # not inference_mode: the features become inputs of modules trained with autograd
def collect_features(
    model, backend, data: Distilled, device, *, aux: bool, batch_tokens: int = 8192, block_size: int = 16
) -> FeatureSet:
    """Teacher-forced target pass over every sequence, keeping the features the drafters need."""
    cfg = model.config
    lens = [len(s) for s in data.sequences]
    groups = _token_batches(lens, batch_tokens)
    num_blocks = max(sum(-(-lens[i] // block_size) for i in g) for g in groups)
    dtype = next(model.parameters()).dtype
    shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    kv = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
          for _ in range(cfg.num_layers)]  # zeros: a backend may read (masked) padding slots
    hidden, auxes = [], []
    for g in tqdm(groups, desc="target features"):
        ids = torch.tensor([t for i in g for t in data.sequences[i]], device=device)  # [T]
        meta, positions = causal_meta([lens[i] for i in g], block_size, device)
        out = model(ids, positions, meta, kv, backend)
        hidden.append(out.hidden_states)
        if aux:
            auxes.append(torch.cat(out.aux_hidden_states, dim=-1))
    lens_t = torch.tensor(lens, dtype=torch.int64)
    return FeatureSet(
        tokens=torch.tensor([t for s in data.sequences for t in s], dtype=torch.int64, device=device),
        hidden=torch.cat(hidden),
        aux=torch.cat(auxes) if aux else None,
        starts=(lens_t.cumsum(0) - lens_t).to(device),
        lens=lens_t.to(device),
        prompt_lens=torch.tensor(data.prompt_lens, dtype=torch.int64, device=device),
    )


@dataclass
class Batch:
    """Padded view of B sequences: flat index of (t + shift) clamped into each sequence, and validity."""

    fs: FeatureSet
    idx: torch.Tensor  # [B, S + max_shift] int64 flat index of position t (clamped to the sequence end)
    pos: torch.Tensor  # [S] int64 positions 0..S-1
    lens: torch.Tensor  # [B, 1]
    prompt_lens: torch.Tensor  # [B, 1]

    @property
    def seq_len(self) -> int:
        return self.pos.shape[0]

    def at(self, shift: int) -> torch.Tensor:
        """[B, S] flat index of position t + shift."""
        return self.idx[:, shift : shift + self.seq_len]

    def answer_mask(self, shift: int) -> torch.Tensor:
        """[B, S] bool: the target's prediction at u = t + shift is of an answer token (P - 1 <= u <= n - 2)."""
        u = self.pos[None, :] + shift
        return (u >= self.prompt_lens - 1) & (u <= self.lens - 2)


def make_batch(fs: FeatureSet, seq_ids: torch.Tensor, max_shift: int) -> Batch:
    """Padded [B, S] view of the sequences seq_ids, with max_shift extra columns for shifted targets."""
    lens = fs.lens[seq_ids][:, None]  # [B, 1]
    seq_len = int(lens.max())
    t = torch.arange(seq_len + max_shift, device=lens.device)[None, :]  # [1, S + max_shift]
    idx = fs.starts[seq_ids][:, None] + torch.minimum(t, lens - 1)  # [B, S + max_shift]
    return Batch(fs, idx, t[0, :seq_len], lens, fs.prompt_lens[seq_ids][:, None])
