"""Target distributions: logits -> the p that sampling and verification use, after every sampling filter.

Each row is one verify-tree node of one request. Penalties and min_tokens see the tokens on that node's
path as if they had been generated, so p is exactly the distribution plain decoding would sample from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specserve.outputs import Logprob
from specserve.sampling_params import SamplingParams


@dataclass
class RowContext:
    """What processing one logits row needs: its request's params and the tokens it is conditioned on."""

    params: SamplingParams
    committed: list[int]  # prompt + output of the request (shared by its rows, never copied per row)
    num_prompt_tokens: int
    banned_until_min_tokens: frozenset[int]  # eos + stop_token_ids, masked while output < min_tokens
    path: tuple[int, ...] = ()  # the row's draft tokens below the root

    @property
    def num_output_tokens(self) -> int:
        return len(self.committed) + len(self.path) - self.num_prompt_tokens

    @property
    def token_ids(self) -> list[int]:
        return self.committed + list(self.path)


def _apply_row_processors(logits: torch.Tensor, rows: list[RowContext]) -> None:
    """Penalties, logit_bias and the min_tokens mask, row by row, in place."""
    for i, ctx in enumerate(rows):
        p = ctx.params
        if p.has_penalties:
            seen = torch.tensor(ctx.token_ids, device=logits.device)
            if p.repetition_penalty != 1.0:  # over prompt and output, as in vLLM / HF
                ids = seen.unique()
                vals = logits[i, ids]
                logits[i, ids] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            out = seen[ctx.num_prompt_tokens :]
            if out.numel():
                counts = torch.bincount(out, minlength=logits.shape[1]).to(logits.dtype)
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=logits.device)
            logits[i, ids] += torch.tensor(list(p.logit_bias.values()), device=logits.device, dtype=logits.dtype)
        if ctx.num_output_tokens < p.min_tokens and ctx.banned_until_min_tokens:
            logits[i, list(ctx.banned_until_min_tokens)] = float("-inf")


def has_processors(params: SamplingParams, num_output_tokens: int) -> bool:
    """Whether a row with this many output tokens gets penalties, logit_bias or the min_tokens mask."""
    return params.has_penalties or bool(params.logit_bias) or num_output_tokens < params.min_tokens


def process_logits(logits: torch.Tensor, rows: list[RowContext]) -> torch.Tensor:
    """Penalties, logit_bias and min_tokens applied to a copy of logits ([N, vocab] float32); logits itself when
    no row has any (callers never write to the result)."""
    if any(has_processors(r.params, r.num_output_tokens) for r in rows):
        logits = logits.float().clone()
        _apply_row_processors(logits, rows)
        return logits
    # .float() of float32 logits is still an op, and on CUDA every op costs host time
    return logits if logits.dtype == torch.float32 else logits.float()


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list on the device through pinned memory: a copy from pageable memory may wait for the stream,
    and async scheduling queues sampling behind a running forward."""
    t = torch.tensor(values, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


class HostCopy:
    """A device tensor's copy into pinned host memory, started now (behind the work queued so far) and waited
    for later: async scheduling reads a step's tokens after it has queued the next step, and verification reads
    draft trees made on the device after it has queued the forward that checks them."""

    def __init__(self, t: torch.Tensor):
        self.event = None
        self.host = t
        if t.is_cuda:
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def tolist(self) -> list:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


def target_probs(logits: torch.Tensor, rows: list[RowContext]) -> torch.Tensor:
    """Softmax after temperature, top-k, top-p and min-p ([N, vocab] float32); rows must not be greedy."""
    device = logits.device
    temp = to_device([r.params.temperature for r in rows], logits.dtype, device)
    logits = logits / temp[:, None]
    top_k = [r.params.top_k for r in rows]
    if any(top_k):
        k = to_device([min(kk or logits.shape[1], logits.shape[1]) for kk in top_k], torch.int64, device)
        kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    # which filters apply is decided from the params on the host: testing tensors would sync with the GPU
    if any(r.params.top_p < 1.0 for r in rows):
        top_p = to_device([r.params.top_p for r in rows], probs.dtype, device)
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        # Keep the smallest set whose mass reaches top_p: a token is cut if the mass before it already does.
        cut = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p[:, None]
        probs = probs.scatter(1, idx, sorted_p.masked_fill(cut, 0.0))
    if any(r.params.min_p > 0 for r in rows):
        min_p = to_device([r.params.min_p for r in rows], probs.dtype, device)
        probs = probs.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def sample_from(probs: torch.Tensor, u: float) -> int:
    """Inverse-CDF draw from one unnormalized distribution with a uniform u in [0, 1); one host sync."""
    cdf = probs.cumsum(dim=-1)
    return min(int(torch.searchsorted(cdf, cdf[-1:] * u, right=True)), probs.shape[-1] - 1)


def sample_rows(probs: torch.Tensor, uniforms: list[float]) -> torch.Tensor:
    """sample_from for every row of probs ([n, vocab]) with its uniform: [n] int64 left on the device (no sync)."""
    cdf = probs.cumsum(dim=-1)
    u = to_device(uniforms, cdf.dtype, cdf.device)
    return torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).clamp(max=cdf.shape[-1] - 1)[:, 0]


def top_logprobs(
    logits: torch.Tensor, token_ids: list[int], num: list[int], tokenizer
) -> list[dict[int, Logprob]]:
    """For each row: the emitted token's logprob and the top-`num` of the model's distribution."""
    logp = logits.float().log_softmax(dim=-1)  # [N, vocab]
    k = max(num) if num else 0
    top_vals, top_ids = logp.topk(max(k, 1), dim=-1)
    chosen = logp.gather(1, torch.tensor(token_ids, device=logp.device)[:, None]).squeeze(1)
    ranks = (logp > chosen[:, None]).sum(dim=-1) + 1
    top_vals, top_ids, chosen, ranks = top_vals.tolist(), top_ids.tolist(), chosen.tolist(), ranks.tolist()
    result = []
    for i, tok in enumerate(token_ids):
        entry = {tok: Logprob(chosen[i], ranks[i], tokenizer.decode([tok]))}
        for r in range(num[i]):
            t = top_ids[i][r]
            if t not in entry:
                entry[t] = Logprob(top_vals[i][r], r + 1, tokenizer.decode([t]))
        result.append(entry)
    return result
