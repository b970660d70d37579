"""Step buffers and CUDA graphs: buckets, prepare's numpy layout, padded replay; GPU parts skip on CPU."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
from helpers import host_syncs

from specserve import LLM, SamplingParams
from specserve.attention import ancestor_masks, tree_depths
from specserve.cuda_graphs import Buckets, batch_buckets, query_buckets
from specserve.drafters.base import DraftProposal
from specserve.kernels import reference
from specserve.model_runner import ModelRunner
from specserve.models.loader import load_model
from specserve.request import Request
from specserve.sampling_params import SamplingParams as SP
from specserve.scheduler import ScheduledRequest

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
PROMPTS = [[5 + i, 17, 33, 9 + i, 21] * (1 + i % 3) for i in range(6)]
NGRAM = {"ngram": {"method": "ngram", "num_speculative_tokens": 4}}


def test_buckets():
    assert batch_buckets(128) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert query_buckets([1]) == [1] and query_buckets([1, 5]) == [1, 2, 4, 5]
    assert query_buckets([1, 16, 5]) == [1, 2, 4, 5, 8, 16]
    b = Buckets(max_seqs=128, query_lens=[1, 5], max_tokens=512, max_seq_len=2048)
    assert b.find(3, 3, 1) == (4, 4, 4)  # plain decode of 3 sequences; no query can be longer than 4
    assert b.find(3, 7, 5) == (4, 8, 5)  # one of them verifies 4 drafts: tokens, not 4 x 5, set the bucket
    assert b.find(128, 640, 5) is None  # past max_tokens: eager
    assert b.find(96, 400, 5) == (96, 480, 5)
    assert b.find(129, 129, 1) is None
    # prefill chunks: buckets whose query may be as long as their tokens, up to 8 sequences and 512 tokens
    assert b.find(1, 40, 40) == (1, 48, 48) and b.find(2, 41, 40) == (2, 48, 48)
    assert b.find(4, 8, 6) == (4, 16, 16)  # 8 tokens, but a query longer than the decode buckets' 5
    assert b.find(1, 600, 600) is None and b.find(16, 40, 25) is None
    assert (1, 1) in b.decode_shapes and (1, 48) not in b.decode_shapes  # what the adaptive cost model profiles


def _request(prompt: list[int], computed: int, blocks: list[int]) -> Request:
    return Request(
        request_id="r#0", group_id="r", index=0, token_ids=list(prompt), num_prompt_tokens=len(prompt),
        params=SP(temperature=0.0), max_tokens=16, eos_token_ids=frozenset(), detokenizer=None, generator=None,
        spec_arm="x", metrics=None, num_computed_tokens=computed, block_ids=list(blocks),
    )


def _old_prepare(runner, scheduled, proposals):
    """The per-token Python construction that prepare replaced: the layout it must still produce."""
    bs = runner.block_size
    ids, pos, slots, masks, qsl, logits_idx, row_starts, rows = [], [], [], [], [0], [], [], 0
    for s, p in zip(scheduled, proposals, strict=True):
        req, n, ctx = s.request, s.num_new_tokens, s.request.num_computed_tokens
        parents = p.parents if p else []
        q_len = n + len(parents)
        ids += req.token_ids[ctx : ctx + n] + (p.tokens if p else [])
        pos += list(range(ctx, ctx + n)) + [ctx + n - 1 + d for d in tree_depths(parents)[1:]]
        slots += [req.block_ids[i // bs] * bs + i % bs for i in range(ctx, ctx + q_len)]
        masks += [0] * (n - 1) + ancestor_masks(parents)
        if s.produces_token:
            row_starts.append(rows)
            logits_idx += list(range(qsl[-1] + n - 1, qsl[-1] + q_len))
            rows += q_len - n + 1
        else:
            row_starts.append(-1)
        qsl.append(qsl[-1] + q_len)
    return ids, pos, slots, masks, qsl, logits_idx, row_starts


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir(), torch.float32, "cpu")


def test_prepare_layout_matches_the_per_token_construction(tiny):
    runner = ModelRunner(tiny.model, 64, 4, reference, torch.device("cpu"), torch.float32, max_model_len=128)
    prompt = list(range(3, 40))
    a = _request(prompt, 0, [7, 3, 9, 1, 2])  # prefill chunk of 10 that does not reach its last token
    b = _request(prompt[:12], 11, [4, 5, 6, 8])  # decoding: root + a tree
    c = _request(prompt[:9], 8, [10, 11, 12])  # decoding: root + a chain
    d = _request(prompt[:6], 3, [13, 14])  # last prefill chunk: produces a token, no drafts
    scheduled = [ScheduledRequest(a, 10, 0), ScheduledRequest(b, 1, 4), ScheduledRequest(c, 1, 3),
                 ScheduledRequest(d, 3, 0)]
    proposals = [None, DraftProposal([50, 51, 52, 53], [0, 0, 1, 1]), DraftProposal.chain([60, 61, 62]), None]
    batch = runner.prepare(scheduled, proposals)
    ids, pos, slots, masks, qsl, logits_idx, row_starts = _old_prepare(runner, scheduled, proposals)
    assert batch.input_ids.tolist() == ids and batch.positions.tolist() == pos
    assert batch.meta.slot_mapping.tolist() == slots and batch.meta.tree_mask.tolist() == masks
    assert batch.query_start_loc == qsl and batch.meta.query_start_loc.tolist() == qsl
    assert batch.logits_indices.tolist() == logits_idx and batch.row_starts == row_starts
    assert batch.meta.context_lens.tolist() == [0, 11, 8, 3]
    assert batch.meta.seq_lens.tolist() == [10, 16, 12, 6]
    assert batch.meta.tree_offsets.tolist() == [9, 0, 0, 2]
    assert batch.meta.block_tables[1, :4].tolist() == [4, 5, 6, 8] and batch.meta.block_tables[1, 4:].eq(0).all()
    assert batch.meta.max_query_len == 10 and batch.meta.max_seq_len == 16 and batch.graph_key is None


def test_decode_steps_pad_to_their_bucket(tiny):
    runner = ModelRunner(tiny.model, 64, 4, reference, torch.device("cpu"), torch.float32, max_model_len=128)
    runner.capture_graphs([1, 5], capture=False)  # padded replay over the same buffers
    reqs = [_request(list(range(3, 3 + n)), n - 1, [1, 2, 3, 4, 5]) for n in (6, 9, 13)]
    scheduled = [ScheduledRequest(r, 1, 0) for r in reqs]
    proposals = [None, DraftProposal.chain([7, 8, 9]), None]
    batch = runner.prepare(scheduled, proposals)
    assert batch.graph_key == (4, 8, 5)  # 3 sequences, 6 tokens, a query of 4
    eager = runner._model_forward(batch.input_ids, batch.positions, batch.meta)
    out = runner.forward(batch)
    assert out.hidden_states.shape[0] == 6 and out.logits.shape[0] == 6
    torch.testing.assert_close(out.hidden_states, eager.hidden_states)
    # the padding: tokens of no sequence write nothing, padded sequences have empty queries
    d = runner.buffers.dev64
    assert d[2 * 8 + 6 : 3 * 8].tolist() == [-1, -1]
    assert runner.buffers.dev32[:5].tolist() == [0, 1, 5, 6, 6]


def _generate(llm, arm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, spec_arm=arm)]


def test_padded_replay_engine_equals_eager(tiny_model_dir):
    common = dict(model=tiny_model_dir(), dtype="float32", speculative_arms=NGRAM, max_num_seqs=8)
    eager = LLM(device="cpu", enforce_eager=True, **common)
    padded = LLM(device="cpu", enforce_eager=False, **common)
    assert eager.engine.runner.graphs is None
    graphs = padded.engine.runner.graphs
    assert sorted(graphs.entries) == Buckets(8, [1, 5], 2048, padded.engine.max_model_len).all  # decode and prefill
    replayed = []
    graphs.replay = lambda key, replay=graphs.replay: replayed.append(key) or replay(key)
    for arm in ("none", "ngram"):
        assert _generate(padded, arm) == _generate(eager, arm)
    # the six prompts (5-15 tokens) prefill together in a prefill bucket: queries up to its 64 tokens
    assert (8, 64, 64) in replayed and (8, 8, 5) in replayed


@cuda
def test_graph_replay_matches_eager_on_cuda(tiny_model_dir):
    common = dict(model=tiny_model_dir(), device="cuda", dtype="float32", speculative_arms=NGRAM, max_num_seqs=8)
    graphs, eager = LLM(enforce_eager=False, **common), LLM(enforce_eager=True, **common)
    assert graphs.engine.runner.graphs.entries[(1, 1, 1)].graph is not None
    for arm in ("none", "ngram"):
        assert _generate(graphs, arm) == _generate(eager, arm)


def _learned_arms(target: str, tmp_path) -> dict:
    from test_drafters_checkpoints import write_eagle, write_eagle3

    return {
        "draft_model": {"method": "draft_model", "model": target, "num_speculative_tokens": 3},
        "eagle": {"method": "eagle", "model": write_eagle(str(tmp_path / "e"), target), "num_speculative_tokens": 8,
                  "top_k": 3, "depth": 4},
        "eagle3": {"method": "eagle3", "model": write_eagle3(str(tmp_path / "e3"), target),
                   "num_speculative_tokens": 6, "top_k": 2, "depth": 3},
    }


def _draft_replays(llm) -> dict[str, int]:
    """Per drafter: forwards and whole-step computations that went through a graph bucket, counted by wrapping
    CudaGraphs.replay (entries) and BatchGraphs.run (EAGLE trees, draft-model chains)."""
    counts = {}
    for name, drafter in llm.engine.drafters.items():
        counts[name] = 0
        whole = getattr(drafter, "chains", None) or drafter.grower.graphs
        for graphs, method in ((drafter.runner.graphs, "replay"), (whole, "run")):
            orig = getattr(graphs, method)

            def counted(*key, name=name, orig=orig):
                counts[name] += 1
                return orig(*key)

            setattr(graphs, method, counted)
    return counts


def test_padded_draft_forwards_equal_eager(tiny_model_dir, tmp_path):
    """Draft-model chain steps and EAGLE levels through graph buckets (padded, replayed eagerly off CUDA) give
    eager's drafts: the same greedy tokens and tokens per step, equal to plain greedy."""
    target = tiny_model_dir()
    common = dict(model=target, dtype="float32", speculative_arms=_learned_arms(target, tmp_path), max_num_seqs=8)
    eager = LLM(device="cpu", enforce_eager=True, **common)
    padded = LLM(device="cpu", enforce_eager=False, **common)
    eagle = padded.engine.drafters["eagle"].runner.graphs
    assert sorted({q for _, q in eagle.buckets.decode_shapes if _ == 1}) == [1, 2, 4, 6]  # entries: depth 4 + 2
    assert eager.engine.drafters["eagle"].runner.graphs is None
    replays = _draft_replays(padded)
    grown = []  # padded batch of every EAGLE tree growth and greedy draft-model chain
    for graphs in (padded.engine.drafters["eagle"].grower.graphs, padded.engine.drafters["eagle3"].grower.graphs,
                   padded.engine.drafters["draft_model"].chains):

        def spy(b, *rest, fn=graphs.fn):
            grown.append(b)
            return fn(b, *rest)

        graphs.fn = spy
    plain = _generate(eager, "none")
    for arm in ("draft_model", "eagle", "eagle3"):
        outs = padded.generate(PROMPTS, GREEDY, spec_arm=arm)
        ref = eager.generate(PROMPTS, GREEDY, spec_arm=arm)
        assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref] == plain
        assert [o.metrics.num_steps for o in outs] == [o.metrics.num_steps for o in ref]
    assert min(replays.values()) > 5, replays
    assert 8 in grown and 6 not in grown  # six prompts: trees and chains ran padded to the batch bucket of 8


