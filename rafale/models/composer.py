"""`CausalLM`: the Composer wrapper around `Decoder` (next-token loss, eval metrics, FSDP and activation
checkpointing hooks, a FLOP count for MFU), and `build_model`, which makes one from a preset name or
an HF checkpoint (`init_from`, see models/hf.py)."""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import ComposerModel
from torchmetrics import Metric

from rafale.errors import UserError
from rafale.models.decoder import Block, Decoder, DecoderConfig
from rafale.models.hf import load_weights, model_config

IGNORE_INDEX = -100


def next_token_targets(batch: dict) -> torch.Tensor:
    """(B, T) targets: labels (default: input_ids) shifted left by one, the last position ignored.

    Shifting the labels rather than slicing the logits keeps the (B, T, V) logits contiguous, as
    transformers' ForCausalLMLoss does."""
    labels = batch.get("labels", batch["input_ids"])
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


class TrainOutput(NamedTuple):
    """What `CausalLM.forward` returns in training mode: the batch's loss, computed with the head
    fused into the cross-entropy (models/losses.py), in place of the (B, T, V) logits, which with
    their gradient would be the largest tensors of the step. `shape` is those logits' shape."""
    loss: torch.Tensor
    shape: torch.Size


class EvalOutput(NamedTuple):
    """What `CausalLM.eval_forward` returns: the batch's summed next-token loss and its number of
    target tokens, computed like the training loss (never the whole logits). They are exactly what
    LanguageCrossEntropy and LanguagePerplexity accumulate."""
    sum_loss: torch.Tensor
    n_tokens: torch.Tensor


class _FromSums:
    """Makes Composer's LanguageCrossEntropy / LanguagePerplexity, whose state is (sum_loss,
    total_items), take an EvalOutput in update() rather than the (B, T, V) logits."""

    def update(self, output: EvalOutput, target: torch.Tensor | None = None) -> None:
        self.sum_loss += output.sum_loss
        self.total_items += output.n_tokens


class CrossEntropyMetric(_FromSums, LanguageCrossEntropy):
    pass


class PerplexityMetric(_FromSums, LanguagePerplexity):
    pass


class CausalLM(ComposerModel):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.model = Decoder(cfg)  # the only child: Composer's FSDP wraps it, and its blocks via fsdp_wrap_fn

    def forward(self, batch: dict) -> TrainOutput | torch.Tensor:
        """Training mode: a TrainOutput holding the loss; eval mode: the logits (B, T, V)."""
        if not self.training:
            return self.model(batch["input_ids"])
        ids = batch["input_ids"]
        return TrainOutput(self.model(ids, targets=next_token_targets(batch)),
                           torch.Size((*ids.shape, self.model.cfg.vocab_size)))

    def loss(self, outputs: TrainOutput | torch.Tensor, batch: dict) -> torch.Tensor:
        """Mean cross-entropy over the non-ignored next tokens, in fp32 (same value as HF's loss).
        From a TrainOutput, the loss forward computed on this batch; from logits, computed here."""
        if isinstance(outputs, TrainOutput):
            return outputs.loss
        targets = next_token_targets(batch)
        return F.cross_entropy(outputs.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)

    def eval_forward(self, batch: dict, outputs: TrainOutput | None = None) -> EvalOutput:
        targets = next_token_targets(batch)
        n = (targets != IGNORE_INDEX).sum()
        mean = self.model(batch["input_ids"], targets=targets)
        return EvalOutput(torch.where(n > 0, mean * n, 0.0), n)

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        if is_train:
            # The training loss is this cross-entropy already; a train metric would be a second pass
            # over the (B, T, V) logits every batch for the same number.
            return {}
        return {"LanguageCrossEntropy": CrossEntropyMetric(ignore_index=IGNORE_INDEX),
                "LanguagePerplexity": PerplexityMetric(ignore_index=IGNORE_INDEX)}

    def update_metric(self, batch: dict, outputs: EvalOutput, metric: Metric) -> None:
        metric.update(outputs)

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


def build_model(preset: str | None, vocab_size: int | None = None, overrides: dict | None = None,
                init_from: str | None = None) -> CausalLM:
    """A model of the preset's shape with `overrides` applied, randomly initialized; or, with `init_from`,
    holding that checkpoint's weights: an HF model directory (its config.json gives the shape and the
    preset is ignored) or a .safetensors file of the preset's shape. `vocab_size` is the tokenizer's:
    the model's (often padded, e.g. 50304) embedding must have a row for every token id."""
    cfg = model_config(preset, overrides, init_from)
    if vocab_size is not None and vocab_size > cfg.vocab_size:
        raise UserError(f"the tokenizer has {vocab_size} tokens but model {init_from or preset!r} embeds only "
                        f"{cfg.vocab_size}; use a tokenizer with at most {cfg.vocab_size} tokens")
    model = CausalLM(cfg)
    if init_from is not None:
        load_weights(model.model, init_from)
    return model
