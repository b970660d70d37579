"""Tiny random drafter checkpoints in their authors' published layouts, and the loaders' errors on bad ones.

The writers spell every tensor name by hand (not through our loaders or trainer), so a loader that drifts
from the published layout fails here. Other drafter tests import them.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from specserve.llm import LLM


def target_config(target_dir: str) -> dict:
    with open(os.path.join(target_dir, "config.json")) as f:
        return json.load(f)


def _write(path: str, config: dict, tensors: dict[str, torch.Tensor], weights: str) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    file = os.path.join(path, weights)
    if weights.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in tensors.items()}, file)
    else:
        torch.save(tensors, file)
    return path


def write_medusa(path: str, target_dir: str, heads: int = 3, layers: int = 1, share: bool = True,
                 hidden: int | None = None, vocab: int | None = None, seed: int = 0, drop: tuple = (),
                 **config) -> str:
    """FasterDecoding/Medusa layout: {head}.{layer}.linear.weight/bias and {head}.{layers}.weight."""
    c = target_config(target_dir)
    h, v = hidden or c["hidden_size"], vocab or c["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    t = {}
    for i in range(heads):
        for j in range(layers):
            t[f"{i}.{j}.linear.weight"] = 0.1 * torch.randn(h, h, generator=g)
            t[f"{i}.{j}.linear.bias"] = 0.1 * torch.randn(h, generator=g)
        if not share:
            t[f"{i}.{layers}.weight"] = 0.1 * torch.randn(v, h, generator=g)
    cfg = {"medusa_num_heads": heads, "medusa_num_layers": layers, "share_lm_head": share,
           "base_model_name_or_path": target_dir, **config}
    return _write(path, cfg, {k: x for k, x in t.items() if k not in drop}, "medusa_lm_head.safetensors")


def _layer(prefix: str, c: dict, g, in_mult: int = 1, input_norm: bool = True, hidden_norm: bool = False) -> dict:
    """One Llama decoder layer's tensors (HF names) with attention inputs in_mult * hidden wide."""
    h, inter = c["hidden_size"], c["intermediate_size"]
    heads, kv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]

    def r(*shape):
        return 0.15 * torch.randn(*shape, generator=g)

    t = {
        f"{prefix}self_attn.q_proj.weight": r(heads * hd, in_mult * h),
        f"{prefix}self_attn.k_proj.weight": r(kv * hd, in_mult * h),
        f"{prefix}self_attn.v_proj.weight": r(kv * hd, in_mult * h),
        f"{prefix}self_attn.o_proj.weight": r(h, heads * hd),
        f"{prefix}mlp.gate_proj.weight": r(inter, h),
        f"{prefix}mlp.up_proj.weight": r(inter, h),
        f"{prefix}mlp.down_proj.weight": r(h, inter),
        f"{prefix}post_attention_layernorm.weight": 1 + r(h),
    }
    if input_norm:
        t[f"{prefix}input_layernorm.weight"] = 1 + r(h)
    if hidden_norm:
        t[f"{prefix}hidden_norm.weight"] = 1 + r(h)
    return t


def _eagle_config(c: dict, **extra) -> dict:
    """EAGLE's config.json: the target's shapes as a one-layer Llama."""
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "rms_norm_eps", "max_position_embeddings", "vocab_size", "bos_token_id", "eos_token_id")
    cfg = {k: c[k] for k in keys}
    theta = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama", num_hidden_layers=1, hidden_act="silu",
               rope_theta=theta, tie_word_embeddings=False)
    return {**cfg, **extra}


def write_eagle(path: str, target_dir: str, seed: int = 0, drop: tuple = (), **config) -> str:
    """SafeAILab/EAGLE (cnets1.py) layout: fc.weight/bias, layers.0.* without input_layernorm, .bin weights."""
    c = target_config(target_dir)
    h = c["hidden_size"]
    g = torch.Generator().manual_seed(seed)
    t = {"fc.weight": 0.1 * torch.randn(h, 2 * h, generator=g), "fc.bias": 0.1 * torch.randn(h, generator=g)}
    t.update(_layer("layers.0.", c, g, input_norm=False))
    cfg = _eagle_config(c, bias=True, **config)
    return _write(path, cfg, {k: x for k, x in t.items() if k not in drop}, "pytorch_model.bin")


