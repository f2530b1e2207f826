"""Workarounds for bugs in the pinned libraries (mosaicml 0.32.1, torch 2.7.0), in one place.

Each is applied once, when training starts (rafale.train), and says what breaks without it and when
it can go (when the pin moves past the fix). Nothing else (generate, eval, export) runs with them. The others live beside the code they serve: the WandB logger's
checkpoint lookup and the FileLogger's per-launch file name (rafale/monitoring.py), and the HSDP
mesh degree (rafale/train.py).
"""

import os

from composer.utils import dist


def _per_node_signal_file_name(original):
    """Composer 0.32 broadcasts rank 0's name for its per-node signal files ("._signal_file_node0_x"),
    so nodes sharing a filesystem (NFS, Lustre, or two launchers on one machine) create and delete
    the same file and crash on autoresume. Suffixing this node's rank keeps each node to its own file."""

    def name(*args, **kwargs) -> str:
        return f"{original(*args, **kwargs)}_on{dist.get_node_rank()}"

    name.rafale_patched = True
    return name


def _quiet_debug_log(original):
    """Composer 0.32's Engine formats a timestamp string for every event and every callback it runs
    (~200 times a step) and then logs it only if ENGINE_DEBUG is set: 6% of a training step at a
    tiny shape (4 layers, d_model 128, 12 x 64 tokens; bench/tiny_train.py). Same log, formatted only
    when it is printed."""

    def _debug_log(self, event, msg: str) -> None:
        if os.environ.get("ENGINE_DEBUG"):
            original(self, event, msg)

    _debug_log.rafale_patched = True
    return _debug_log


def _event_kind_sets() -> None:
    """Composer 0.32's Event.is_before_event / is_after_event search a tuple of events with a
    Python-level __eq__ (two per event run, ~45,000 comparisons in 40 steps); the same answer from a
    set of the events' values."""
    from composer.core import event as events

    before = frozenset(e.value for e in events._BEFORE_EVENTS)
    after = frozenset(e.value for e in events._AFTER_EVENTS)
    events.Event.is_before_event = property(lambda self: self.value in before)
    events.Event.is_after_event = property(lambda self: self.value in after)


def _cpu_model_from_proc(original):
    """Composer 0.32's Trainer asks py-cpuinfo for the CPU's name (for the environment it records in
    every checkpoint), and py-cpuinfo finds it by running a Python subprocess: ~1 s of every launch
    before the first step. Linux's /proc/cpuinfo has the same brand string; elsewhere, the original."""

    def get_cpu_model() -> str:
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return original()

    get_cpu_model.rafale_patched = True
    return get_cpu_model


def apply() -> None:
    if not getattr(dist.get_node_signal_file_name, "rafale_patched", False):
        dist.get_node_signal_file_name = _per_node_signal_file_name(dist.get_node_signal_file_name)
    from composer.core.engine import Engine

    from composer.utils import collect_env

    if not getattr(collect_env.get_cpu_model, "rafale_patched", False):
        collect_env.get_cpu_model = _cpu_model_from_proc(collect_env.get_cpu_model)
    if not getattr(Engine._debug_log, "rafale_patched", False):
        Engine._debug_log = _quiet_debug_log(Engine._debug_log)
        _event_kind_sets()
