"""Verification: golden greedy tree walks, and exactness of speculative sampling (chi-square)."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from specserve.drafters.base import DraftProposal
from specserve.request import Request
from specserve.sampler import RowContext, process_logits, target_probs
from specserve.sampling_params import SamplingParams
from specserve.verify import VerifyItem, _walk_chains, _walk_sampling, verify


def make_request(params: SamplingParams, prompt: list[int]) -> Request:
    return Request(
        request_id="r#0", group_id="r", index=0, token_ids=list(prompt), num_prompt_tokens=len(prompt),
        params=params, max_tokens=params.max_tokens or 16, eos_token_ids=frozenset(), detokenizer=None,
        generator=None, spec_arm="test", metrics=None,
    )


def one_hot_logits(argmaxes: list[int], vocab: int = 16) -> torch.Tensor:
    logits = torch.zeros(len(argmaxes), vocab)  # [num_rows, vocab]
    logits[torch.arange(len(argmaxes)), torch.tensor(argmaxes)] = 10.0
    return logits


def test_greedy_walk_follows_the_matching_child():
    # root -> {1: tok 5, 2: tok 6}; 1 -> {3: tok 7, 4: tok 8}; 2 -> {5: tok 9}
    prop = DraftProposal(tokens=[5, 6, 7, 8, 9], parents=[0, 0, 1, 1, 2])
    req = make_request(SamplingParams(temperature=0.0), [1, 2, 3])
    # row j = target argmax after node j: root wants 6 (node 2), node 2 wants 9 (node 5), node 5 wants 11
    logits = one_hot_logits([6, 0, 9, 0, 0, 11])
    (res,) = verify([VerifyItem(req, prop, 0, torch.Generator())], logits)
    assert res.accepted_nodes == [0, 2, 5]
    assert res.token_ids == [6, 9, 11]
    assert res.rows == [0, 2, 5]
    assert res.num_draft_tokens == 5 and res.draft_depth == 2


def test_greedy_batch_mixes_rejections_and_empty_drafts():
    greedy = SamplingParams(temperature=0.0)
    a = VerifyItem(make_request(greedy, [1]), DraftProposal.chain([4, 4, 4]), 0, torch.Generator())
    b = VerifyItem(make_request(greedy, [1]), None, 4, torch.Generator())
    c = VerifyItem(make_request(greedy, [1]), DraftProposal.chain([7]), 5, torch.Generator())
    logits = one_hot_logits([4, 4, 3, 0, 12, 8, 0])  # a: accept 2 then recover 3; b: 12; c: reject 7 -> 8
    ra, rb, rc = verify([a, b, c], logits)
    assert (ra.accepted_nodes, ra.token_ids) == ([0, 1, 2], [4, 4, 3])
    assert (rb.accepted_nodes, rb.token_ids) == ([0], [12])
    assert (rc.accepted_nodes, rc.token_ids) == ([0], [8])


def test_min_tokens_masks_eos_on_draft_rows():
    params = SamplingParams(temperature=0.0, min_tokens=2)
    req = make_request(params, [1])
    req.eos_token_ids = frozenset({3})
    # after 0 outputs the root row must not pick eos (3); the node-1 row (1 output) must not either
    logits = one_hot_logits([3, 3, 3])
    logits[:, 9] = 5.0
    (res,) = verify([VerifyItem(req, DraftProposal.chain([9, 9]), 0, torch.Generator())], logits)
    assert res.token_ids == [9, 9, 3]  # the third token (2 outputs before it) may be eos


@pytest.fixture(scope="module")
def tiny_distributions(tiny_model_dir):
    """Target logits after a prompt (row 0), and after prompt + x for every token x (rows 1..V)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32)
    prompt = torch.tensor([[5, 17, 42, 99, 7]])
    vocab = model.config.vocab_size
    with torch.no_grad():
        root = model(prompt).logits[0, -1]  # [vocab]
        nxt = torch.cat([prompt.expand(vocab, -1), torch.arange(vocab)[:, None]], dim=1)
        after = model(nxt).logits[:, -1]  # [vocab, vocab]: row x = logits after prompt + x
    return prompt[0].tolist(), root, after


def p_of(logits: torch.Tensor, params: SamplingParams, prompt: list[int]) -> torch.Tensor:
    rows = [RowContext(params, prompt, len(prompt), frozenset())] * logits.shape[0]
    return target_probs(process_logits(logits, rows), rows)