@cuda
def test_draft_graphs_match_eager_on_cuda(tiny_model_dir, tmp_path):
    target = tiny_model_dir()
    common = dict(model=target, device="cuda", dtype="float32", speculative_arms=_learned_arms(target, tmp_path),
                  max_num_seqs=8)
    graphs, eager = LLM(enforce_eager=False, **common), LLM(enforce_eager=True, **common)
    assert graphs.engine.drafters["eagle"].runner.graphs.entries[(1, 4, 4)].graph is not None
    assert sorted(graphs.engine.drafters["eagle"].grower.graphs.graphs) == [(1,), (2,), (4,), (8,)]
    assert len(graphs.engine.drafters["draft_model"].chains.graphs) == 4 * 2  # batch buckets x chain steps 1, 2
    replays = _draft_replays(graphs)
    for arm in ("none", "draft_model", "eagle", "eagle3"):
        assert _generate(graphs, arm) == _generate(eager, arm)
    assert min(replays.values()) > 5, replays


@cuda
def test_one_host_sync_per_decode_step(tiny_model_dir):
    llm = LLM(model=tiny_model_dir(), device="cuda", dtype="bfloat16", speculative_arms=NGRAM, max_num_seqs=8)
    engine = llm.engine
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, GREEDY, spec_arm="ngram")
    engine.step()  # the prefill of every prompt
    for _ in range(5):
        assert host_syncs(engine.step) <= 1


