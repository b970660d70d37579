"""`specserve train-drafter`: self-distil an EAGLE-1/2, EAGLE-3, Medusa or draft-model drafter for a target.

    specserve train-drafter --kind eagle --model M --prompts train_prompts.jsonl --out DIR [--device cuda]

1. The target answers the prompts through our engine (batched, greedy by default); the answers are cached in
   DIR/distill.json (or --distill-cache, to share them between kinds), so a rerun skips generation.
2. One teacher-forced target pass records the features the drafter reads at run time (train_data.py).
3. The head trains from those tensors in memory (train_heads.py: modules and losses per kind): AdamW,
   warmup then cosine or linear decay, gradient clipping, bf16 autocast on CUDA.
4. DIR gets the checkpoint in its published layout, training_curves.json (command line, phase times, loss
   and per-head/position accuracy per step) and train_state.pt, which `--resume` continues from.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time

import torch
from tqdm import tqdm

from specserve.drafters.train_data import Distilled, FeatureSet, collect_features, distill, load_prompts, make_batch
from specserve.drafters.train_heads import (
    DraftModelObjective,
    Eagle3Objective,
    EagleObjective,
    MedusaObjective,
    draft_vocab_from_counts,
)
from specserve.kernels import get_backend
from specserve.models.loader import load_model

KINDS = ("eagle", "eagle3", "medusa", "draft_model")
DEFAULT_LR = {"eagle": 5e-4, "eagle3": 5e-4, "medusa": 1e-3, "draft_model": 1e-4}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Flags of `specserve train-drafter`."""
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--model", default=None, help="target: HF dir or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--prompts", required=True, help="JSONL of training prompts (never mt_bench.jsonl)")
    p.add_argument("--out", required=True, help="output directory (checkpoint, curves, caches)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="target dtype (auto: bf16 on CUDA)")
    p.add_argument("--attention-backend", default=None, choices=["torch", "triton"])
    d = p.add_argument_group("self-distillation")
    d.add_argument("--max-prompts", type=int, default=None)
    d.add_argument("--max-tokens", type=int, default=256, help="answer length cap")
    d.add_argument("--temperature", type=float, default=0.0)
    d.add_argument("--num-samples", type=int, default=1, help="answers per prompt (needs --temperature > 0)")
    d.add_argument("--max-num-seqs", type=int, default=256, help="generation batch")
    d.add_argument("--kv-cache-memory-gb", type=float, default=None, help="generation KV pool (4 on CUDA, else 0.5)")
    d.add_argument("--distill-cache", default=None, help="answers cache (default OUT/distill.json)")
    d.add_argument("--teacher-batch-tokens", type=int, default=16384, help="tokens per teacher-forced pass")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=None, help="total optimizer steps (default: from --epochs)")
    t.add_argument("--epochs", type=float, default=20)
    t.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    t.add_argument("--val-fraction", type=float, default=0.05, help="sequences held out, evaluated each epoch")
    t.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default per kind: {DEFAULT_LR})")
    t.add_argument("--warmup", type=float, default=0.05, help="fraction of steps of linear warmup")
    t.add_argument("--schedule", default="cosine", choices=["cosine", "linear"])
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--grad-clip", type=float, default=0.5)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    t.add_argument("--save-every", type=int, default=0, help="also save train_state.pt every N steps")
    t.add_argument("--save-dtype", default="bfloat16", choices=list(DTYPES))
    k = p.add_argument_group("kinds")
    k.add_argument("--ttt-steps", type=int, default=None, help="EAGLE unrolled steps (default: eagle 2, eagle3 3)")
    k.add_argument("--draft-vocab-size", type=int, default=8192, help="EAGLE-3 draft vocabulary")
    k.add_argument("--medusa-heads", type=int, default=4)
    k.add_argument("--medusa-layers", type=int, default=1)
    k.add_argument("--draft-layers", type=int, default=2, help="draft_model: the target's first N layers")


