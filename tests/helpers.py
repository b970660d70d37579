"""Test builders: tiny real HF model directories, causal attention metadata, empty KV caches, poisoned buffers."""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

from specserve.attention import AttentionMetadata
from specserve.models.config import ModelConfig

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Speculative decoding drafts tokens and the target model verifies them in one forward pass.",
    "def add(a, b):\n    return a + b\n",
    "Paged attention stores keys and values in fixed-size blocks of a shared pool.",
    "Hello, world! How are you today? I am fine, thank you.",
]


def make_tiny_model_dir(path: str, family: str = "llama", vocab_size: int = 320, seed: int = 0) -> str:
    """Write a tiny random model as a real HF dir (config.json, model.safetensors, tokenizer); return path.

    Families: llama (tied embeddings, like SmolLM2), mistral, qwen2 (q/k/v bias, tied), qwen3 (q/k norm,
    head_dim * heads != hidden), llama31 (Llama 3.1 rope scaling, two eos ids).
    """
    from transformers import AutoModelForCausalLM

    os.makedirs(path, exist_ok=True)
    tokenizer = _make_tokenizer(vocab_size)
    config = _tiny_config(family, vocab_size)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _tiny_config(family: str, vocab_size: int):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if family == "llama31":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        return LlamaConfig(**{**common, "eos_token_id": [2, 0]}, rope_parameters=rope, tie_word_embeddings=False)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None, tie_word_embeddings=False)
    if family == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True)
    if family == "qwen3":
        return Qwen3Config(**{**common, "head_dim": 32}, tie_word_embeddings=False)
    raise ValueError(f"unknown tiny family {family!r}")


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that attention is far from uniform, norms away from 1 so a misplaced one shows."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.15 * noise)


def _make_tokenizer(vocab_size: int):
    """Byte-level BPE trained on a few sentences: any text round-trips; ids 0-2 are the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def make_meta(
    query_lens: list[int], context_lens: list[int], block_tables: list[list[int]], block_size: int
) -> AttentionMetadata:
    """Causal chunks, no drafts: sequence b runs query_lens[b] tokens after context_lens[b] cached ones."""
    seq_lens = [c + q for c, q in zip(context_lens, query_lens, strict=True)]
    slots = [
        block_tables[b][pos // block_size] * block_size + pos % block_size
        for b in range(len(query_lens))
        for pos in range(context_lens[b], seq_lens[b])
    ]
    # The last query token of each sequence is the tree root (mask 0b1); tokens before it attend causally.
    tree_mask = [1 if i == q - 1 else 0 for q in query_lens for i in range(q)]
    width = max(len(t) for t in block_tables)
    return AttentionMetadata(
        query_start_loc=torch.tensor([0, *query_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        context_lens=torch.tensor(context_lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        tree_offsets=torch.tensor([q - 1 for q in query_lens], dtype=torch.int32),
        tree_mask=torch.tensor(tree_mask, dtype=torch.int64),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        block_size=block_size,
    )


def make_positions(query_lens: list[int], context_lens: list[int]) -> torch.Tensor:
    """[sum(query_lens)] int64: the sequence position of every query token of make_meta's batch."""
    return torch.cat([torch.arange(c, c + q) for q, c in zip(query_lens, context_lens, strict=True)])


def new_kv_caches(
    config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype = torch.float32, device="cpu"
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One zeroed (k_cache, v_cache) per layer, [num_blocks, block_size, num_kv_heads, head_dim] each."""
    shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(config.num_layers)
    ]


def host_syncs(fn) -> int:
    """How many synchronizing CUDA calls torch's sync debug mode reports while fn() runs."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return len([w for w in caught if "synchroniz" in str(w.message)])


@contextlib.contextmanager
def nan_allocations():
    """torch.empty / empty_like hand out NaN-filled floating tensors while active."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *a, **k: poisoned(empty(*a, **k))
    torch.empty_like = lambda *a, **k: poisoned(empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like
