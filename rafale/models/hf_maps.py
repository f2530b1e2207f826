"""transformers <-> rafale names, as literal data: parameter names (with `rename` to apply them), config
field names, the defaults transformers assumes for keys a config.json leaves out, and the settings
rafale does not implement. The code that uses them (reading config.json, fusing q/k/v, safetensors in
and out) is models/hf.py.

`{}` stands for the layer index. GPT-NeoX tensors need no reshaping: rafale's fused qkv keeps its
per-head [q, k, v] layout. Llama-family checkpoints store q, k and v apart (LLAMA_QKV); hf.py
interleaves them into rafale's fused qkv (see `fuse_qkv` there).
"""

import re

import torch

GPT_NEOX: dict[str, str] = {
    "gpt_neox.embed_in.weight": "embed_in.weight",
    "gpt_neox.layers.{}.input_layernorm.weight": "blocks.{}.norm1.weight",
    "gpt_neox.layers.{}.input_layernorm.bias": "blocks.{}.norm1.bias",
    "gpt_neox.layers.{}.attention.query_key_value.weight": "blocks.{}.attn.qkv.weight",
    "gpt_neox.layers.{}.attention.query_key_value.bias": "blocks.{}.attn.qkv.bias",
    "gpt_neox.layers.{}.attention.dense.weight": "blocks.{}.attn.proj.weight",
    "gpt_neox.layers.{}.attention.dense.bias": "blocks.{}.attn.proj.bias",
    "gpt_neox.layers.{}.post_attention_layernorm.weight": "blocks.{}.norm2.weight",
    "gpt_neox.layers.{}.post_attention_layernorm.bias": "blocks.{}.norm2.bias",
    "gpt_neox.layers.{}.mlp.dense_h_to_4h.weight": "blocks.{}.mlp.fc_in.weight",
    "gpt_neox.layers.{}.mlp.dense_h_to_4h.bias": "blocks.{}.mlp.fc_in.bias",
    "gpt_neox.layers.{}.mlp.dense_4h_to_h.weight": "blocks.{}.mlp.fc_out.weight",
    "gpt_neox.layers.{}.mlp.dense_4h_to_h.bias": "blocks.{}.mlp.fc_out.bias",
    "gpt_neox.final_layer_norm.weight": "norm_f.weight",
    "gpt_neox.final_layer_norm.bias": "norm_f.bias",
    "embed_out.weight": "embed_out.weight",
}

# Llama, Mistral and Qwen2 share these names.
LLAMA: dict[str, str] = {
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
LLAMA_QKV: dict[str, tuple[str, str, str]] = {
    "blocks.{}.attn.qkv.weight": ("model.layers.{}.self_attn.q_proj.weight",
                                  "model.layers.{}.self_attn.k_proj.weight",
                                  "model.layers.{}.self_attn.v_proj.weight"),
    "blocks.{}.attn.qkv.bias": ("model.layers.{}.self_attn.q_proj.bias",
                                "model.layers.{}.self_attn.k_proj.bias",
                                "model.layers.{}.self_attn.v_proj.bias"),
}

# Buffers some checkpoints carry that are not weights (older transformers saved them): skipped on import.
NON_WEIGHTS = re.compile(r"(rotary_emb\.inv_freq|attention\.bias|attention\.masked_bias)$")

# DecoderConfig field -> transformers GPTNeoXConfig attribute.
GPT_NEOX_CONFIG: dict[str, str] = {
    "vocab_size": "vocab_size",
    "d_model": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "d_ff": "intermediate_size",
    "max_seq_len": "max_position_embeddings",
    "rotary_pct": "rotary_pct",
    "rope_theta": "rotary_emb_base",
    "parallel_residual": "use_parallel_residual",
    "norm_eps": "layer_norm_eps",
    "tie_embeddings": "tie_word_embeddings",
    "init_std": "initializer_range",
}

# DecoderConfig field -> LlamaConfig / MistralConfig / Qwen2Config attribute.
LLAMA_CONFIG: dict[str, str] = {
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

# What the Llama-family config classes (Llama, Mistral, Qwen2) share: the DecoderConfig switches and
# the defaults for omitted keys; each differs in max_position_embeddings (and Qwen2 in q/k/v bias).
_LLAMA_SWITCHES = dict(norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=False, rotary_pct=1.0,
                       parallel_residual=False)
_LLAMA_DEFAULTS = dict(num_key_value_heads=None, rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-6,
                       tie_word_embeddings=False, initializer_range=0.02)

# Per model_type: HF class, names, config map, the DecoderConfig switches the architecture fixes, the
# values transformers' config class assumes for keys a config.json may omit (None: the key is
# required), and the settings whose other values rafale does not implement (with transformers' default).
ARCHITECTURES: dict[str, dict] = {
    "gpt_neox": dict(
        hf_class="GPTNeoXForCausalLM", names=GPT_NEOX, config=GPT_NEOX_CONFIG,
        switches=dict(norm="layernorm", mlp="gelu", bias=True, qkv_bias=True),
        defaults=dict(max_position_embeddings=2048, rotary_pct=0.25, rotary_emb_base=10000.0,
                      use_parallel_residual=True, layer_norm_eps=1e-5, tie_word_embeddings=False,
                      initializer_range=0.02),
        fixed=dict(hidden_act="gelu", attention_bias=True, rope_scaling=None),
    ),
    "llama": dict(
        hf_class="LlamaForCausalLM", names=LLAMA, config=LLAMA_CONFIG, switches=_LLAMA_SWITCHES,
        defaults=dict(_LLAMA_DEFAULTS, max_position_embeddings=2048),
        fixed=dict(hidden_act="silu", attention_bias=False, mlp_bias=False),
    ),
    "mistral": dict(
        hf_class="MistralForCausalLM", names=LLAMA, config=LLAMA_CONFIG, switches=_LLAMA_SWITCHES,
        defaults=dict(_LLAMA_DEFAULTS, max_position_embeddings=4096 * 32),
        fixed=dict(hidden_act="silu"),
    ),
    "qwen2": dict(
        hf_class="Qwen2ForCausalLM", names=LLAMA, config=LLAMA_CONFIG,
        switches=dict(_LLAMA_SWITCHES, qkv_bias=True),
        defaults=dict(_LLAMA_DEFAULTS, max_position_embeddings=32768),
        fixed=dict(hidden_act="silu"),
    ),
}

_LAYER = re.compile(r"\.(\d+)\.")


def template(key: str) -> tuple[str, str | None]:
    """`blocks.3.attn.qkv.weight` -> (`blocks.{}.attn.qkv.weight`, "3"); keys outside layers -> (key, None)."""
    m = _LAYER.search(key)
    return (key[:m.start()] + ".{}." + key[m.end():], m.group(1)) if m else (key, None)


def rename(state_dict: dict[str, torch.Tensor], name_map: dict[str, str]) -> dict[str, torch.Tensor]:
    """Renames every key through `name_map` (source template -> target template). A key the map does
    not know raises KeyError naming it: a silently dropped tensor would leave random weights behind."""
    out = {}
    for key, tensor in state_dict.items():
        tmpl, layer = template(key)
        if tmpl not in name_map:
            raise KeyError(f"no mapping for parameter {key!r}")
        out[name_map[tmpl].format(layer)] = tensor
    return out


def inverse(name_map: dict[str, str]) -> dict[str, str]:
    """The map the other way round (rafale -> HF), for export."""
    return {v: k for k, v in name_map.items()}