def run_train(args: argparse.Namespace) -> int:
    """Distil, collect features, train, save; prints where everything went."""
    times, t0 = {}, time.time()
    command = shlex.join(sys.argv)
    print(f"train-drafter: {command}", file=sys.stderr)
    if args.num_samples > 1 and args.temperature == 0:
        raise ValueError("--num-samples > 1 needs --temperature > 0 (greedy answers would repeat)")
    torch.manual_seed(args.seed)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    dtype = DTYPES.get(args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    os.makedirs(args.out, exist_ok=True)
    loaded = load_model(args.model, dtype, device)
    times["load_s"] = time.time() - t0

    t = time.time()
    data = _distilled(args, loaded)
    times["distill_s"] = time.time() - t
    objective = _objective(args, loaded, data)
    loaded.model.aux_layers = objective.aux_layers  # the target's forward now also returns these features
    t = time.time()
    feats = collect_features(loaded.model, get_backend(args.attention_backend, device), data, device,
                             aux=bool(objective.aux_layers), batch_tokens=args.teacher_batch_tokens)
    if device.type == "cuda":
        torch.cuda.synchronize()
    times["features_s"] = time.time() - t

    plain = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}
    curves = {"kind": args.kind, "command": command, "args": plain, "device": _device_name(device),
              "data": {"num_sequences": len(data.sequences), "num_tokens": int(feats.tokens.numel()),
                       "num_answer_tokens": data.num_answer_tokens}, "times": times}
    t = time.time()
    _train(objective, feats, args, device, curves)
    times["train_s"] = time.time() - t
    objective.save(args.out, DTYPES[args.save_dtype])
    times["total_s"] = time.time() - t0
    _write_curves(curves, args.out)
    summary = {k: round(v, 4) for k, v in curves["final"].items()}
    val = {k: round(v, 4) for k, v in curves.get("final_val", {}).items()}
    print(f"train-drafter: {args.kind} -> {args.out} in {times['total_s']:.1f}s; final {summary}; validation {val}",
          file=sys.stderr)
    return 0


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _distilled(args, loaded) -> Distilled:
    """The target's answers: from the cache when it was made with the same settings, else generated."""
    from specserve import LLM, SamplingParams

    path = args.distill_cache or os.path.join(args.out, "distill.json")
    meta = {"model": loaded.path, "prompts": os.path.abspath(args.prompts), "max_prompts": args.max_prompts,
            "max_tokens": args.max_tokens, "temperature": args.temperature, "num_samples": args.num_samples,
            "seed": args.seed}
    if os.path.isfile(path):
        cached = Distilled.load(path)
        if cached.meta == meta:
            print(f"train-drafter: reusing {len(cached.sequences)} answers from {path}", file=sys.stderr)
            return cached
        print(f"train-drafter: {path} was made with other settings; generating again", file=sys.stderr)
    prompts = load_prompts(args.prompts, args.max_prompts)
    kv_gb = args.kv_cache_memory_gb or (4.0 if loaded.model.lm_head.weight.is_cuda else 0.5)
    llm = LLM(model=loaded.path, device=args.device, dtype=args.dtype, loaded_model=loaded,
              max_num_seqs=args.max_num_seqs, kv_cache_memory_gb=kv_gb,
              attention_backend=args.attention_backend, seed=args.seed)
    params = SamplingParams(n=args.num_samples, temperature=args.temperature, max_tokens=args.max_tokens,
                            seed=args.seed if args.temperature > 0 else None)
    data = distill(llm, prompts, params, meta)
    del llm  # frees its KV pool before the teacher pass
    data.save(path)
    return data


def _objective(args, loaded, data: Distilled):
    target = loaded.model
    if args.kind == "eagle":
        return EagleObjective(target, args.ttt_steps or 2)
    if args.kind == "eagle3":
        counts = torch.zeros(target.config.vocab_size, dtype=torch.int64)
        for seq, plen in zip(data.sequences, data.prompt_lens, strict=True):
            counts += torch.bincount(torch.tensor(seq[plen:]), minlength=len(counts))
        vocab = draft_vocab_from_counts(counts, min(args.draft_vocab_size, len(counts)))
        share = counts[vocab].sum() / counts.sum().clamp_min(1)
        print(f"train-drafter: draft vocab of {len(vocab)} covers {share:.2%} of answer tokens", file=sys.stderr)
        return Eagle3Objective(target, vocab.to(target.lm_head.weight.device), args.ttt_steps or 3)
    if args.kind == "medusa":
        return MedusaObjective(target, args.medusa_heads, args.medusa_layers, loaded.path)
    return DraftModelObjective(loaded, args.draft_layers)


def _lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warmup to 1, then cosine or linear decay to 0.1 at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(total - warmup, 1)
    decay = 0.5 * (1 + math.cos(math.pi * frac)) if schedule == "cosine" else 1 - frac
    return 0.1 + 0.9 * decay


