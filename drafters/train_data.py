"""Self-distillation data for drafter training: the target's own answers, then its features on them.

1. `distill`: the target answers the training prompts (chat template applied) with our model and attention
   backend, a static batch of sequences at a time, sampled on the device at each sequence's temperature, so
   a drafter learns the distribution it will be verified against, not some other model's text. The engine
   would give the same answers, but it samples row by row on the host (~0.25 ms per sequence per step: 3.4k
   tokens/s at batch 256 on an H200), which makes many samples per prompt cost minutes. Cached as
   safetensors: all token ids concatenated plus offsets.
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

BLOCK_SIZE = 16  # of the scratch KV pools of generation and the teacher pass


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


def encode_chat(tokenizer, prompt: str) -> list[int]:
    """Token ids of a one-turn chat ready for the answer (what `LLM.chat` feeds the model)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


@dataclass
class Distilled:
    """(prompt + target answer) token ids of M sequences, concatenated; answers start at prompt_lens[i]."""

    tokens: torch.Tensor  # [N] int32
    offsets: torch.Tensor  # [M + 1] int64: sequence i is tokens[offsets[i] : offsets[i + 1]]
    prompt_lens: torch.Tensor  # [M] int64
    prompt_index: torch.Tensor  # [M] int64: which prompt (line of the prompts file) sequence i answers
    temperatures: torch.Tensor  # [M] float32: the temperature its answer was sampled at
    meta: dict

    @classmethod
    def from_lists(cls, sequences: list[list[int]], prompt_lens: list[int], prompt_index: list[int],
                   temperatures: list[float], meta: dict) -> Distilled:
        lens = torch.tensor([0] + [len(s) for s in sequences], dtype=torch.int64)
        return cls(torch.tensor([t for s in sequences for t in s], dtype=torch.int32), lens.cumsum(0),
                   torch.tensor(prompt_lens, dtype=torch.int64), torch.tensor(prompt_index, dtype=torch.int64),
                   torch.tensor(temperatures, dtype=torch.float32), meta)

    @property
    def num_sequences(self) -> int:
        return self.prompt_lens.shape[0]

    @property
    def lens(self) -> torch.Tensor:
        return self.offsets.diff()

    @property
    def num_answer_tokens(self) -> int:
        return int((self.lens - self.prompt_lens).sum())

    def answer_mask(self) -> torch.Tensor:
        """[N] bool: which of the concatenated tokens belong to answers."""
        seq_of = torch.repeat_interleave(torch.arange(self.num_sequences), self.lens)
        return torch.arange(self.tokens.shape[0]) - self.offsets[seq_of] >= self.prompt_lens[seq_of]

    def save(self, path: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tensors = {"tokens": self.tokens, "offsets": self.offsets, "prompt_lens": self.prompt_lens,
                   "prompt_index": self.prompt_index, "temperatures": self.temperatures}
        tmp = f"{path}.{os.getpid()}.tmp"  # runs sharing a cache may write it at once: each its own file
        save_file(tensors, tmp, metadata={"meta": json.dumps(self.meta)})
        os.replace(tmp, path)  # a run killed mid-write leaves no half cache

    @classmethod
    def load(cls, path: str) -> Distilled:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}
            meta = json.loads(f.metadata()["meta"])
        return cls(t["tokens"], t["offsets"], t["prompt_lens"], t["prompt_index"], t["temperatures"], meta)


@dataclass
class DistillPlan:
    """What to generate: every prompt answered once greedily if 0 is among the temperatures, and
    num_samples times at each temperature above 0."""

    prompts: list[list[int]]  # chat-formatted token ids
    temperatures: list[float]
    num_samples: int
    max_tokens: int
    batch_size: int  # sequences per static generation batch
    seed: int

    def jobs(self) -> list[tuple[int, float]]:
        """(prompt index, temperature) of every answer, prompt by prompt."""
        per_prompt = [t for t in self.temperatures for _ in range(1 if t == 0 else self.num_samples)]
        return [(p, t) for p in range(len(self.prompts)) for t in per_prompt]