def chi2_pvalue(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness of fit, pooling bins expected below 5 counts into one."""
    n = samples.numel()
    observed = torch.bincount(samples, minlength=probs.numel()).double()
    expected = probs.double() * n
    big = expected >= 5
    assert observed[expected == 0].sum() == 0, "sampled a token the target gives probability 0"
    obs = torch.cat([observed[big], observed[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    if exp[-1] < 5:
        obs, exp = obs[:-1], exp[:-1]
    exp = exp * obs.sum() / exp.sum()  # chisquare wants equal totals to ~1e-8
    return float(chisquare(obs.numpy(), exp.numpy()).pvalue)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_speculative_sampling_is_exact(tiny_distributions, temperature, top_p):
    prompt, root, after = tiny_distributions
    params = SamplingParams(temperature=temperature, top_p=top_p)
    vocab = root.numel()
    gen = torch.Generator().manual_seed(1234)
    # A drafter whose q differs from p: a random distribution peaked elsewhere.
    q = torch.softmax(2.0 * torch.randn(vocab, generator=gen), dim=-1)
    n = 20_000
    drafts = torch.multinomial(q, n, replacement=True, generator=gen).tolist()
    items, rows = [], []
    for i, d in enumerate(drafts):
        prop = DraftProposal.chain([d], q[None])
        items.append(VerifyItem(make_request(params, prompt), prop, 2 * i, gen))
        rows += [root, after[d]]
    results = verify(items, torch.stack(rows))
    first = torch.tensor([r.token_ids[0] for r in results])
    p0 = p_of(root[None], params, prompt)[0]
    assert chi2_pvalue(first, p0) > 1e-3
    # Power check: the same test rejects the drafter's own samples.
    assert chi2_pvalue(torch.tensor(drafts), q) > 1e-3 and chi2_pvalue(torch.tensor(drafts), (p0 + q) / 2) < 1e-6
    # An accepted draft x has probability min(p0(x), q(x)); the bonus token after it follows p(. | prompt, x).
    # So the bonus tokens of accepted drafts follow the mixture sum_x min(p0, q)(x) p(. | x), normalized.
    second = torch.tensor([r.token_ids[1] for r in results if len(r.token_ids) == 2])
    p_after = torch.stack([p_of(after[x][None], params, prompt + [x])[0] for x in range(vocab)])  # [x, vocab]
    overlap = torch.minimum(p0, q)
    assert abs(second.numel() / n - float(overlap.sum())) < 0.02  # acceptance rate = sum of min(p, q)
    mixture = (overlap[:, None] * p_after).sum(dim=0)
    assert chi2_pvalue(second, mixture / mixture.sum()) > 1e-3


def test_batched_chain_sampling_equals_the_node_walk():
    """Chains take a batched path (two host syncs); with the same seeds it emits what the node walk emits."""
    vocab, gen = 12, torch.Generator().manual_seed(0)
    req = make_request(SamplingParams(temperature=1.0), [1])
    batched, walked, blocks = [], [], []
    for i in range(300):
        k = i % 5
        tokens = torch.randint(vocab, (k,), generator=gen).tolist()
        q = torch.softmax(torch.randn(k, vocab, generator=gen), dim=-1) if k and i % 3 == 0 else None
        logits = torch.randn(k + 1, vocab, generator=gen)  # [num_nodes, vocab]
        for c, tok in enumerate(tokens):  # make most drafts likely under the target, so walks go deep
            logits[c, tok] += 3.0 * float(torch.rand((), generator=gen) < 0.7)
        blocks.append(logits.softmax(dim=-1))
        prop = DraftProposal.chain(tokens, q) if k else None
        batched.append(VerifyItem(req, prop, 0, torch.Generator().manual_seed(i)))
        walked.append(VerifyItem(req, prop, 0, torch.Generator().manual_seed(i)))
    got = _walk_chains(batched, torch.cat(blocks))
    want = [_walk_sampling(it, probs) for it, probs in zip(walked, blocks, strict=True)]
    assert [(r.accepted_nodes, r.token_ids) for r in got] == [(r.accepted_nodes, r.token_ids) for r in want]
    depths = [len(r.accepted_nodes) - 1 for r in got]
    assert max(depths) == 4 and depths.count(0) > 30  # both full acceptances and first-draft rejections
