"""Torch side of the data: a Dataset over cached blocks and the DataLoader Composer trains on."""

import numpy as np
import torch
from composer.core import DataSpec
from composer.utils import dist
from torch.utils.data import DataLoader, Dataset, IterableDataset


class BlockDataset(Dataset):
    """Row i of a (n_blocks, T) array (usually a read-only memmap) as {"input_ids": LongTensor(T)}.

    The model shifts input_ids for its next-token targets, so no labels are stored.
    """

    def __init__(self, blocks: np.ndarray):
        assert blocks.ndim == 2, f"expected (n_blocks, seq_len), got shape {blocks.shape}"
        self.blocks = blocks
        self.max_seq_len = blocks.shape[1]

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        # astype copies the row out of the read-only memmap (torch refuses non-writable arrays).
        return {"input_ids": torch.from_numpy(self.blocks[i].astype(np.int64))}


class PackedBlockDataset(Dataset):
    """Row i of a PackedBlocks (data/causal_lm.py) as {"input_ids": LongTensor(T), "documents": LongTensor(T)},
    documents being each token's document index in the block."""

    def __init__(self, packed):
        self.packed = packed
        self.max_seq_len = packed.shape[1]

    def __len__(self) -> int:
        return len(self.packed)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, documents = self.packed[i]
        return {"input_ids": torch.from_numpy(ids.astype(np.int64)), "documents": torch.from_numpy(documents)}


def build_dataloader(dataset, batch_size: int, shuffle: bool, seed: int, drop_last: bool,
                     collator=None) -> DataLoader:
    """`batch_size` is per device. The sampler is Composer's DistributedSampler: each rank reads its
    own shard, and Composer calls set_epoch on it every epoch and, when a run resumes, replays
    it to the batch it stopped at, so the order depends only on the seed. `dataset` and `collator` are
    a pipeline's (data/pipeline.py); a collator with a `bind` method gets this loader's sampler."""
    sampler = dist.get_sampler(dataset, shuffle=shuffle, drop_last=drop_last, seed=seed)
    if collator is not None and hasattr(collator, "bind"):
        collator = collator.bind(sampler)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, collate_fn=collator,
                      num_workers=0, pin_memory=torch.cuda.is_available())


def pipeline_loader(pipeline, rows, meta: dict, batch_size: int, shuffle: bool, seed: int,
                    drop_last: bool) -> DataLoader:
    """A DataLoader over one split of a pipeline's prepared data. A StreamingDataset (data/streaming.py)
    partitions, shuffles and resumes itself, so it gets no sampler (and its `shuffle` and `seed` were
    given when it was made)."""
    if isinstance(rows, IterableDataset):
        return DataLoader(rows, batch_size=batch_size, drop_last=drop_last, collate_fn=pipeline.collator(meta, seed),
                          num_workers=0, pin_memory=torch.cuda.is_available())
    return build_dataloader(pipeline.dataset(rows), batch_size, shuffle, seed, drop_last,
                            collator=pipeline.collator(meta, seed))


class LossTokenSpec(DataSpec):
    """A train loader that tells Composer how many loss-bearing targets a (micro-)batch holds, from its
    pipeline's `loss_tokens`; with the Trainer's accumulate_train_batch_on_tokens, a step's loss is the
    mean over the step's loss-bearing targets, whatever the micro-batch size. "total" tokens (Composer's
    token count, `tok` durations, tokens/s) stay Composer's default count."""

    def __init__(self, dataloader, pipeline):
        super().__init__(dataloader)
        self.pipeline = pipeline

    def get_num_tokens_in_batch(self, batch, token_type: str = "total") -> int:
        if token_type == "loss_generating":
            n = self.pipeline.loss_tokens(batch)
            return self.get_num_samples_in_batch(batch) if n is None else n
        return super().get_num_tokens_in_batch(batch, token_type)
