"""The chat pipeline (`data.pipeline: chat`): supervised fine-tuning on conversations, loss on the answers.

    .jsonl rows ({"messages": [...]}, Alpaca's instruction/input/output, or prompt/response)
      -> conversations rendered with the chat template (data.chat_template, else the tokenizer's:
         its folder's chat_template.jinja / tokenizer_config.json, or a GGUF file's metadata)
      -> token ids + loss mask (data/chat.py: data.train_on assistant | all | last, truncation policy)
      -> one flat id array, its mask and row offsets per split (no padding stored)
      -> batches right-padded to their longest row; labels are the ids where the mask is set, -100
         elsewhere, and the objective is the causal one (data/causal_lm.py) on those labels

The loss is the mean over a micro-batch's target tokens (CausalLM's). Position 0 is never predicted.
A row is one conversation: conversations are not packed together.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from rafale.data import cache, chat, tokenize
from rafale.data.causal_lm import CausalLM
from rafale.data.pipeline import IGNORE_INDEX, DataSection
from rafale.errors import UserError
from rafale.schema import results


@dataclass
class ChatData(DataSection):
    train: Union[str, list[str]] = results("dolly-sft/messages.jsonl")
    tokenizer: str = results("smollm2")
    max_seq_len: int = results(512)
    train_on: str = results("assistant")  # assistant (every answer) | all (every token) | last (final answer)
    # A .jinja file or a template string; default: the tokenizer's own template.
    chat_template: Optional[str] = results(None)

    def problems(self) -> list[str]:
        problems = super().problems()
        if self.train_on not in chat.TRAIN_ON:
            problems.append(f"data.train_on: expected one of {', '.join(chat.TRAIN_ON)}, got {self.train_on!r}")
        return problems


class Sequences:
    """One split's token sequences with their loss masks, stored flat with row offsets. `s[i]` is
    {"input_ids", "loss_mask"} as numpy arrays; `s[array_of_indices]` a new Sequences of those rows."""

    def __init__(self, ids: np.ndarray, mask: np.ndarray, offsets: np.ndarray):
        self.ids, self.mask, self.offsets = ids, mask, offsets

    @classmethod
    def of(cls, rows: list[tuple[list[int], list[int]]], dtype) -> "Sequences":
        lengths = [len(ids) for ids, _ in rows]
        flat = lambda k, t: np.array([x for r in rows for x in r[k]], dtype=t)
        return cls(flat(0, dtype), flat(1, np.uint8), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, (int, np.integer)):
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            return {"input_ids": self.ids[a:b], "loss_mask": self.mask[a:b]}
        rows = [self[int(j)] for j in np.asarray(i)]
        return Sequences.of([(r["input_ids"], r["loss_mask"]) for r in rows], self.ids.dtype)

    def arrays(self, split: str) -> dict[str, np.ndarray]:
        return {f"{split}_ids": self.ids, f"{split}_mask": self.mask, f"{split}_offsets": self.offsets}

    @classmethod
    def from_arrays(cls, arrays: dict, split: str) -> "Sequences":
        return cls(arrays[f"{split}_ids"], arrays[f"{split}_mask"], arrays[f"{split}_offsets"])


def jsonl_rows(path: Path, key: str):
    """(line number, object) for each non-blank line of a .jsonl file; a UserError names a bad line."""
    if not path.name.endswith(".jsonl"):
        raise UserError(f"{key}: {path} is not a .jsonl file; this pipeline reads JSON Lines rows")
    for n, line in enumerate(tokenize.read_text(path, key).split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{key}: {path} line {n} is not JSON ({e.msg}); fix the row") from None


def labels_of(input_ids, loss_mask):
    """The causal objective's labels: the ids where the mask is set, IGNORE_INDEX elsewhere."""
    import torch

    return torch.where(loss_mask.bool(), input_ids, IGNORE_INDEX)


