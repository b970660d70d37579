"""Stochastic verification of branching draft trees is exact: emitted tokens follow the target's distribution.

A random tree drafter proposes, for every draw, a fresh tree of one fixed branching shape whose tokens are
drawn i.i.d. from a draft distribution q; verification gets either q itself (sampled drafts) or no q (one-hot,
as for Medusa / EAGLE top-k trees). Chi-square tests with fixed seeds then compare
  - the first emitted token with p(. | prompt),
  - the second token, over the draws whose first token was an accepted depth-1 node x, with the sum of
    p(. | prompt, x) over those draws (contexts differ per draw: conservative, but exact in mean),
and a power check makes sure the first test rejects q itself.

Only the rows of the root and of depth-1 nodes shape those two tokens, so they come from real tree forwards
of the tiny model (the root with 63 children per sequence, every vocabulary token once); deeper nodes reuse
the root's row, which only changes tokens after the second.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from specserve.attention import MAX_TREE_NODES, AttentionMetadata, ancestor_masks
from specserve.drafters.base import DraftProposal
from specserve.kernels import reference
from specserve.models.loader import load_model
from specserve.sampler import RowContext, target_probs
from specserve.sampling_params import SamplingParams
from specserve.verify import VerifyItem, verify

PARENTS = [0, 0, 0, 1, 1, 2, 4]  # root -> 1, 2, 3; 1 -> 4, 5; 2 -> 6; 4 -> 7
DEPTH1 = [j + 1 for j, p in enumerate(PARENTS) if p == 0]
NUM_DRAWS = 20_000
PROMPT = [1, 40, 41, 42, 43]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    model = load_model(tiny_model_dir(), torch.float32, "cpu").model
    # A random model's next-token distribution is nearly flat; doubling the final norm sharpens it (top token
    # ~0.36 at temperature 1) so one-hot drafts get accepted often enough to test what follows them.
    with torch.no_grad():
        model.model.norm.weight.mul_(2.0)
    return model


def star_logits(model, children: torch.Tensor) -> torch.Tensor:
    """[P, 1 + m, vocab]: logits after PROMPT (the root) and after each child, for P trees root -> m children."""
    p, m = children.shape
    n, bs = len(PROMPT), 16
    q_len = n + m
    nb = -(-q_len // bs)
    ids = torch.cat([torch.tensor(PROMPT).expand(p, n), children], dim=1).flatten()  # [P * q_len]
    positions = torch.cat([torch.arange(n), torch.full((m,), n)]).repeat(p)
    meta = AttentionMetadata(
        query_start_loc=torch.arange(p + 1, dtype=torch.int32) * q_len,
        seq_lens=torch.full((p,), q_len, dtype=torch.int32),
        context_lens=torch.zeros(p, dtype=torch.int32),
        block_tables=(torch.arange(p)[:, None] * nb + torch.arange(nb)).to(torch.int32),  # seq b: its own blocks
        slot_mapping=(torch.arange(p)[:, None] * nb * bs + torch.arange(q_len)).flatten(),
        tree_offsets=torch.full((p,), n - 1, dtype=torch.int32),
        tree_mask=torch.tensor([0] * (n - 1) + ancestor_masks([0] * m)).repeat(p),
        max_query_len=q_len,
        max_seq_len=q_len,
        block_size=bs,
    )
    cfg = model.config
    shape = (p * nb, bs, cfg.num_kv_heads, cfg.head_dim)
    kv = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.num_layers)]
    with torch.inference_mode():
        hidden = model(ids, positions, meta, kv, reference).hidden_states.view(p, q_len, -1)
        return model.compute_logits(hidden[:, n - 1 :])


def probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    rows = [RowContext(params, PROMPT, len(PROMPT), frozenset())] * logits.shape[0]
    return target_probs(logits, rows)


def chi2_pvalue(samples: list[int], p: np.ndarray) -> float:
    """Chi-square p-value of token samples against p; bins expecting < 5 are pooled into one."""
    counts = np.bincount(samples, minlength=len(p)).astype(np.float64)
    p = p.astype(np.float64)
    expected = p / p.sum() * len(samples)
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return float(chisquare(obs[keep], exp[keep]).pvalue)


@pytest.mark.parametrize(
    "sampled_q, temperature",
    [(False, 1.0), (False, 0.6), (True, 1.0), (True, 0.6)],
)
def test_tree_verification_is_exact(model, sampled_q, temperature):
    params = SamplingParams(temperature=temperature, max_tokens=8)
    vocab = model.config.vocab_size
    width = MAX_TREE_NODES - 1
    every = torch.arange(-(-vocab // width) * width).remainder(vocab).view(-1, width)  # each token at least once
    star = star_logits(model, every)
    root = star[0, 0]  # [vocab] logits after the prompt
    after = torch.empty(vocab, vocab)  # after[x]: logits after prompt + x
    after[every.flatten()] = star[:, 1:].flatten(0, 1)
    p_root = probs(root[None], params)[0]
    q = 0.8 * p_root + 0.2 / vocab  # the draft distribution: mostly the target's root distribution

    gen = torch.Generator().manual_seed(1234)
    trees = torch.multinomial(q.expand(NUM_DRAWS, -1), len(PARENTS), replacement=True, generator=gen)  # [N, m]
    rows = root.expand(NUM_DRAWS, 1 + len(PARENTS), vocab).clone()  # [N, 1 + m, vocab]
    rows[:, DEPTH1] = after[trees[:, [j - 1 for j in DEPTH1]]]
    req = SimpleNamespace(params=params, token_ids=PROMPT, num_prompt_tokens=len(PROMPT), eos_token_ids=frozenset())
    draft_probs = q.expand(len(PARENTS), -1) if sampled_q else None
    results, batch = [], 4000
    for start in range(0, NUM_DRAWS, batch):
        items = [VerifyItem(req, DraftProposal(trees[i].tolist(), PARENTS, draft_probs), j * (1 + len(PARENTS)), gen)
                 for j, i in enumerate(range(start, start + batch))]
        results += verify(items, rows[start : start + batch].flatten(0, 1))

    first = [r.token_ids[0] for r in results]
    assert chi2_pvalue(first, p_root.numpy()) > 1e-3
    assert chi2_pvalue(first, q.numpy()) < 1e-6  # the test can tell a wrong distribution

    accepted = [r for r in results if len(r.accepted_nodes) > 1]
    assert len(accepted) > 2000
    expected = probs(after[[r.token_ids[0] for r in accepted]], params).double().sum(0)  # [vocab]
    assert chi2_pvalue([r.token_ids[1] for r in accepted], expected.numpy()) > 1e-3
