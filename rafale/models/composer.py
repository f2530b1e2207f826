"""`CausalLM`: the Composer wrapper around `Decoder` (next-token loss, eval metrics, FSDP and activation
checkpointing hooks, a FLOP count for MFU), and `build_model`, which makes one from a preset name."""

import torch
import torch.nn.functional as F
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import ComposerModel
from torchmetrics import Metric

from rafale.errors import UserError
from rafale.models.decoder import Block, Decoder, DecoderConfig
from rafale.models.presets import get_preset

IGNORE_INDEX = -100


def next_token_targets(batch: dict) -> torch.Tensor:
    """(B, T) targets: labels (default: input_ids) shifted left by one, the last position ignored.

    Shifting the labels rather than slicing the logits keeps the (B, T, V) logits contiguous, as
    transformers' ForCausalLMLoss does."""
    labels = batch.get("labels", batch["input_ids"])
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


class CausalLM(ComposerModel):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.model = Decoder(cfg)  # the only child: Composer's FSDP wraps it, and its blocks via fsdp_wrap_fn

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(batch["input_ids"])  # (B, T, V)

    def loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        """Mean cross-entropy over the non-ignored next tokens, in fp32 (same value as HF's loss)."""
        targets = next_token_targets(batch)
        return F.cross_entropy(outputs.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)

    def eval_forward(self, batch: dict, outputs: torch.Tensor | None = None) -> torch.Tensor:
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        if is_train:
            # The training loss is this cross-entropy already; a train metric would be a second pass
            # over the (B, T, V) logits every batch for the same number.
            return {}
        return {"LanguageCrossEntropy": LanguageCrossEntropy(ignore_index=IGNORE_INDEX),
                "LanguagePerplexity": LanguagePerplexity(ignore_index=IGNORE_INDEX)}

    def update_metric(self, batch: dict, outputs: torch.Tensor, metric: Metric) -> None:
        # Both metrics take logits (B, T, V) and targets (B, T), flattening them to (B*T, V) / (B*T,).
        metric.update(outputs, next_token_targets(batch))

    def fsdp_wrap_fn(self, module: torch.nn.Module) -> bool:
        # FSDP1 asks the ComposerModel; FSDP2 asks its child (Decoder.fsdp_wrap_fn). Same answer.
        return isinstance(module, Block)

    def activation_checkpointing_fn(self, module: torch.nn.Module) -> bool:
        return isinstance(module, Block)

    def flops_per_batch(self, batch: dict) -> float:
        """Training FLOPs of one batch, as llm-foundry counts them: 6 per parameter per token (forward
        2, backward 4) plus the attention score/value matmuls. The input embedding is a lookup, not a
        matmul, so it is left out (unless tied, when it is the head's weight too)."""
        B, T = batch["input_ids"].shape[:2]
        cfg = self.model.cfg
        params = sum(p.numel() for p in self.model.parameters())
        if not cfg.tie_embeddings:
            params -= self.model.embed_in.weight.numel()
        attn_flops_per_seq = cfg.n_layers * 2 * 2 * cfg.d_model * T * T
        return float(B * (6 * params * T + 3 * attn_flops_per_seq))


def build_model(preset: str, vocab_size: int | None = None, overrides: dict | None = None) -> CausalLM:
    """A randomly initialized model of the preset's shape with `overrides` applied. `vocab_size` is the
    tokenizer's: the model's (often padded, e.g. 50304) embedding must have a row for every token id."""
    cfg = get_preset(preset, overrides)
    if vocab_size is not None and vocab_size > cfg.vocab_size:
        raise UserError(f"the tokenizer has {vocab_size} tokens but model {preset!r} embeds only "
                        f"{cfg.vocab_size}; use a tokenizer with at most {cfg.vocab_size} tokens")
    return CausalLM(cfg)