class PadCollator:
    """Right-pads a list of {"input_ids", "loss_mask"} rows to the longest one (pads carry no loss and,
    being after every real token, are never attended to by one), and adds the labels."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        T = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.bool)
        for b, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[b, :n] = torch.from_numpy(r["input_ids"].astype(np.int64))
            mask[b, :n] = torch.from_numpy(r["loss_mask"].astype(bool))
        return {"input_ids": ids, "loss_mask": mask, "labels": labels_of(ids, mask)}


def tokenizer_folder_tokens(tokenizer_path: Path) -> dict:
    """The special tokens of the tokenizer_config.json beside a tokenizer.json (empty if none)."""
    config = Path(tokenizer_path).parent / chat.CONFIG_FILE
    return json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}


def end_of_turn(tok, tokenizer_path: Path) -> tuple[str, int]:
    """The token an answer ends with (generation stops there): tokenizer_config.json's eos_token
    (SmolLM2's <|im_end|>), else the tokenizer's end-of-document token."""
    eos = chat._token_text(tokenizer_folder_tokens(tokenizer_path).get("eos_token"))
    if eos is not None and tok.token_to_id(eos) is not None:
        return eos, tok.token_to_id(eos)
    return tokenize.resolve_eos(tok, None, tokenizer_path, "data")


def end_of_turn_meta(tokenizer: str) -> dict:
    """model_meta of a pipeline of conversations (chat, preference): the tokenizer's size and the token
    that ends an answer, read from the tokenizer alone."""
    from rafale.paths import resolve_tokenizer

    tok_path = resolve_tokenizer(tokenizer)
    tok = tokenize.load_tokenizer(Path(tok_path).read_text())
    eos, eos_id = end_of_turn(tok, tok_path)
    return {"vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "tokenizer": {"path": str(tok_path), "eos_token": eos, "eos_id": eos_id}}


class ChatSFT(CausalLM):
    name = "chat"
    Section = ChatData

    def _template(self, tokenizer_path: Path) -> chat.ChatTemplate:
        return chat.load_chat_template(tokenizer_path, self.data.chat_template)

    def prepare(self) -> cache.PreparedData:
        from rafale.paths import resolve_tokenizer

        d = self.data
        # The template's text decides the arrays (a template file edited in place must rebuild).
        template = self._template(resolve_tokenizer(d.tokenizer))

        def build(inputs: cache.Inputs):
            tok = inputs.tokenizer()
            vocab_size = tok.get_vocab_size(with_added_tokens=True)
            counts = dict(conversations=0, whole=0, shortened=0, cut=0, dropped=0, merged_boundaries=0)
            splits = {}
            for split, paths in inputs.paths.items():
                rows = []
                for path in paths:
                    for n, row in jsonl_rows(path, f"data.{split}"):
                        where = f"data.{split}: {path} line {n}"
                        messages = chat.row_to_messages(row, where)
                        ids, mask, info = chat.tokenize_conversation(messages, template, tok, d.train_on,
                                                                     d.max_seq_len, where)
                        counts["conversations"] += 1
                        counts["merged_boundaries"] += info.merged_boundaries
                        kind = ("dropped" if info.dropped else "cut" if info.cut_tokens else
                                "shortened" if info.dropped_messages else "whole")
                        counts[kind] += 1
                        if not info.dropped:
                            rows.append((ids, mask))
                splits[split] = rows
            if not splits["train"]:
                raise UserError(f"data.train: no conversation fits data.max_seq_len={d.max_seq_len} with a token "
                                f"to learn; raise data.max_seq_len or check the rows")
            if not inputs.paths["val"]:
                n_val = cache.held_out(len(splits["train"]), d.val_fraction, "conversation", "data",
                                       "add conversations")
                splits["val"] = splits["train"][len(splits["train"]) - n_val:]
                splits["train"] = splits["train"][:len(splits["train"]) - n_val]
            dtype = cache.token_dtype(vocab_size)
            arrays = {}
            for split, rows in splits.items():
                arrays.update(Sequences.of(rows, dtype).arrays(split))
            eos, eos_id = end_of_turn(tok, inputs.tokenizer_path)
            stats = {**counts, "tokens": int(len(arrays["train_ids"]) + len(arrays["val_ids"])),
                     "target_tokens": int(arrays["train_mask"].sum() + arrays["val_mask"].sum()),
                     "train_rows": len(splits["train"]), "val_rows": len(splits["val"])}
            meta = {"tokenizer": {"eos_token": eos, "eos_id": eos_id, "pad_id": eos_id}, "vocab_size": vocab_size,
                    "dtype": np.dtype(dtype).name, "stats": stats}
            return arrays, meta

        path, arrays, meta, hit = cache.prepare_entry(
            self.name, d.train, d.val, d.tokenizer, d.max_seq_len, d.val_fraction,
            {"train_on": d.train_on, "chat_template": template.source}, build)
        val = Sequences.from_arrays(arrays, "val")
        return cache.PreparedData(path=path, train=Sequences.from_arrays(arrays, "train"),
                                  val=val if len(val) else None, meta=meta, hit=hit)

    def report(self, prepared) -> str:
        s = prepared.meta["stats"]
        return (f"{s['conversations']:,} conversations: {s['whole']:,} whole, {s['shortened']:,} with earlier "
                f"exchanges dropped, {s['cut']:,} cut at max_seq_len={self.data.max_seq_len}, {s['dropped']:,} "
                f"dropped (nothing to learn within max_seq_len); {s['tokens']:,} tokens, {s['target_tokens']:,} "
                f"of them targets (train_on={self.data.train_on}); {s['train_rows']:,} train + {s['val_rows']:,} "
                f"val conversations")

    def model_meta(self) -> dict:
        return end_of_turn_meta(self.data.tokenizer)

    def check_network(self, network) -> None:
        pass  # conversations are one a row: no packed documents to check for

    def dataset(self, rows):
        return rows  # a Sequences: rows of {"input_ids", "loss_mask"}, padded by the collator

    def collator(self, meta: dict, seed: int):
        return PadCollator(meta["tokenizer"]["eos_id"])

    def export_tokens(self, meta: dict, tokenizer, tokenizer_path) -> dict:
        """The tokenizer's own bos / eos (eos: the end of an answer) and the chat template, so that
        transformers' apply_chat_template renders the conversations the model was trained on."""
        own = tokenizer_folder_tokens(tokenizer_path)
        eos, eos_id = meta["tokenizer"]["eos_token"], meta["tokenizer"]["eos_id"]
        bos = chat._token_text(own.get("bos_token")) or eos
        config = {"tokenizer_config": {"bos_token": bos, "eos_token": eos,
                                       "chat_template": self._template(Path(tokenizer_path)).source},
                  "config": {"bos_token_id": tokenizer.token_to_id(bos), "eos_token_id": eos_id}}
        return config
