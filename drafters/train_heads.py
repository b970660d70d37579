"""Training the runtime drafters' own modules (so the checkpoint is what their loaders read), densely.

The heads are the classes of drafters/eagle.py, eagle3.py, medusa.py (parameter names of the published
checkpoints); training runs them on padded [B, S] batches with plain causal attention instead of the paged
KV, through their submodules, so the math is the runtime's op for op:
- EAGLE-1/2 (SafeAILab/EAGLE `cnets.py`): `fc` over cat(token embedding, target feature), then one decoder
  layer without input_layernorm; its output goes straight to the target's LM head.
- EAGLE-3 (`traineagle3/cnets.py`): `fc` over the concatenated aux features, `midlayer` whose attention
  reads cat(input_layernorm(embedding), hidden_norm(hidden)) [2H], `norm`, and its own `lm_head` over a
  draft vocabulary; `d2t` maps it to the target's, and the saved `t2d` marks the target ids it covers. Or
  the target's LM head over the whole vocabulary (`--draft-vocab-size 0`), not saved.
- Medusa: `medusa_heads`, zero-initialised as Medusa does.
Unrolled ("training-time test") steps j >= 1 of the EAGLE heads feed their own output back, as drafting
does: a query at position t attends step 0's keys at <= t and step i's key at t only, rope at t + j.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from specserve.drafters.eagle import Eagle1Head
from specserve.drafters.eagle3 import SHARED_LM_HEAD_KEY, Eagle3Head
from specserve.drafters.medusa import medusa_heads
from specserve.drafters.train_data import Batch
from specserve.models.config import ModelConfig
from specserve.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, RotaryEmbedding
from specserve.models.loader import SHARED_EMBEDDINGS_KEY

KV = tuple[torch.Tensor, torch.Tensor]  # [B, num_kv_heads, S, head_dim] each, rope applied


def draft_layer_config(target: ModelConfig) -> ModelConfig:
    """The EAGLE draft layer: the target's shapes as a plain one-layer Llama (no biases, no q/k norm)."""
    return dataclasses.replace(target, model_type="llama", num_layers=1, qkv_bias=False, mlp_bias=False, qk_norm=False)


def attention(
    attn: LlamaAttention, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding, cache: list[KV]
) -> torch.Tensor:
    """Attention of x [B, S, in] at positions [S]; appends its K/V to cache (earlier unrolled steps)."""
    s = x.shape[1]
    q, k, v = attn.project_qkv(x)  # [B, S, heads, head_dim]
    q, k = rotary(positions, q).transpose(1, 2), rotary(positions, k).transpose(1, 2)  # [B, heads, S, hd]
    cache.append((k, v.transpose(1, 2)))
    group = attn.num_heads // attn.num_kv_heads
    keys = torch.cat([kv[0] for kv in cache], dim=2).repeat_interleave(group, dim=1)  # [B, heads, J*S, hd]
    values = torch.cat([kv[1] for kv in cache], dim=2).repeat_interleave(group, dim=1)
    if len(cache) == 1:
        out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=attn.scale)
    else:
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        eye = torch.eye(s, dtype=torch.bool, device=x.device)
        mask = torch.cat([causal] + [eye] * (len(cache) - 1), dim=1)  # [S, J*S]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scale)
    return attn.o_proj(out.transpose(1, 2).flatten(2))  # [B, S, H]


def decoder_layer(layer: LlamaDecoderLayer, x, positions, rotary, cache: list[KV]) -> torch.Tensor:
    """A Llama decoder layer on [B, S, H]."""
    h = x if layer.input_layernorm is None else layer.input_layernorm(x)
    x = x + attention(layer.self_attn, h, positions, rotary, cache)
    return x + layer.mlp(layer.post_attention_layernorm(x))


def eagle_step(head: Eagle1Head, emb, feature, positions, cache: list[KV]) -> torch.Tensor:
    """EAGLE-1 next-feature prediction [B, S, H] from embeddings of x_{t+1} and features f_t, both [B, S, H]."""
    x = head.fc(torch.cat((emb, feature), dim=-1))
    return decoder_layer(head.layers[0], x, positions, head.rotary, cache)  # its input_layernorm is None


