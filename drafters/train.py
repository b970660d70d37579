"""`specserve train-drafter`: self-distil an EAGLE-1/2, EAGLE-3, Medusa or draft-model drafter for a target.

    specserve train-drafter --kind eagle --model M --prompts train_prompts.jsonl --out DIR [--device cuda]

1. The target answers the prompts (greedy by default; --temperatures 0,0.7 --num-samples 8 mixes one greedy
   and eight sampled answers per prompt), a static batch of --max-num-seqs sequences at a time; the answers
   are cached in DIR/distill.safetensors (or --distill-cache, to share them between kinds), so a rerun skips
   generation.
2. One teacher-forced target pass records the features the drafter reads at run time (train_data.py).
3. The head trains from those tensors in memory (train_heads.py: modules and losses per kind): AdamW,
   warmup then cosine or linear decay, gradient clipping, bf16 autocast on CUDA. Validation runs each epoch
   on the answers to held-out prompts (--val-fraction); --keep-best saves the best epoch, not the last.
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
from safetensors.torch import load_file
from tqdm import tqdm

from specserve.drafters.self_instruct import write_prompts
from specserve.drafters.train_data import (
    Distilled,
    DistillPlan,
    FeatureSet,
    collect_features,
    distill,
    encode_chat,
    load_prompts,
    make_batch,
)
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
# draft_model: 1e-3 beat 3e-4 and 1e-4 on held-out prompts in a CPU run (SmolLM2, 40 prompts x 3 answers,
# 120 steps of 8 sequences: validation top-1 0.21 / 0.16 / 0.12): two truncated layers have far to go.
DEFAULT_LR = {"eagle": 5e-4, "eagle3": 5e-4, "medusa": 1e-3, "draft_model": 1e-3}
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
    d.add_argument("--temperatures", "--temperature", type=_floats, default=[0.0],
                   help="comma-separated sampling temperatures, e.g. 0,0.7,1.0 (0: one greedy answer per prompt)")
    d.add_argument("--num-samples", type=int, default=1, help="answers per prompt at each temperature above 0")
    d.add_argument("--max-num-seqs", type=int, default=256, help="sequences per generation batch")
    d.add_argument("--self-instruct", type=int, default=0, metavar="N",
                   help="the target first writes N more prompts, each begun with a training prompt's opening words "
                        "(drafters/self_instruct.py); they are answered like the others and saved beside the cache")
    d.add_argument("--distill-cache", default=None, help="answers cache (default OUT/distill.safetensors)")
    d.add_argument("--teacher-batch-tokens", type=int, default=16384, help="tokens per teacher-forced pass")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=None, help="total optimizer steps (default: from --epochs)")
    t.add_argument("--epochs", type=float, default=20)
    t.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    t.add_argument("--val-fraction", type=float, default=0.05,
                   help="prompts held out (all their answers), evaluated each epoch")
    t.add_argument("--keep-best", action="store_true", help="save the epoch of best validation top-1 (acc_0)")
    t.add_argument("--group-by-length", action="store_true",
                   help="batch sequences of similar length (sorted within windows of 64 batches, batches shuffled): "
                        "less padding in the dense [B, S] forwards")
    t.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole run (load, distillation, features, training): training stops when "
                        "they are spent, its learning rate decaying by time or steps, whichever is further along, "
                        "so a stopped run still ends annealed")
    t.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default per kind: {DEFAULT_LR})")
    t.add_argument("--warmup", type=float, default=0.05, help="fraction of training of linear warmup")
    t.add_argument("--schedule", default="cosine", choices=["cosine", "linear"])
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--grad-clip", type=float, default=0.5)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    t.add_argument("--init", default=None, metavar="DIR",
                   help="start from a checkpoint of this kind: its tensors of the same names and shapes")
    t.add_argument("--save-every", type=int, default=0, help="also save train_state.pt every N steps")
    t.add_argument("--save-dtype", default="bfloat16", choices=list(DTYPES))
    k = p.add_argument_group("kinds")
    k.add_argument("--ttt-steps", type=int, default=None, help="EAGLE unrolled steps (default: eagle 2, eagle3 3)")
    k.add_argument("--feature-noise", type=float, default=0.0,
                   help="eagle: add U(-w/2, w/2) to the input features in training (SafeAILab/EAGLE uses 0.2)")
    k.add_argument("--draft-vocab-size", type=int, default=0,
                   help="EAGLE-3 draft vocabulary: its own LM head over the N most frequent answer tokens, or 0 "
                        "(default) the target's whole vocabulary through the target's LM head (not saved)")
    k.add_argument("--medusa-heads", type=int, default=4)
    k.add_argument("--medusa-layers", type=int, default=1)
    k.add_argument("--draft-layers", type=int, default=2, help="draft_model: the target's first N layers")


def _floats(text: str) -> list[float]:
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 0 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct temperatures >= 0 separated by commas, got {text!r}")
    return values


def run_train(args: argparse.Namespace) -> int:
    """Distil, collect features, train, save; prints where everything went."""
    times, t0 = {}, time.time()
    command = shlex.join(sys.argv)
    print(f"train-drafter: {command}", file=sys.stderr)
    if args.keep_best and args.val_fraction <= 0:
        raise ValueError("--keep-best needs a validation split (--val-fraction > 0)")
    if args.num_samples > 1 and not any(t > 0 for t in args.temperatures):
        raise ValueError("--num-samples counts answers at each temperature above 0; greedy gives one per prompt")
    if args.feature_noise and args.kind != "eagle":
        raise ValueError("--feature-noise is for --kind eagle (EAGLE-1's input features)")
    torch.manual_seed(args.seed)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    dtype = DTYPES.get(args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    os.makedirs(args.out, exist_ok=True)
    loaded = load_model(args.model, dtype, device)
    backend = get_backend(args.attention_backend, device)
    times["load_s"] = time.time() - t0

    t = time.time()
    data = _distilled(args, loaded, backend, device)
    times["distill_s"] = time.time() - t
    train_ids, val_ids = split_by_prompt(data.prompt_index, args.val_fraction, args.seed)
    objective = _objective(args, loaded, data, train_ids)
    if args.init:
        taken, left = init_from(objective.module, args.init)
        print(f"train-drafter: --init took {len(taken)} tensors of {args.init}; left as initialised: "
              f"{', '.join(left) or 'none'}", file=sys.stderr)
    loaded.model.aux_layers = objective.aux_layers  # the target's forward now also returns these features
    t = time.time()
    feats = collect_features(loaded.model, backend, data, device, aux=bool(objective.aux_layers),
                             batch_tokens=args.teacher_batch_tokens)
    if device.type == "cuda":
        torch.cuda.synchronize()
    times["features_s"] = time.time() - t

    plain = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))}
    curves = {"kind": args.kind, "command": command, "args": plain, "device": _device_name(device),
              "data": {"num_sequences": data.num_sequences, "num_tokens": int(feats.tokens.numel()),
                       "num_answer_tokens": data.num_answer_tokens,
                       "num_prompts": int(data.prompt_index.unique().numel())}, "times": times}
    t = time.time()
    deadline = t0 + args.time_budget if args.time_budget else None
    _train(objective, feats, train_ids, val_ids, args, device, curves, deadline)
    times["train_s"] = time.time() - t
    objective.save(args.out, DTYPES[args.save_dtype])
    times["total_s"] = time.time() - t0
    _write_curves(curves, args.out)
    summary = {k: round(v, 4) for k, v in curves["final"].items()}
    val = {k: round(v, 4) for k, v in curves.get("saved_val", {}).items()}
    print(f"train-drafter: {args.kind} -> {args.out} in {times['total_s']:.1f}s; final {summary}; "
          f"validation of the saved module {val}", file=sys.stderr)
    return 0


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _distilled(args, loaded, backend, device: torch.device) -> Distilled:
    """The target's answers: from the cache when it was made with the same settings, else generated."""
    path = args.distill_cache or os.path.join(args.out, "distill.safetensors")
    meta = {"model": loaded.path, "prompts": os.path.abspath(args.prompts), "max_prompts": args.max_prompts,
            "max_tokens": args.max_tokens, "temperatures": args.temperatures, "num_samples": args.num_samples,
            "self_instruct": args.self_instruct, "seed": args.seed}
    if os.path.isfile(path):
        cached = Distilled.load(path)
        if cached.meta == meta:
            print(f"train-drafter: reusing {cached.num_sequences} answers from {path}", file=sys.stderr)
            return cached
        print(f"train-drafter: {path} was made with other settings; generating again", file=sys.stderr)
    texts = load_prompts(args.prompts, args.max_prompts)
    if args.self_instruct:
        t = time.time()
        written = write_prompts(loaded.model, backend, loaded.tokenizer, texts, args.self_instruct, device,
                                seed=args.seed, batch_size=args.max_num_seqs)
        _write_jsonl([{"prompt": p} for p in written], os.path.splitext(path)[0] + ".self_instruct.jsonl")
        print(f"train-drafter: the target wrote {len(written)} prompts in {time.time() - t:.1f}s", file=sys.stderr)
        texts += written
    prompts = [encode_chat(loaded.tokenizer, p) for p in texts]
    plan = DistillPlan(prompts, args.temperatures, args.num_samples, args.max_tokens, args.max_num_seqs, args.seed)
    t = time.time()
    data = distill(loaded.model, backend, plan, loaded.config.eos_token_ids, device, meta)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the generation KV pool: other runs may share this GPU
    print(f"train-drafter: {data.num_sequences} answers, {data.num_answer_tokens} tokens in {time.time() - t:.1f}s",
          file=sys.stderr)
    data.save(path)
    return data