@cuda
def test_graph_capture_pauses_the_cycle_collector(tiny_model_dir, monkeypatch):
    """An engine dropped in a reference cycle is freed whenever the cycle collector runs; freeing its CUDA graphs
    during another engine's capture invalidates that capture, so the collector must not run there."""
    model = tiny_model_dir()
    old = LLM(model=model, device="cuda", dtype="bfloat16", max_num_seqs=8)
    gone = weakref.ref(old.engine.runner.graphs)
    del old
    assert gone() is not None  # held by a cycle: only the collector frees it
    collector_on, forward = [], ModelRunner._model_forward

    def forward_collecting(self, *args):
        if torch.cuda.is_current_stream_capturing():
            collector_on.append(gc.isenabled())
            if gc.isenabled():
                gc.collect()  # where an automatic collection may land
        return forward(self, *args)

    monkeypatch.setattr(ModelRunner, "_model_forward", forward_collecting)
    new = LLM(model=model, device="cuda", dtype="bfloat16", max_num_seqs=8)
    assert collector_on and not any(collector_on) and gc.isenabled()
    assert _generate(new, "none") == [o.outputs[0].token_ids for o in new.generate(PROMPTS, GREEDY)]


@cuda
def test_static_inputs_are_pinned(tiny_model_dir):
    runner = LLM(model=tiny_model_dir(), device="cuda").engine.runner
    assert runner.buffers.host64.is_pinned() and runner.buffers.host32.is_pinned()
    assert np.shares_memory(runner.buffers.host(1, 1, 1).input_ids, runner.buffers.host64.numpy())
