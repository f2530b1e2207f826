"""The preference pipeline (`data.pipeline: preference`): DPO or SimPO on pairs of answers to one prompt.

    .jsonl rows {"prompt", "chosen", "rejected"}, each plain text or messages:
      plain text   prompt ids + answer ids + the end token, tokenized apart (the prompt's ids are the
                   same in both sequences); loss mask on the answer and its end token
      messages     prompt: a string (one user message) or a list of messages; chosen / rejected: a
                   string (one assistant message) or a list of messages; rendered with the chat template
                   and masked as data/chat.py does for the last answer (data.train_on last)
      -> two sequences per pair (data/sft.py Sequences: chosen at 2i, rejected at 2i + 1)
      -> batches of (B, 2, T) ids and masks, so Composer's micro-batches never split a pair

The objective (train.objective): `dpo` (rewards train.beta * (policy - reference) summed response
log-probs) or `simpo` (rewards beta * mean response log-prob, target margin train.gamma in reward units). DPO's
reference is the model before fine-tuning, never a second model in memory: under LoRA the same network
with its adapters switched off; for full fine-tuning one pass over every pair before the first step
(`ReferencePass`), saved in the run directory so a resumed run reads it back. Chosen / rejected
rewards, margins and accuracy (share of pairs with a positive margin) are logged every step
(preference/train/*) and at evaluation (metrics/eval/Reward*).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from rafale.data import cache, chat, tokenize
from rafale.data.pipeline import DataSection, Pipeline
from rafale.data.sft import Sequences, end_of_turn, end_of_turn_meta, jsonl_rows
from rafale.errors import UserError
from rafale.schema import results

STATS = ("chosen_rewards", "rejected_rewards", "margins", "accuracy")
REFERENCE_FILE = "reference_logps.pt"


@dataclass
class PreferenceData(DataSection):
    tokenizer: str = results("smollm2")
    max_seq_len: int = results(512)
    chat_template: Optional[str] = results(None)  # for message rows; default: the tokenizer's


class Pairs:
    """One split's pairs: `p[i]` is {"input_ids": [chosen, rejected], "loss_mask": [...], "index"}, where
    index (base + i) is the pair's place among every pair of the data, for its reference log-probs."""

    def __init__(self, sequences: Sequences, base: int = 0):
        self.sequences, self.base = sequences, base

    def __len__(self) -> int:
        return len(self.sequences) // 2

    def __getitem__(self, i):
        if isinstance(i, (int, np.integer)):
            c, r = self.sequences[2 * int(i)], self.sequences[2 * int(i) + 1]
            return {"input_ids": [c["input_ids"], r["input_ids"]], "loss_mask": [c["loss_mask"], r["loss_mask"]],
                    "index": self.base + int(i)}
        rows = np.asarray(i)
        return Pairs(self.sequences[np.stack([2 * rows, 2 * rows + 1], 1).reshape(-1)], base=0)


class PairCollator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        T = max(len(ids) for r in rows for ids in r["input_ids"])
        ids = torch.full((len(rows), 2, T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), 2, T), dtype=torch.bool)
        for b, r in enumerate(rows):
            for k in range(2):
                n = len(r["input_ids"][k])
                ids[b, k, :n] = torch.from_numpy(r["input_ids"][k].astype(np.int64))
                mask[b, k, :n] = torch.from_numpy(r["loss_mask"][k].astype(bool))
        return {"input_ids": ids, "loss_mask": mask, "index": torch.tensor([r["index"] for r in rows])}


