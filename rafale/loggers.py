"""The two Composer logger destinations rafale adds: `metrics.jsonl` and a rich progress display.

Composer's FileLogger writes free text and its ProgressBarLogger uses tqdm; a run directory needs a
machine-readable log (one JSON object per step, Composer's own metric names) and the console a
compact live view, so both are small LoggerDestinations here.
"""

import json
import math
import os
import sys
from pathlib import Path

from composer.core import State
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist

from rafale.runs import read_metrics


class JsonlLogger(LoggerDestination):
    """Appends `{"step": N, "<metric>": value, ...}` per step to a JSONL file (rank 0 only).

    Step N is the N-th optimizer step (1-based, like checkpoint names: ba4 holds 4 steps), and an
    eval after step N is logged with step N. Composer tags the training loss with the step count
    before the update and callbacks' metrics with the count after it, so the step is tracked here.
    On resume the lines past the restored step are dropped first: those steps are trained again,
    and the file then reads exactly like an uninterrupted run's.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.pending: dict[int, dict] = {}
        self.step = 0

    def batch_start(self, state: State, logger: Logger) -> None:
        self.step = int(state.timestamp.batch) + 1

    def eval_start(self, state: State, logger: Logger) -> None:
        self.step = int(state.timestamp.batch)

    def fit_start(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() != 0 or not self.path.exists():
            return
        resumed_at = self.step = int(state.timestamp.batch)
        # read_metrics drops a torn last line (a kill or a full disk mid-write) along with the redone steps
        kept = [record for record in read_metrics(self.path) if record["step"] <= resumed_at]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(record) + "\n" for record in kept))
        os.replace(tmp, self.path)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        record = self.pending.setdefault(self.step, {})
        for name, value in metrics.items():
            value = value.item() if hasattr(value, "item") else value
            if isinstance(value, (int, float)):
                record[name] = value

    def _flush(self) -> None:
        if dist.get_global_rank() == 0 and self.pending:
            with self.path.open("a") as f:
                for step in sorted(self.pending):
                    f.write(json.dumps({"step": step} | self.pending[step]) + "\n")
        self.pending.clear()

    def batch_end(self, state: State, logger: Logger) -> None:
        self._flush()

    def eval_end(self, state: State, logger: Logger) -> None:
        self._flush()

    def fit_end(self, state: State, logger: Logger) -> None:
        self._flush()

    def close(self, state: State, logger: Logger) -> None:
        self._flush()


class RichProgress(LoggerDestination):
    """A live bar with step, loss, lr, tokens/s and the latest validation figure (rank 0 only).

    Without a terminal (CI, pipes) it prints one plain line per eval and at the end instead.
    """

    def __init__(self, total_label: str, eval_label: str = "val", eval_metric: str = "LanguageCrossEntropy"):
        from rich.console import Console

        self.console = Console(file=sys.stdout)
        self.total_label = total_label
        self.eval_label, self.eval_metric = eval_label, f"metrics/eval/{eval_metric}"
        self.values: dict[str, float] = {}
        self.progress = None
        self.task = None
        self.finished = False
        self.eval_step = 0

    def _enabled(self) -> bool:
        return dist.get_global_rank() == 0

    def fit_start(self, state: State, logger: Logger) -> None:
        if not self._enabled() or not self.console.is_terminal:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                 console=self.console)
        total = state.max_duration.value if state.max_duration.unit.name == "BATCH" else None
        self.task = self.progress.add_task("train", total=total, info="")
        self.progress.start()

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        for name, value in metrics.items():
            value = value.item() if hasattr(value, "item") else value
            if isinstance(value, (int, float)):
                self.values[name] = float(value)

    def _info(self, step: int) -> str:
        v = self.values
        parts = []
        if "loss/train/total" in v:
            parts.append(f"loss {v['loss/train/total']:.4f}")
        if self.eval_metric in v:
            # The step of that evaluation when it is not this one (a run stopped by a signal skips its final eval).
            at = f" (step {self.eval_step})" if self.eval_step != step else ""
            parts.append(f"{self.eval_label} {v[self.eval_metric]:.4f}{at}")
        lr = next((val for k, val in v.items() if k.startswith("lr-")), None)
        if lr is not None:
            parts.append(f"lr {lr:.2e}")
        if "throughput/tokens_per_sec" in v:
            parts.append(f"{v['throughput/tokens_per_sec']:,.0f} tok/s")
        return "  ".join(parts)

    def batch_end(self, state: State, logger: Logger) -> None:
        if self.progress is not None:
            total = None
            if state.max_duration.unit.name != "BATCH" and state.dataloader_len:
                epochs = state.max_duration.value if state.max_duration.unit.name == "EPOCH" else math.nan
                total = int(epochs * int(state.dataloader_len)) if epochs == epochs else None
            self.progress.update(self.task, completed=int(state.timestamp.batch), total=total,
                                 info=self._info(int(state.timestamp.batch)))

    def _line(self, state: State, what: str) -> None:
        if self._enabled() and self.progress is None:
            step = int(state.timestamp.batch)
            self.console.print(f"{what} step {step}  {self._info(step)}", highlight=False)

    def eval_end(self, state: State, logger: Logger) -> None:
        self.eval_step = int(state.timestamp.batch)
        self._line(state, "eval")

    def fit_end(self, state: State, logger: Logger) -> None:
        self.finished = True

    def close(self, state: State, logger: Logger) -> None:
        # After the end-of-training eval, so the line shows the final validation loss; once.
        if self.finished:
            self.finished = False
            self._line(state, "done")
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
