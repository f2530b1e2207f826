"""Named encoder shapes, as plain data: `ENCODER_PRESETS[name]` holds the `EncoderConfig` fields.

- bert-tiny / mini / small / medium: Google's compact BERTs (Turc et al. 2019, google/bert_uncased_L-*_H-*),
  bert-base / bert-large: bert-base-uncased / bert-large-uncased; all with the bert-base-uncased
  vocabulary (30,522 WordPiece tokens, the bundled `bert-base-uncased` tokenizer), 512 positions.
- roberta-base / roberta-large: FacebookAI's, byte-level BPE vocabulary of 50,265 (the bundled
  `roberta-base` tokenizer), 514 position rows = 512 tokens after the pad offset.
- bert-micro and roberta-micro are CPU sizes for tests and quick checks; roberta-tiny is RoBERTa in
  bert-tiny's shape. Both -tiny sizes train in minutes on a CPU.
The exact HF shapes mean a checkpoint of one loads with `model.init_from`.
"""

import copy
import difflib

from rafale.errors import UserError
from rafale.models.encoder import EncoderConfig

_BERT = dict(family="bert", vocab_size=30522, max_seq_len=512, type_vocab_size=2, pad_token_id=0,
             norm_eps=1e-12)
_ROBERTA = dict(family="roberta", vocab_size=50265, max_seq_len=512, type_vocab_size=1, pad_token_id=1,
                norm_eps=1e-5)

ENCODER_PRESETS: dict[str, dict] = {
    "bert-micro": dict(_BERT, d_model=64, n_layers=2, n_heads=2, max_seq_len=128),
    "bert-tiny": dict(_BERT, d_model=128, n_layers=2, n_heads=2),
    "bert-mini": dict(_BERT, d_model=256, n_layers=4, n_heads=4),
    "bert-small": dict(_BERT, d_model=512, n_layers=4, n_heads=8),
    "bert-medium": dict(_BERT, d_model=512, n_layers=8, n_heads=8),
    "bert-base": dict(_BERT, d_model=768, n_layers=12, n_heads=12),
    "bert-large": dict(_BERT, d_model=1024, n_layers=24, n_heads=16),
    "roberta-micro": dict(_ROBERTA, d_model=64, n_layers=2, n_heads=2, max_seq_len=128),
    "roberta-tiny": dict(_ROBERTA, d_model=128, n_layers=2, n_heads=2),
    "roberta-base": dict(_ROBERTA, d_model=768, n_layers=12, n_heads=12),
    "roberta-large": dict(_ROBERTA, d_model=1024, n_layers=24, n_heads=16),
}


def get_encoder_preset(name: str, overrides: dict | None = None) -> EncoderConfig:
    """The preset's config with `overrides` (EncoderConfig field -> value) applied; d_ff follows d_model
    unless given."""
    if name not in ENCODER_PRESETS:
        close = difflib.get_close_matches(name, ENCODER_PRESETS, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(f"model.preset: {name!r} is not an encoder preset; {hint}the mlm and classification "
                        f"pipelines take one of: {', '.join(ENCODER_PRESETS)}")
    return EncoderConfig(**copy.deepcopy({**ENCODER_PRESETS[name], **(overrides or {})}))