def eagle3_step(head: Eagle3Head, emb, hidden, positions, cache: list[KV]) -> torch.Tensor:
    """EAGLE-3 next hidden [B, S, H] (pre-norm: fed back at the next step; logits = lm_head(norm(.)))."""
    m = head.midlayer
    x = torch.cat((m.input_layernorm(emb), m.hidden_norm(hidden)), dim=-1)  # [B, S, 2H]
    h = hidden + attention(m.self_attn, x, positions, head.rotary, cache)  # the residual is the raw hidden
    return h + m.mlp(m.post_attention_layernorm(h))


def draft_vocab_from_counts(counts: torch.Tensor, size: int) -> torch.Tensor:
    """[size] sorted target ids: the most frequent (ties and unseen ids by lower id), as EAGLE-3 builds it."""
    order = torch.sort(counts, descending=True, stable=True).indices  # stable: equal counts keep id order
    return order[:size].sort().values


def dense_causal_lm(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Our LlamaForCausalLM on padded ids [B, S] with causal attention, no KV: post-norm hidden [B, S, H]."""
    m = model.model
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    x = m.embed_tokens(input_ids)
    for layer in m.layers:
        x = decoder_layer(layer, x, positions, m.rotary_emb, [])
    return m.norm(x)


# ---- objectives: what each kind trains, its loss on a Batch, and the checkpoint it writes -------------


def target_probs(target, hidden: torch.Tensor) -> torch.Tensor:
    """[R, V] float32 target distribution from post-norm hidden rows [R, H] (never stored: recomputed)."""
    with torch.no_grad():
        return torch.softmax(target.compute_logits(hidden), dim=-1)


def soft_ce(logits: torch.Tensor, p: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows of -sum p * log softmax(logits); rows where keep is False count as zero."""
    ce = -(p * torch.log_softmax(logits.float(), dim=-1)).sum(-1)  # [R]
    return (ce if keep is None else ce * keep).mean()


def _save(module: nn.Module, path: str, dtype: torch.dtype, skip: tuple[str, ...] = (), **extra) -> None:
    """safetensors of the module's state (+ extra tensors): floats in dtype, integers and bools as they are."""
    state = {k: v for k, v in module.state_dict().items() if k not in skip} | extra
    save_file({k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in state.items()}, path)


def llama_config(cfg: ModelConfig, **extra) -> dict:
    """config.json of a draft in Llama spelling (what EAGLE's and HF's loaders read)."""
    rope = None
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope = {"rope_type": s.rope_type, "factor": s.factor}
        if s.rope_type == "llama3":
            rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                        original_max_position_embeddings=s.original_max_position_embeddings)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "num_hidden_layers": 1, "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": rope, "max_position_embeddings": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size, "tie_word_embeddings": False,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids), **extra,
    }


