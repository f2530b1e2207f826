"""A step's loss is the mean over the step's loss-bearing targets whatever the micro-batch split: one
optimizer step of Composer's Trainer (as rafale builds it) on a batch of 8 with uneven loss-bearing
counts per row (causal rows with padding, packed documents, MLM masks) gives the same loss and the same
gradients (1e-6 relative) in one micro-batch of 8 as in 8 micro-batches of 1; and that loss is the token mean of the whole
batch, not the mean of the per-row means (which the batch's uneven counts make different)."""

from pathlib import Path

import pytest
import torch
from composer.core import Callback
from composer.utils import reproducibility

from rafale import train
from rafale.build import build_data, build_model
from rafale.config import from_dict
from rafale.paths import ASSETS_DIR

STORIES = ASSETS_DIR / "tinystories" / "tinystories_train_2MiB.txt"

# Causal rows whose tail is padding (pad id 0, no loss): 0 to 45 of the 64 positions, row by row.
PADDED_PIPELINE = '''
import torch

from rafale.data.causal_lm import CausalLM
from rafale.data.loaders import BlockDataset


class Padded(BlockDataset):
    def __getitem__(self, i):
        ids = super().__getitem__(i)["input_ids"]
        n = len(ids) - (i * 13) % 46
        labels = ids.clone()
        ids[n:], labels[n:] = 0, -100
        return {"input_ids": ids, "labels": labels}


class PaddedLM(CausalLM):
    def dataset(self, rows):
        return Padded(rows)
'''


class Probe(Callback):
    """Before the optimizer steps: the gradients, and the batch's loss two ways from the same weights."""

    def after_train_batch(self, state, logger):
        self.grads = {n: p.grad.clone() for n, p in state.model.named_parameters() if p.grad is not None}
        model, batch = state.model, state.batch
        rows = [{k: v[i:i + 1] for k, v in batch.items()} for i in range(len(batch["input_ids"]))]
        with torch.no_grad():
            self.token_mean = model.loss(model(batch), batch).item()
            self.row_mean = sum(model.loss(model(r), r).item() for r in rows) / len(rows)

    def batch_end(self, state, logger):
        self.loss = state.total_loss_dict["loss/train/total"]


def one_step(data: dict, model: dict, microbatch: int) -> Probe:
    cfg = from_dict({"run": {"seed": 3}, "model": model, "data": {"val_fraction": 0, **data},
                     "optim": {"lr": 1e-3}, "schedule": {"warmup": "0ba"},
                     "train": {"max_duration": "1ba", "global_batch_size": 8, "device_microbatch_size": microbatch,
                               "clip_norm": None}})
    reproducibility.seed_all(cfg.run.seed)
    prepared = build_data(cfg)
    lm = build_model(cfg, prepared.meta)
    with torch.no_grad():  # confident logits (the init's are nearly uniform): per-token losses that differ
        for p in lm.parameters():
            if p.shape[0] > 10_000:  # the vocabulary-sized embedding and head
                p.mul_(30.0)
    for module in lm.modules():  # dropout draws would differ with the split; the loss weighting is under test
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "p_drop"):
            module.p_drop = 0.0
    probe = Probe()
    trainer = train.build_trainer(cfg, lm, prepared, run_dir=None, extra_callbacks=[probe])
    trainer.fit()
    trainer.close()
    return probe


CASES = {
    "causal-padding": ({"pipeline": "./padded.py:PaddedLM", "max_seq_len": 64}, {"preset": "pythia-micro"}),
    # Sentences as documents: several boundaries (targets without loss) per row, a different number in each.
    "causal-packed-documents": ({"packing": "document", "doc_separator": ".", "max_seq_len": 64},
                                {"preset": "pythia-micro"}),
    "mlm": ({"pipeline": "mlm", "tokenizer": "bert-base-uncased", "doc_separator": "<|endoftext|>",
             "max_seq_len": 64, "mlm_probability": 0.3}, {"preset": "bert-micro"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_micro_batch_of_8_and_8_of_1_give_the_same_loss_and_gradients(case, tmp_path, monkeypatch):
    monkeypatch.setenv("RAFALE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "padded.py").write_text(PADDED_PIPELINE)
    (tmp_path / "stories.txt").write_text(STORIES.read_text()[:12_000])
    data, model = CASES[case]
    whole, split = (one_step({"train": "stories.txt", **data}, model, mb) for mb in (8, 1))
    print(f"{case}: loss {whole.loss:.6f} vs {split.loss:.6f}; token mean {whole.token_mean:.6f}, "
          f"mean of row means {whole.row_mean:.6f}")
    # Relative tolerance 1e-6: float32 rounding is 6e-8 relative. Uneven counts make the mean of the row
    # means differ from the token mean by over 10x that, so weighting micro-batches per sample fails it.
    rel = lambda a, b: abs(a - b) / abs(b)
    assert rel(whole.row_mean, whole.token_mean) > 1e-5
    assert rel(whole.loss, whole.token_mean) < 1e-6 and rel(split.loss, whole.token_mean) < 1e-6
    assert whole.grads.keys() == split.grads.keys() and len(whole.grads) > 0
    scale = max(g.abs().max().item() for g in whole.grads.values())
    worst = max((whole.grads[n] - split.grads[n]).abs().max().item() for n in whole.grads)
    print(f"{case}: max |grad difference| {worst:.2e} for max |grad| {scale:.2e}")
    assert worst < 1e-6 * scale
