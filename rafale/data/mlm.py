"""The masked-LM pipeline: text files -> documents -> token ids -> one [SEP]-joined stream -> blocks
framed by [CLS] ... [SEP] (RoBERTa: <s> ... </s>), BERT's masking in the collator, and the masked-token
objective.

    files, documents, tokenization: as the causal pipeline (tokenize.py), with the tokenizer's
      [SEP] / </s> after every document instead of an EOS
      -> the stream cut into pieces of max_seq_len - 2 tokens, each framed: (n_blocks, max_seq_len)
      -> train / val: explicit val files, or the LAST `val_fraction` of the blocks

Blocks are full (packing, as RoBERTa's FULL-SENTENCES), so there is no padding. Nothing is masked
in the cache: `MLMCollator` masks each block anew every epoch, so the masking probability is not
part of the cache key.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import ClassVar, Optional

import numpy as np

from rafale.data import cache, mixture, tokenize
from rafale.data.pipeline import IGNORE_INDEX, DataSection, Pipeline
from rafale.errors import UserError
from rafale.schema import results


@dataclass
class MLMData(DataSection):
    mixes: ClassVar[bool] = True  # data.train may be a mixture (data/mixture.py)
    doc_separator: Optional[str] = results(None)  # split files into documents at this string
    text_field: str = results("text", added=True)  # the column holding the text in row formats (.jsonl, .parquet, ...)
    mlm_probability: float = results(0.15)  # share of tokens masked per block (80% [MASK], 10% random, 10% kept)

    def problems(self) -> list[str]:
        problems = super().problems()
        if not 0.0 < self.mlm_probability < 1.0:
            problems.append(f"data.mlm_probability: must be in (0, 1), got {self.mlm_probability}")
        return problems


def special_ids(tok) -> list[int]:
    """Ids of every special token ([CLS], [SEP], [PAD], [MASK], [UNK], ...): never masked."""
    return sorted(i for i, t in tok.get_added_tokens_decoder().items() if t.special)


def frame(stream: np.ndarray, max_seq_len: int, cls_id: int, sep_id: int) -> np.ndarray:
    """(n_blocks, max_seq_len): [cls] + max_seq_len - 2 stream tokens + [sep]; a short tail is dropped."""
    body = tokenize.to_blocks(stream, max_seq_len - 2)
    blocks = np.empty((len(body), max_seq_len), dtype=stream.dtype)
    blocks[:, 0], blocks[:, 1:-1], blocks[:, -1] = cls_id, body, sep_id
    return blocks


def prepare_mlm(train: str | list[str], tokenizer: str, max_seq_len: int, val: str | list[str] | None = None,
                val_fraction: float = 0.05, doc_separator: str | None = None,
                key_prefix: str = "data", text_field: str = "text") -> cache.PreparedData:
    """The masked-LM blocks for these sources, from the cache or built now."""
    if max_seq_len < 3:
        raise UserError(f"{key_prefix}.max_seq_len: must be at least 3 (a block holds [CLS], text and [SEP]), "
                        f"got {max_seq_len}")

    def build(inputs: cache.Inputs):
        tok = inputs.tokenizer()
        special = tokenize.special_tokens(tok, f"{key_prefix}.tokenizer", inputs.tokenizer_path)
        vocab_size = tok.get_vocab_size(with_added_tokens=True)
        dtype = cache.token_dtype(vocab_size)
        cls_id, sep_id = special["cls"][1], special["sep"][1]
        splits, stats = {}, {"documents": 0, "tokens": 0}
        for split in ("train", "val"):
            if not inputs.paths[split]:
                continue
            key = f"{key_prefix}.{split}"
            stream, n_docs = tokenize.tokenize_files(inputs.paths[split], tok, sep_id, doc_separator, dtype, key,
                                                     text_field)
            if n_docs == 0:
                raise UserError(f"{key}: its {len(inputs.paths[split])} file(s) hold no text (empty or only "
                                f"whitespace); point it at text files")
            splits[split] = frame(stream, max_seq_len, cls_id, sep_id)
            stats["documents"] += n_docs
            stats["tokens"] += len(stream)
            if len(splits[split]) == 0:
                raise UserError(f"{key}: the text is {len(stream):,} tokens, less than one block of "
                                f"{key_prefix}.max_seq_len={max_seq_len} ([CLS] + {max_seq_len - 2} + [SEP]); "
                                f"add text or lower {key_prefix}.max_seq_len")
        if "val" not in splits:
            blocks = splits["train"]
            n_val = cache.held_out(len(blocks), val_fraction, "block", key_prefix,
                                   f"add text, lower {key_prefix}.max_seq_len")
            splits = {"train": blocks[:len(blocks) - n_val], "val": blocks[len(blocks) - n_val:]}
        stats.update(train_blocks=len(splits["train"]), val_blocks=len(splits["val"]))
        meta = {"special": special, "special_ids": special_ids(tok), "vocab_size": vocab_size,
                "dtype": np.dtype(dtype).name, "stats": stats}
        return splits, meta

    options = {"doc_separator": doc_separator}
    if text_field != "text":  # entries made before text_field existed keep their key
        options["text_field"] = text_field
    path, arrays, meta, hit = cache.prepare_entry(MaskedLM.name, train, val, tokenizer, max_seq_len, val_fraction,
                                                  options, build, key_prefix)
    return cache.PreparedData(path=path, train=arrays["train"], val=arrays["val"] if len(arrays["val"]) else None,
                              meta=meta, hit=hit)


class MLMCollator:
    """Masks as BERT does: each non-special token is picked with probability p (15%); a picked token is
    replaced by [MASK] 80% of the time, by a random token 10%, and left as is 10%, and only picked tokens
    have a label (IGNORE_INDEX elsewhere). The draws for a block come from a generator seeded by (run
    seed, epoch, the block's tokens): every epoch sees new masks, evaluation (an unshuffled loader:
    epoch 0 always, though Composer reseeds its sampler per evaluation) the same masks every time, a
    resumed run the masks an uninterrupted one would have drawn (whatever the batch size, number of
    workers or processes), and DEBUG=1's one repeated batch the same masks at every step."""

    def __init__(self, mask_id: int, vocab_size: int, special_ids: list[int], probability: float, seed: int):
        self.mask_id, self.vocab_size, self.probability, self.seed = mask_id, vocab_size, probability, seed
        self.special = np.zeros(max(vocab_size, max(special_ids, default=0) + 1), dtype=bool)
        self.special[special_ids] = True
        self.sampler = None  # set by `bind`: its epoch (Composer calls set_epoch) reseeds the masks

    def bind(self, sampler) -> "MLMCollator":
        bound = copy.copy(self)
        bound.sampler = sampler
        return bound

    def mask(self, ids: np.ndarray, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, labels) for one block of token ids."""
        tokens = int.from_bytes(hashlib.blake2b(ids.tobytes(), digest_size=8).digest(), "little")
        rng = np.random.default_rng((self.seed, epoch, tokens))
        picked = (rng.random(ids.shape) < self.probability) & ~self.special[ids]
        how = rng.random(ids.shape)
        random_ids = rng.integers(0, self.vocab_size, ids.shape)
        labels = np.where(picked, ids, IGNORE_INDEX)
        inputs = np.where(picked & (how < 0.8), self.mask_id, ids)
        inputs = np.where(picked & (how >= 0.8) & (how < 0.9), random_ids, inputs)
        return inputs, labels

    def __call__(self, samples: list[dict]) -> dict:
        import torch

        epoch = self.sampler.epoch if getattr(self.sampler, "shuffle", False) else 0
        pairs = [self.mask(s["input_ids"].numpy(), epoch) for s in samples]
        return {"input_ids": torch.from_numpy(np.stack([p[0] for p in pairs])),
                "labels": torch.from_numpy(np.stack([p[1] for p in pairs]))}


def encoder_inputs(batch: dict) -> tuple:
    return batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids")


def encoder_flops(network, batch: dict, head_tokens: int = 0) -> float:
    """Training FLOPs, counted as for the decoder: 6 per weight per token it multiplies (embedding lookups
    excluded) plus the attention matmuls, plus `head_tokens` rows through the (tied) output matrix."""
    B, T = batch["input_ids"].shape
    enc = network.encoder
    embeds = sum(m.weight.numel() for m in (enc.embed_tokens, enc.embed_positions, enc.embed_types))
    return encoder_flops_of(network.cfg, sum(p.numel() for p in network.parameters()), embeds, B, T, head_tokens)


def encoder_flops_of(cfg, params: int, embedding: int, B: int, T: int, head_tokens: int = 0) -> float:
    """`encoder_flops` from the config and parameter counts: `embedding` in the three lookup tables."""
    flops = 6 * (params - embedding) * B * T + 3 * cfg.n_layers * 2 * 2 * cfg.d_model * T * T * B
    return float(flops + 6 * cfg.vocab_size * cfg.d_model * head_tokens)


class MaskedLM(Pipeline):
    name = "mlm"
    Section = MLMData
    task = "mlm"

    def prepare(self) -> cache.PreparedData:
        d = self.data

        def one(train, text_field, val, val_fraction):
            return prepare_mlm(train, d.tokenizer, d.max_seq_len, val=val, val_fraction=val_fraction,
                               doc_separator=d.doc_separator, text_field=text_field)

        return mixture.prepare(d, one) if mixture.is_mixture(d.train) else one(d.train, d.text_field, d.val,
                                                                                d.val_fraction)

    def collator(self, meta: dict, seed: int) -> MLMCollator:
        return MLMCollator(meta["special"]["mask"][1], meta["vocab_size"], meta["special_ids"],
                           self.data.mlm_probability, seed)

    @staticmethod
    def targets(batch: dict):
        labels = batch["labels"]
        return labels[labels != IGNORE_INDEX]  # (N,), in the order of forward's logits

    def loss_tokens(self, batch: dict) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def forward(self, network, batch: dict, training: bool):
        """Logits (N, V) at the N positions with a label (the masked ones): the head's (V x C) matmul runs
        on those alone."""
        return network(*encoder_inputs(batch), predict=batch["labels"] != IGNORE_INDEX)

    def loss(self, outputs, batch: dict):
        import torch.nn.functional as F

        if outputs.shape[0] == 0:  # nothing masked in this batch: no signal, but keep the graph
            return outputs.sum() * 0.0
        return F.cross_entropy(outputs.float(), self.targets(batch))

    def metrics(self, meta: dict) -> dict:
        from composer.metrics.nlp import LanguageCrossEntropy, MaskedAccuracy

        return {"MaskedAccuracy": MaskedAccuracy(ignore_index=IGNORE_INDEX),
                "LanguageCrossEntropy": LanguageCrossEntropy(ignore_index=IGNORE_INDEX)}

    def update_metric(self, batch: dict, outputs, metric) -> None:
        metric.update(outputs, self.targets(batch))

    def flops(self, network, batch: dict) -> float:
        return encoder_flops(network, batch, head_tokens=int((batch["labels"] != IGNORE_INDEX).sum()))

    def sequence_flops(self, cfg, counts: dict, seq: int) -> float:
        # the share of positions a masked block has targets at
        head_tokens = round(self.data.mlm_probability * seq)
        return encoder_flops_of(cfg, counts["total"], counts["embedding"], 1, seq, head_tokens)

    def network_meta(self) -> dict:
        return tokenizer_meta(self.data.tokenizer, need=("cls", "sep", "pad", "mask"))

    def export_tokens(self, meta: dict, tokenizer, tokenizer_path) -> dict:
        return encoder_tokens(tokenizer, tokenizer_path)


def tokenizer_meta(tokenizer: str, need: tuple[str, ...], key_prefix: str = "data") -> dict:
    """vocab_size and special tokens of an encoder pipeline's tokenizer, as its cache entry's meta holds
    them, read from the tokenizer alone."""
    from rafale.paths import resolve_tokenizer

    path = resolve_tokenizer(tokenizer, f"{key_prefix}.tokenizer")
    tok = tokenize.load_tokenizer(path.read_bytes(), f"{key_prefix}.tokenizer {path}")
    return {"vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "special": tokenize.special_tokens(tok, f"{key_prefix}.tokenizer", path, need=need)}


def encoder_tokens(tokenizer, tokenizer_path) -> dict:
    """RoBERTa's config.json names <s> and </s> as bos / eos; BERT's names none. The tokenizer config lists
    every special token by role."""
    special = tokenize.special_tokens(tokenizer, "data.tokenizer", tokenizer_path)
    roberta = special["cls"][0] == "<s>"
    return {"config": {"bos_token_id": special["cls"][1], "eos_token_id": special["sep"][1]} if roberta else {},
            "tokenizer_config": {f"{role}_token": token for role, (token, _) in special.items()}}
