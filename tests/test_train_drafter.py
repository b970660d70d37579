"""train-drafter on a tiny random target: losses fall, checkpoints have the published layouts, resume works,
and (once the runtime drafters exist) the trained drafters load in the engine with greedy output unchanged."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from specserve.drafters import DRAFTERS
from specserve.drafters import train as train_module
from specserve.drafters.train import add_train_args, epoch_batches, run_train, split_by_prompt
from specserve.drafters.train_data import (
    Distilled,
    DistillPlan,
    causal_meta,
    collect_features,
    distill,
    encode_chat,
    load_prompts,
    make_batch,
)
from specserve.drafters.train_heads import (
    EagleObjective,
    dense_causal_lm,
    draft_layer_config,
    draft_vocab_from_counts,
    eagle3_step,
    eagle_step,
)
from specserve.kernels import get_backend
from specserve.models.loader import SHARED_EMBEDDINGS_KEY, load_model

PROMPTS = ["Tell me about the fox.", "What is a cache?", "Write add(a, b).", "Say hello.", "Why blocks?", "Count."]
KIND_ARGS = {
    "eagle": ["--lr", "3e-3", "--ttt-steps", "2"],
    "eagle3": ["--lr", "3e-3", "--ttt-steps", "2", "--draft-vocab-size", "128", "--group-by-length"],
    "eagle3-shared": ["--lr", "3e-3", "--ttt-steps", "2", "--draft-vocab-size", "0"],  # the target's LM head
    "medusa": ["--lr", "3e-3", "--medusa-heads", "3"],
    "draft_model": ["--lr", "1e-3", "--draft-layers", "2"],
}
H, V, LAYERS, HEADS, KV_HEADS, HEAD_DIM, INTER = 64, 320, 3, 4, 2, 16, 128  # tests/helpers.py tiny llama


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return tiny_model_dir("llama"), str(prompts), root


def train(setup, name: str, out: str, *extra: str) -> dict:
    """Train KIND_ARGS[name] (its kind: name up to a dash) for 6 steps; the curves."""
    model, prompts, root = setup
    kind = name.split("-")[0]
    parser = argparse.ArgumentParser()
    add_train_args(parser)
    args = parser.parse_args([
        "--kind", kind, "--model", model, "--prompts", prompts, "--out", out, "--max-tokens", "16",
        "--batch-size", "8", "--steps", "6", "--distill-cache", str(root / "distill.safetensors"),
        *KIND_ARGS[name], *extra,
    ])  # batch 8 >= 6 sequences: every step sees the same data, so the loss must fall
    assert run_train(args) == 0
    with open(os.path.join(out, "training_curves.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def trained(setup):
    """kind -> (output dir, curves), each kind trained once for the module."""
    _, _, root = setup
    return {kind: (str(root / kind), train(setup, kind, str(root / kind))) for kind in KIND_ARGS}


@pytest.mark.parametrize("kind", list(KIND_ARGS))
def test_loss_falls(trained, kind):
    _, curves = trained[kind]
    loss = curves["log"]["loss"]
    assert len(loss) == 6 and curves["log"]["step"] == list(range(1, 7))
    assert sum(loss[-2:]) / 2 < sum(loss[:2]) / 2, loss
    assert "acc_0" in curves["log"]["metrics"] and curves["command"] and curves["times"]["total_s"] > 0


def test_eagle_layout(trained):
    out, _ = trained["eagle"]
    sd = load_file(os.path.join(out, "model.safetensors"))
    qkv = {"q_proj": HEADS * HEAD_DIM, "k_proj": KV_HEADS * HEAD_DIM, "v_proj": KV_HEADS * HEAD_DIM}
    want = {"fc.weight": (H, 2 * H), "fc.bias": (H,), "layers.0.self_attn.o_proj.weight": (H, HEADS * HEAD_DIM),
            "layers.0.mlp.gate_proj.weight": (INTER, H), "layers.0.mlp.up_proj.weight": (INTER, H),
            "layers.0.mlp.down_proj.weight": (H, INTER), "layers.0.post_attention_layernorm.weight": (H,),
            **{f"layers.0.self_attn.{n}.weight": (rows, H) for n, rows in qkv.items()}}
    assert {k: tuple(v.shape) for k, v in sd.items()} == want
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["num_hidden_layers"] == 1 and cfg["hidden_size"] == H and cfg["vocab_size"] == V and cfg["bias"]
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (HEADS, KV_HEADS, HEAD_DIM)


def test_eagle3_layout(trained):
    out, _ = trained["eagle3"]
    sd = load_file(os.path.join(out, "model.safetensors"))
    assert sd["fc.weight"].shape == (H, 3 * H)
    for n, rows in {"q_proj": HEADS * HEAD_DIM, "k_proj": KV_HEADS * HEAD_DIM, "v_proj": KV_HEADS * HEAD_DIM}.items():
        assert sd[f"midlayer.self_attn.{n}.weight"].shape == (rows, 2 * H)
    for n in ("hidden_norm", "input_layernorm", "post_attention_layernorm"):
        assert sd[f"midlayer.{n}.weight"].shape == (H,)
    assert sd["midlayer.mlp.down_proj.weight"].shape == (H, INTER) and sd["norm.weight"].shape == (H,)
    assert sd["lm_head.weight"].shape == (128, H)
    d2t, t2d = sd["d2t"], sd["t2d"]
    assert d2t.dtype == torch.int64 and t2d.dtype == torch.bool and t2d.shape == (V,)
    ids = torch.arange(128) + d2t  # target id of every draft id, increasing
    assert torch.equal(ids, t2d.nonzero().flatten())
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["draft_vocab_size"] == 128 and cfg["vocab_size"] == V
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [2, LAYERS // 2, LAYERS - 3]


def test_eagle3_shared_lm_head_layout(trained):
    """--draft-vocab-size 0: no lm_head, d2t or t2d stored; the config says the target's LM head serves."""
    out, _ = trained["eagle3-shared"]
    sd = load_file(os.path.join(out, "model.safetensors"))
    assert sd["fc.weight"].shape == (H, 3 * H) and not {"lm_head.weight", "d2t", "t2d"} & set(sd)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["draft_vocab_size"] == V and cfg["specserve_shared_lm_head"] is True


