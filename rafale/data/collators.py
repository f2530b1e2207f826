"""Batches for the encoder pipelines: MLM masking and classification padding (the causal pipeline's
fixed-length blocks need neither, see loaders.py).

`MLMCollator` masks as BERT does: each non-special token is picked with probability p (15%); a picked
token is replaced by [MASK] 80% of the time, by a random token 10%, and left as is 10%, and only
picked tokens have a label (-100 elsewhere). The draws for a block come from a generator seeded by
(run seed, epoch, the block's tokens): every epoch sees new masks, evaluation (an unshuffled
loader: epoch 0 always, though Composer reseeds its sampler per evaluation) the same masks every
time, a resumed run the masks an uninterrupted one would have drawn
(whatever the batch size, number of workers or processes), and DEBUG=1's one repeated batch the
same masks at every step.
"""

import copy
import hashlib

import numpy as np
import torch

from rafale.data.loaders import BlockDataset

IGNORE_INDEX = -100


class MLMCollator:
    def __init__(self, mask_id: int, vocab_size: int, special_ids: list[int], probability: float, seed: int):
        self.mask_id, self.vocab_size, self.probability, self.seed = mask_id, vocab_size, probability, seed
        self.special = np.zeros(max(vocab_size, max(special_ids, default=0) + 1), dtype=bool)
        self.special[special_ids] = True
        self.sampler = None  # set by `bind`: its epoch (Composer calls set_epoch) reseeds the masks

    def dataset(self, blocks: np.ndarray) -> BlockDataset:
        return BlockDataset(blocks)

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

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        epoch = self.sampler.epoch if getattr(self.sampler, "shuffle", False) else 0
        pairs = [self.mask(s["input_ids"].numpy(), epoch) for s in samples]
        return {"input_ids": torch.from_numpy(np.stack([p[0] for p in pairs])),
                "labels": torch.from_numpy(np.stack([p[1] for p in pairs]))}


class PaddingCollator:
    """Pads a batch of examples to its longest one: input_ids (pad id), attention_mask (0 on padding),
    token_type_ids (pairs only), labels (B,)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def dataset(self, examples):
        return examples

    def bind(self, sampler) -> "PaddingCollator":
        return self

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
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


def for_pipeline(pipeline: str, meta: dict, mlm_probability: float, seed: int):
    """The collator of a data cache entry's pipeline; None for causal_lm (plain stacking)."""
    if pipeline == "mlm":
        return MLMCollator(meta["special"]["mask"][1], meta["vocab_size"], meta["special_ids"], mlm_probability,
                           seed)
    if pipeline == "classification":
        return PaddingCollator(meta["special"]["pad"][1])
    return None