def _write_jsonl(rows: list[dict], path: str) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


@torch.no_grad()
def init_from(module: torch.nn.Module, path: str) -> tuple[list[str], list[str]]:
    """Copy a checkpoint's tensors (every *.safetensors in path) into module's of the same name and shape; (the
    names taken, the module's names left as they were)."""
    tensors = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            tensors |= load_file(os.path.join(path, name))
    state = module.state_dict()  # checkpoint names (merged projections show as their parts)
    taken = [n for n, v in state.items() if n in tensors and tensors[n].shape == v.shape]
    module.load_state_dict(state | {n: tensors[n] for n in taken})
    return taken, [n for n in state if n not in taken]


def _objective(args, loaded, data: Distilled, train_ids: torch.Tensor):
    target = loaded.model
    if args.kind == "eagle":
        return EagleObjective(target, args.ttt_steps or 2, args.feature_noise)
    if args.kind == "eagle3":
        if args.draft_vocab_size == 0:
            return Eagle3Objective(target, None, args.ttt_steps or 3)
        # Counted on training answers only, so the held-out prompts stay unseen.
        in_train = torch.zeros(data.num_sequences, dtype=torch.bool)
        in_train[train_ids] = True
        keep = data.answer_mask() & torch.repeat_interleave(in_train, data.lens)
        counts = torch.bincount(data.tokens[keep].long(), minlength=target.config.vocab_size)
        vocab = draft_vocab_from_counts(counts, min(args.draft_vocab_size, len(counts)))
        share = counts[vocab].sum() / counts.sum().clamp_min(1)
        print(f"train-drafter: draft vocab of {len(vocab)} covers {share:.2%} of answer tokens", file=sys.stderr)
        return Eagle3Objective(target, vocab.to(target.lm_head.weight.device), args.ttt_steps or 3)
    if args.kind == "medusa":
        return MedusaObjective(target, args.medusa_heads, args.medusa_layers, loaded.path)
    return DraftModelObjective(loaded, args.draft_layers)


