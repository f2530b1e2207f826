"""Models: presets (named shapes), the decoder, its Composer wrapper, HF weight-name maps; the BERT /
RoBERTa encoder (encoder.py), its presets, Composer wrappers (encoder_heads.py) and HF maps (hf_encoders.py)."""
