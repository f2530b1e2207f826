"""Composer wrappers around the encoders (models/encoder.py): `MaskedLM` (loss on the masked tokens,
masked accuracy and cross-entropy) and `Classifier` (cross-entropy, accuracy and macro F1), with the
FSDP and activation-checkpointing hooks; and `build_encoder_model`, which makes one from a preset or
an HF checkpoint (`init_from`, see models/hf_encoders.py).

Batches come from data/collators.py: input_ids (B, T), labels (MLM: (B, T), -100 where nothing is
predicted; classification: (B,)), and attention_mask / token_type_ids when the data has padding / pairs.
"""

import sys

import torch
import torch.nn.functional as F
from composer.metrics.nlp import LanguageCrossEntropy, MaskedAccuracy
from composer.models import ComposerModel
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from rafale.errors import UserError
from rafale.models.encoder import Block, EncoderConfig, EncoderForClassification, EncoderForMaskedLM
from rafale.models.hf_encoders import encoder_config, load_encoder_weights

IGNORE_INDEX = -100


class _EncoderModel(ComposerModel):
    model: EncoderForMaskedLM | EncoderForClassification  # the only child (FSDP wraps it and its blocks)

    def _inputs(self, batch: dict) -> tuple:
        return batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids")

    def eval_forward(self, batch: dict, outputs: torch.Tensor | None = None) -> torch.Tensor:
        return outputs if outputs is not None else self.forward(batch)

    def fsdp_wrap_fn(self, module: torch.nn.Module) -> bool:
        # FSDP1 asks the ComposerModel; FSDP2 asks its child (the network's fsdp_wrap_fn). Same answer.
        return isinstance(module, Block)

    def activation_checkpointing_fn(self, module: torch.nn.Module) -> bool:
        return isinstance(module, Block)

    def flops_per_batch(self, batch: dict) -> float:
        """Training FLOPs, counted as for the decoder: 6 per weight per token it multiplies (embedding
        lookups excluded) plus the attention matmuls. The MLM output matrix multiplies the predicted
        tokens only."""
        B, T = batch["input_ids"].shape
        cfg = self.model.cfg
        enc = self.model.encoder
        embeds = sum(m.weight.numel() for m in (enc.embed_tokens, enc.embed_positions, enc.embed_types))
        body = sum(p.numel() for p in self.model.parameters()) - embeds
        flops = 6 * body * B * T + 3 * cfg.n_layers * 2 * 2 * cfg.d_model * T * T * B
        if isinstance(self.model, EncoderForMaskedLM):
            flops += 6 * enc.embed_tokens.weight.numel() * int((batch["labels"] != IGNORE_INDEX).sum())
        return float(flops)


class MaskedLM(_EncoderModel):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.model = EncoderForMaskedLM(cfg)

    def forward(self, batch: dict) -> torch.Tensor:
        """Logits (N, V) at the N positions with a label (the masked ones)."""
        return self.model(*self._inputs(batch), predict=batch["labels"] != IGNORE_INDEX)

    def targets(self, batch: dict) -> torch.Tensor:
        labels = batch["labels"]
        return labels[labels != IGNORE_INDEX]  # (N,), in the order of forward's logits

    def loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        if outputs.shape[0] == 0:  # nothing masked in this batch: no signal, but keep the graph
            return outputs.sum() * 0.0
        return F.cross_entropy(outputs.float(), self.targets(batch))

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        # No train metrics: Composer would run a second forward pass per batch to compute them.
        if is_train:
            return {}
        return {"MaskedAccuracy": MaskedAccuracy(ignore_index=IGNORE_INDEX),
                "LanguageCrossEntropy": LanguageCrossEntropy(ignore_index=IGNORE_INDEX)}

    def update_metric(self, batch: dict, outputs: torch.Tensor, metric: Metric) -> None:
        metric.update(outputs, self.targets(batch))


class Classifier(_EncoderModel):
    def __init__(self, cfg: EncoderConfig, labels: list[str]):
        super().__init__()
        self.labels = list(labels)
        self.model = EncoderForClassification(cfg, len(labels))

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(*self._inputs(batch))  # (B, num_labels)

    def loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        return F.cross_entropy(outputs.float(), batch["labels"])

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        if is_train:
            return {}
        k = len(self.labels)
        # Accuracy over all examples; F1 averaged over classes with equal weight (macro).
        return {"MulticlassAccuracy": MulticlassAccuracy(num_classes=k, average="micro"),
                "MulticlassF1Score": MulticlassF1Score(num_classes=k, average="macro")}

    def update_metric(self, batch: dict, outputs: torch.Tensor, metric: Metric) -> None:
        metric.update(outputs, batch["labels"])


def build_encoder_model(task: str, preset: str | None, vocab_size: int, pad_id: int,
                        labels: list[str] | None = None, overrides: dict | None = None,
                        init_from: str | None = None) -> MaskedLM | Classifier:
    """A masked LM or a classifier over `labels` of the preset's shape (with `overrides`), randomly
    initialized; or with `init_from` holding that checkpoint's weights, an HF directory (its config.json
    gives the shape) or a .safetensors file of the preset's shape. The tokenizer's `vocab_size` and
    `pad_id` must fit the model."""
    cfg = encoder_config(preset, overrides or {}, init_from)
    where = repr(init_from or preset)
    if vocab_size > cfg.vocab_size:
        raise UserError(f"the tokenizer has {vocab_size} tokens but model {where} embeds only {cfg.vocab_size}; "
                        f"use its own tokenizer (bert-* presets: bert-base-uncased, roberta-*: roberta-base)")
    if pad_id != cfg.pad_token_id:
        raise UserError(f"the tokenizer pads with id {pad_id} but model {where} expects pad_token_id "
                        f"{cfg.pad_token_id}; use its own tokenizer (bert-* presets: bert-base-uncased, "
                        f"roberta-*: roberta-base)")
    model = MaskedLM(cfg) if task == "mlm" else Classifier(cfg, labels)
    if init_from is not None:
        fresh = load_encoder_weights(model.model, init_from)
        if fresh and next(model.parameters()).device.type != "meta":
            print(f"model.init_from: {', '.join(fresh)} not in the checkpoint, initialized fresh", file=sys.stderr)
    return model
