"""transformers <-> rafale names, as literal data: parameter names (with `rename` to apply them) and
config field names.

`{}` stands for the layer index. The tensors themselves need no reshaping: rafale's fused qkv keeps
GPT-NeoX's per-head [q, k, v] layout (see models/decoder.py).
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

_LAYER = re.compile(r"\.(\d+)\.")


def rename(state_dict: dict[str, torch.Tensor], name_map: dict[str, str]) -> dict[str, torch.Tensor]:
    """Renames every key through `name_map` (source template -> target template). A key the map does
    not know raises KeyError naming it: a silently dropped tensor would leave random weights behind."""
    out = {}
    for key, tensor in state_dict.items():
        m = _LAYER.search(key)
        template, layer = (key[:m.start()] + ".{}." + key[m.end():], m.group(1)) if m else (key, None)
        if template not in name_map:
            raise KeyError(f"no mapping for parameter {key!r}")
        out[name_map[template].format(layer)] = tensor
    return out


def inverse(name_map: dict[str, str]) -> dict[str, str]:
    """The map the other way round (rafale -> HF), for export."""
    return {v: k for k, v in name_map.items()}


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
