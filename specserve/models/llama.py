"""Llama-family decoder (Llama 2/3.x, SmolLM2, Mistral, Qwen2, Qwen3) over the paged KV pool.

The whole batch is one flat run of T query tokens; `AttentionMetadata` says which sequence each belongs
to, where its K/V go and what it may attend (causal chunks and draft trees alike). Parameter names are
Hugging Face's, so an HF state_dict loads as is. The math follows transformers op for op (RMSNorm in
fp32, rope as q * cos + rotate_half(q) * sin) so fp32 logits match it to rounding.

q/k/v and gate/up run as one matmul each (`qkv_proj`, `gate_up_proj`); state_dict() and load_state_dict()
still speak the checkpoint's names (q_proj, k_proj, ...), and the loader fills the merged weights part by part.
The small ops between the matmuls (RMSNorm + residual add, rope + K/V store, SiLU-and-multiply) come from the
attention backend: fused Triton kernels on CUDA (at decode shapes rope + K/V store inside the q/k/v matmul and
SiLU-and-multiply inside gate_up's), their torch references on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import ModuleType

import torch
from torch import nn

from specserve.attention import AttentionMetadata
from specserve.kernels import reference
from specserve.models.config import ModelConfig

KVCache = tuple[torch.Tensor, torch.Tensor]  # [num_blocks, block_size, num_kv_heads, head_dim] each


class Linear(nn.Linear):
    """nn.Linear whose matmul comes from the kernel backend (few-row Triton matmul on CUDA)."""

    def forward(self, x: torch.Tensor, backend: ModuleType = reference) -> torch.Tensor:
        return backend.linear(x, self.weight, self.bias)

    def forward_gated(self, x: torch.Tensor, backend: ModuleType = reference) -> torch.Tensor:
        """silu_and_mul(self(x)) for rows [gate; up] (one launch on CUDA at decode shapes)."""
        return backend.gated_linear(x, self.weight, self.bias)

    def forward_rope(self, x: torch.Tensor, backend: ModuleType, num_q_heads: int, *rope_write_kv_args) -> torch.Tensor:
        """backend.rope_write_kv of self(x) for rows [q; k; v] (positions, cos, sin, caches, slot mapping): rotated q
        (one launch on CUDA at decode shapes)."""
        return backend.qkv_rope_write_kv(x, self.weight, self.bias, num_q_heads, *rope_write_kv_args)


def make_linear(in_features: int, out_features: int, bias: bool) -> nn.Module:
    """Every projection is built here: the seam for quantized and tensor-parallel linear layers."""
    return Linear(in_features, out_features, bias=bias)


# merged projection -> the checkpoint's projections it holds, in output order
MERGED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def merged_part(name: str) -> tuple[str, int] | None:
    """For a checkpoint name like `...self_attn.k_proj.weight`: (`...self_attn.qkv_proj.weight`, part 1)."""
    *path, proj, attr = name.split(".")
    for merged, parts in MERGED_PROJECTIONS.items():
        if proj in parts:
            return ".".join([*path, merged, attr]), parts.index(proj)
    return None


def register_merged(module: nn.Module, merged: str, sizes: list[int]) -> None:
    """Make module's state_dict show `merged` as its parts' checkpoint names, and load_state_dict accept them."""
    parts = MERGED_PROJECTIONS[merged]

    def split(mod, state, prefix, local_metadata) -> None:
        for attr in ("weight", "bias"):
            whole = state.pop(prefix + f"{merged}.{attr}", None)
            if whole is not None:
                state.update((prefix + f"{p}.{attr}", t) for p, t in zip(parts, whole.split(sizes), strict=True))

    def join(mod, state, prefix, *args) -> None:
        for attr in ("weight", "bias"):
            names = [prefix + f"{p}.{attr}" for p in parts]
            if all(n in state for n in names):
                state[prefix + f"{merged}.{attr}"] = torch.cat([state.pop(n) for n in names])

    module.register_state_dict_post_hook(split)
    module.register_load_state_dict_pre_hook(join)


@dataclass
class ModelOutput:
    hidden_states: torch.Tensor  # [T, hidden] after the final norm: what compute_logits takes
    aux_hidden_states: list[torch.Tensor] = field(default_factory=list)  # [T, hidden] per aux layer (EAGLE-3)


class RMSNorm(nn.Module):
    """HF's RMSNorm: normalize in fp32, cast back, then scale. Given a residual, adds it first and returns
    (x + residual, norm(x + residual)): one kernel for the layer's add and the next norm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, backend: ModuleType = reference):
        return backend.rms_norm(x, self.weight, self.eps, residual)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """[head_dim // 2] fp32 inverse frequencies, linear or Llama 3.1 scaling as transformers does it."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    if s.rope_type == "linear":
        return inv_freq / s.factor
    # llama3: keep high frequencies, divide low ones by factor, interpolate smoothly in between.
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables in fp32 indexed by position; built on first use on the device that needs them.

    The tables are plain attributes, not buffers: a model built on the meta device and materialized later
    gets them right, and model.to(bf16) does not round the fp32 tables (they are cast per use, like HF).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.cos: torch.Tensor | None = None  # [max_positions, head_dim // 2]
        self.sin: torch.Tensor | None = None

    def reserve(self, num_positions: int, device: torch.device) -> None:
        """Make the tables cover positions [0, num_positions) on device."""
        if self.cos is not None and self.cos.device == device and self.cos.shape[0] >= num_positions:
            return
        inv_freq = rope_inv_freq(self.config).to(device)
        t = torch.arange(num_positions, device=device, dtype=torch.float)
        freqs = t[:, None] * inv_freq[None, :]  # [num_positions, head_dim // 2]
        self.cos, self.sin = freqs.cos(), freqs.sin()

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) on device, covering max_position_embeddings (longer contexts call reserve() up front)."""
        self.reserve(self.config.max_position_embeddings, device)
        return self.cos, self.sin

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, heads, head_dim] at positions [T]."""
        return reference.apply_rope(x, positions, *self.tables(positions.device))


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
        )
        self.scale = self.head_dim**-0.5
        hidden, bias = config.hidden_size, config.qkv_bias
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_sizes = [q_size, kv_size, kv_size]
        self.qkv_proj = make_linear(hidden, q_size + 2 * kv_size, bias)
        register_merged(self, "qkv_proj", self.qkv_sizes)
        self.o_proj = make_linear(self.num_heads * self.head_dim, hidden, False)
        if config.qk_norm:  # Qwen3: RMSNorm over each head before rope
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        positions: torch.Tensor,  # [T]
        rotary: RotaryEmbedding,
        meta: AttentionMetadata,
        kv_cache: KVCache,
        backend: ModuleType,
    ) -> torch.Tensor:
        k_cache, v_cache = kv_cache
        rope_args = (positions, *rotary.tables(x.device), k_cache, v_cache, meta.slot_mapping)
        if hasattr(self, "q_norm"):  # Qwen3 norms q and k between the projection and rope
            q = backend.rope_write_kv(*self.project_qkv(x, backend), *rope_args)
        else:
            q = self.qkv_proj.forward_rope(x, backend, self.num_heads, *rope_args)
        out = backend.paged_attention(q, k_cache, v_cache, meta, self.scale)  # [T, num_heads, head_dim]
        return self.o_proj(out.flatten(1), backend)

    def project_qkv(self, x: torch.Tensor, backend: ModuleType = reference) -> tuple[torch.Tensor, ...]:
        """q [..., num_heads, head_dim], k and v [..., num_kv_heads, head_dim] (views of one matmul), before rope."""
        q, k, v = self.qkv_proj(x, backend).split(self.qkv_sizes, dim=-1)
        q = q.unflatten(-1, (self.num_heads, self.head_dim))
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q, backend=backend), self.k_norm(k, backend=backend)
        return q, k, v


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden, inter, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_up_proj = make_linear(hidden, 2 * inter, bias)
        register_merged(self, "gate_up_proj", [inter, inter])
        self.down_proj = make_linear(inter, hidden, bias)

    def forward(self, x: torch.Tensor, backend: ModuleType = reference) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj.forward_gated(x, backend), backend)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attn = LlamaAttention(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h, residual, positions, rotary, meta, kv_cache, backend) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, residual) -> (mlp output, residual stream before it): the stream entering the next layer is their
        sum, which the next norm adds in its own kernel (residual None: h is the stream itself)."""
        if residual is None:
            residual = h
            if self.input_layernorm is not None:
                h = self.input_layernorm(h, backend=backend)
        else:
            residual, h = self.input_layernorm(h, residual, backend)
        h = self.self_attn(h, positions, rotary, meta, kv_cache, backend)
        residual, h = self.post_attention_layernorm(h, residual, backend)
        return self.mlp(h, backend), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class LlamaForCausalLM(nn.Module):
    """Causal LM over paged KV. `aux_layers` picks the residual streams handed to EAGLE-3.

    aux_hidden_states[j] is the residual stream entering layer aux_layers[j] (the output of layer
    aux_layers[j] - 1; 0 is the embeddings, num_layers the last output before the final norm), i.e.
    transformers' `output_hidden_states[aux_layers[j]]` without its final norm.
    That is where EAGLE-3 taps the target (`if idx in (2, L // 2, L - 3)` before running layer idx, as in
    its training code and vLLM), so trained EAGLE-3 heads see what they were trained on.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = make_linear(config.hidden_size, config.vocab_size, False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.aux_layers: tuple[int, ...] = ()

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        meta: AttentionMetadata,
        kv_caches: list[KVCache],  # one (k_cache, v_cache) per layer
        backend: ModuleType,
    ) -> ModelOutput:
        m = self.model
        h, residual = m.embed_tokens(input_ids), None  # [T, hidden]; the stream is h + residual
        taps = {}  # layer index -> residual stream entering it
        for i, layer in enumerate(m.layers):
            if i in self.aux_layers:
                taps[i] = h if residual is None else h + residual
            h, residual = layer(h, residual, positions, m.rotary_emb, meta, kv_caches[i], backend)
        x, hidden = m.norm(h, residual, backend)
        taps[len(m.layers)] = x
        aux = [taps[i] for i in self.aux_layers]
        return ModelOutput(hidden_states=hidden, aux_hidden_states=aux)

    def compute_logits(self, hidden: torch.Tensor, backend: ModuleType = reference) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] float32."""
        return self.lm_head(hidden, backend).float()


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights of sane scale (normal std 0.02, norm weights 1), the same for a seed on any device."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            # drawn on the CPU so that a seed gives the same model on every device
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
