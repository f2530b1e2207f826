"""The causal-LM pipeline: text files -> documents -> token ids -> one EOS-joined stream -> blocks, and
the next-token objective.

    files (a file, a list, or a directory: all files in it, sorted, recursively)
      -> documents (a file is a document; `doc_separator` splits a file into several)
      -> token ids (tokenizer.json, no special tokens added) with the EOS id after every document
      -> one uint16 stream (uint32 when the vocabulary does not fit) -> (n_blocks, max_seq_len)
      -> train / val: explicit val files, or the LAST `val_fraction` of the blocks (cache.held_out)

`packing` decides what a block's tokens see. `concat` (the default): the block is one sequence, a
document attends to the ones before it in the block. `document`: positions restart at every document and
attention stays inside it (models/attention.py); the entry then also stores, per split, where each
document starts (`<split>_doc_starts`: offsets block * max_seq_len + position of the token after each
EOS), and the target that would predict the next document's first token from the end of the previous
one carries no loss, so a block's loss is exactly that of its documents run one by one.

The objective is the mean next-token cross-entropy. With rafale's Decoder the head is fused into the
loss (models/losses.py), so the (B, T, V) logits are never held whole in training or evaluation; any
other network (model.class) returns logits and the loss is computed from them.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, NamedTuple, Optional

import numpy as np

from rafale.data import cache, mixture, tokenize
from rafale.data.pipeline import IGNORE_INDEX, DataSection, Pipeline
from rafale.errors import UserError
from rafale.schema import bookkeeping, results


@dataclass
class StreamingSection:
    """data.streaming: read the blocks from MDS shards through mosaicml-streaming (data/streaming.py).
    Where they are read from changes nothing trained, so neither key is in the run hash; that they are
    streamed is (Streaming shuffles in its own order)."""
    remote: Optional[str] = bookkeeping(None)  # what `rafale prepare --to-mds DIR` wrote: DIR, or a copy in s3://...
    local: Optional[str] = bookkeeping(None)  # Streaming's local cache; default $RAFALE_HOME/streaming/<remote hash>


@dataclass
class CausalLMData(DataSection):
    mixes: ClassVar[bool] = True  # data.train may be a mixture (data/mixture.py)
    doc_separator: Optional[str] = results(None)  # split files into documents at this string
    text_field: str = results("text", added=True)  # the column holding the text in row formats (.jsonl, .parquet, ...)
    eos_token: Optional[str] = results(None)  # appended after each document; default: the tokenizer's own
    # concat: a block is one sequence; document: positions and attention restart at every document
    packing: Literal["concat", "document"] = results("concat", added=True)
    streaming: Optional[StreamingSection] = results(None, added=True)  # train from MDS shards, not the cache

    def problems(self) -> list[str]:
        problems = super().problems()
        if self.streaming is not None and not self.streaming.remote:
            problems.append("data.streaming.remote: missing; name the directory `rafale prepare -c CONFIG --to-mds "
                            "DIR` wrote (or its copy in object storage)")
        return problems


class PackedBlocks:
    """A split's (n_blocks, T) token ids with where its documents start (`starts`: sorted offsets
    block * T + position into the blocks of `rows`, the whole array when None). Indexes like the array:
    an int gives (ids, documents) of one block, documents (T,) being each token's document index in the
    block (0 first); an array of ints gives the PackedBlocks of those rows."""

    def __init__(self, blocks: np.ndarray, starts: np.ndarray, rows: np.ndarray | None = None):
        self.blocks, self.starts, self.rows = blocks, starts, rows

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.blocks)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.blocks.shape[1]

    def __getitem__(self, i):
        if not np.isscalar(i):
            rows = np.arange(len(self.blocks))[self.rows if self.rows is not None else slice(None)]
            return PackedBlocks(self.blocks, self.starts, rows[np.asarray(i)])
        block = int(self.rows[i]) if self.rows is not None else int(i)
        T = self.blocks.shape[1]
        lo, hi = np.searchsorted(self.starts, [block * T + 1, (block + 1) * T])  # position 0 starts one anyway
        documents = np.zeros(T, dtype=np.int64)
        documents[self.starts[lo:hi] - block * T] = 1
        return self.blocks[block], np.cumsum(documents)


def document_starts(stream: np.ndarray, eos_id: int, n_tokens: int) -> np.ndarray:
    """Offsets of the first token of every document in stream[:n_tokens]: the tokens after each EOS."""
    starts = np.flatnonzero(stream[:n_tokens] == eos_id) + 1
    return starts[starts < n_tokens]


def prepare_causal_lm(train: str | list[str], tokenizer: str, max_seq_len: int,
                      val: str | list[str] | None = None, val_fraction: float = 0.05,
                      doc_separator: str | None = None, eos_token: str | None = None,
                      key_prefix: str = "data", text_field: str = "text",
                      packing: str = "concat") -> cache.PreparedData:
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
        stream, n_docs = tokenize.tokenize_files(inputs.paths["train"], tok, eos_id, doc_separator, dtype, train_key,
                                                 text_field)
        if n_docs == 0:
            raise UserError(f"{train_key}: its {len(inputs.paths['train'])} file(s) hold no text (empty or only "
                            f"whitespace); point it at text files")
        blocks = tokenize.to_blocks(stream, max_seq_len)
        n_tokens = len(stream)
        if len(blocks) == 0:
            raise UserError(f"{train_key}: the corpus is {len(stream):,} tokens, fewer than 1 training block of "
                            f"{key_prefix}.max_seq_len={max_seq_len} tokens; add text, lower {key_prefix}.max_seq_len")
        train_starts = document_starts(stream, eos_id, blocks.size)
        if inputs.paths["val"]:
            val_key = f"{key_prefix}.val"
            val_stream, n_val_docs = tokenize.tokenize_files(inputs.paths["val"], tok, eos_id, doc_separator,
                                                             dtype, val_key, text_field)
            val_blocks = tokenize.to_blocks(val_stream, max_seq_len)
            if len(val_blocks) == 0:
                raise UserError(f"{val_key}: the validation text is {len(val_stream):,} tokens, less than one "
                                f"block of {key_prefix}.max_seq_len={max_seq_len}; add text or lower "
                                f"{key_prefix}.max_seq_len")
            train_blocks = blocks
            val_starts = document_starts(val_stream, eos_id, val_blocks.size)
            n_docs += n_val_docs
            n_tokens += len(val_stream)
        else:
            n_val = cache.held_out(len(blocks), val_fraction, "block", key_prefix,
                                   f"add text, lower {key_prefix}.max_seq_len")
            train_blocks, val_blocks = blocks[:len(blocks) - n_val], blocks[len(blocks) - n_val:]
            train_starts, val_starts = (train_starts[train_starts < train_blocks.size],
                                        train_starts[train_starts >= train_blocks.size] - train_blocks.size)
        stats = {"documents": n_docs, "tokens": n_tokens, "train_blocks": len(train_blocks),
                 "val_blocks": len(val_blocks)}
        meta = {"tokenizer": {"eos_token": eos, "eos_id": eos_id}, "vocab_size": vocab_size,
                "dtype": np.dtype(dtype).name, "stats": stats}
        arrays = {"train": train_blocks, "val": val_blocks}
        if packing == "document":
            arrays.update(train_doc_starts=train_starts, val_doc_starts=val_starts)
        return arrays, meta

    options = {"doc_separator": doc_separator, "eos_token": eos_token}
    if text_field != "text":  # entries made before text_field existed keep their key
        options["text_field"] = text_field
    if packing != "concat":  # concat entries keep the key they had before packing existed
        options["packing"] = packing
    path, arrays, meta, hit = cache.prepare_entry(
        CausalLM.name, train, val, tokenizer, max_seq_len, val_fraction, options, build, key_prefix)
    if packing == "document":
        arrays = {split: PackedBlocks(arrays[split], arrays[f"{split}_doc_starts"]) for split in ("train", "val")}
    val_blocks = arrays["val"]
    return cache.PreparedData(path=path, train=arrays["train"], val=val_blocks if len(val_blocks) else None,
                              meta=meta, hit=hit)


def next_token_targets(batch: dict):
    """(B, T) targets: labels (default: input_ids) shifted left by one, the last position ignored; in
    packed rows (`documents`) also the last position of every document (its target is the next one's start).

    Shifting the labels rather than slicing the logits keeps the (B, T, V) logits contiguous, as
    transformers' ForCausalLMLoss does."""
    import torch.nn.functional as F

    labels = batch.get("labels", batch["input_ids"])
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    if "documents" in batch:
        documents = batch["documents"]
        ends = F.pad(documents[:, 1:] != documents[:, :-1], (0, 1), value=False)
        targets = targets.masked_fill(ends, IGNORE_INDEX)
    return targets


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


def _packed(batch: dict) -> dict:
    """The network's keyword for packed rows (rafale's Decoder takes `documents`), if the batch has them."""
    return {"documents": batch["documents"]} if "documents" in batch else {}


def mean_next_token_loss(network, batch: dict):
    """The mean cross-entropy over the non-ignored next tokens, in fp32 (HF's loss value). A batch with
    none gives 0 (with the graph) rather than the mean's NaN: its weight in the step is 0 (see loss_tokens)."""
    import torch.nn.functional as F

    targets = next_token_targets(batch)
    if not (targets != IGNORE_INDEX).any():  # still a forward: every rank runs the same collectives
        return network(batch["input_ids"], **_packed(batch)).sum() * 0.0
    if _fuses_loss(type(network).forward):
        return network(batch["input_ids"], targets=targets, **_packed(batch))
    logits = network(batch["input_ids"], **_packed(batch))
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def decoder_flops(cfg, params: int, embedding: int, T: int) -> float:
    """`CausalLM.flops` of one T-token sequence through a decoder of `cfg` with `params` parameters, of
    which `embedding` in the input lookup."""
    if not cfg.tie_embeddings:
        params -= embedding
    attn_flops_per_seq = cfg.n_layers * 2 * 2 * cfg.d_model * T * T
    return float(6 * params * T + 3 * attn_flops_per_seq)


class CausalLM(Pipeline):
    name = "causal_lm"
    Section = CausalLMData
    task = "causal_lm"
    generates = True

    def prepare(self) -> cache.PreparedData:
        d = self.data

        def one(train, text_field, val, val_fraction):
            return prepare_causal_lm(train, d.tokenizer, d.max_seq_len, val=val, val_fraction=val_fraction,
                                     doc_separator=d.doc_separator, eos_token=d.eos_token, text_field=text_field,
                                     packing=d.packing)

        if mixture.is_mixture(d.train):
            if d.packing != "concat":  # a mixture draws plain rows; document starts are not carried across
                raise UserError("data.packing: document is not available for a mixture (data.train as a list of "
                                "{path, weight}) yet; use data.packing: concat, or one source")
            return mixture.prepare(d, one)
        return one(d.train, d.text_field, d.val, d.val_fraction)

    def model_meta(self) -> dict:
        """The tokenizer's size and end-of-document token, read from the tokenizer alone: generating from
        or exporting a run needs no data."""
        from rafale.paths import resolve_tokenizer

        tok_path = resolve_tokenizer(self.data.tokenizer)
        tok = tokenize.load_tokenizer(Path(tok_path).read_bytes(), f"data.tokenizer {tok_path}")
        eos, eos_id = tokenize.resolve_eos(tok, self.data.eos_token, tok_path, "data")
        return {"vocab_size": tok.get_vocab_size(with_added_tokens=True),
                "tokenizer": {"path": str(tok_path), "eos_token": eos, "eos_id": eos_id}}

    def dataset(self, rows):
        from rafale.data.loaders import PackedBlockDataset

        return PackedBlockDataset(rows) if isinstance(rows, PackedBlocks) else super().dataset(rows)

    def check_network(self, network) -> None:
        if self.data.packing == "document" and "documents" not in inspect.signature(type(network).forward).parameters:
            raise UserError(f"data.packing: document needs a network whose forward takes `documents` (rafale's "
                            f"decoder presets and init_from models do; {type(network).__name__} does not); "
                            f"use packing concat")

    def loss_tokens(self, batch: dict) -> int:
        return int((next_token_targets(batch) != IGNORE_INDEX).sum())

    def forward(self, network, batch: dict, training: bool):
        """Training: a TrainOutput holding the loss; otherwise the logits (B, T, V)."""
        if not training:
            return network(batch["input_ids"], **_packed(batch))
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
        return B * decoder_flops(cfg, params, network.embed_in.weight.numel(), T)

    def sequence_flops(self, cfg, counts: dict, seq: int) -> float:
        return decoder_flops(cfg, counts["total"], counts["embedding"], seq)

    def export_tokens(self, meta: dict, tokenizer, tokenizer_path) -> dict:
        # rafale's causal pipeline puts the eos token between documents and adds no bos, so the separator
        # is both, as in GPT-NeoX's and SmolLM2's own tokenizer configs.
        eos, eos_id = meta["tokenizer"]["eos_token"], meta["tokenizer"]["eos_id"]
        return {"config": {"bos_token_id": eos_id, "eos_token_id": eos_id},
                "tokenizer_config": {"bos_token": eos, "eos_token": eos}}