def test_init_takes_matching_tensors(setup, trained):
    """--init: EAGLE-3 with the target's LM head starts from a draft-vocabulary checkpoint's fc, midlayer, norm."""
    from specserve.drafters.train import init_from
    from specserve.drafters.train_heads import Eagle3Objective

    model, _, _ = setup
    objective = Eagle3Objective(load_model(model, torch.float32, "cpu").model, None)
    out, _ = trained["eagle3"]
    taken, left = init_from(objective.module, out)
    assert left == ["d2t"] and {"fc.weight", "midlayer.self_attn.k_proj.weight"} <= set(taken)
    sd, now = load_file(os.path.join(out, "model.safetensors")), objective.module.state_dict()
    assert all(torch.equal(now[n], sd[n].float()) for n in taken)


def test_medusa_layout(trained):
    out, _ = trained["medusa"]
    sd = load_file(os.path.join(out, "medusa_lm_head.safetensors"))
    want = {f"{h}.0.linear.{p}": (H, H) if p == "weight" else (H,) for h in range(3) for p in ("weight", "bias")}
    assert {k: tuple(v.shape) for k, v in sd.items()} == want  # shared LM head: no {head}.1.weight
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert (cfg["medusa_num_heads"], cfg["medusa_num_layers"], cfg["share_lm_head"]) == (3, 1, True)
    assert (cfg["hidden_size"], cfg["vocab_size"]) == (H, V)