def _lr_factor(progress: float, warmup: float, schedule: str) -> float:
    """Linear warmup to 1 over the first `warmup` of training, then cosine or linear decay to 0.1 at its end."""
    if progress < warmup:
        return progress / warmup
    frac = min((progress - warmup) / max(1 - warmup, 1e-9), 1.0)
    decay = 0.5 * (1 + math.cos(math.pi * frac)) if schedule == "cosine" else 1 - frac
    return 0.1 + 0.9 * decay


def split_by_prompt(prompt_index: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) sequence ids: all answers of a seeded round(fraction * P) of the P prompts are held
    out, so validation measures prompts never trained on even with many answers per prompt."""
    prompts = prompt_index.unique()
    perm = prompts[torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))]
    held = perm[: min(round(fraction * len(prompts)), len(prompts) - 1)]
    is_val = torch.isin(prompt_index, held)
    return (~is_val).nonzero().flatten(), is_val.nonzero().flatten()


@torch.no_grad()
def _evaluate(objective, feats: FeatureSet, ids: torch.Tensor, bsz: int, device: torch.device) -> dict[str, float]:
    """Loss and metrics on held-out sequences (module in eval mode: no feature noise), averaged over batches."""
    objective.module.eval()
    sums: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(ids), bsz):
        batch = make_batch(feats, ids[i : i + bsz].to(device), objective.max_shift)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, metrics = objective.loss(batch)
        for name, v in {"loss": loss, **metrics}.items():
            sums.setdefault(name, []).append(v.float())
    objective.module.train()
    return {name: torch.stack(v).mean().item() for name, v in sums.items()}


def epoch_batches(train_ids: torch.Tensor, lens: torch.Tensor, bsz: int, epoch: int, args) -> list[torch.Tensor]:
    """The epoch's batches of sequence ids: a seeded shuffle (so a resumed run sees the batches the uninterrupted
    one would have), with --group-by-length sorted by length within windows of 64 batches, batches shuffled."""
    gen = torch.Generator().manual_seed(args.seed * 7919 + epoch)
    order = train_ids[torch.randperm(len(train_ids), generator=gen)]
    if not args.group_by_length:
        return list(order.split(bsz))
    batches = [b for w in order.split(64 * bsz) for b in w[lens[w].argsort(descending=True)].split(bsz)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def _train(objective, feats: FeatureSet, train_ids: torch.Tensor, val_ids: torch.Tensor, args,
           device: torch.device, curves: dict, deadline: float | None) -> None:
    """The optimizer loop; fills curves (per step, validation per epoch), leaves the module to save (the best
    validated one with --keep-best) and saves train_state.pt for --resume. Stops at the deadline (time.time())."""
    module = objective.module.to(device).train()
    params = [p for p in module.parameters() if p.requires_grad]
    base_lr = args.lr or DEFAULT_LR[args.kind]
    opt = torch.optim.AdamW(params, lr=base_lr, betas=(0.9, 0.95), weight_decay=args.weight_decay,
                            fused=device.type == "cuda")
    bsz = min(args.batch_size, len(train_ids))
    per_epoch = math.ceil(len(train_ids) / bsz)
    total = args.steps or max(1, round(args.epochs * per_epoch))
    log = {"step": [], "loss": [], "lr": [], "grad_norm": [], "metrics": {}, "val": []}
    # Only what training changes (trainable parameters, buffers) is kept: the draft model's frozen embedding
    # and LM head would make train_state.pt several times larger than the checkpoint.
    keep = {n for n, p in module.named_parameters() if p.requires_grad} | {n for n, _ in module.named_buffers()}

    def trained() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in module.state_dict().items() if k in keep}

    state_path, start, best = os.path.join(args.out, "train_state.pt"), 0, None  # best: {"step", "acc_0", "module"}
    if args.resume:
        state = torch.load(state_path, map_location=device, weights_only=False)
        module.load_state_dict(state["module"], strict=False)  # frozen weights come from the target
        opt.load_state_dict(state["optimizer"])
        start, log, best = state["step"], state["log"], state["best"]
        print(f"train-drafter: resuming at step {start} of {total}", file=sys.stderr)
    curves |= {"log": log, "total_steps": total, "steps_per_epoch": per_epoch,
               "num_train_sequences": len(train_ids), "num_val_sequences": len(val_ids)}

    def save_state(step: int) -> None:
        torch.save({"module": trained(), "optimizer": opt.state_dict(), "step": step, "log": log, "best": best},
                   state_path + ".tmp")
        os.replace(state_path + ".tmp", state_path)

    lens = feats.lens.cpu()
    batches_of: dict[int, list[torch.Tensor]] = {}  # the current epoch's
    t0, done = time.time(), start
    bar = tqdm(range(start, total), initial=start, total=total, desc=f"train {args.kind}")
    for step in bar:
        epoch, offset = divmod(step, per_epoch)
        if epoch not in batches_of:
            batches_of = {epoch: epoch_batches(train_ids, lens, bsz, epoch, args)}
        progress = (step + 1) / total
        if deadline is not None:
            progress = max(progress, (time.time() - t0) / max(deadline - t0, 1e-9))
        lr = base_lr * _lr_factor(progress, args.warmup, args.schedule)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = make_batch(feats, batches_of[epoch][offset].to(device), objective.max_shift)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, metrics = objective.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        values = [loss.detach(), grad_norm, *(v.detach() for v in metrics.values())]
        loss_v, gn, *rest = torch.stack([v.float() for v in values]).tolist()  # one host sync per step
        done = step + 1
        log["step"].append(done)
        log["loss"].append(loss_v)
        log["lr"].append(lr)
        log["grad_norm"].append(gn)
        for name, v in zip(metrics, rest, strict=True):
            log["metrics"].setdefault(name, []).append(v)
        bar.set_postfix(loss=f"{loss_v:.4f}", acc=f"{rest[0]:.3f}")
        out_of_time = deadline is not None and time.time() >= deadline
        if len(val_ids) and (done % per_epoch == 0 or done == total or out_of_time):
            log["val"].append({"step": done, **_evaluate(objective, feats, val_ids, bsz, device)})
            if args.keep_best and (best is None or log["val"][-1]["acc_0"] > best["acc_0"]):
                best = {"step": done, "acc_0": log["val"][-1]["acc_0"], "module": trained()}
        if args.save_every and done % args.save_every == 0:
            save_state(done)
            _write_curves(curves, args.out)
        if out_of_time:
            print(f"train-drafter: --time-budget {args.time_budget:g}s reached at step {done} of {total}",
                  file=sys.stderr)
            curves["stopped_at_step"] = done
            break
    save_state(done)
    if best is not None:
        module.load_state_dict(best["module"], strict=False)
    curves["saved_step"] = best["step"] if best is not None else done
    saved = [v for v in log["val"] if v["step"] == curves["saved_step"]]
    if saved:
        curves["saved_val"] = saved[0]


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
        json.dump(_rounded(curves), f, indent=1)


def _rounded(obj):
    """Floats to 5 significant digits: the per-step log is shipped with the checkpoint, and its size counts."""
    if isinstance(obj, float):
        return float(f"{obj:.5g}")
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    return obj
