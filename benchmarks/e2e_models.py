"""Helpers of bench_gpu_e2e.py: the Llama-3.1-8B shape, random weights made on the device, HF twins, timing.

Random weights are drawn on the device (normal, std 0.02; norms 1): the loader's `load_format="dummy"`
draws them on the CPU so a seed gives the same model everywhere, which takes minutes for 8B parameters.
"""

from __future__ import annotations

import copy
import json
import os
import time

import torch

from specserve.models.config import ModelConfig
from specserve.models.llama import LlamaForCausalLM
from specserve.models.loader import LoadedModel

LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    "torch_dtype": "bfloat16", "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
}
# the same structure at a size the CPU runs in seconds (--quick)
TINY_SHAPE = {"vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32}


class IdTokenizer:
    """Decodes ids to one CJK character each: dummy models have no tokenizer, the engine's detokenizer needs one."""

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(0x4E00 + i % 20000) for i in ids)


def write_config(path: str, quick: bool) -> str:
    """An HF model directory holding only config.json: the 8B shape, or its tiny twin."""
    os.makedirs(path, exist_ok=True)
    cfg = {**LLAMA_31_8B, **(TINY_SHAPE if quick else {})}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return path


@torch.no_grad()
def dummy_model(path: str, device: torch.device, dtype: torch.dtype, seed: int = 0, repeat: bool = False
                ) -> LoadedModel:
    """Our model of path's config with random weights drawn on the device.

    Plain random weights give nearly flat logits, so bf16 rounding that differs between a decode and a verify
    shape flips greedy choices within a few tokens, and replay drafts (the recorded plain output) stop
    matching. With `repeat` the residual stream is the token's embedding (std 1; other weights std 0.002)
    and the LM head is a copy of the embedding, so greedy repeats the last token by a margin of thousands:
    every shape decodes the same text. Timing does not depend on the values.
    """
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(path)
    config = ModelConfig.from_hf(hf_config)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            std = 1.0 if repeat and name == "model.embed_tokens.weight" else 0.002 if repeat else 0.02
            p.normal_(0.0, std, generator=gen)
    if repeat and not config.tie_word_embeddings:
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    model.requires_grad_(False).eval()
    return LoadedModel(model, config, hf_config, IdTokenizer(), path)


@torch.no_grad()
def hf_twin(loaded: LoadedModel, device: torch.device, dtype: torch.dtype, same_weights: bool):
    """transformers' LlamaForCausalLM of the same config: our weights copied in, or its own random ones."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(loaded.hf_config)
    if hasattr(cfg, "quantization_config"):  # a GGUF's: the weights we copy in are dequantized
        del cfg.quantization_config
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    if same_weights:
        missing, _ = model.load_state_dict(loaded.model.state_dict(), strict=False)
        if missing:
            raise ValueError(f"our weights lack {missing[:5]} of the HF model")
    return model.eval()


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a 1 GiB device-to-device copy, counting the read and the write (median of 20)."""
    if device.type != "cuda":
        return float("nan")
    import triton

    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=20, rep=100, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def jit_variants() -> int:
    """Compiled variants of specserve's Triton kernels so far: a count that grows inside a timed run means a
    JIT compile stalled it (0 where Triton's cache cannot be read)."""
    from triton.runtime.jit import JITFunction

    from specserve.kernels import fused_ops, kv_ops, skinny_linear, tree_attention

    n = 0
    for mod in (fused_ops, kv_ops, skinny_linear, tree_attention):
        for obj in vars(mod).values():
            if isinstance(obj, JITFunction):
                n += sum(len(caches[0]) for caches in getattr(obj, "device_caches", {}).values())
    return n


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter (a tied embedding counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def hf_generate(model, prompt: list[int], new_tokens: int, device, **kwargs) -> tuple[float, list[int]]:
    """Seconds of one HF greedy generate of up to new_tokens tokens, and the tokens it produced."""
    ids = torch.tensor([prompt], device=device)
    sync(device)
    t = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0, **kwargs)
    sync(device)
    return time.perf_counter() - t, out[0, len(prompt):].tolist()


def markdown(rows: list[dict], cols: list[str]) -> str:
    """A markdown table of rows (floats with 3 significant digits)."""
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
