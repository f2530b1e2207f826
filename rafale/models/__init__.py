"""Models: presets (named shapes), the decoder, its Composer wrapper, HF weight-name maps."""