def write_eagle3(path: str, target_dir: str, draft_vocab: int = 200, seed: int = 0, drop: tuple = (),
                 fc_inputs: int = 3, **config) -> str:
    """EAGLE-3 (cnets.py) layout: fc [H, 3H], midlayer.* (2H attention inputs, hidden_norm), norm, lm_head, d2t, t2d."""
    c = target_config(target_dir)
    h, v = c["hidden_size"], c["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    vocab = torch.randperm(v, generator=g)[:draft_vocab].sort().values  # target ids the draft can say
    t = {
        "fc.weight": 0.1 * torch.randn(h, fc_inputs * h, generator=g),
        "norm.weight": 1 + 0.1 * torch.randn(h, generator=g),
        "lm_head.weight": 0.15 * torch.randn(draft_vocab, h, generator=g),
        "d2t": vocab - torch.arange(draft_vocab),
        "t2d": torch.zeros(v, dtype=torch.bool).index_fill_(0, vocab, True),
    }
    t.update(_layer("midlayer.", c, g, in_mult=2, hidden_norm=True))
    cfg = _eagle_config(c, draft_vocab_size=draft_vocab, **config)
    return _write(path, cfg, {k: x for k, x in t.items() if k not in drop}, "model.safetensors")


# ---- loader errors --------------------------------------------------------------------------------


def _build(target_dir: str, method: str, path: str):
    return LLM(model=target_dir, device="cpu", dtype="float32", speculative_config={"method": method, "model": path})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hidden=48), "hidden_size 48, but the target model's hidden_size is 64"),
        (dict(share=False, vocab=300), "vocab_size 300, but the target model's vocab_size is 320"),
        (dict(drop=("1.0.linear.bias",)), "lacks 1 tensors: 1.0.linear.bias"),
        (dict(share=False, drop=("0.1.weight", "2.1.weight")), "lacks 2 tensors: 0.1.weight, 2.1.weight"),
    ],
)
def test_medusa_loader_errors(tiny_model_dir, tmp_path, kwargs, message):
    path = write_medusa(str(tmp_path / "medusa"), tiny_model_dir(), **kwargs)
    with pytest.raises(ValueError, match=message):
        _build(tiny_model_dir(), "medusa", path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hidden_size=48), "hidden_size 48, but the target model's hidden_size is 64"),
        (dict(vocab_size=300), "vocab_size 300, but the target model's vocab_size is 320"),
        (dict(drop=("layers.0.mlp.down_proj.weight", "fc.bias")), "lacks 2 tensors: fc.bias, layers.0.mlp"),
    ],
)
def test_eagle_loader_errors(tiny_model_dir, tmp_path, kwargs, message):
    path = write_eagle(str(tmp_path / "eagle"), tiny_model_dir(), **kwargs)
    with pytest.raises(ValueError, match=message):
        _build(tiny_model_dir(), "eagle", path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(fc_inputs=2), "fc input size 128, but the target model's fc input size is 192"),
        (dict(drop=("d2t", "norm.weight")), "lacks 2 tensors: d2t, norm.weight"),
        (dict(drop=("lm_head.weight",), specserve_shared_lm_head=True),
         "draft_vocab_size 200 must be the target's vocab_size 320"),
        (dict(draft_vocab=320, specserve_shared_lm_head=True), "unexpected .*lm_head.weight"),
    ],
)
def test_eagle3_loader_errors(tiny_model_dir, tmp_path, kwargs, message):
    path = write_eagle3(str(tmp_path / "eagle3"), tiny_model_dir(), **kwargs)
    with pytest.raises(ValueError, match=message):
        _build(tiny_model_dir(), "eagle3", path)


