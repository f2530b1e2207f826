"""The Llama family (Llama, Mistral, Qwen2 and rafale's own gpt-* models): presets, transformers'
LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM config and weight names, as literal data.

RMSNorm, SwiGLU MLP, full rotary (Llama-3 frequency scaling optional), grouped-query attention,
sequential residual, no biases (Qwen2: q/k/v only). transformers stores q_proj (nh*hs rows), k_proj
and v_proj (nkv*hs rows each) apart; rafale's fused qkv holds, for each key/value head g, its
n_rep = nh/nkv query heads, then k_g, then v_g:

    qkv rows = [q_{g*n_rep} .. q_{g*n_rep+n_rep-1}, k_g, v_g] for g = 0 .. nkv-1   (hs rows each)

`fuse_qkv` builds that from the three HF tensors (weights and Qwen2's biases alike), `split_qkv`
undoes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rafale.models.configs import DecoderConfig
from rafale.models.decoder_family import DecoderFamily
from rafale.models.family import template

if TYPE_CHECKING:  # the tables load without torch (rafale config show); only fuse / split touch tensors
    import torch

_LLAMA = dict(norm="rmsnorm", mlp="swiglu", bias=False, rotary_pct=1.0, parallel_residual=False)
# gpt-*: rafale's own models to train from scratch (tied embeddings, GQA). d_ff is left to
# DecoderConfig (8/3 d_model rounded up to 64), so a d_model override keeps it in step; vocab 50304
# holds either bundled tokenizer (gpt-neox-20b, smollm2). gpt-tiny / gpt-micro are CPU sizes.
_GPT = dict(_LLAMA, vocab_size=50304, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True)

PRESETS: dict[str, dict] = {
    "gpt-micro": dict(_GPT, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256),
    "gpt-tiny": dict(_GPT, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=512),
    "gpt-125m": dict(_GPT, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, max_seq_len=2048),
    "gpt-350m": dict(_GPT, d_model=1024, n_layers=24, n_heads=16, n_kv_heads=4, max_seq_len=2048),
    "gpt-1b": dict(_GPT, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, max_seq_len=2048),

    # The exact shapes of these HF checkpoints (their config.json), so a .safetensors file of one
    # loads with model.init_from.
    "llama-3.2-1b": dict(_LLAMA, vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                         d_ff=8192, max_seq_len=131072, rope_theta=500000.0, norm_eps=1e-5,
                         tie_embeddings=True,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "qwen2.5-0.5b": dict(_LLAMA, qkv_bias=True, vocab_size=151936, d_model=896, n_layers=24, n_heads=14,
                         n_kv_heads=2, d_ff=4864, max_seq_len=32768, rope_theta=1000000.0, norm_eps=1e-6,
                         tie_embeddings=True),
    "smollm2-135m": dict(_LLAMA, vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                         d_ff=1536, max_seq_len=8192, rope_theta=100000.0, norm_eps=1e-5,
                         tie_embeddings=True),
    "tinyllama-1.1b": dict(_LLAMA, vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                           d_ff=5632, max_seq_len=2048, rope_theta=10000.0, norm_eps=1e-5,
                           tie_embeddings=False),
}

# transformers name -> rafale name (Llama, Mistral and Qwen2 share them); `{}` is the layer index.
NAMES: dict[str, str] = {
    "model.embed_tokens.weight": "embed_in.weight",
    "model.layers.{}.input_layernorm.weight": "blocks.{}.norm1.weight",
    "model.layers.{}.self_attn.o_proj.weight": "blocks.{}.attn.proj.weight",
    "model.layers.{}.post_attention_layernorm.weight": "blocks.{}.norm2.weight",
    "model.layers.{}.mlp.gate_proj.weight": "blocks.{}.mlp.fc_gate.weight",
    "model.layers.{}.mlp.up_proj.weight": "blocks.{}.mlp.fc_in.weight",
    "model.layers.{}.mlp.down_proj.weight": "blocks.{}.mlp.fc_out.weight",
    "model.norm.weight": "norm_f.weight",
    "lm_head.weight": "embed_out.weight",
}

# rafale's fused tensor -> HF's (q, k, v) tensors it is made of (Qwen2 has the biases).
QKV: dict[str, tuple[str, str, str]] = {
    "blocks.{}.attn.qkv.weight": ("model.layers.{}.self_attn.q_proj.weight",
                                  "model.layers.{}.self_attn.k_proj.weight",
                                  "model.layers.{}.self_attn.v_proj.weight"),
    "blocks.{}.attn.qkv.bias": ("model.layers.{}.self_attn.q_proj.bias",
                                "model.layers.{}.self_attn.k_proj.bias",
                                "model.layers.{}.self_attn.v_proj.bias"),
}

# DecoderConfig field -> LlamaConfig / MistralConfig / Qwen2Config attribute.
CONFIG: dict[str, str] = {
    "vocab_size": "vocab_size",
    "d_model": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "d_ff": "intermediate_size",
    "max_seq_len": "max_position_embeddings",
    "rope_theta": "rope_theta",
    "rope_scaling": "rope_scaling",
    "norm_eps": "rms_norm_eps",
    "tie_embeddings": "tie_word_embeddings",
    "init_std": "initializer_range",
}

# What the three config classes share: the DecoderConfig switches and the defaults for omitted keys;
# each differs in max_position_embeddings (and Qwen2 in q/k/v bias).
_SWITCHES = dict(norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=False, rotary_pct=1.0, parallel_residual=False)
_DEFAULTS = dict(num_key_value_heads=None, rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-6,
                 tie_word_embeddings=False, initializer_range=0.02)

ARCHITECTURES: dict[str, dict] = {
    "llama": dict(hf_class="LlamaForCausalLM", config=CONFIG, switches=_SWITCHES,
                  defaults=dict(_DEFAULTS, max_position_embeddings=2048),
                  fixed=dict(hidden_act="silu", attention_bias=False, mlp_bias=False)),
    "mistral": dict(hf_class="MistralForCausalLM", config=CONFIG, switches=_SWITCHES,
                    defaults=dict(_DEFAULTS, max_position_embeddings=4096 * 32),
                    fixed=dict(hidden_act="silu")),
    "qwen2": dict(hf_class="Qwen2ForCausalLM", config=CONFIG, switches=dict(_SWITCHES, qkv_bias=True),
                  defaults=dict(_DEFAULTS, max_position_embeddings=32768),
                  fixed=dict(hidden_act="silu")),
}

# Buffers some checkpoints carry that are not weights (older transformers saved them).
NON_WEIGHTS = ("rotary_emb.inv_freq",)


def split_qkv(cfg: DecoderConfig, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rafale's fused qkv (weight or bias) -> HF's (q, k, v); see the module docstring for the layout."""
    nkv, n_rep, hs = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    rest = qkv.shape[1:]
    groups = qkv.view(nkv, n_rep + 2, hs, *rest)
    q = groups[:, :n_rep].reshape(nkv * n_rep * hs, *rest)
    return q, groups[:, n_rep].reshape(nkv * hs, *rest), groups[:, n_rep + 1].reshape(nkv * hs, *rest)


