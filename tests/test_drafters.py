"""Learned drafters end to end on a tiny random target: greedy speculation equals plain greedy, draft = target
accepts everything, and each drafter's proposals equal a dense recomputation from the committed tokens.

The dense checks recompute what a drafter should propose from scratch (one causal forward over the whole
sequence, fresh KV) and compare it with what it proposed while following the engine step by step (paged KV,
chunked prefill, prefix-cache hits, accepted and rejected drafts). They catch KV, position and feature
plumbing errors that greedy identity alone would hide (verification corrects any draft).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from helpers import make_meta, make_positions, new_kv_caches
from safetensors.torch import load_file, save_file
from test_drafters_checkpoints import write_eagle, write_eagle3, write_medusa

from specserve.kernels import reference
from specserve.llm import LLM
from specserve.sampling_params import SamplingParams

SHARED = "Paged attention stores keys and values in fixed-size blocks of a shared pool. " * 2
PROMPTS = [
    "Hello",
    SHARED + "The quick brown fox",
    "def add(a, b):\n    return a + b\n",
    SHARED + "Speculative decoding drafts tokens",  # a prefix-cache hit on the one before
    "The quick brown fox jumps over the lazy dog. " * 4,
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
ENGINE = dict(device="cpu", dtype="float32", max_num_batched_tokens=48)  # long prompts prefill in chunks


@pytest.fixture(scope="module")
def target(tiny_model_dir):
    return tiny_model_dir()


@pytest.fixture(scope="module")
def plain(target):
    """Plain greedy token ids of PROMPTS."""
    return [o.outputs[0].token_ids for o in LLM(model=target, **ENGINE).generate(PROMPTS, GREEDY)]


def first_layers(target: str, path: str, num_layers: int) -> str:
    """A smaller draft model: the target's first layers, embedding and LM head (what train-drafter starts from)."""
    os.makedirs(path, exist_ok=True)
    for f in os.listdir(target):
        if f != "model.safetensors":
            shutil.copy(os.path.join(target, f), path)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["num_hidden_layers"] = num_layers
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    keep = {f"model.layers.{i}." for i in range(num_layers)}
    tensors = load_file(os.path.join(target, "model.safetensors"))
    kept = {k: v for k, v in tensors.items() if not k.startswith("model.layers.") or any(k.startswith(p) for p in keep)}
    save_file(kept, os.path.join(path, "model.safetensors"))
    return path


def generate(target: str, spec: dict, spy=None, **engine):
    """(LLM, outputs) of PROMPTS under spec; spy(drafter) may wrap the drafter before the run."""
    llm = LLM(model=target, speculative_config=spec, **{**ENGINE, **engine})
    if spy is not None:
        spy(llm.engine.drafters[llm.engine.default_arm])
    return llm, llm.generate(PROMPTS, GREEDY)