@torch.inference_mode()
def distill(model, backend, plan: DistillPlan, eos_token_ids, device, meta: dict) -> Distilled:
    """The target's answers for every job of the plan, generated batch_size sequences at a time."""
    jobs = plan.jobs()
    batches = [jobs[i : i + plan.batch_size] for i in range(0, len(jobs), plan.batch_size)]
    kv = _kv_pool(model, max(_num_blocks([len(plan.prompts[p]) + plan.max_tokens for p, _ in b]) for b in batches),
                  device)
    gen = torch.Generator(device=device).manual_seed(plan.seed)
    eos = torch.tensor(sorted(eos_token_ids), dtype=torch.int64, device=device)
    seqs, plens = [], []
    for batch in tqdm(batches, desc="distill"):
        prompts = [plan.prompts[p] for p, _ in batch]
        answers = sample_answers(model, backend, kv, prompts, [t for _, t in batch], plan.max_tokens, eos, gen)
        seqs += [p + a for p, a in zip(prompts, answers, strict=True)]
        plens += [len(p) for p in prompts]
    return Distilled.from_lists(seqs, plens, [p for p, _ in jobs], [t for _, t in jobs], meta)


def _num_blocks(lens: list[int]) -> int:
    return sum(-(-n // BLOCK_SIZE) for n in lens)


def _kv_pool(model, num_blocks: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Scratch paged KV for every layer, zeroed: a backend may read (masked) padding slots, which must be finite."""
    cfg = model.config
    dtype = next(model.parameters()).dtype
    shape = (num_blocks, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(cfg.num_layers)]


def _consecutive_tables(lens: list[int]) -> torch.Tensor:
    """[B, W] int32 block tables where sequence b owns the next ceil(lens[b] / BLOCK_SIZE) blocks of the pool."""
    nblocks = [-(-n // BLOCK_SIZE) for n in lens]
    first = torch.tensor([0, *nblocks]).cumsum(0)
    tables = torch.zeros(len(lens), max(nblocks), dtype=torch.int32)
    for b, n in enumerate(nblocks):
        tables[b, :n] = torch.arange(first[b], first[b] + n)
    return tables


def sample_answers(model, backend, kv, prompts: list[list[int]], temperatures: list[float], max_tokens: int,
                   eos: torch.Tensor, gen: torch.Generator) -> list[list[int]]:
    """One static batch: prefill every prompt, then up to max_tokens - 1 decode steps for all rows (a row that
    ended keeps stepping, its tokens cut afterwards) until every row has ended.

    Row b draws from softmax(logits / temperatures[b]) (argmax at 0); its answer ends with its first eos
    token, which it keeps, as the engine's outputs do.
    """
    device = eos.device
    if max(len(p) for p in prompts) + max_tokens > model.config.max_position_embeddings:
        raise ValueError(f"a prompt plus --max-tokens {max_tokens} exceeds the model's context")
    tables = _consecutive_tables([len(p) + max_tokens for p in prompts])
    temps = torch.tensor(temperatures, dtype=torch.float32, device=device)
    last = []  # logits rows at each prompt's last token
    for group in _token_batches([len(p) for p in prompts], 16384):
        lens = [len(prompts[i]) for i in group]
        meta, positions = paged_meta(tables[group], [0] * len(group), lens, device)
        ids = torch.tensor([t for i in group for t in prompts[i]], device=device)
        hidden = model(ids, positions, meta, kv, backend).hidden_states
        last.append(model.compute_logits(hidden[torch.tensor(lens, device=device).cumsum(0) - 1]))
    out = torch.full((max_tokens, len(prompts)), int(eos[0]), dtype=torch.int64, device=device)  # [step, B]
    out[0] = _draw(torch.cat(last), temps, gen)
    ended = torch.isin(out[0], eos)
    dev_tables = tables.to(device)
    pos = torch.tensor([len(p) for p in prompts], device=device)  # where the token fed next goes
    qsl = torch.arange(len(prompts) + 1, dtype=torch.int32, device=device)
    longest = max(len(p) for p in prompts)
    for step in range(1, max_tokens):
        if step % 16 == 0 and bool(ended.all()):  # one host sync every 16 steps
            break
        meta = decode_meta(dev_tables, pos, qsl, longest + step)
        hidden = model(out[step - 1], pos, meta, kv, backend).hidden_states
        out[step] = _draw(model.compute_logits(hidden), temps, gen)
        ended |= torch.isin(out[step], eos)
        pos = pos + 1
    is_eos = torch.isin(out.T, eos)  # [B, max_tokens]
    lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, max_tokens).tolist()
    return [row[:n] for row, n in zip(out.T.tolist(), lengths, strict=True)]


def _draw(logits: torch.Tensor, temps: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """[B] next tokens: a draw from softmax(logits / T) per row, argmax where T is 0."""
    probs = torch.softmax(logits / temps.clamp_min(1e-6)[:, None], dim=-1)
    drawn = torch.multinomial(probs, 1, generator=gen).squeeze(1)
    return torch.where(temps > 0, drawn, logits.argmax(-1))


def decode_meta(tables: torch.Tensor, pos: torch.Tensor, qsl: torch.Tensor, max_seq_len: int) -> AttentionMetadata:
    """One new token per sequence at positions pos [B] over its block table (all on the device, no sync);
    qsl is arange(B + 1), int32."""
    num = pos.shape[0]
    slots = tables.gather(1, (pos // BLOCK_SIZE)[:, None]).squeeze(1).long() * BLOCK_SIZE + pos % BLOCK_SIZE
    return AttentionMetadata(
        query_start_loc=qsl, seq_lens=(pos + 1).int(), context_lens=pos.int(), block_tables=tables,
        slot_mapping=slots, tree_offsets=torch.zeros_like(qsl[:num]),
        tree_mask=torch.ones(num, dtype=torch.int64, device=pos.device),  # each token is its own tree root
        max_query_len=1, max_seq_len=max_seq_len, block_size=BLOCK_SIZE,
    )


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


def paged_meta(tables: torch.Tensor, context_lens: list[int], query_lens: list[int], device
               ) -> tuple[AttentionMetadata, torch.Tensor]:
    """Metadata of causal chunks without drafts: sequence b's query_lens[b] tokens follow its context_lens[b]
    cached ones, in the blocks of tables[b] ([B, W] int32 on the host). Returns (meta, positions [T])."""
    q, ctx = torch.tensor(query_lens), torch.tensor(context_lens)
    seq_of = torch.repeat_interleave(torch.arange(len(q)), q)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), q.cumsum(0)])
    positions = ctx[seq_of] + torch.arange(int(cu[-1])) - cu[seq_of]  # [T]
    slots = tables[seq_of, positions // BLOCK_SIZE].long() * BLOCK_SIZE + positions % BLOCK_SIZE
    tree_mask = torch.zeros(len(positions), dtype=torch.int64)
    tree_mask[cu[1:] - 1] = 1  # the last token of each sequence is the tree root (mask 0b1); the rest is causal
    meta = AttentionMetadata(
        query_start_loc=cu.to(device, torch.int32),
        seq_lens=(ctx + q).to(device, torch.int32),
        context_lens=ctx.to(device, torch.int32),
        block_tables=tables.to(device),
        slot_mapping=slots.to(device),
        tree_offsets=(q - 1).to(device, torch.int32),
        tree_mask=tree_mask.to(device),
        max_query_len=int(q.max()),
        max_seq_len=int((ctx + q).max()),
        block_size=BLOCK_SIZE,
    )
    return meta, positions.to(device)


def causal_meta(query_lens: list[int], device) -> tuple[AttentionMetadata, torch.Tensor]:
    """Metadata of whole sequences prefilled at once (no cache, no drafts) over consecutive blocks.

    Sequence b owns blocks [first_b, first_b + ceil(len_b / BLOCK_SIZE)); returns (meta, positions [T]).
    """
    return paged_meta(_consecutive_tables(query_lens), [0] * len(query_lens), query_lens, device)


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
def collect_features(model, backend, data: Distilled, device, *, aux: bool, batch_tokens: int = 8192
                     ) -> FeatureSet:
    """Teacher-forced target pass over every sequence, written straight into the flat feature tensors."""
    cfg = model.config
    lens = data.lens.tolist()
    offsets = data.offsets.tolist()
    groups = _token_batches(lens, batch_tokens)
    kv = _kv_pool(model, max(_num_blocks([lens[i] for i in g]) for g in groups), device)
    dtype = next(model.parameters()).dtype
    num_tokens = offsets[-1]
    # Preallocated, not concatenated from per-batch pieces: at ~2M tokens the EAGLE-3 aux features alone
    # are ~7 GB in bf16, and a cat would hold them twice.
    hidden = torch.empty(num_tokens, cfg.hidden_size, dtype=dtype, device=device)
    aux_width = len(model.aux_layers) * cfg.hidden_size
    aux_t = torch.empty(num_tokens, aux_width, dtype=dtype, device=device) if aux else None
    for g in tqdm(groups, desc="target features"):
        s, e = offsets[g[0]], offsets[g[-1] + 1]
        meta, positions = causal_meta([lens[i] for i in g], device)
        out = model(data.tokens[s:e].to(device, torch.int64), positions, meta, kv, backend)
        hidden[s:e] = out.hidden_states
        if aux_t is not None:
            torch.cat(out.aux_hidden_states, dim=-1, out=aux_t[s:e])
    del kv
    return FeatureSet(
        tokens=data.tokens.to(device, torch.int64),
        hidden=hidden,
        aux=aux_t,
        starts=data.offsets[:-1].to(device),
        lens=data.lens.to(device),
        prompt_lens=data.prompt_lens.to(device),
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