def test_draft_model_layout(setup, trained):
    """Two layers and the final norm in HF names, no embedding / LM head / tokenizer: they are the target's."""
    out, _ = trained["draft_model"]
    keys = load_file(os.path.join(out, "model.safetensors")).keys()
    assert "model.layers.1.mlp.up_proj.weight" in keys and "model.norm.weight" in keys
    assert "model.embed_tokens.weight" not in keys and "lm_head.weight" not in keys
    assert json.load(open(os.path.join(out, "config.json")))[SHARED_EMBEDDINGS_KEY] is True
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "train_state.pt", "training_curves.json"]
    with pytest.raises(ValueError, match="stores no model.embed_tokens.weight: its config.json sets "
                                         "specserve_shared_embeddings"):
        load_model(out, torch.float32, "cpu")
    target = load_model(setup[0], torch.float32, "cpu").model
    embed = target.model.embed_tokens.weight
    draft = load_model(out, torch.float32, "cpu", shared_tensors={"model.embed_tokens.weight": embed})
    assert draft.config.num_layers == 2 and draft.tokenizer is None
    assert draft.model.model.embed_tokens.weight.data_ptr() == embed.data_ptr()  # the target's tensor, no copy
    assert draft.model.lm_head.weight.data_ptr() == embed.data_ptr()  # tied, like the target
    with pytest.raises(ValueError, match=r"the target's is \(320, 48\) and this model needs \(320, 64\)"):
        load_model(out, torch.float32, "cpu", shared_tensors={"model.embed_tokens.weight": torch.zeros(V, 48)})


def test_resume_continues_and_reuses_answers(setup, trained, tmp_path, monkeypatch):
    out = str(tmp_path / "eagle")
    held_out = ("--val-fraction", "0.34")  # 2 of 6 prompts: 4 train (one step an epoch), evaluated each step
    train(setup, "eagle", out, "--steps", "3", *held_out)
    monkeypatch.setattr(train_module, "distill", None)  # the cached answers must be used: no generation
    curves = train(setup, "eagle", out, "--steps", "5", "--resume", *held_out)
    assert curves["log"]["step"] == [1, 2, 3, 4, 5] and curves["num_val_sequences"] == 2
    assert [v["step"] for v in curves["log"]["val"]] == [1, 2, 3, 4, 5] and "acc_0" in curves["final_val"]
    state = torch.load(os.path.join(out, "train_state.pt"), weights_only=False)
    assert state["step"] == 5 and state["optimizer"]["state"]


def test_teacher_pass_matches_dense_forward(setup):
    """The batched paged forward of collect_features equals the dense causal forward the draft model trains with."""
    model, _, _ = setup
    loaded = load_model(model, torch.float32, "cpu")
    seqs = [[1, 5, 9, 33, 7], [1, 40, 41], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]]
    data = Distilled.from_lists(seqs, [2, 1, 4], [0, 1, 2], [0.0] * 3, {})
    fs = collect_features(loaded.model, get_backend("torch", torch.device("cpu")), data, "cpu",
                          aux=False, batch_tokens=10)  # two teacher batches
    with torch.no_grad():
        dense = torch.cat([dense_causal_lm(loaded.model, torch.tensor([s]))[0] for s in seqs])
    torch.testing.assert_close(fs.hidden, dense, atol=1e-5, rtol=1e-4)
    assert fs.starts.tolist() == [0, 5, 8] and fs.lens.tolist() == [5, 3, 18]


def test_helpers():
    meta, pos = causal_meta([3, 17], "cpu")
    assert meta.block_tables.tolist() == [[0, 0], [1, 2]] and pos.tolist() == [0, 1, 2, *range(17)]
    assert meta.slot_mapping.tolist() == [0, 1, 2, *range(16, 33)]
    counts = torch.tensor([0, 5, 1, 5, 0, 9])
    assert draft_vocab_from_counts(counts, 3).tolist() == [1, 3, 5]
    with pytest.raises(ValueError, match="evaluation set"):
        load_prompts("/x/mt_bench.jsonl")


def _runtime_missing(kind: str) -> str | None:
    module = DRAFTERS.get(kind, "").split(":")[0]
    if not module or importlib.util.find_spec(f"specserve.drafters.{module}") is None:
        return f"runtime drafter {kind!r} is not registered in specserve.drafters yet"
    return None