def test_draft_model_vocab_mismatch(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    target = tiny_model_dir()
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    draft = str(tmp_path / "draft")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(draft)
    for f in os.listdir(target):
        if f.startswith("tokenizer") or f == "special_tokens_map.json":
            shutil.copy(os.path.join(target, f), draft)
    with pytest.raises(ValueError, match="draft model vocab size 300 does not match the target's 320"):
        _build(target, "draft_model", draft)


def write_shared_draft(path: str, target_dir: str, layers: int = 1, seed: int = 0, **config) -> str:
    """A `train-drafter --kind draft_model` directory: the target's config cut to `layers` layers, declaring
    specserve_shared_embeddings, with no embedding, LM head or tokenizer (they are the target's)."""
    c = target_config(target_dir)
    g = torch.Generator().manual_seed(seed)
    cfg = {**c, "num_hidden_layers": layers, "specserve_shared_embeddings": True, **config}
    t = {"model.norm.weight": 1 + 0.1 * torch.randn(cfg["hidden_size"], generator=g)}
    for i in range(layers):
        t.update(_layer(f"model.layers.{i}.", cfg, g))
    return _write(path, cfg, t, "model.safetensors")


@pytest.mark.parametrize("tied", [True, False])
def test_shared_draft_model_loads_with_target(tiny_model_dir, tmp_path, tied):
    """The draft's embedding (and untied LM head) are the target's tensors; alone it is no model."""
    target = tiny_model_dir()
    draft = write_shared_draft(str(tmp_path / "draft"), target, tie_word_embeddings=tied)
    llm = LLM(model=target, device="cpu", dtype="float32",
              speculative_config={"method": "draft_model", "model": draft, "num_speculative_tokens": 3})
    drafter, embed = llm.engine.drafters[llm.engine.default_arm].model, llm.engine.model.model.embed_tokens.weight
    assert drafter.model.embed_tokens.weight.data_ptr() == embed.data_ptr()
    assert drafter.lm_head.weight.data_ptr() == llm.engine.model.lm_head.weight.data_ptr()
    missing = "model.embed_tokens.weight" if tied else "model.embed_tokens.weight / lm_head.weight"
    with pytest.raises(ValueError, match=f"stores no {missing}: its config.json sets specserve_shared_embeddings, "
                                         "so it takes them from the target it drafts for"):
        LLM(model=draft, device="cpu", dtype="float32")


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(hidden_size=48, head_dim=12), r"the target's is \(320, 64\) and this model needs \(320, 48\)"),
        (dict(vocab_size=300), r"the target's is \(320, 64\) and this model needs \(300, 64\)"),
    ],
)
def test_shared_draft_model_must_match_target(tiny_model_dir, tmp_path, config, message):
    draft = write_shared_draft(str(tmp_path / "draft"), tiny_model_dir(), **config)
    with pytest.raises(ValueError, match="takes model.embed_tokens.weight from its target .*" + message):
        _build(tiny_model_dir(), "draft_model", draft)


def test_missing_checkpoint_files(tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        _build(tiny_model_dir(), "eagle", str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 2}))
    with pytest.raises(FileNotFoundError, match="has none of medusa_lm_head.safetensors, medusa_lm_head.pt"):
        _build(tiny_model_dir(), "medusa", str(tmp_path))


def test_tree_settings_are_checked(tiny_model_dir, tmp_path):
    target = tiny_model_dir()
    medusa = write_medusa(str(tmp_path / "medusa"), target, heads=2)
    for tree, message in (([[0], [0, 0], [0, 0, 0]], "3 deep, but the checkpoint has 2 Medusa heads"),
                          ([[r] for r in range(64)], "64 nodes; at most 63")):
        with pytest.raises(ValueError, match=message):
            LLM(model=target, device="cpu", dtype="float32",
                speculative_config={"method": "medusa", "model": medusa, "tree": tree})
    eagle = write_eagle(str(tmp_path / "eagle"), target)
    with pytest.raises(ValueError, match="1 \\+ top_k \\* \\(depth - 1\\) <= 64; got top_k 8, depth 9"):
        LLM(model=target, device="cpu", dtype="float32",
            speculative_config={"method": "eagle", "model": eagle, "top_k": 8, "depth": 9})
