"""The GPT-NeoX family (EleutherAI's Pythia): presets, transformers' GPTNeoXForCausalLM config and
weight names, as literal data.

LayerNorm, exact-erf GELU MLP, partial rotary, parallel residual, biases everywhere. GPT-NeoX fuses
q/k/v per head as [q_h, k_h, v_h], which is rafale's layout as is: every tensor maps one to one.
"""

import re

from rafale.models.configs import DecoderConfig
from rafale.models.decoder_family import DecoderFamily

# The exact shapes of EleutherAI's Pythia checkpoints (their config.json: vocab 50304, 2048 positions,
# rotary_pct 0.25, rotary base 10000, parallel residual, untied head, d_ff = 4 * d_model).
# pythia-tiny and pythia-micro are CPU sizes: a bundled config trains in minutes (tiny) / the tests (micro).
_PYTHIA = dict(vocab_size=50304, max_seq_len=2048, rotary_pct=0.25, rope_theta=10000.0,
               parallel_residual=True, norm_eps=1e-5, tie_embeddings=False)

PRESETS: dict[str, dict] = {
    "pythia-14m": dict(_PYTHIA, d_model=128, n_layers=6, n_heads=4),
    "pythia-70m": dict(_PYTHIA, d_model=512, n_layers=6, n_heads=8),
    "pythia-160m": dict(_PYTHIA, d_model=768, n_layers=12, n_heads=12),
    "pythia-410m": dict(_PYTHIA, d_model=1024, n_layers=24, n_heads=16),
    "pythia-1b": dict(_PYTHIA, d_model=2048, n_layers=16, n_heads=8),
    "pythia-1.4b": dict(_PYTHIA, d_model=2048, n_layers=24, n_heads=16),
    "pythia-tiny": dict(_PYTHIA, d_model=128, n_layers=4, n_heads=4, max_seq_len=512),
    "pythia-micro": dict(_PYTHIA, d_model=64, n_layers=2, n_heads=4, max_seq_len=256),
}

# transformers name -> rafale name; `{}` stands for the layer index.
NAMES: dict[str, str] = {
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

# DecoderConfig field -> transformers GPTNeoXConfig attribute.
CONFIG: dict[str, str] = {
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

ARCHITECTURES: dict[str, dict] = {
    "gpt_neox": dict(
        hf_class="GPTNeoXForCausalLM", config=CONFIG,
        switches=dict(norm="layernorm", mlp="gelu", bias=True, qkv_bias=True),
        # GPTNeoXConfig's values for keys a config.json may omit
        defaults=dict(max_position_embeddings=2048, rotary_pct=0.25, rotary_emb_base=10000.0,
                      use_parallel_residual=True, layer_norm_eps=1e-5, tie_word_embeddings=False,
                      initializer_range=0.02),
        # settings rafale implements one value of
        fixed=dict(hidden_act="gelu", attention_bias=True, rope_scaling=None),
    ),
}

# Buffers some checkpoints carry that are not weights (older transformers saved them): skipped on import.
NON_WEIGHTS = re.compile(r"(rotary_emb\.inv_freq|attention\.bias|attention\.masked_bias)$")


class GPTNeoX(DecoderFamily):
    name = "gpt_neox"
    presets = PRESETS
    architectures = ARCHITECTURES
    names = NAMES

    def owns(self, cfg) -> bool:
        return isinstance(cfg, DecoderConfig) and cfg.norm == "layernorm"

    def export_type(self, cfg: DecoderConfig) -> str:
        want = dict(ARCHITECTURES["gpt_neox"]["switches"], n_kv_heads=cfg.n_heads, rope_scaling=None)
        self.check_switches(cfg, "gpt_neox", want)
        return "gpt_neox"

    def ignored(self, cfg, task: str, hf_key: str) -> bool:
        return bool(NON_WEIGHTS.search(hf_key))


FAMILY = GPTNeoX()
