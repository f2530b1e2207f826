"""The causal-LM pipeline: text files -> documents -> token ids -> one EOS-joined stream -> blocks, and
the next-token objective.

    files (a file, a list, or a directory: all files in it, sorted, recursively)
      -> documents (a file is a document; `doc_separator` splits a file into several)
      -> token ids (tokenizer.json, no special tokens added) with the EOS id after every document
      -> one uint16 stream (uint32 when the vocabulary does not fit) -> (n_blocks, max_seq_len)
      -> train / val: explicit val files, or the LAST `val_fraction` of the blocks (cache.held_out)

The objective is the mean next-token cross-entropy. With rafale's Decoder the head is fused into the
loss (models/losses.py), so the (B, T, V) logits are never held whole in training or evaluation; any
other network (model.class) returns logits and the loss is computed from them.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from rafale.data import cache, tokenize
from rafale.data.pipeline import IGNORE_INDEX, DataSection, Pipeline
from rafale.errors import UserError
from rafale.schema import results


@dataclass
class CausalLMData(DataSection):
    doc_separator: Optional[str] = results(None)  # split files into documents at this string
    eos_token: Optional[str] = results(None)  # appended after each document; default: the tokenizer's own


def prepare_causal_lm(train: str | list[str], tokenizer: str, max_seq_len: int,
                      val: str | list[str] | None = None, val_fraction: float = 0.05,
                      doc_separator: str | None = None, eos_token: str | None = None,
                      key_prefix: str = "data") -> cache.PreparedData:
    """The causal-LM blocks for these sources, from the cache or built now."""
    if max_seq_len < 2:
        raise UserError(f"{key_prefix}.max_seq_len: must be at least 2 (a block holds the inputs and "
                        f"their next-token targets), got {max_seq_len}")

    def build(inputs: cache.Inputs):
        tok = inputs.tokenizer()
        eos, eos_id = tokenize.resolve_eos(tok, eos_token, inputs.tokenizer_path, key_prefix)
        vocab_size = tok.get_vocab_size(with_added_tokens=True)  # ~10 ms per call: once
        dtype = cache.token_dtype(vocab_size)
        train_key = f"{key_prefix}.train"
        stream, n_docs = tokenize.tokenize_files(inputs.paths["train"], tok, eos_id, doc_separator, dtype, train_key)
        if n_docs == 0:
            raise UserError(f"{train_key}: its {len(inputs.paths['train'])} file(s) hold no text (empty or only "
                            f"whitespace); point it at text files")
        blocks = tokenize.to_blocks(stream, max_seq_len)
        n_tokens = len(stream)
        if len(blocks) == 0:
            raise UserError(f"{train_key}: the corpus is {len(stream):,} tokens, fewer than 1 training block of "
                            f"{key_prefix}.max_seq_len={max_seq_len} tokens; add text, lower {key_prefix}.max_seq_len")
        if inputs.paths["val"]:
            val_key = f"{key_prefix}.val"
            val_stream, n_val_docs = tokenize.tokenize_files(inputs.paths["val"], tok, eos_id, doc_separator,
                                                             dtype, val_key)
            val_blocks = tokenize.to_blocks(val_stream, max_seq_len)
            if len(val_blocks) == 0:
                raise UserError(f"{val_key}: the validation text is {len(val_stream):,} tokens, less than one "
                                f"block of {key_prefix}.max_seq_len={max_seq_len}; add text or lower "
                                f"{key_prefix}.max_seq_len")
            train_blocks = blocks
            n_docs += n_val_docs
            n_tokens += len(val_stream)
        else:
            n_val = cache.held_out(len(blocks), val_fraction, "block", key_prefix,
                                   f"add text, lower {key_prefix}.max_seq_len")
            train_blocks, val_blocks = blocks[:len(blocks) - n_val], blocks[len(blocks) - n_val:]
        stats = {"documents": n_docs, "tokens": n_tokens, "train_blocks": len(train_blocks),
                 "val_blocks": len(val_blocks)}
        meta = {"tokenizer": {"eos_token": eos, "eos_id": eos_id}, "vocab_size": vocab_size,
                "dtype": np.dtype(dtype).name, "stats": stats}
        return {"train": train_blocks, "val": val_blocks}, meta

    path, arrays, meta, hit = cache.prepare_entry(
        CausalLM.name, train, val, tokenizer, max_seq_len, val_fraction,
        {"doc_separator": doc_separator, "eos_token": eos_token}, build, key_prefix)
    val_blocks = arrays["val"]
    return cache.PreparedData(path=path, train=arrays["train"], val=val_blocks if len(val_blocks) else None,
                              meta=meta, hit=hit)


def next_token_targets(batch: dict):
    """(B, T) targets: labels (default: input_ids) shifted left by one, the last position ignored.

    Shifting the labels rather than slicing the logits keeps the (B, T, V) logits contiguous, as
    transformers' ForCausalLMLoss does."""
    import torch.nn.functional as F

    labels = batch.get("labels", batch["input_ids"])
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


