"""Preemption and walltime: SIGTERM or SIGUSR1 -> a checkpoint at the next step boundary, exit 75.

Clusters send SIGTERM before killing a job (SLURM also SIGUSR1 via `--signal`). The handler only
sets a flag; at the end of the current step all ranks agree on it, Composer's checkpoint saver
writes a checkpoint, training stops, and the process exits with 75 (rafale/signals.py) so a job script
can requeue itself. Relaunching the same command resumes from that checkpoint.
"""

import signal

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from rafale.signals import SIGNALS, noted_outside_training


class Preemption(Callback):
    """Also Ctrl-C (SIGINT), the same way: the first one stops the run at the next step boundary with a
    checkpoint (`interrupted`, the CLI exits 130); a second one quits at once (KeyboardInterrupt),
    keeping the last checkpoint. It replaces Composer's SIGINT handler, which exits 130 mid-step."""

    def __init__(self):
        self.requested = False  # a signal arrived in this process
        self.stopping = False  # all ranks agreed to stop after this step
        self.interrupted = False  # the signal was Ctrl-C
        self._previous = {}

    def install(self) -> None:
        self.requested = self.requested or noted_outside_training()
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_interrupt)

    def _on_interrupt(self, signum, frame) -> None:
        if self.interrupted:
            print("\nrafale: Ctrl-C again: quitting at once (the last checkpoint is kept)", flush=True)
            raise KeyboardInterrupt
        self.requested = self.interrupted = True
        print("\nrafale: Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again quits at once)",
              flush=True)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        self.requested = True

    def save_interval(self, regular):
        """Composer's save_interval callable: the regular schedule, or now if we are stopping."""
        return lambda state, event: self.stopping or regular(state, event)

    def eval_interval(self, regular):
        """Composer's eval_interval callable: the regular schedule, but no evaluation once stopping
        (the end-of-training eval would delay the exit past a walltime warning, and add an eval at a
        step the uninterrupted run does not evaluate)."""
        return lambda state, event: not self.stopping and regular(state, event)

    def batch_end(self, state: State, logger: Logger) -> None:
        flag = self.requested
        if dist.get_world_size() > 1:  # one rank's signal stops every rank at the same step
            t = state.device.tensor_to_device(torch.tensor([int(flag)]))
            dist.all_reduce(t, reduce_operation="MAX")
            flag = bool(t.item())
        if flag and not self.stopping:
            self.stopping = True
            state.stop_training()
