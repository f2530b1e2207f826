"""Named model shapes, as plain data: `PRESETS[name]` holds the `DecoderConfig` fields of that model.

The pythia-* entries are the exact shapes of EleutherAI's Pythia checkpoints on the HF hub (their
config.json: vocab 50304, 2048 positions, rotary_pct 0.25, rotary base 10000, parallel residual,
untied head, d_ff = 4 * d_model). pythia-tiny and pythia-micro are CPU-sized models in the same style.
"""

import difflib

from rafale.errors import UserError
from rafale.models.decoder import DecoderConfig

_PYTHIA = dict(vocab_size=50304, max_seq_len=2048, rotary_pct=0.25, rope_theta=10000.0,
               parallel_residual=True, norm_eps=1e-5, tie_embeddings=False)

PRESETS: dict[str, dict] = {
    "pythia-14m": dict(_PYTHIA, d_model=128, n_layers=6, n_heads=4),
    "pythia-70m": dict(_PYTHIA, d_model=512, n_layers=6, n_heads=8),
    "pythia-160m": dict(_PYTHIA, d_model=768, n_layers=12, n_heads=12),
    "pythia-410m": dict(_PYTHIA, d_model=1024, n_layers=24, n_heads=16),
    "pythia-1b": dict(_PYTHIA, d_model=2048, n_layers=16, n_heads=8),
    "pythia-1.4b": dict(_PYTHIA, d_model=2048, n_layers=24, n_heads=16),
    # CPU sizes: trains on Tiny Shakespeare in minutes (tiny) / runs the test suite (micro).
    "pythia-tiny": dict(_PYTHIA, d_model=128, n_layers=4, n_heads=4, max_seq_len=512),
    "pythia-micro": dict(_PYTHIA, d_model=64, n_layers=2, n_heads=4, max_seq_len=256),
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
    return DecoderConfig(**{**PRESETS[name], **(overrides or {})})
