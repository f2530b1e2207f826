"""What a run reports and watches, from the config's `monitor` section: Composer's loggers, its
monitoring callbacks, the loss guard that stops a diverging run, and the profiler.

Everything here is Composer's own (ConsoleLogger, FileLogger, TensorboardLogger, WandBLogger,
MLFlowLogger, SpeedMonitor, LRMonitor, OptimizerMonitor, MemoryMonitor, Profiler) except two small
callbacks Composer lacks: the loss guard and the CPU memory reading.
"""

import importlib.util
import math
import os
import resource
import statistics
import sys
import time
from collections import deque
from pathlib import Path

import torch
from composer.callbacks import LRMonitor, MemoryMonitor, OptimizerMonitor, SpeedMonitor
from composer.core import Callback, State
from composer.loggers import Logger, LoggerDestination

from rafale import runs
from rafale.config import Config
from rafale.errors import UserError
from rafale.loggers import JsonlLogger, RichProgress

# logger name -> (the module it needs, the pip extra that installs it)
_LOGGER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
                    "mlflow": ("mlflow", "mlflow")}


class Diverged(Exception):
    """The training loss became NaN, infinite, or spiked for too long; the run is marked failed and
    the CLI exits 1."""


class LossGuard(Callback):
    """Stops the run at a non-finite loss, or when the loss stays above `factor` x the median of the
    previous `window` steps for `patience` steps in a row (spiking steps stay out of the window).

    It reads the loss Composer has already averaged over all processes, so every rank takes the same
    decision at the same step: none is left waiting in a collective for one that stopped. It checks
    at the end of the step, before that step's checkpoint, so a diverged state is never saved. Its
    history is checkpointed, so a resumed run judges spikes exactly as the uninterrupted one would
    (Composer's NaNMonitor raises a bare error and misses infinities; it has no spike detection).
    """

    def __init__(self, factor: float | None = None, window: int = 50, patience: int = 3):
        self.factor, self.window, self.patience = factor, window, patience
        self.history: deque[float] = deque(maxlen=window)  # the last `window` non-spiking losses
        self.spiking = 0

    def batch_end(self, state: State, logger: Logger) -> None:
        loss = (state.total_loss_dict or {}).get("loss/train/total")
        if loss is None:
            return
        step = int(state.timestamp.batch)
        if not math.isfinite(loss):
            raise Diverged(f"the training loss is {loss} at step {step}; lower optim.lr, keep train.clip_norm, "
                           f"or use fp32")
        if self.factor is None:
            return
        if len(self.history) == self.window:
            median = statistics.median(self.history)
            if loss > self.factor * median:
                self.spiking += 1
                if self.spiking >= self.patience:
                    raise Diverged(f"the training loss spiked: {loss:.4f} at step {step} is over "
                                   f"{self.factor} x the median {median:.4f} of the previous {self.window} steps "
                                   f"for {self.spiking} steps in a row; lower optim.lr, lengthen schedule.warmup, "
                                   f"or raise monitor.loss_spike_factor")
                return
        self.spiking = 0
        self.history.append(loss)

    def state_dict(self) -> dict:
        return {"history": list(self.history), "spiking": self.spiking}

    def load_state_dict(self, state: dict) -> None:
        self.history = deque(state["history"], maxlen=self.window)
        self.spiking = int(state["spiking"])