def token_ids(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


# ---- draft model ----------------------------------------------------------------------------------


def test_draft_model_equal_to_target_accepts_everything(target, plain):
    _, outs = generate(target, {"method": "draft_model", "model": target, "num_speculative_tokens": 4})
    assert token_ids(outs) == plain
    assert all(o.metrics.num_draft_tokens > 0 and o.metrics.acceptance_rate == 1.0 for o in outs)


def test_draft_model_smaller_draft_matches_plain_greedy(target, plain, tmp_path):
    draft = first_layers(target, str(tmp_path / "draft"), 1)
    _, outs = generate(target, {"method": "draft_model", "model": draft, "num_speculative_tokens": 3})
    assert token_ids(outs) == plain
    assert sum(o.metrics.num_accepted_tokens for o in outs) > 0


def test_draft_model_survives_preemption(target, plain):
    _, outs = generate(target, {"method": "draft_model", "model": target, "num_speculative_tokens": 4},
                       num_kv_blocks=14)
    assert token_ids(outs) == plain
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    assert all(o.metrics.acceptance_rate == 1.0 for o in outs)  # restarted requests rebuild their draft KV


# ---- dense references -----------------------------------------------------------------------------


def dense_target(model, tokens: list[int]):
    """Target ModelOutput over tokens as one causal chunk on a fresh cache."""
    n, bs = len(tokens), 16
    nb = -(-n // bs)
    meta = make_meta([n], [0], [list(range(nb))], bs)
    kv = new_kv_caches(model.config, nb, bs)
    return model(torch.tensor(tokens), make_positions([n], [0]), meta, kv, reference)


def dense_eagle(drafter, tokens: list[int], inputs: torch.Tensor) -> torch.Tensor:
    """EAGLE head outputs [n, H] of entries (tokens[s], inputs[s]) at positions 0..n-1, on a fresh cache."""
    n, bs = len(tokens), 16
    nb = -(-n // bs)
    shape = (nb, bs, *drafter.kv.layers[0][0].shape[2:])
    kv = [(torch.zeros(shape), torch.zeros(shape)) for _ in drafter.kv.layers]
    meta = make_meta([n], [0], [list(range(nb))], bs)
    return drafter.head(drafter.embed(torch.tensor(tokens)), inputs, make_positions([n], [0]), meta, kv, reference)


def spy_on_grow(drafter, seen: list) -> None:
    """Record (tokens, root position, candidates) of every EAGLE tree the drafter grows."""
    grow = drafter._grow

    def spy(reqs, roots, root_in, g_root, budgets):
        grown = grow(reqs, roots, root_in, g_root, budgets)
        cands = zip(grown.scores.tolist(), grown.parents.tolist(), grown.tokens.tolist(), strict=True)
        seen.extend((list(r.token_ids), n, c) for r, n, c in zip(reqs, roots, cands, strict=True))
        return grown

    drafter._grow = spy


@pytest.mark.parametrize("method, write", [("eagle", write_eagle), ("eagle3", write_eagle3)])
def test_eagle_matches_plain_and_dense_recomputation(target, plain, tmp_path, method, write):
    k = 3
    spec = {"method": method, "model": write(str(tmp_path / method), target), "num_speculative_tokens": 8,
            "top_k": k, "depth": 4}
    seen: list = []
    llm, outs = generate(target, spec, spy=lambda d: spy_on_grow(d, seen))
    assert token_ids(outs) == plain
    drafter, model = llm.engine.drafters[llm.engine.default_arm], llm.engine.model
    with torch.inference_mode():
        for tokens, n, (scores, _, cand_tokens) in seen[:: max(1, len(seen) // 6)]:
            feats = drafter.head.fuse(dense_target(model, tokens[:n]))  # [n, H]
            inputs = torch.cat((feats.new_zeros(1, feats.shape[1]), feats))  # entry s reads f_{s-1}; f_{-1} = 0
            g_root = dense_eagle(drafter, tokens[: n + 1], inputs)[n]
            logp, tok = drafter.head.top_k(g_root[None], k)
            assert tok[0].tolist() == cand_tokens[:k]
            assert torch.allclose(logp[0], torch.tensor(scores[:k]), atol=1e-4)
            # level 2 under the best root child: that node reads the root's output at position n + 1
            g = dense_eagle(drafter, tokens[: n + 1] + [cand_tokens[0]], torch.cat((inputs, g_root[None])))[n + 1]
            logp2, tok2 = drafter.head.top_k(g[None], k)
            assert tok2[0].tolist() == cand_tokens[k : 2 * k]
            assert torch.allclose(logp[0, 0] + logp2[0], torch.tensor(scores[k : 2 * k]), atol=1e-4)


def test_eagle_survives_preemption(target, plain, tmp_path):
    spec = {"method": "eagle", "model": write_eagle(str(tmp_path / "eagle"), target), "num_speculative_tokens": 6,
            "top_k": 2, "depth": 3}
    _, outs = generate(target, spec, num_kv_blocks=14)
    assert token_ids(outs) == plain
    assert sum(o.metrics.num_preemptions for o in outs) > 0


def test_eagle_arms_sharing_steps_match_plain(target, plain, tmp_path):
    """Requests of two EAGLE arms in the same steps: each arm's trees, made on the device, fill their own rows of the
    one verify forward, and a request near its length limit keeps a smaller tree than the others of its arm."""
    arms = {"e1": {"method": "eagle", "model": write_eagle(str(tmp_path / "e1"), target), "num_speculative_tokens": 8,
                   "top_k": 3, "depth": 4},
            "e3": {"method": "eagle3", "model": write_eagle3(str(tmp_path / "e3"), target),
                   "num_speculative_tokens": 6, "top_k": 2, "depth": 3}}
    llm = LLM(model=target, speculative_arms=arms, **ENGINE)
    eng, fed = llm.engine, []
    feed = eng.runner.feed_drafts

    def spy(batch, proposals):
        groups: dict[int, set[int]] = {}
        for p in proposals:
            if p is not None and p.on_device is not None:
                groups.setdefault(id(p.on_device), set()).add(len(p.tokens))
        fed.append(list(groups.values()))
        feed(batch, proposals)

    eng.runner.feed_drafts = spy
    lengths = [GREEDY.max_tokens - 3 * i for i in range(len(PROMPTS))]
    for i, (prompt, n) in enumerate(zip(PROMPTS, lengths, strict=True)):
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        eng.add_request(str(i), prompt, params, spec_arm=("e1", "e3")[i % 2])
    outs = {}
    while eng.has_unfinished_requests():
        outs.update((o.request_id, o.outputs[0].token_ids) for o in eng.step() if o.finished)
    assert [outs[str(i)] for i in range(len(PROMPTS))] == [p[:n] for p, n in zip(plain, lengths, strict=True)]
    assert any(len(groups) == 2 for groups in fed)  # both arms' trees in one verify forward
    assert any(len(sizes) > 1 for groups in fed for sizes in groups)  # one arm's trees of different sizes


def test_medusa_matches_plain_and_dense_recomputation(target, plain, tmp_path):
    spec = {"method": "medusa", "model": write_medusa(str(tmp_path / "medusa"), target, heads=3),
            "num_speculative_tokens": 6}
    seen: list = []

    def spy(drafter):
        propose = drafter.propose

        def wrapped(requests, max_tokens):
            props = propose(requests, max_tokens)
            seen.extend((list(r.token_ids), k, p) for r, k, p in zip(requests, max_tokens, props, strict=True) if p)
            return props

        drafter.propose = wrapped

    llm, outs = generate(target, spec, spy=spy)
    assert token_ids(outs) == plain
    drafter, model = llm.engine.drafters[llm.engine.default_arm], llm.engine.model
    with torch.inference_mode():
        for tokens, k, prop in seen[:: max(1, len(seen) // 6)]:
            n = len(tokens) - 1  # the root's position
            hidden = dense_target(model, tokens[:n]).hidden_states[n - 1 : n]  # gave the root token
            tree = drafter.tree.prefix(k)
            # head by head, through the target's LM head (the checkpoint shares it)
            ranked = [model.compute_logits(drafter.heads[d](hidden)).topk(tree.top_k).indices[0].tolist()
                      for d in range(tree.depth)]
            assert prop.tokens == tree.tokens(ranked) and prop.parents == list(tree.parents)


def test_medusa_static_tree_from_config(target, plain, tmp_path):
    path = write_medusa(str(tmp_path / "medusa"), target, heads=2, share=False)
    tree = [[0], [1], [0, 0], [0, 1], [2]]
    llm, outs = generate(target, {"method": "medusa", "model": path, "num_speculative_tokens": 4, "tree": tree})
    assert token_ids(outs) == plain
    assert llm.engine.drafters[llm.engine.default_arm].max_num_tokens == 5


def test_medusa_tree_from_checkpoint_choices(target, plain, tmp_path):
    """A config.json with stored choices gives the default tree: their first num_speculative_tokens, in their
    order (best first), so a shorter budget's prefix is the best smaller tree; lossless either way."""
    choices = [[1], [0], [1, 0], [0, 0], [1, 0, 0], [2]]
    path = write_medusa(str(tmp_path / "medusa"), target, heads=3, specserve_medusa_choices=choices)
    llm, outs = generate(target, {"method": "medusa", "model": path, "num_speculative_tokens": 5})
    assert token_ids(outs) == plain
    tree = llm.engine.drafters[llm.engine.default_arm].tree
    assert tree.paths == ((1,), (0,), (1, 0), (0, 0), (1, 0, 0)) and tree.parents == (0, 0, 1, 2, 3)
    cases = [(3, [[0], [0, 0, 0], [0, 0]], 1, r"choices: tree path \[0, 0, 0\] comes before its parent path \[0, 0\]"),
             (3, choices, 7, "specserve_medusa_choices: 6 paths cannot make a 7-node tree"),
             (2, choices, 5, "specserve_medusa_choices of .* is 3 deep, but the checkpoint has 2 Medusa heads")]
    for i, (heads, stored, k, message) in enumerate(cases):
        bad = write_medusa(str(tmp_path / f"bad{i}"), target, heads=heads, specserve_medusa_choices=stored)
        with pytest.raises(ValueError, match=message):
            LLM(model=target, speculative_config={"method": "medusa", "model": bad, "num_speculative_tokens": k},
                **ENGINE)


# ---- sampling -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["draft_model", "eagle"])
def test_sampled_drafts_are_seeded_and_carry_q(target, tmp_path, method):
    model = target if method == "draft_model" else write_eagle(str(tmp_path / "eagle"), target)
    llm = LLM(model=target, speculative_config={"method": method, "model": model, "num_speculative_tokens": 3},
              **ENGINE)
    drafter = llm.engine.drafters[llm.engine.default_arm]
    propose, qs = drafter.propose, []

    def wrapped(requests, max_tokens):
        props = propose(requests, max_tokens)
        qs.extend(p for p in props if p is not None and p.draft_probs is not None)
        return props

    drafter.propose = wrapped
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=24, seed=7, ignore_eos=True)
    first = token_ids(llm.generate(PROMPTS[:3], params))
    assert token_ids(llm.generate(PROMPTS[:3], params)) == first
    if method == "draft_model":  # sampled chains hand verification q; EAGLE's top-k trees do not need it
        assert qs
        for p in qs:
            assert p.draft_probs.shape == (len(p.tokens), 320) and p.draft_probs.dtype == torch.float32
            assert torch.allclose(p.draft_probs.sum(-1), torch.ones(len(p.tokens)))
            assert all(p.draft_probs[j, t] > 0 for j, t in enumerate(p.tokens))
    else:
        assert not qs