def _split(num_seqs: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) sequence ids: a seeded shuffle whose first round(fraction * n) are held out."""
    perm = torch.randperm(num_seqs, generator=torch.Generator().manual_seed(seed))
    num_val = min(round(fraction * num_seqs), num_seqs - 1)
    return perm[num_val:], perm[:num_val]


@torch.no_grad()
def _evaluate(objective, feats: FeatureSet, ids: torch.Tensor, bsz: int, device: torch.device) -> dict[str, float]:
    """Loss and metrics on held-out sequences, averaged over batches."""
    sums: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(ids), bsz):
        batch = make_batch(feats, ids[i : i + bsz].to(device), objective.max_shift)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, metrics = objective.loss(batch)
        for name, v in {"loss": loss, **metrics}.items():
            sums.setdefault(name, []).append(v.float())
    return {name: torch.stack(v).mean().item() for name, v in sums.items()}


def _train(objective, feats: FeatureSet, args, device: torch.device, curves: dict) -> None:
    """The optimizer loop; fills curves (per step, validation per epoch) and saves train_state.pt for --resume."""
    module = objective.module.to(device).train()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr or DEFAULT_LR[args.kind], betas=(0.9, 0.95),
                            weight_decay=args.weight_decay, fused=device.type == "cuda")
    train_ids, val_ids = _split(feats.num_seqs, args.val_fraction, args.seed)
    bsz = min(args.batch_size, len(train_ids))
    per_epoch = math.ceil(len(train_ids) / bsz)
    total = args.steps or max(1, round(args.epochs * per_epoch))
    warmup = int(args.warmup * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total, warmup, args.schedule))
    log = {"step": [], "loss": [], "lr": [], "grad_norm": [], "metrics": {}, "val": []}
    state_path, start = os.path.join(args.out, "train_state.pt"), 0
    if args.resume:
        state = torch.load(state_path, map_location=device, weights_only=False)
        module.load_state_dict(state["module"], strict=False)  # frozen weights come from the target
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, log = state["step"], state["log"]
        print(f"train-drafter: resuming at step {start} of {total}", file=sys.stderr)
    curves |= {"log": log, "total_steps": total, "steps_per_epoch": per_epoch,
               "num_train_sequences": len(train_ids), "num_val_sequences": len(val_ids)}

    # Only what training changes (trainable parameters, buffers) is saved: the draft model's frozen embedding
    # and LM head would make train_state.pt several times larger than the checkpoint.
    keep = {n for n, p in module.named_parameters() if p.requires_grad} | {n for n, _ in module.named_buffers()}

    def save_state(step: int) -> None:
        trained = {k: v for k, v in module.state_dict().items() if k in keep}
        torch.save({"module": trained, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "step": step, "log": log}, state_path + ".tmp")
        os.replace(state_path + ".tmp", state_path)

    # A fixed permutation per epoch, so a resumed run sees the batches the uninterrupted one would have.
    perms: dict[int, torch.Tensor] = {}
    bar = tqdm(range(start, total), initial=start, total=total, desc=f"train {args.kind}")
    for step in bar:
        epoch, offset = divmod(step, per_epoch)
        if epoch not in perms:
            gen = torch.Generator().manual_seed(args.seed * 7919 + epoch)
            perms = {epoch: train_ids[torch.randperm(len(train_ids), generator=gen)]}
        batch = make_batch(feats, perms[epoch][offset * bsz : (offset + 1) * bsz].to(device), objective.max_shift)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, metrics = objective.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        values = [loss.detach(), grad_norm, *(v.detach() for v in metrics.values())]
        loss_v, gn, *rest = torch.stack([v.float() for v in values]).tolist()  # one host sync per step
        log["step"].append(step + 1)
        log["loss"].append(loss_v)
        log["lr"].append(sched.get_last_lr()[0])
        log["grad_norm"].append(gn)
        for name, v in zip(metrics, rest, strict=True):
            log["metrics"].setdefault(name, []).append(v)
        sched.step()
        bar.set_postfix(loss=f"{loss_v:.4f}", acc=f"{rest[0]:.3f}")
        if len(val_ids) and ((step + 1) % per_epoch == 0 or step + 1 == total):
            log["val"].append({"step": step + 1, **_evaluate(objective, feats, val_ids, bsz, device)})
        if args.save_every and (step + 1) % args.save_every == 0:
            save_state(step + 1)
            _write_curves(curves, args.out)
    save_state(total)


def _write_curves(curves: dict, out_dir: str) -> None:
    """training_curves.json, with the first and last 10% of steps averaged for a quick read."""
    log = curves["log"]
    series = {"loss": log["loss"], **log["metrics"]}
    n = max(1, len(log["loss"]) // 10)
    curves["first"] = {k: sum(v[:n]) / len(v[:n]) for k, v in series.items() if v}
    curves["final"] = {k: sum(v[-n:]) / len(v[-n:]) for k, v in series.items() if v}
    if log["val"]:
        curves["final_val"] = log["val"][-1]
    with open(os.path.join(out_dir, "training_curves.json"), "w") as f:
        json.dump(curves, f, indent=1)