@pytest.mark.parametrize("kind", list(KIND_ARGS))
def test_trained_drafter_runs_lossless(setup, trained, kind):
    """The checkpoint loads through the engine and greedy speculative output equals plain greedy output."""
    reason = _runtime_missing(kind.split("-")[0])
    if reason:
        pytest.skip(reason)
    from specserve import LLM, SamplingParams

    model, _, _ = setup
    out, _ = trained[kind]
    kind = kind.split("-")[0]
    convs = [[{"role": "user", "content": p}] for p in PROMPTS[:3]]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    loaded = load_model(model, torch.float32, "cpu")
    plain = LLM(model=model, device="cpu", loaded_model=loaded, num_kv_blocks=256).chat(convs, params)
    spec = {"method": kind, "model": out, "num_speculative_tokens": 3}
    llm = LLM(model=model, device="cpu", loaded_model=loaded, num_kv_blocks=256, speculative_config=spec)
    fast = llm.chat(convs, params)
    assert [o.outputs[0].token_ids for o in fast] == [o.outputs[0].token_ids for o in plain]
    assert sum(o.metrics.num_draft_tokens for o in fast) > 0
    if kind == "draft_model":  # it drafts with the target's own embedding tensor
        draft = llm.engine.drafters[llm.engine.default_arm].model
        assert draft.model.embed_tokens.weight.data_ptr() == loaded.model.model.embed_tokens.weight.data_ptr()


def test_dense_heads_match_runtime_forward(setup):
    """Training's dense steps compute what the runtime heads compute over the paged KV (same modules)."""
    from specserve.drafters.eagle import Eagle1Head
    from specserve.drafters.eagle3 import Eagle3Head

    model, _, _ = setup
    target = load_model(model, torch.float32, "cpu").model
    cfg = draft_layer_config(target.config)
    torch.manual_seed(0)
    emb, hidden = torch.randn(20, H), torch.randn(20, H)  # one sequence of 20 entries
    meta, positions = causal_meta([20], "cpu")
    backend = get_backend("torch", torch.device("cpu"))
    kv = [(torch.zeros(2, 16, KV_HEADS, HEAD_DIM), torch.zeros(2, 16, KV_HEADS, HEAD_DIM))]
    for head, step in ((Eagle1Head(cfg, True, None), eagle_step), (Eagle3Head(cfg, 3, 128), eagle3_step)):
        with torch.no_grad():
            paged = head(emb, hidden, positions, meta, kv, backend)
            dense = step(head, emb[None], hidden[None], positions, [])[0]
        torch.testing.assert_close(dense, paged, atol=1e-5, rtol=1e-4)


def _answers(data: Distilled) -> list[list[int]]:
    return [data.tokens[s + p : e].tolist()
            for s, e, p in zip(data.offsets[:-1], data.offsets[1:], data.prompt_lens, strict=True)]


def test_distill_greedy_matches_engine(setup):
    """The static-batch sampler at temperature 0 gives the engine's greedy answers, the stop token kept."""
    from specserve import LLM, SamplingParams

    model, _, _ = setup
    loaded = load_model(model, torch.float32, "cpu")
    backend, cpu = get_backend("torch", torch.device("cpu")), torch.device("cpu")
    prompts = [encode_chat(loaded.tokenizer, p) for p in PROMPTS]
    plan = DistillPlan(prompts, [0.0], 1, max_tokens=20, batch_size=4, seed=0)  # two batches: 4 + 2
    eos = loaded.config.eos_token_ids
    stop = _answers(distill(loaded.model, backend, plan, eos, cpu, {}))[0][6]  # the tiny model never says eos
    data = distill(loaded.model, backend, plan, [stop, *eos], cpu, {})
    llm = LLM(model=model, device="cpu", loaded_model=loaded, num_kv_blocks=256)
    ref = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop]))
    answers = _answers(data)
    assert answers == [list(o.outputs[0].token_ids) for o in ref]
    assert answers[0][-1] == stop and len(answers[0]) <= 7 and any(len(a) == 20 for a in answers)
    assert data.prompt_lens.tolist() == [len(p) for p in prompts] and data.prompt_index.tolist() == list(range(6))


