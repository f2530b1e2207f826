"""The classification pipeline: rows of text (or a text pair) and a label -> token ids with the
tokenizer's own [CLS] a [SEP] (b [SEP]) framing, truncated to max_seq_len, cached like the other
pipelines (cache.py); padding per batch in `PaddingCollator`; cross-entropy over the labels, accuracy,
macro F1 and (in `rafale eval`) a confusion matrix.

    files: .jsonl (one JSON object per line), .csv, .tsv (header row; no quoting, as GLUE), .parquet;
      a file, a list, or a directory of them
      -> rows: `text_field`, optional `text_pair_field`, `label_field`
      -> labels: all integers (or digit strings, as TSV gives them): the label IS the class id, and the
         label names are "0" .. "max" (refused when most of those never occur); otherwise names,
         sorted, and the class id is the position (one kind for all labels: a mix is refused)
      -> train / val: explicit val files, or the LAST `val_fraction` of the rows

Stored ragged: <split>_ids (all token ids, concatenated), <split>_offsets (n + 1), <split>_labels (n),
and <split>_types (segment ids) for pairs. meta.json keeps the label names.
"""

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from rafale.data import cache, tokenize
from rafale.data.cache import PreparedData
from rafale.data.mlm import encoder_flops, encoder_flops_of, encoder_inputs, encoder_tokens, tokenizer_meta
from rafale.data.pipeline import DataSection, Pipeline
from rafale.errors import UserError
from rafale.schema import results

FORMATS = (".jsonl", ".csv", ".tsv", ".parquet")
INT_LABEL = re.compile(r"^\s*\d+\s*$")


class Examples:
    """One split's tokenized examples. `ex[i]` is {"input_ids", "label"(, "token_type_ids")} with numpy
    values; `ex[array_of_indices]` is a new Examples holding those rows (in that order, repeats allowed)."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, labels: np.ndarray, types: np.ndarray | None = None):
        self.ids, self.offsets, self.labels, self.types = ids, offsets, labels, types

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        if isinstance(i, (int, np.integer)):
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            row = {"input_ids": self.ids[a:b], "label": int(self.labels[i])}
            if self.types is not None:
                row["token_type_ids"] = self.types[a:b]
            return row
        rows = [self[int(j)] for j in np.asarray(i)]
        lengths = [len(r["input_ids"]) for r in rows]
        cat = (lambda k: np.concatenate([r[k] for r in rows])) if rows else (lambda k: self.ids[:0])
        return Examples(cat("input_ids"), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                        np.array([r["label"] for r in rows], dtype=np.int64),
                        cat("token_type_ids") if self.types is not None else None)


def read_rows(path: Path, key: str) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise UserError(f"{key}: {path} is not one of {', '.join(FORMATS)}; the classification pipeline reads "
                        f"tables of text and labels")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a damaged or non-parquet file
            raise UserError(f"{key}: {path} is not a readable parquet file ({e})") from None
    text = tokenize.read_text(path, key)
    if suffix == ".jsonl":
        rows = []
        # "\n" only: str.splitlines would also cut at U+2028 and other separators inside JSON strings.
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{key}: {path} line {n} is not JSON ({e})") from None
        return rows
    # GLUE's TSVs hold bare quotes inside sentences; csv's quoting would swallow them.
    quoting = csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL
    return list(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",",
                               quoting=quoting))


def read_split(paths: list[Path], fields: dict[str, str | None], key: str) -> dict[str, list]:
    """Column name -> values, over every row of `paths`; `fields` maps role -> config key's column."""
    columns = {role: [] for role, name in fields.items() if name is not None}
    for path in paths:
        for n, row in enumerate(read_rows(path, key), 1):
            for role in columns:
                name = fields[role]
                value = row.get(name) if isinstance(row, dict) else None
                if value is None:
                    have = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
                    raise UserError(f"{key}: {path} row {n} has no {name!r} (set by data.{role}); its fields: "
                                    f"{have}")
                columns[role].append(value)
    if not columns["label_field"]:
        raise UserError(f"{key}: its {len(paths)} file(s) hold no rows; point it at a table of texts and labels")
    return columns