def _as_messages(value, role: str, key: str, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return value
    raise UserError(f"{where}: '{key}' must be a string or a list of messages, got {type(value).__name__}")


def _pair(row, template, tok, eos_id: int, max_seq_len: int, where: str):
    """((chosen ids, mask), (rejected ids, mask), cut) of one row; None for a pair left with nothing to
    compare after truncation."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: a row must be a JSON object with 'prompt', 'chosen' and 'rejected'")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
    if missing:
        raise UserError(f"{where}: the row has no {', '.join(map(repr, missing))}; a preference row needs "
                        f"'prompt', 'chosen' and 'rejected'")
    plain = all(isinstance(row[k], str) for k in ("prompt", "chosen", "rejected"))
    out, cut = [], False
    for key in ("chosen", "rejected"):
        if plain:
            for k in ("prompt", key):
                if not row[k].strip():
                    raise UserError(f"{where}: '{k}' is empty; fix the row")
            prompt = tok.encode(row["prompt"], add_special_tokens=False).ids
            answer = tok.encode(row[key], add_special_tokens=False).ids + [eos_id]
            ids, mask = prompt + answer, [0] * len(prompt) + [1] * len(answer)
            cut |= len(ids) > max_seq_len
            ids, mask = ids[:max_seq_len], mask[:max_seq_len]
        else:
            if template is None:
                raise UserError(f"{where}: message rows need a chat template; the tokenizer has none, set "
                                f"data.chat_template")
            messages = chat.validate_messages(_as_messages(row["prompt"], "user", "prompt", where)
                                              + _as_messages(row[key], "assistant", key, where), where)
            ids, mask, info = chat.tokenize_conversation(messages, template, tok, "last", max_seq_len, where)
            cut |= info.truncated
        if not any(mask[1:]):
            return None
        out.append((ids, mask))
    return out[0], out[1], cut


class Preference(Pipeline):
    name = "preference"
    Section = PreferenceData
    task = "causal_lm"
    generates = True
    progress = ("val acc", "RewardAccuracy")
    # gamma (simpo): the target reward margin, in reward units (beta x the paper's gamma/beta ratio)
    train_keys = {"objective": "dpo", "beta": 0.1, "gamma": 0.5}

    def _template(self, tokenizer_path: Path):
        try:
            return chat.load_chat_template(tokenizer_path, self.data.chat_template)
        except UserError:
            if self.data.chat_template is not None:
                raise
            return None  # plain-text rows need none; message rows say so

    def prepare(self) -> cache.PreparedData:
        from rafale.paths import resolve_tokenizer

        d = self.data
        template = self._template(resolve_tokenizer(d.tokenizer))

        def build(inputs: cache.Inputs):
            tok = inputs.tokenizer()
            vocab_size = tok.get_vocab_size(with_added_tokens=True)
            eos, eos_id = end_of_turn(tok, inputs.tokenizer_path)
            counts = {"pairs": 0, "cut": 0, "dropped": 0}
            splits = {}
            for split, paths in inputs.paths.items():
                rows = []
                for path in paths:
                    for n, row in jsonl_rows(path, f"data.{split}"):
                        pair = _pair(row, template, tok, eos_id, d.max_seq_len, f"data.{split}: {path} line {n}")
                        counts["pairs"] += 1
                        if pair is None:
                            counts["dropped"] += 1
                            continue
                        counts["cut"] += pair[2]
                        rows.append(pair[:2])
                splits[split] = rows
            if not splits["train"]:
                raise UserError(f"data.train: no pair fits data.max_seq_len={d.max_seq_len}; raise it")
            if not inputs.paths["val"]:
                n_val = cache.held_out(len(splits["train"]), d.val_fraction, "pair", "data", "add pairs")
                splits["train"], splits["val"] = (splits["train"][:len(splits["train"]) - n_val],
                                                  splits["train"][len(splits["train"]) - n_val:])
            dtype = cache.token_dtype(vocab_size)
            arrays = {}
            for split, rows in splits.items():
                arrays.update(Sequences.of([s for pair in rows for s in pair], dtype).arrays(split))
            stats = {**counts, "train_pairs": len(splits["train"]), "val_pairs": len(splits["val"]),
                     "tokens": int(len(arrays["train_ids"]) + len(arrays["val_ids"]))}
            meta = {"tokenizer": {"eos_token": eos, "eos_id": eos_id}, "vocab_size": vocab_size,
                    "dtype": np.dtype(dtype).name, "stats": stats}
            return arrays, meta

        path, arrays, meta, hit = cache.prepare_entry(
            self.name, d.train, d.val, d.tokenizer, d.max_seq_len, d.val_fraction,
            {"chat_template": template.source if template else None}, build)
        train = Pairs(Sequences.from_arrays(arrays, "train"))
        val = Pairs(Sequences.from_arrays(arrays, "val"), base=len(train))
        return cache.PreparedData(path=path, train=train, val=val if len(val) else None, meta=meta, hit=hit)

    def report(self, prepared) -> str:
        s = prepared.meta["stats"]
        return (f"{s['pairs']:,} pairs: {s['cut']:,} cut at max_seq_len={self.data.max_seq_len}, {s['dropped']:,} "
                f"dropped (no answer token within it); {s['tokens']:,} tokens; {s['train_pairs']:,} train + "
                f"{s['val_pairs']:,} val pairs")

    def model_meta(self) -> dict:
        return end_of_turn_meta(self.data.tokenizer)

    def dataset(self, rows):
        return rows

    def collator(self, meta: dict, seed: int):
        return PairCollator(meta["tokenizer"]["eos_id"])

    def callbacks(self, run_dir):
        from rafale.data.preference_callbacks import PreferenceStats, ReferencePass

        return [PreferenceStats(self), ReferencePass(self, run_dir)]

    # --- the objective ---
    reference = None  # full fine-tuning DPO: (n_pairs, 2) reference summed log-probs, set by ReferencePass
    _step_stats: list | None = None

    def needs_reference_pass(self, network) -> bool:
        from rafale.models.lora import has_lora

        return self.train.objective == "dpo" and not has_lora(network)

    def sequence_logps(self, network, batch: dict):
        """(sum_logp (B, 2), n_tokens (B, 2)) of the chosen and rejected answers."""
        ids, mask = batch["input_ids"], batch["loss_mask"]
        B, _, T = ids.shape
        sums, counts = network(ids.reshape(2 * B, T), response_mask=mask.reshape(2 * B, T))
        return sums.view(B, 2), counts.view(B, 2)

    def forward(self, network, batch: dict, training: bool):
        import torch

        from rafale.models.lora import adapters_disabled
        from rafale.models.preference import dpo_loss, simpo_loss

        t = self.train
        sums, counts = self.sequence_logps(network, batch)
        if batch.get("reference_pass"):  # ReferencePass: the model's log-probs as it starts
            return sums
        if t.objective == "simpo":
            avg = sums / counts.clamp(min=1)
            out = simpo_loss(avg[:, 0], avg[:, 1], t.beta, t.gamma)
        else:
            if self.needs_reference_pass(network):
                if self.reference is None:
                    raise RuntimeError("the DPO reference pass has not run")
                ref = self.reference.to(sums.device)[batch["index"]]
            else:
                with torch.no_grad(), adapters_disabled(network):
                    ref, _ = self.sequence_logps(network, batch)
            out = dpo_loss(sums[:, 0], sums[:, 1], ref[:, 0], ref[:, 1], t.beta)
        if training and self._step_stats is not None:
            self._step_stats.append({k: out[k].detach() for k in STATS})
        return out

    def loss(self, outputs, batch: dict):
        return outputs["loss"]

    def eval_forward(self, network, batch: dict, outputs=None):
        return outputs if outputs is not None else self.forward(network, batch, training=False)

    def metrics(self, meta: dict) -> dict:
        from rafale.data.preference_callbacks import PairMean

        return {"RewardAccuracy": PairMean("accuracy"), "RewardMargin": PairMean("margins"),
                "ChosenReward": PairMean("chosen_rewards"), "RejectedReward": PairMean("rejected_rewards"),
                "PreferenceLoss": PairMean("loss")}

    def update_metric(self, batch: dict, outputs, metric) -> None:
        metric.update(outputs, len(batch["index"]))

    def export_tokens(self, meta: dict, tokenizer, tokenizer_path) -> dict:
        eos, eos_id = meta["tokenizer"]["eos_token"], meta["tokenizer"]["eos_id"]
        return {"config": {"bos_token_id": eos_id, "eos_token_id": eos_id},
                "tokenizer_config": {"bos_token": eos, "eos_token": eos}}
