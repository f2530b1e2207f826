"""`rafale plot`: training and validation curves of one or several runs on one figure, read from their
metrics.jsonl, drawn with matplotlib's Agg backend (no display needed) and written as a PNG.

By default: a "loss" panel with each run's training loss (faint as logged, solid smoothed) and its
validation loss (`metrics/eval/LanguageCrossEntropy`, the same quantity, as dots), then one panel per
other validation metric (perplexity, accuracy, F1, ...). `metrics` names the panels instead: any key
of metrics.jsonl, or its last part (`LanguagePerplexity`, `lr-AdamW/group0`). x is the optimizer step
or the tokens trained on. A torn last line (a run still writing, or killed mid-line) is skipped.
"""

import os
from pathlib import Path

from rafale.errors import UserError
from rafale.runs import METRICS_FILE, Run, read_metrics

TRAIN_LOSS = "loss/train/total"
VAL_LOSS = "metrics/eval/LanguageCrossEntropy"  # drawn on the loss panel: the training loss's own measure
EVAL_PREFIX = "metrics/eval/"
# The training loss is smoothed over about this share of its points (at least one point): TensorBoard's
# exponential moving average with its start-up bias removed, its weight set from the run's length so
# that 30 steps and 30,000 steps both read (0.95 for 400 points).
SMOOTHING_SHARE = 0.05
X_AXES = ("steps", "tokens")


def smooth(values: list[float]) -> list[float]:
    """Debiased exponential moving average (TensorBoard's scalar smoothing) whose window (1 / (1 - weight)
    points) is SMOOTHING_SHARE of the series."""
    weight = 1 - 1 / max(1.0, SMOOTHING_SHARE * len(values))
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i) if weight else v)
    return out


class RunCurves:
    """One run's metrics.jsonl as series: metric -> (steps, values), and steps -> tokens."""

    def __init__(self, run_dir: str | Path):
        self.run = Run.open(run_dir, where="rafale plot")
        path = self.run.path / METRICS_FILE
        records = read_metrics(path) if path.is_file() else []
        if not any(len(r) > 1 for r in records):
            raise UserError(f"rafale plot {run_dir}: no metrics logged yet ({path}); train the run for a few steps")
        self.series: dict[str, tuple[list[int], list[float]]] = {}
        for r in records:
            for key, value in r.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    steps, values = self.series.setdefault(key, ([], []))
                    steps.append(r["step"])
                    values.append(float(value))
        # time/token at step s counts the tokens of the s - 1 batches before it (Composer logs the
        # timestamp the step started from): (batches done, tokens done) pairs.
        self._tokens = sorted({(r["time/batch"], r["time/token"]) for r in records
                               if isinstance(r.get("time/batch"), int) and isinstance(r.get("time/token"), int)})

    @property
    def name(self) -> str:
        return self.run.name

    def tokens_after(self, step: int) -> float:
        """Tokens trained on after `step` optimizer steps, from the (batches, tokens) the log holds;
        past the last logged pair, at the run's average tokens per batch."""
        import numpy as np

        if not self._tokens or self._tokens[-1][0] == 0:
            raise UserError(f"rafale plot {self.run.path}: metrics.jsonl logs no token counts yet; use --x steps")
        batches, tokens = map(np.asarray, zip(*self._tokens))
        if step <= batches[-1]:
            return float(np.interp(step, batches, tokens))
        return float(tokens[-1] + (step - batches[-1]) * tokens[-1] / batches[-1])

    def xs(self, steps: list[int], x: str) -> list[float]:
        return [float(s) for s in steps] if x == "steps" else [self.tokens_after(s) for s in steps]


def resolve_metric(name: str, runs: list[RunCurves]) -> str:
    """A full metrics.jsonl key; else the one key (across the runs) whose last part is `name`; else the
    one that contains it, ignoring case (`perplexity`)."""
    keys = sorted({k for r in runs for k in r.series})
    if name in keys:
        return name
    for matches in ([k for k in keys if k.rsplit("/", 1)[-1] == name], [k for k in keys if name.lower() in k.lower()]):
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise UserError(f"--metric {name}: several metrics match ({', '.join(matches[:6])}"
                            f"{', ...' if len(matches) > 6 else ''}); give the full name")
    # Per-parameter gradient norms and time counters would drown the list.
    shown = [k for k in keys if not k.startswith(("time/", "l2_norm/grad/model."))]
    raise UserError(f"--metric {name}: no such metric in metrics.jsonl; logged: {', '.join(shown)}")


def default_panels(runs: list[RunCurves]) -> list[str]:
    evals = sorted({k for r in runs for k in r.series if k.startswith(EVAL_PREFIX) and k != VAL_LOSS})
    return [TRAIN_LOSS, *evals]


def plot_runs(run_dirs: list[str], metrics: list[str] | None = None, x: str = "steps"):
    """A matplotlib Figure (Agg canvas) with one panel per metric and one colour per run."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ModuleNotFoundError:
        raise UserError("rafale plot needs matplotlib: pip install 'rafale[plot]'") from None
    if x not in X_AXES:
        raise UserError(f"--x {x}: choose steps or tokens")
    runs = [RunCurves(d) for d in run_dirs]
    panels = [resolve_metric(m, runs) for m in metrics] if metrics else default_panels(runs)
    fig = Figure(figsize=(6.4 * len(panels), 4.8), layout="constrained")
    FigureCanvasAgg(fig)  # the figure draws to memory: no display, no pyplot state
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, metric in zip(axes, panels):
        for run, colour in zip(runs, colours):
            _draw(ax, run, metric, x, colour)
            if metric == TRAIN_LOSS and VAL_LOSS in run.series:
                _draw(ax, run, VAL_LOSS, x, colour, label=f"{run.name} validation")
        ax.set_title("loss" if metric == TRAIN_LOSS else metric.removeprefix(EVAL_PREFIX))
        ax.set_xlabel("step" if x == "steps" else "tokens")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    return fig


def _draw(ax, run: RunCurves, metric: str, x: str, colour: str, label: str | None = None) -> None:
    if metric not in run.series:
        return  # this run did not log it (another pipeline, or no eval yet)
    steps, values = run.series[metric]
    xs = run.xs(steps, x)
    if metric.startswith(EVAL_PREFIX):  # one point per evaluation
        ax.plot(xs, values, color=colour, marker="o", linestyle="--", label=label or run.name)
    elif metric.startswith("loss/"):  # every step, noisy: faint as logged, smoothed on top
        ax.plot(xs, values, color=colour, alpha=0.25, linewidth=0.8)
        ax.plot(xs, smooth(values), color=colour, label=label or f"{run.name} (smoothed)")
    else:  # learning rate, throughput, gradient norm: as logged
        ax.plot(xs, values, color=colour, label=label or run.name)


def save_png(fig, out: str | Path) -> Path:
    """Writes the figure as a PNG, atomically (a temporary file renamed into place)."""
    out = Path(out).expanduser()
    if not out.parent.is_dir():
        raise UserError(f"-o {out}: no directory {out.parent}; create it first")
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, out)
    return out