def test_distill_mixed_temperatures_and_cache(setup, tmp_path):
    """One greedy and num_samples sampled answers per prompt at each temperature, recorded per sequence;
    the cache round-trips through safetensors."""
    model, _, _ = setup
    loaded = load_model(model, torch.float32, "cpu")
    prompts = [encode_chat(loaded.tokenizer, p) for p in PROMPTS[:2]]
    plan = DistillPlan(prompts, [0.0, 0.7, 1.5], 3, max_tokens=12, batch_size=5, seed=1)
    data = distill(loaded.model, get_backend("torch", torch.device("cpu")), plan, loaded.config.eos_token_ids,
                   torch.device("cpu"), {"seed": 1})
    assert data.num_sequences == 2 * 7 and data.prompt_index.tolist() == [0] * 7 + [1] * 7
    assert data.temperatures.tolist()[:7] == [0.0] + [pytest.approx(0.7)] * 3 + [1.5] * 3
    answers = {tuple(data.tokens[s:e].tolist()) for s, e in zip(data.offsets[:-1], data.offsets[1:], strict=True)}
    assert len(answers) > 7  # sampled answers differ
    path = str(tmp_path / "d.safetensors")
    data.save(path)
    back = Distilled.load(path)
    assert back.meta == {"seed": 1} and torch.equal(back.tokens, data.tokens) and back.tokens.dtype == torch.int32
    assert torch.equal(back.offsets, data.offsets) and torch.equal(back.temperatures, data.temperatures)
    mask = data.answer_mask()
    assert int(mask.sum()) == data.num_answer_tokens and not mask[: data.prompt_lens[0]].any()


def test_split_by_prompt():
    prompt_index = torch.arange(40).repeat_interleave(16)  # 40 prompts x 16 answers
    train_ids, val_ids = split_by_prompt(prompt_index, 0.1, seed=3)
    assert len(val_ids) == 4 * 16 and len(train_ids) + len(val_ids) == 640
    assert not set(prompt_index[val_ids].tolist()) & set(prompt_index[train_ids].tolist())
    assert torch.equal(split_by_prompt(prompt_index, 0.1, seed=3)[1], val_ids)


def test_keep_best_saves_best_validated_module(setup, tmp_path):
    out = str(tmp_path / "medusa")
    curves = train(setup, "medusa", out, "--steps", "5", "--val-fraction", "0.34", "--keep-best", "--lr", "3e-2")
    vals = curves["log"]["val"]
    assert [v["step"] for v in vals] == [1, 2, 3, 4, 5]  # 4 training sequences, batch 8: one step an epoch
    best = max(vals, key=lambda v: v["acc_0"])
    assert curves["saved_step"] == best["step"] and curves["saved_val"] == best
    state = torch.load(os.path.join(out, "train_state.pt"), weights_only=False)
    saved = load_file(os.path.join(out, "medusa_lm_head.safetensors"))
    for name, value in state["best"]["module"].items():
        torch.testing.assert_close(saved[name], value.to("cpu", torch.bfloat16))  # trained on CUDA where there is one


def test_time_budget_stops_annealed(setup, tmp_path):
    curves = train(setup, "medusa", str(tmp_path / "m"), "--time-budget", "1e-6", "--val-fraction", "0")
    assert curves["stopped_at_step"] == 1 and curves["log"]["step"] == [1]
    assert curves["log"]["lr"] == [pytest.approx(3e-3 * 0.1)]  # out of time: the schedule's end