class TrainOutput(NamedTuple):
    """What the causal objective's forward returns in training: the batch's loss, computed with the head
    fused into the cross-entropy, in place of the (B, T, V) logits, which with their gradient would be
    the largest tensors of the step. `shape` is those logits' shape."""
    loss: object
    shape: tuple


class EvalOutput(NamedTuple):
    """What eval_forward returns: the batch's summed next-token loss and its number of target tokens,
    computed like the training loss (never the whole logits): exactly what LanguageCrossEntropy and
    LanguagePerplexity accumulate (rafale/metrics.py)."""
    sum_loss: object
    n_tokens: object


@functools.cache
def _fuses_loss(forward) -> bool:
    """Whether a network's forward takes `targets` and returns the loss itself (rafale's Decoder)."""
    return "targets" in inspect.signature(forward).parameters


def mean_next_token_loss(network, batch: dict):
    """The mean cross-entropy over the non-ignored next tokens, in fp32 (HF's loss value)."""
    import torch.nn.functional as F

    targets = next_token_targets(batch)
    if _fuses_loss(type(network).forward):
        return network(batch["input_ids"], targets=targets)
    logits = network(batch["input_ids"])
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


class CausalLM(Pipeline):
    name = "causal_lm"
    Section = CausalLMData
    task = "causal_lm"
    generates = True

    def prepare(self) -> cache.PreparedData:
        d = self.data
        return prepare_causal_lm(d.train, d.tokenizer, d.max_seq_len, val=d.val, val_fraction=d.val_fraction,
                                 doc_separator=d.doc_separator, eos_token=d.eos_token)

    def model_meta(self) -> dict:
        """The tokenizer's size and end-of-document token, read from the tokenizer alone: generating from
        or exporting a run needs no data."""
        from rafale.paths import resolve_tokenizer

        tok_path = resolve_tokenizer(self.data.tokenizer)
        tok = tokenize.load_tokenizer(Path(tok_path).read_bytes(), f"data.tokenizer {tok_path}")
        eos, eos_id = tokenize.resolve_eos(tok, self.data.eos_token, tok_path, "data")
        return {"vocab_size": tok.get_vocab_size(with_added_tokens=True),
                "tokenizer": {"path": str(tok_path), "eos_token": eos, "eos_id": eos_id}}

    def forward(self, network, batch: dict, training: bool):
        """Training: a TrainOutput holding the loss; otherwise the logits (B, T, V)."""
        if not training:
            return network(batch["input_ids"])
        vocab = getattr(getattr(network, "cfg", None), "vocab_size", -1)
        return TrainOutput(mean_next_token_loss(network, batch), (*batch["input_ids"].shape, vocab))

    def loss(self, outputs, batch: dict):
        if isinstance(outputs, TrainOutput):
            return outputs.loss
        import torch.nn.functional as F

        targets = next_token_targets(batch)
        return F.cross_entropy(outputs.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)

    def eval_forward(self, network, batch: dict, outputs=None) -> EvalOutput:
        import torch

        n = (next_token_targets(batch) != IGNORE_INDEX).sum()
        mean = mean_next_token_loss(network, batch)
        return EvalOutput(torch.where(n > 0, mean * n, 0.0), n)

    def metrics(self, meta: dict) -> dict:
        from rafale.metrics import CrossEntropyFromSums, PerplexityFromSums

        return {"LanguageCrossEntropy": CrossEntropyFromSums(ignore_index=IGNORE_INDEX),
                "LanguagePerplexity": PerplexityFromSums(ignore_index=IGNORE_INDEX)}

    def update_metric(self, batch: dict, outputs: EvalOutput, metric) -> None:
        metric.update(outputs)

    def flops(self, network, batch: dict) -> float:
        """As llm-foundry counts them: 6 per parameter per token (forward 2, backward 4) plus the attention
        score/value matmuls. The input embedding is a lookup, not a matmul, so it is left out (unless
        tied, when it is the head's weight too)."""
        cfg = getattr(network, "cfg", None)
        if cfg is None or not hasattr(network, "embed_in"):
            return super().flops(network, batch)
        B, T = batch["input_ids"].shape[:2]
        params = sum(p.numel() for p in network.parameters())
        if not cfg.tie_embeddings:
            params -= network.embed_in.weight.numel()
        attn_flops_per_seq = cfg.n_layers * 2 * 2 * cfg.d_model * T * T
        return float(B * (6 * params * T + 3 * attn_flops_per_seq))

    def export_tokens(self, meta: dict, tokenizer, tokenizer_path) -> dict:
        # rafale's causal pipeline puts the eos token between documents and adds no bos, so the separator
        # is both, as in GPT-NeoX's and SmolLM2's own tokenizer configs.
        eos, eos_id = meta["tokenizer"]["eos_token"], meta["tokenizer"]["eos_id"]
        return {"config": {"bos_token_id": eos_id, "eos_token_id": eos_id},
                "tokenizer_config": {"bos_token": eos, "eos_token": eos}}