def fuse_qkv(cfg: DecoderConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HF's (q, k, v) -> rafale's fused qkv; the inverse of `split_qkv`."""
    nkv, n_rep, hs = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    rest = q.shape[1:]
    groups = (q.reshape(nkv, n_rep, hs, *rest), k.reshape(nkv, 1, hs, *rest), v.reshape(nkv, 1, hs, *rest))
    import torch

    return torch.cat(groups, dim=1).reshape(-1, *rest)


class Llama(DecoderFamily):
    name = "llama"
    presets = PRESETS
    architectures = ARCHITECTURES
    names = NAMES

    def owns(self, cfg) -> bool:
        return isinstance(cfg, DecoderConfig) and cfg.norm == "rmsnorm"

    def export_type(self, cfg: DecoderConfig) -> str:
        # Qwen2 is the one transformers class with q/k/v biases and no others.
        model_type = "qwen2" if cfg.qkv_bias and not cfg.bias else "llama"
        self.check_switches(cfg, model_type, ARCHITECTURES[model_type]["switches"])
        return model_type

    def attention_window(self, model_type: str, hf: dict) -> float:
        # Sliding-window attention is plain causal attention for sequences no longer than the window,
        # so capping the context there keeps the logits exact. Mistral's config class defaults to a
        # 4096 window when the key is absent (v0.2+ write null); Qwen2 slides only with use_sliding_window.
        if model_type == "mistral":
            return hf.get("sliding_window", 4096) or float("inf")
        if model_type == "qwen2" and hf.get("use_sliding_window"):
            return hf.get("sliding_window", 4096)
        return float("inf")

    def hf_names(self, cfg: DecoderConfig, task: str, name: str) -> list[str]:
        tmpl, layer = template(name)
        if tmpl in QKV:
            return [n.format(layer) for n in QKV[tmpl]]
        return super().hf_names(cfg, task, name)

    def split(self, cfg, task, name, tensor):
        return list(split_qkv(cfg, tensor)) if template(name)[0] in QKV else [tensor]

    def join(self, cfg, task, name, parts):
        return fuse_qkv(cfg, *parts) if len(parts) == 3 else parts[0]

    def ignored(self, cfg, task: str, hf_key: str) -> bool:
        return hf_key.endswith(NON_WEIGHTS)


FAMILY = Llama()