def _write_json(obj: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


class EagleObjective:
    """EAGLE-1/2: smooth-L1 on the next feature (weight 1.0) + CE of its logits through the target's LM head
    against the target's next-token distribution (0.1), as in the EAGLE paper; unrolled steps weigh 0.8^j.

    feature_noise w adds U(-w/2, w/2) to the target features the head reads (never to its targets) while the
    module is in training mode: SafeAILab/EAGLE's `AddUniformNoise` (std 0.2 in its train config), which also
    scales by 512 / sequence length (a side effect of its [1, S, H] layout) that we leave out.
    """

    v_weight, p_weight = 1.0, 0.1

    aux_layers = ()

    def __init__(self, target, steps: int = 1, feature_noise: float = 0.0):
        self.target, self.steps, self.max_shift, self.feature_noise = target, steps, steps, feature_noise
        self.module = Eagle1Head(draft_layer_config(target.config), bias=True, target_logits=None)

    def loss(self, b: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        fs, embed = b.fs, self.target.model.embed_tokens
        feats = fs.hidden  # [N, H] the feature is the post-norm last hidden state, as EAGLE's runtime reads it
        feature, cache, total, metrics = feats[b.at(0)], [], 0.0, {}
        if self.feature_noise and self.module.training:
            feature = feature + (torch.rand_like(feature) - 0.5) * self.feature_noise
        for j in range(self.steps):
            idx = b.at(1 + j)  # [B, S]: x_{t+1+j}, and the feature f_{t+1+j} step j predicts
            out = eagle_step(self.module, embed(fs.tokens[idx]), feature, b.pos + j, cache)  # [B, S, H]
            mask = b.answer_mask(1 + j)
            rows, tidx = out[mask], idx[mask]  # [R, H], [R]
            logits = self.target.compute_logits(rows)  # [R, V]
            p = target_probs(self.target, fs.hidden[tidx])
            vloss = F.smooth_l1_loss(rows.float(), feats[tidx].float())
            ploss = soft_ce(logits, p)
            total = total + 0.8**j * (self.v_weight * vloss + self.p_weight * ploss)
            metrics |= {f"acc_{j}": (logits.argmax(-1) == p.argmax(-1)).float().mean(),
                        f"vloss_{j}": vloss, f"ploss_{j}": ploss}
            feature = out  # drafting feeds its own prediction back
        return total, metrics

    def save(self, out_dir: str, dtype: torch.dtype) -> None:
        _save(self.module, os.path.join(out_dir, "model.safetensors"), dtype)
        _write_json(llama_config(self.target.config, bias=True), os.path.join(out_dir, "config.json"))


def eagle3_aux_layers(num_layers: int) -> tuple[int, ...]:
    """Low, mid and high target layers whose input EAGLE-3 reads (its training code and vLLM's choice)."""
    return (2, num_layers // 2, num_layers - 3)


class Eagle3Objective:
    """EAGLE-3: CE of the draft-vocab logits against the target's distribution restricted to the draft
    vocab, at positions whose target argmax the draft vocab holds; unrolled steps weigh 0.8^j.

    draft_vocab None: the target's whole vocabulary through the target's frozen LM head, which the checkpoint
    does not store (SHARED_LM_HEAD_KEY): every token can be drafted, for no weights of its own.
    """

    def __init__(self, target, draft_vocab: torch.Tensor | None, steps: int = 1):
        self.target, self.steps, self.max_shift = target, steps, steps
        self.aux_layers = eagle3_aux_layers(target.config.num_layers)
        self.vocab = draft_vocab  # [Vd] sorted target ids, or None: all of them
        size = target.config.vocab_size if draft_vocab is None else len(draft_vocab)
        logits = target.compute_logits if draft_vocab is None else None
        self.module = Eagle3Head(draft_layer_config(target.config), len(self.aux_layers), size, logits)
        self.t2d = None
        if draft_vocab is not None:
            self.module.d2t.copy_(draft_vocab - torch.arange(len(draft_vocab), device=draft_vocab.device))
            self.t2d = torch.zeros(target.config.vocab_size, dtype=torch.bool, device=draft_vocab.device)
            self.t2d[draft_vocab] = True  # target ids the draft can emit

    def loss(self, b: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        fs, m, embed = b.fs, self.module, self.target.model.embed_tokens
        hidden, cache, total, metrics = m.fc(fs.aux[b.at(0)]), [], 0.0, {}
        for j in range(self.steps):
            idx = b.at(1 + j)
            out = eagle3_step(m, embed(fs.tokens[idx]), hidden, b.pos + j, cache)  # [B, S, H]
            mask = b.answer_mask(1 + j)
            rows, tidx = out[mask], idx[mask]
            logits = m.logits(rows)  # [R, Vd]
            with torch.no_grad():
                tlogits = self.target.compute_logits(fs.hidden[tidx])  # [R, V]
                best = tlogits.argmax(-1)
                if self.vocab is not None:
                    tlogits = tlogits[:, self.vocab.to(tlogits.device)]
                p = torch.softmax(tlogits, dim=-1)  # [R, Vd]
            loss = soft_ce(logits, p, keep=None if self.t2d is None else self.t2d[best])
            total = total + 0.8**j * loss
            pred = logits.argmax(-1)
            metrics |= {f"acc_{j}": (pred + m.d2t[pred] == best).float().mean(), f"ploss_{j}": loss}
            hidden = out
        return total, metrics

    def save(self, out_dir: str, dtype: torch.dtype) -> None:
        if self.t2d is None:
            _save(self.module, os.path.join(out_dir, "model.safetensors"), dtype, skip=("d2t",))
            extra = {"draft_vocab_size": self.target.config.vocab_size, SHARED_LM_HEAD_KEY: True}
        else:
            _save(self.module, os.path.join(out_dir, "model.safetensors"), dtype, t2d=self.t2d)
            extra = {"draft_vocab_size": len(self.vocab)}
        cfg = llama_config(self.target.config, **extra,
                           eagle_config={"eagle_aux_hidden_state_layer_ids": list(self.aux_layers)})
        _write_json(cfg, os.path.join(out_dir, "config.json"))


class MedusaObjective:
    """Medusa: head i at position t predicts token t + i + 2 (the LM head itself predicts t + 1): CE against
    the target's distribution there, head i weighted 0.8^i as in Medusa's training."""

    aux_layers = ()

    def __init__(self, target, num_heads: int, num_layers: int, model_path: str):
        cfg = target.config
        self.target, self.max_shift, self.num_layers, self.model_path = target, num_heads, num_layers, model_path
        self.module = medusa_heads(cfg.hidden_size, cfg.vocab_size, num_heads, num_layers, share_lm_head=True)
        for name, p in self.module.named_parameters():
            if name.endswith("linear.weight"):
                nn.init.zeros_(p)  # each ResBlock starts as the identity: heads start as the LM head

    def loss(self, b: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        fs, base, total, metrics = b.fs, b.at(0), 0.0, {}
        for i, head in enumerate(self.module):
            mask = b.answer_mask(1 + i)  # the target's p at u = t + 1 + i is over token t + i + 2
            logits = self.target.compute_logits(head(fs.hidden[base[mask]]))  # [R, V]
            p = target_probs(self.target, fs.hidden[b.at(1 + i)[mask]])
            loss = soft_ce(logits, p)
            total = total + 0.8**i * loss
            metrics |= {f"acc_{i}": (logits.argmax(-1) == p.argmax(-1)).float().mean(), f"ploss_{i}": loss}
        return total, metrics

    def save(self, out_dir: str, dtype: torch.dtype) -> None:
        _save(self.module, os.path.join(out_dir, "medusa_lm_head.safetensors"), dtype)
        cfg = self.target.config
        _write_json({"medusa_num_heads": len(self.module), "medusa_num_layers": self.num_layers,
                     "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size, "share_lm_head": True,
                     "base_model_name_or_path": self.model_path}, os.path.join(out_dir, "config.json"))


class DraftModelObjective:
    """A small Llama of the target's first layers (plus its embedding, final norm and LM head), trained with
    KL(target || draft) on every answer position. Embedding and LM head stay frozen and are not saved: the
    checkpoint declares SHARED_EMBEDDINGS_KEY and takes the target's at load time (SmolLM2's tied 49152 x 576
    embedding alone is 57 MB in bf16, four times the two layers)."""

    aux_layers, max_shift = (), 0

    def __init__(self, loaded, num_layers: int):
        self.loaded, self.target = loaded, loaded.model
        cfg = dataclasses.replace(loaded.config, num_layers=num_layers)
        device = self.target.lm_head.weight.device
        self.module = LlamaForCausalLM(cfg).to(device)
        src = self.target.state_dict()
        self.module.load_state_dict({k: src[k].float() for k in self.module.state_dict()})
        self.module.model.embed_tokens.requires_grad_(False)
        self.module.lm_head.requires_grad_(False)

    def loss(self, b: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        fs, idx = b.fs, b.at(0)
        hidden = dense_causal_lm(self.module, fs.tokens[idx])  # [B, S, H]
        mask = b.answer_mask(0)
        logits = self.module.compute_logits(hidden[mask])  # [R, V]
        p = target_probs(self.target, fs.hidden[idx[mask]])
        kl = (p * (torch.log(p.clamp_min(1e-30)) - torch.log_softmax(logits, dim=-1))).sum(-1).mean()
        return kl, {"acc_0": (logits.argmax(-1) == p.argmax(-1)).float().mean(), "kl": kl}

    def save(self, out_dir: str, dtype: torch.dtype) -> None:
        """An HF-layout directory (config.json, model.safetensors) without embedding, LM head or tokenizer:
        our loader fills them from the target (load_model(..., shared_tensors=...))."""
        cfg = self.module.config
        _save(self.module, os.path.join(out_dir, "model.safetensors"), dtype,
              skip=("model.embed_tokens.weight", "lm_head.weight"))
        hf = copy.deepcopy(self.loaded.hf_config)
        hf.num_hidden_layers = cfg.num_layers
        setattr(hf, SHARED_EMBEDDINGS_KEY, True)
        if getattr(hf, "layer_types", None):
            hf.layer_types = hf.layer_types[: cfg.num_layers]
        if hasattr(hf, "quantization_config"):  # a GGUF target's: these weights are plain floats
            del hf.quantization_config
        hf.save_pretrained(out_dir)