class HostMemory(Callback):
    """The process's peak resident memory (`memory/peak_rss_mb`) each step: what a CPU run has in
    place of Composer's MemoryMonitor, which reads only the CUDA allocator."""

    def batch_end(self, state: State, logger: Logger) -> None:
        scale = 1 / 2**20 if sys.platform == "darwin" else 1 / 2**10  # ru_maxrss: bytes on macOS, KiB on Linux
        logger.log_metrics({"memory/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale})


def check_logger_packages(cfg: Config) -> None:
    """The optional packages monitor.loggers needs are installed."""
    for name in cfg.monitor.loggers:
        module, extra = _LOGGER_PACKAGES.get(name, (None, None))
        if module is not None and importlib.util.find_spec(module) is None:
            raise UserError(f"monitor.loggers: {name} needs the {module} package; pip install 'rafale[{extra}]' "
                            f"or remove {name}")


def build_loggers(cfg: Config, run_dir: Path | None,
                  progress_metric: tuple[str, str] = ("val", "LanguageCrossEntropy")) -> list[LoggerDestination]:
    """The progress display (showing the pipeline's `progress_metric`: label, eval metric name),
    metrics.jsonl, and the loggers named in monitor.loggers (those that write files only with a run
    directory: DEBUG=1 runs keep to the console)."""
    m = cfg.monitor
    loggers: list[LoggerDestination] = [RichProgress(cfg.train.max_duration, *progress_metric)] if m.progress else []
    if "console" in m.loggers:
        from composer.loggers import ConsoleLogger

        loggers.append(ConsoleLogger(log_interval=m.console_interval, stream=sys.stdout))
    if run_dir is None:
        return loggers
    loggers.append(JsonlLogger(run_dir / runs.METRICS_FILE))
    check_logger_packages(cfg)
    if "file" in m.loggers:
        from composer.loggers import FileLogger

        # One file per launch: Composer 0.32's FileLogger always truncates its file (its `overwrite`
        # flag is stored as a one-element tuple), which would erase the log of the steps before a resume.
        launch = time.strftime("%Y%m%d-%H%M%S")
        loggers.append(FileLogger(filename=str(run_dir / "logs" / f"{launch}-rank{{rank}}.txt"),
                                  capture_stdout=False, capture_stderr=False, flush_interval=1))
    if "tensorboard" in m.loggers:
        from composer.loggers import TensorboardLogger

        loggers.append(TensorboardLogger(log_dir=str(run_dir / "tensorboard"), flush_interval=1))
    if "wandb" in m.loggers:
        # Offline: the run is written under run_dir/wandb; `wandb sync` uploads it later.
        loggers.append(_wandb_logger()(project=cfg.run.name, name=run_dir.name, init_kwargs={
            "mode": os.environ.get("WANDB_MODE", "offline"), "dir": str(run_dir)}))
    if "mlflow" in m.loggers:
        from composer.loggers import MLFlowLogger

        loggers.append(MLFlowLogger(experiment_name=cfg.run.name, run_name=run_dir.name,
                                    tracking_uri=(run_dir / "mlruns").resolve().as_uri(),
                                    log_system_metrics=False, resume=True, synchronous=True))
    return loggers


def _wandb_logger():
    from composer.loggers import WandBLogger

    class LocalCheckpointsWandBLogger(WandBLogger):
        """Composer's autoresume asks every logger for a remote checkpoint before its first step;
        WandBLogger answers with a RuntimeError (it is not initialised yet) where "not here" is
        expected, and the run crashes. Checkpoints live in the run directory, so: not here."""

        def download_file(self, remote_file_name: str, *args, **kwargs) -> None:
            raise FileNotFoundError(remote_file_name)

    return LocalCheckpointsWandBLogger


def build_callbacks(cfg: Config) -> list[Callback]:
    """lr, tokens/s (and MFU where Composer knows the GPU's peak), gradient norms, memory, the loss guard."""
    m = cfg.monitor
    callbacks: list[Callback] = [LRMonitor(), SpeedMonitor(window_size=10),
                                 LossGuard(m.loss_spike_factor, m.loss_spike_window, m.loss_spike_patience)]
    if m.grad_norm_interval:
        callbacks.append(OptimizerMonitor(log_optimizer_metrics=False, batch_log_interval=m.grad_norm_interval))
    if m.memory:
        callbacks.append(MemoryMonitor() if torch.cuda.is_available() else HostMemory())
    return callbacks


def build_profiler(cfg: Config, run_dir: Path | None):
    """Composer's Profiler recording monitor.profile_steps steps after two warm-up steps: Chrome
    traces (open in https://ui.perfetto.dev or chrome://tracing) in run_dir/profile."""
    steps = cfg.monitor.profile_steps
    if not steps or run_dir is None:
        return None
    from composer.profiler import JSONTraceHandler, Profiler, cyclic_schedule

    folder = str(run_dir / "profile")
    return Profiler(schedule=cyclic_schedule(skip_first=1, wait=0, warmup=1, active=steps, repeat=1),
                    trace_handlers=[JSONTraceHandler(folder=folder, overwrite=True)],
                    sys_prof_cpu=False, torch_prof_folder=folder, torch_prof_overwrite=True,
                    torch_prof_remote_file_name=None, torch_prof_memory_remote_file_name=None)