def label_ids(train: list, val: list, key_prefix: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(label names, train ids, val ids): integer labels are class ids themselves, others are names
    numbered in sorted order."""
    every = train + val
    kinds = {"integer" if isinstance(v, int) and not isinstance(v, bool) or isinstance(v, str) and INT_LABEL.match(v)
             else type(v).__name__ for v in every}
    if len(kinds) > 1:  # 0, "pos", 1.0 and True would silently be four classes
        raise UserError(f"{key_prefix}.label_field: the labels mix {', '.join(sorted(kinds))} values; give every "
                        f"label as a class id (0, 1, ...) or every label as a name")
    if kinds == {"integer"}:
        ids = [int(v) for v in every]
        if min(ids) < 0:
            raise UserError(f"{key_prefix}.label_field: negative label {min(ids)}; integer labels are class ids "
                            f"0..K-1, renumber them or give names")
        present = len(set(ids))
        # A gap or two is a real dataset (IMDB's ratings 1-4, 7-10); 0 and 2000000 would be 2,000,001 classes.
        if max(ids) + 1 > 2 * present:
            raise UserError(f"{key_prefix}.label_field: integer labels are class ids, and these make "
                            f"{max(ids) + 1:,} classes (0..{max(ids)}) of which only {present:,} occur; renumber "
                            f"them 0..K-1 or give them as names")
        names = [str(i) for i in range(max(ids) + 1)]
    else:
        names = sorted({str(v) for v in train})
        index = {name: i for i, name in enumerate(names)}
        unknown = sorted({str(v) for v in val} - set(index))
        if unknown:
            raise UserError(f"{key_prefix}.val: label(s) {', '.join(map(repr, unknown))} never occur in "
                            f"{key_prefix}.train (its labels: {', '.join(names)})")
        ids = [index[str(v)] for v in every]
    if len(names) < 2:
        raise UserError(f"{key_prefix}.label_field: the data has a single label ({names[0]!r}); a classifier "
                        f"needs at least 2")
    ids = np.array(ids, dtype=np.int64)
    return names, ids[:len(train)], ids[len(train):]


def encode(tok, texts: list[str], pairs: list[str] | None, max_seq_len: int, dtype, key: str) -> tuple[dict, int]:
    """Arrays ids / offsets (/ types for pairs) and the number of examples truncated."""
    for name, column in (("text_field", texts), ("text_pair_field", pairs or [])):
        bad = next((v for v in column if not isinstance(v, str)), None)
        if bad is not None:
            raise UserError(f"{key}: data.{name} must hold text, found {bad!r}")
    tok.enable_truncation(max_seq_len, strategy="longest_first")
    inputs = list(zip(texts, pairs)) if pairs is not None else texts
    encodings = tok.encode_batch_fast(inputs, add_special_tokens=True)
    lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
    arrays = {"ids": np.fromiter((i for e in encodings for i in e.ids), dtype=dtype, count=int(lengths.sum())),
              "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)}
    if pairs is not None:
        arrays["types"] = np.fromiter((t for e in encodings for t in e.type_ids), dtype=np.uint8,
                                      count=int(lengths.sum()))
    return arrays, sum(1 for e in encodings if e.overflowing)


@dataclass
class ClassificationData(DataSection):
    text_field: str = results("text")  # the column holding the text
    text_pair_field: Optional[str] = results(None)  # a second text column (sentence pairs)
    label_field: str = results("label")  # the column holding the label

    def problems(self) -> list[str]:
        problems = super().problems()
        if self.text_pair_field is not None and self.text_pair_field == self.text_field:
            problems.append(f"data.text_pair_field: must name another column than data.text_field "
                            f"('{self.text_field}')")
        return problems


def prepare_classification(train: str | list[str], tokenizer: str, max_seq_len: int, text_field: str = "text",
                           label_field: str = "label", text_pair_field: str | None = None,
                           val: str | list[str] | None = None, val_fraction: float = 0.05,
                           key_prefix: str = "data") -> PreparedData:
    """The tokenized, labelled examples of these tables, from the cache or built now."""
    if max_seq_len < 3:
        raise UserError(f"{key_prefix}.max_seq_len: must be at least 3 ([CLS], text, [SEP]), got {max_seq_len}")
    fields = {"text_field": text_field, "text_pair_field": text_pair_field, "label_field": label_field}

    def build(inputs: cache.Inputs):
        tok = inputs.tokenizer()
        special = tokenize.special_tokens(tok, f"{key_prefix}.tokenizer", inputs.tokenizer_path,
                                          need=("cls", "sep", "pad"))
        if tok.encode("a").ids[:1] != [special["cls"][1]]:
            raise UserError(f"{key_prefix}.tokenizer: {inputs.tokenizer_path} adds no {special['cls'][0]} in front "
                            f"of a text (no post-processor); the classifier reads its label off that token")
        vocab_size = tok.get_vocab_size(with_added_tokens=True)
        dtype = cache.token_dtype(vocab_size)
        columns = {split: read_split(ps, fields, f"{key_prefix}.{split}") for split, ps in inputs.paths.items() if ps}
        if "val" not in columns:
            n = len(columns["train"]["label_field"])
            n_val = cache.held_out(n, val_fraction, "row", key_prefix, "add rows")
            whole = columns.pop("train")
            columns = {"train": {k: v[:n - n_val] for k, v in whole.items()},
                       "val": {k: v[n - n_val:] for k, v in whole.items()}}
        names, train_ids, val_ids = label_ids(columns["train"]["label_field"], columns["val"]["label_field"],
                                              key_prefix)
        arrays, stats = {}, {"examples": 0, "tokens": 0, "truncated": 0}
        for split, labels in (("train", train_ids), ("val", val_ids)):
            c = columns[split]
            tokens, truncated = encode(tok, c["text_field"], c.get("text_pair_field"), max_seq_len, dtype,
                                       f"{key_prefix}.{split}")
            arrays.update({f"{split}_{k}": v for k, v in tokens.items()}, **{f"{split}_labels": labels})
            stats[f"{split}_examples"] = len(labels)
            stats["examples"] += len(labels)
            stats["tokens"] += len(tokens["ids"])
            stats["truncated"] += truncated
        counts = {split: np.bincount(ids, minlength=len(names)).tolist()
                  for split, ids in (("train", train_ids), ("val", val_ids))}
        meta = {"special": special, "labels": names, "label_counts": counts, "vocab_size": vocab_size,
                "dtype": np.dtype(dtype).name, "stats": stats}
        return arrays, meta

    path, arrays, meta, hit = cache.prepare_entry(Classification.name, train, val, tokenizer, max_seq_len,
                                                  val_fraction, fields, build, key_prefix)

    def split(name: str) -> Examples:
        return Examples(arrays[f"{name}_ids"], arrays[f"{name}_offsets"], arrays[f"{name}_labels"],
                        arrays.get(f"{name}_types"))

    return PreparedData(path=path, train=split("train"), val=split("val") if meta["stats"]["val_examples"] else None,
                        meta=meta, hit=hit)


class PaddingCollator:
    """Pads a batch of examples to its longest one: input_ids (pad id), attention_mask (0 on padding),
    token_type_ids (pairs only), labels (B,)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, samples: list[dict]) -> dict:
        import torch

        T = max(len(s["input_ids"]) for s in samples)
        B = len(samples)
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        types = torch.zeros((B, T), dtype=torch.long) if "token_type_ids" in samples[0] else None
        for r, s in enumerate(samples):
            n = len(s["input_ids"])
            ids[r, :n] = torch.from_numpy(s["input_ids"].astype(np.int64))
            mask[r, :n] = 1
            if types is not None:
                types[r, :n] = torch.from_numpy(s["token_type_ids"].astype(np.int64))
        batch = {"input_ids": ids, "attention_mask": mask,
                 "labels": torch.tensor([s["label"] for s in samples], dtype=torch.long)}
        if types is not None:
            batch["token_type_ids"] = types
        return batch


