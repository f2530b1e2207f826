"""Named model shapes, as plain data: `PRESETS[name]` holds the `DecoderConfig` fields of that model.

Three kinds of entries:
- pythia-*: the exact shapes of EleutherAI's Pythia checkpoints (their config.json: vocab 50304, 2048
  positions, rotary_pct 0.25, rotary base 10000, parallel residual, untied head, d_ff = 4 * d_model).
- llama-3.2-1b, qwen2.5-0.5b, smollm2-135m, tinyllama-1.1b: the exact shapes of those HF checkpoints
  (from their config.json), so a `.safetensors` file of one loads with `model.init_from`.
- gpt-*: rafale's own Llama-style models to train from scratch (RMSNorm, SwiGLU, full rotary, GQA,
  tied embeddings, no biases); vocab 50304 holds either bundled tokenizer (gpt-neox-20b, smollm2).
*-tiny and *-micro are CPU sizes: a bundled config trains in minutes (tiny) / the test suite (micro).
"""

import copy
import difflib

from rafale.errors import UserError
from rafale.models.decoder import DecoderConfig

_PYTHIA = dict(vocab_size=50304, max_seq_len=2048, rotary_pct=0.25, rope_theta=10000.0,
               parallel_residual=True, norm_eps=1e-5, tie_embeddings=False)

# The Llama family's switches; Qwen2 adds q/k/v biases on top.
_LLAMA = dict(norm="rmsnorm", mlp="swiglu", bias=False, rotary_pct=1.0, parallel_residual=False)

# d_ff is left to DecoderConfig (8/3 d_model rounded up to 64), so a d_model override keeps it in step.
_GPT = dict(_LLAMA, vocab_size=50304, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True)

PRESETS: dict[str, dict] = {
    "pythia-14m": dict(_PYTHIA, d_model=128, n_layers=6, n_heads=4),
    "pythia-70m": dict(_PYTHIA, d_model=512, n_layers=6, n_heads=8),
    "pythia-160m": dict(_PYTHIA, d_model=768, n_layers=12, n_heads=12),
    "pythia-410m": dict(_PYTHIA, d_model=1024, n_layers=24, n_heads=16),
    "pythia-1b": dict(_PYTHIA, d_model=2048, n_layers=16, n_heads=8),
    "pythia-1.4b": dict(_PYTHIA, d_model=2048, n_layers=24, n_heads=16),
    "pythia-tiny": dict(_PYTHIA, d_model=128, n_layers=4, n_heads=4, max_seq_len=512),
    "pythia-micro": dict(_PYTHIA, d_model=64, n_layers=2, n_heads=4, max_seq_len=256),

    "gpt-micro": dict(_GPT, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256),
    "gpt-tiny": dict(_GPT, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=512),
    "gpt-125m": dict(_GPT, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, max_seq_len=2048),
    "gpt-350m": dict(_GPT, d_model=1024, n_layers=24, n_heads=16, n_kv_heads=4, max_seq_len=2048),
    "gpt-1b": dict(_GPT, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, max_seq_len=2048),

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


def get_preset(name: str, overrides: dict | None = None) -> DecoderConfig:
    """The preset's config with `overrides` (DecoderConfig field -> value) applied on top; derived
    fields (d_ff when not given, head_dim, rotary_dim) follow the overridden sizes."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(f"model.preset: unknown preset {name!r}; {hint}valid presets: {', '.join(PRESETS)}")
    fields = DecoderConfig.__dataclass_fields__
    settable = [k for k, f in fields.items() if f.init]
    for key in overrides or {}:
        if key not in settable:
            raise UserError(f"model.{key}: not a model setting; valid ones: {', '.join(settable)}")
    # A deep copy: rope_scaling is a dict that must not be shared with (and mutated through) a config.
    return DecoderConfig(**copy.deepcopy({**PRESETS[name], **(overrides or {})}))
