"""The masked-LM datapipe: text files -> documents -> token ids -> one [SEP]-joined stream -> blocks
framed by [CLS] ... [SEP] (RoBERTa: <s> ... </s>), cached like the causal pipeline (cache.py).

    files, documents, tokenization: as the causal pipeline (pipelines.py), with the tokenizer's
      [SEP] / </s> after every document instead of an EOS
      -> the stream cut into pieces of max_seq_len - 2 tokens, each framed: (n_blocks, max_seq_len)
      -> train / val: explicit val files, or the LAST `val_fraction` of the blocks

Blocks are full (packing, as RoBERTa's FULL-SENTENCES), so there is no padding. Nothing is masked
here: the collator (collators.py) masks each block anew every epoch, so the masking probability is
not part of the cache key. It imports no torch.
"""

import hashlib

import numpy as np

from rafale.data import pipelines
from rafale.data.cache import PreparedData, load_or_build, resolve_inputs, source_key
from rafale.errors import UserError

PIPELINE = "mlm"


def special_ids(tok) -> list[int]:
    """Ids of every special token ([CLS], [SEP], [PAD], [MASK], [UNK], ...): never masked."""
    return sorted(i for i, t in tok.get_added_tokens_decoder().items() if t.special)


def frame(stream: np.ndarray, max_seq_len: int, cls_id: int, sep_id: int) -> np.ndarray:
    """(n_blocks, max_seq_len): [cls] + max_seq_len - 2 stream tokens + [sep]; a short tail is dropped."""
    body = pipelines.to_blocks(stream, max_seq_len - 2)
    blocks = np.empty((len(body), max_seq_len), dtype=stream.dtype)
    blocks[:, 0], blocks[:, 1:-1], blocks[:, -1] = cls_id, body, sep_id
    return blocks


def prepare_mlm(train: str | list[str], tokenizer: str, max_seq_len: int, val: str | list[str] | None = None,
                val_fraction: float = 0.05, doc_separator: str | None = None,
                key_prefix: str = "data") -> PreparedData:
    """The masked-LM blocks for these sources, from the cache or built now."""
    if max_seq_len < 3:
        raise UserError(f"{key_prefix}.max_seq_len: must be at least 3 (a block holds [CLS], text and [SEP]), "
                        f"got {max_seq_len}")
    paths, tok_path, tok_bytes, sources = resolve_inputs(train, val, tokenizer, key_prefix)
    tok_sha = hashlib.sha256(tok_bytes).hexdigest()
    options = {"doc_separator": doc_separator, "max_seq_len": max_seq_len,
               "val_fraction": None if paths["val"] else val_fraction}

    def build():
        tok = pipelines.load_tokenizer(tok_bytes.decode("utf-8"))
        special = pipelines.special_tokens(tok, f"{key_prefix}.tokenizer", tok_path)
        vocab_size = tok.get_vocab_size(with_added_tokens=True)
        dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
        cls_id, sep_id = special["cls"][1], special["sep"][1]
        splits, stats = {}, {"documents": 0, "tokens": 0}
        for split in ("train", "val"):
            if not paths[split]:
                continue
            key = f"{key_prefix}.{split}"
            stream, n_docs = pipelines.tokenize_files(paths[split], tok, sep_id, doc_separator, dtype, key)
            if n_docs == 0:
                raise UserError(f"{key}: its {len(paths[split])} file(s) hold no text (empty or only "
                                f"whitespace); point it at text files")
            splits[split] = frame(stream, max_seq_len, cls_id, sep_id)
            stats["documents"] += n_docs
            stats["tokens"] += len(stream)
            if len(splits[split]) == 0:
                raise UserError(f"{key}: the text is {len(stream):,} tokens, less than one block of "
                                f"{key_prefix}.max_seq_len={max_seq_len} ([CLS] + {max_seq_len - 2} + [SEP]); "
                                f"add text or lower {key_prefix}.max_seq_len")
        blocks = splits["train"]
        if "val" not in splits:
            n_val = max(1, round(len(blocks) * val_fraction)) if val_fraction > 0 else 0
            if len(blocks) <= n_val:
                raise UserError(f"{key_prefix}.train: {len(blocks)} block(s) of {key_prefix}.max_seq_len="
                                f"{max_seq_len}, too few for 1 training plus {n_val} validation block(s); add "
                                f"text, lower {key_prefix}.max_seq_len or set {key_prefix}.val_fraction to 0")
            splits = {"train": blocks[:len(blocks) - n_val], "val": blocks[len(blocks) - n_val:]}
        stats.update(train_blocks=len(splits["train"]), val_blocks=len(splits["val"]),
                     bytes=sum(s["bytes"] for ss in sources.values() for s in ss))
        meta = {"options": options, "tokenizer": {"path": str(tok_path), "sha256": tok_sha},
                "special": special, "special_ids": special_ids(tok),
                "vocab_size": vocab_size, "dtype": str(dtype.__name__), "sources": sources, "stats": stats}
        return splits, meta

    path, arrays, meta, hit = load_or_build(
        PIPELINE, {"options": options, "tokenizer_sha256": tok_sha, "sources": source_key(sources)}, build)
    return PreparedData(path=path, train=arrays["train"], val=arrays["val"] if len(arrays["val"]) else None,
                        meta=meta, hit=hit)