class ConfusionMatrix:
    """`rafale eval`'s confusion matrix over the label names: rows true labels, columns predictions."""

    def __init__(self, labels: list[str], device):
        from torchmetrics.classification import MulticlassConfusionMatrix

        self.labels = labels
        self.metric = MulticlassConfusionMatrix(num_classes=len(labels)).to(device)

    def update(self, batch: dict, outputs) -> None:
        self.metric.update(outputs, batch["labels"])

    def result(self) -> tuple[str, dict]:
        return "confusion_matrix", {"labels": self.labels, "matrix": self.metric.compute().tolist()}


class Classification(Pipeline):
    name = "classification"
    Section = ClassificationData
    task = "classification"
    progress = ("val acc", "MulticlassAccuracy")

    def prepare(self) -> PreparedData:
        d = self.data
        return prepare_classification(d.train, d.tokenizer, d.max_seq_len, text_field=d.text_field,
                                      label_field=d.label_field, text_pair_field=d.text_pair_field, val=d.val,
                                      val_fraction=d.val_fraction)

    def report(self, prepared) -> str:
        s = prepared.meta["stats"]
        return (f"{s['train_examples']:,} train + {s['val_examples']:,} val examples, {s['tokens']:,} tokens, "
                f"{s['truncated']:,} truncated to {self.data.max_seq_len}; labels {', '.join(prepared.meta['labels'])}")

    def dataset(self, rows):
        return rows  # Examples index like a torch Dataset

    def collator(self, meta: dict, seed: int) -> PaddingCollator:
        return PaddingCollator(meta["special"]["pad"][1])

    def forward(self, network, batch: dict, training: bool):
        return network(*encoder_inputs(batch))  # (B, num_labels)

    def loss(self, outputs, batch: dict):
        import torch.nn.functional as F

        return F.cross_entropy(outputs.float(), batch["labels"])

    def metrics(self, meta: dict) -> dict:
        from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

        k = len(meta["labels"])
        # Accuracy over all examples; F1 averaged over classes with equal weight (macro).
        return {"MulticlassAccuracy": MulticlassAccuracy(num_classes=k, average="micro"),
                "MulticlassF1Score": MulticlassF1Score(num_classes=k, average="macro")}

    def update_metric(self, batch: dict, outputs, metric) -> None:
        metric.update(outputs, batch["labels"])

    def flops(self, network, batch: dict) -> float:
        return encoder_flops(network, batch)

    def sequence_flops(self, cfg, counts: dict, seq: int) -> float:
        return encoder_flops_of(cfg, counts["total"], counts["embedding"], 1, seq)

    def network_meta(self) -> dict:
        """The tokenizer's size and special tokens, and the label names from the label column alone
        (the texts are neither tokenized nor cached): the classifier's output size."""
        d = self.data
        fields = {"label_field": d.label_field}
        labels = {split: read_split(tokenize.list_sources(spec, f"data.{split}"), fields, f"data.{split}")["label_field"]
                  for split, spec in (("train", d.train), ("val", d.val)) if spec is not None}
        names, _, _ = label_ids(labels["train"], labels.get("val", []), "data")
        return {**tokenizer_meta(d.tokenizer, need=("cls", "sep", "pad")), "labels": names}

    def eval_extras(self, meta: dict, device=None) -> list:
        return [ConfusionMatrix(meta["labels"], device)]

    def export_tokens(self, meta: dict, tokenizer, tokenizer_path) -> dict:
        return encoder_tokens(tokenizer, tokenizer_path)
