"""ModelConfig: the few numbers our Llama-family forward needs, read from a transformers config.

Families: llama (Llama 2/3.x, SmolLM2), mistral, qwen2 (q/k/v bias), qwen3 (per-head q/k RMSNorm).
transformers 5 keeps rope settings in `config.rope_parameters` (theta included); older versions used
`rope_scaling` plus `rope_theta`. Both are read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """Rope frequency scaling: "linear" divides all by factor, "llama3" (Llama 3.1) mainly the low ones."""

    rope_type: str  # "linear" | "llama3"
    factor: float
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_window: int | None  # set only when some layer really uses a window
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def max_model_len(self) -> int:
        """Longest sequence our full attention computes exactly (a sliding window sees all up to its size)."""
        if self.sliding_window is None:
            return self.max_position_embeddings
        return min(self.max_position_embeddings, self.sliding_window)

    @classmethod
    def from_hf(cls, hf: Any) -> ModelConfig:
        """Read a transformers PretrainedConfig; ValueError for families or features we do not run."""
        model_type = getattr(hf, "model_type", None)
        if model_type not in FAMILIES:
            raise ValueError(f"unsupported model_type {model_type!r}: specserve runs {', '.join(FAMILIES)}")
        act = getattr(hf, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{model_type} with hidden_act={act!r} is not supported (only silu)")
        num_heads = hf.num_attention_heads
        theta, scaling = _rope(hf)
        return cls(
            model_type=model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // num_heads,
            rms_norm_eps=hf.rms_norm_eps,
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            # Qwen2 always has q/k/v bias and no flag for it; Llama and Mistral say so in attention_bias.
            qkv_bias=model_type == "qwen2" or bool(getattr(hf, "attention_bias", False)),
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=_sliding_window(hf),
            bos_token_id=getattr(hf, "bos_token_id", None),
            eos_token_ids=_as_tuple(getattr(hf, "eos_token_id", None)),
        )


def _rope(hf: Any) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from rope_parameters (transformers 5) or rope_scaling + rope_theta (older)."""
    params = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    theta = float(params.get("rope_theta", getattr(hf, "rope_theta", None) or 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    if rope_type == "default":
        return theta, None
    if rope_type == "linear":
        return theta, RopeScaling("linear", float(params["factor"]))
    original = params.get("original_max_position_embeddings") or hf.max_position_embeddings
    scaling = RopeScaling(
        "llama3",
        float(params["factor"]),
        float(params["low_freq_factor"]),
        float(params["high_freq_factor"]),
        int(original),
    )
    return theta, scaling


def _sliding_window(hf: Any) -> int | None:
    """The attention window if any layer uses one (Mistral v0.1, Qwen with use_sliding_window), else None."""
    window = getattr(hf, "sliding_window", None)
    if window is None or getattr(hf, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(hf, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


def _as_tuple(ids: int | list[int] | None) -> tuple[int, ...]:
    if ids is None:
        return ()
    return (ids,) if isinstance(ids, int) else tuple(ids)
