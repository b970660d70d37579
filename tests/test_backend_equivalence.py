"""Engine level: greedy output with the Triton backend equals the torch reference's, with draft trees.

On CPU the Triton kernels run in the interpreter, which must be switched on before triton is first
imported: the comparison runs in a fresh Python process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = r"""
import json, random, sys
import torch
from specserve import LLM, SamplingParams
from specserve.drafters.base import DraftProposal


class RandomTreeDrafter:
    '''Deterministic random trees (branching up to 3, depth up to 3): exercises siblings and compaction.'''

    max_num_tokens, num_kv_layers = 8, 0

    def propose(self, requests, max_tokens):
        out = []
        for req, k in zip(requests, max_tokens):
            rng = random.Random(len(req.token_ids) * 7919 + req.token_ids[-1])
            tokens, parents, depth = [], [], [0]
            for j in range(min(k, rng.randint(1, 8))):
                parent = rng.choice([p for p in range(j + 1) if depth[p] < 3])
                # half the nodes copy an earlier token of the request: the n-gram kind of guess that hits
                tokens.append(rng.choice(req.token_ids) if rng.random() < 0.5 else rng.randrange(300))
                parents.append(parent)
                depth.append(depth[parent] + 1)
            out.append(DraftProposal(tokens, parents) if tokens else None)
        return out

    def observe(self, requests, results, out):
        pass


model, backend, eager = sys.argv[1], sys.argv[2], sys.argv[3] == "eager"
device = "cuda" if torch.cuda.is_available() else "cpu"  # Triton kernels take CUDA tensors off the interpreter
llm = LLM(model=model, device=device, dtype="float32", attention_backend=backend, enforce_eager=eager,
          max_num_seqs=4, max_num_batched_tokens=64,
          speculative_config={"method": "ngram", "num_speculative_tokens": 8})
llm.engine.drafters["ngram:8"] = RandomTreeDrafter()
prefill_replays = []  # steps replayed in a bucket whose query is longer than any verify's (9)
if llm.engine.runner.graphs is not None:
    graphs = llm.engine.runner.graphs

    def counted(key, replay=graphs.replay):
        if key.max_query_len > 9:
            prefill_replays.append(key)
        return replay(key)

    graphs.replay = counted
prompts = ["a b c a b c a b", "hello world, hello world, hello", "the cat sat on the mat and the cat"]
outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
print(json.dumps({"tokens": [o.outputs[0].token_ids for o in outs],
                  "accepted": sum(o.metrics.num_accepted_tokens for o in outs),
                  "drafted": sum(o.metrics.num_draft_tokens for o in outs), "prefill_replays": len(prefill_replays)}))
"""


def run(model: str, backend: str, eager: str = "eager") -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1" if not torch.cuda.is_available() else "0"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, model, backend, eager], env=env, capture_output=True,
                          text=True, cwd=Path(__file__).parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def reference(tiny_model_dir) -> dict:
    """The torch reference's run, eager: what every Triton run here must reproduce."""
    return run(tiny_model_dir("llama"), "torch")


def test_triton_backend_equals_reference_with_tree_drafts(tiny_model_dir, reference):
    ref, tri = reference, run(tiny_model_dir("llama"), "triton")
    assert ref["drafted"] > 0 and ref["accepted"] > 0, "the test drafter should get some nodes accepted"
    assert tri["tokens"] == ref["tokens"]
    assert (tri["accepted"], tri["drafted"]) == (ref["accepted"], ref["drafted"])


def test_triton_backend_in_padded_buckets_equals_reference(tiny_model_dir, reference):
    """Steps replayed in their buckets (eagerly off CUDA) launch the kernels for the bucket's longest query and
    max_model_len keys, not the step's (prefill chunks and verify trees): the same tokens as the reference."""
    ref, tri = reference, run(tiny_model_dir("llama"), "triton", "padded")
    assert tri["prefill_replays"] > 0 and ref["prefill_replays"] == 0
    assert tri["tokens"] == ref["tokens"]
    assert (tri["accepted"], tri["drafted"]) == (ref["accepted"], ref["drafted"])
