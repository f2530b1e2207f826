"""The torch / Composer side of the preference pipeline (data/preference.py), kept apart so that reading
its config section imports neither: the DPO reference pass for full fine-tuning, the per-step reward
statistics, and the eval metric that averages them over pairs."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from torch.utils.data import DataLoader
from torchmetrics import Metric

from rafale.data.preference import REFERENCE_FILE, STATS


class ReferencePass(Callback):
    """DPO without LoRA: before the first step, the reference summed log-probs of every pair (train and
    val) from the model as it starts, one forward pass each under no_grad, kept as an (n_pairs, 2) tensor
    instead of a frozen copy of the model. Saved in the run directory (atomically), so a resumed run
    reads them back rather than recomputing them from trained weights."""

    def __init__(self, pipeline, run_dir: Path | None):
        self.pipeline, self.run_dir = pipeline, run_dir

    def fit_start(self, state: State, logger: Logger) -> None:
        network = _task_model(state).model
        if not self.pipeline.needs_reference_pass(network):
            return
        file = self.run_dir / REFERENCE_FILE if self.run_dir is not None else None
        if file is not None and file.is_file():
            self.pipeline.reference = torch.load(file, map_location="cpu")
            return
        if int(state.timestamp.batch) > 0:
            raise RuntimeError(f"{file} is missing in a run that already trained; the reference log-probs "
                               f"cannot be recomputed from trained weights: train again with FORCE=1")
        datasets = [state.train_dataloader.dataset] + [e.dataloader.dataloader.dataset for e in state.evaluators]
        reference = torch.zeros(max(d.base + len(d) for d in datasets), 2)
        collate = state.train_dataloader.collate_fn
        was_training = state.model.training
        state.model.eval()
        with torch.no_grad():
            for dataset in datasets:
                for batch in DataLoader(dataset, batch_size=state.device_train_microbatch_size, collate_fn=collate):
                    batch = state.device.batch_to_device(batch)
                    # Through the ComposerModel's forward, so that FSDP gathers the weights as in training.
                    sums = state.model({**batch, "reference_pass": True})
                    reference[batch["index"].cpu()] = sums.float().cpu()
        state.model.train(was_training)
        self.pipeline.reference = reference
        if file is not None and dist.get_global_rank() == 0:
            tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
            torch.save(reference, tmp)
            os.replace(tmp, file)


class PreferenceStats(Callback):
    """Logs each step's mean chosen and rejected rewards, margin and accuracy over its pairs (this
    process's), as preference/train/<name>."""

    def __init__(self, pipeline):
        self.pipeline = pipeline

    def batch_start(self, state: State, logger: Logger) -> None:
        self.pipeline._step_stats = []

    def after_train_batch(self, state: State, logger: Logger) -> None:
        parts = self.pipeline._step_stats or []
        if parts:
            margins = torch.cat([p["margins"] for p in parts])
            logger.log_metrics({
                "preference/train/chosen_rewards": torch.cat([p["chosen_rewards"] for p in parts]).mean().item(),
                "preference/train/rejected_rewards": torch.cat([p["rejected_rewards"] for p in parts]).mean().item(),
                "preference/train/margins": margins.mean().item(),
                "preference/train/accuracy": (margins > 0).float().mean().item()})
        self.pipeline._step_stats = None


class PairMean(Metric):
    """The mean of one of dpo_loss / simpo_loss's outputs over every evaluated pair."""

    def __init__(self, key: str):
        super().__init__()
        assert key in (*STATS, "loss"), key
        self.key = key
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, outputs: dict, n_pairs: int) -> None:
        value = outputs[self.key].detach().double()
        self.total += value.sum() if value.ndim else value * n_pairs
        self.count += n_pairs

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp(min=1)).float()


def _task_model(state: State):
    model = state.model
    return getattr(model, "module", model)  # DDP wraps the ComposerModel