def test_feature_noise_only_in_training(setup):
    model, _, _ = setup
    loaded = load_model(model, torch.float32, "cpu")
    data = Distilled.from_lists([[1, 5, 9, 33, 7, 8], [1, 40, 41, 42]], [2, 1], [0, 1], [0.0, 0.0], {})
    fs = collect_features(loaded.model, get_backend("torch", torch.device("cpu")), data, "cpu", aux=False)
    obj = EagleObjective(loaded.model, steps=2, feature_noise=0.2)
    batch = make_batch(fs, torch.arange(2), obj.max_shift)
    with torch.no_grad():
        obj.module.eval()
        assert obj.loss(batch)[0] == obj.loss(batch)[0]
        obj.module.train()
        assert obj.loss(batch)[0] != obj.loss(batch)[0]


def test_group_by_length_batches():
    lens = torch.randint(5, 500, (1000,))
    train_ids = torch.arange(3, 1000, 2)  # 499 sequences
    args = argparse.Namespace(seed=0, group_by_length=True)
    batches = epoch_batches(train_ids, lens, 8, 0, args)
    assert len(batches) == 63 and sorted(torch.cat(batches).tolist()) == train_ids.tolist()
    padded = sum(len(b) * int(lens[b].max()) for b in batches)
    plain = sum(len(b) * int(lens[b].max()) for b in epoch_batches(train_ids, lens, 8, 0, argparse.Namespace(
        seed=0, group_by_length=False)))
    assert padded < 0.7 * plain  # far less padding than random batches
    assert [b.tolist() for b in epoch_batches(train_ids, lens, 8, 0, args)] == [b.tolist() for b in batches]


def test_temperature_flags(capsys):
    parser = argparse.ArgumentParser()
    add_train_args(parser)
    base = ["--kind", "eagle", "--prompts", "p.jsonl", "--out", "o"]
    assert parser.parse_args([*base, "--temperature", "0.7"]).temperatures == [0.7]  # the old spelling
    assert parser.parse_args([*base, "--temperatures", "0,0.7,1"]).temperatures == [0.0, 0.7, 1.0]
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--temperatures", "0.7,0.7"])
    assert "distinct temperatures" in capsys.readouterr().err


def test_self_instruct_writes_new_closed_turns(setup, monkeypatch):
    """The target continues user turns begun with seed openings, in order; kept turns are new and distinct."""
    import random

    from specserve.drafters import self_instruct

    model, _, _ = setup
    loaded = load_model(model, torch.float32, "cpu")
    before, after = self_instruct.user_turn(loaded.tokenizer)
    text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert before + "hi" + after == text and after.startswith("<|im_end|>")
    im_end = loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in self_instruct.turn_end_ids(loaded.tokenizer, after, loaded.config.eos_token_ids)
    monkeypatch.setattr(self_instruct, "turn_end_ids", lambda *_: set(range(3, V, 4)))  # random weights never close
    seeds = [*PROMPTS, "Tell me about the fox, briefly"]
    written = self_instruct.write_prompts(loaded.model, get_backend("torch", torch.device("cpu")), loaded.tokenizer,
                                          seeds, 8, torch.device("cpu"), max_tokens=12, batch_size=5)
    assert 0 < len(written) <= 8 and len(set(written)) == len(written) and not set(written) & set(seeds)
    starts = iter(self_instruct.openings(seeds, 12, random.Random(0)))
    assert all(any(w.startswith(s) for s in starts) for w in written)  # each begins with the next opening kept
    assert all(len(w.split()) >= 3 for w in written)


def test_self_instruct_prompts_are_answered(setup, tmp_path, monkeypatch):
    from specserve.drafters import self_instruct

    monkeypatch.setattr(self_instruct, "turn_end_ids", lambda *_: set(range(3, V, 4)))
    cache = tmp_path / "distill.safetensors"
    train(setup, "medusa", str(tmp_path / "m"), "--self-instruct", "4", "--distill-cache", str(cache))
    with open(tmp_path / "distill.self_instruct.jsonl") as f:
        written = [json.loads(line)["prompt"] for line in f]
    data = Distilled.load(str(cache))
    assert data.meta["self_instruct"] == 4 and 0 < len(written) <= 4
    assert data.prompt_index.unique().tolist() == list(range(len(PROMPTS) + len(written)))
