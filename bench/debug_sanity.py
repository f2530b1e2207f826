"""DEBUG=1 on every bundled config: the loss on the one batch after each step (as a share of the first),
the loss on a batch it never saw, and the time it takes. The figures behind the `debug` defaults
(rafale/config.py DebugSection).

    python bench/debug_sanity.py                       # the defaults
    python bench/debug_sanity.py debug.lr=3e-3 debug.steps=60 debug.batch=4
    CONFIGS=llama-tinystories,bert-sst2 python bench/debug_sanity.py   # some of them
"""

import os
import sys
import tempfile
import time

import rafale.train
from rafale.cli import _quiet_libraries
from rafale.config import bundled_configs, load_config

MARKS = (2, 4, 6, 8, 10, 20, 30, 40, 60, 80)


def main(overrides: list[str]) -> None:
    _quiet_libraries()
    os.environ.setdefault("RAFALE_HOME", tempfile.mkdtemp(prefix="rafale-debug-"))
    history = rafale.train._LossHistory
    curves = []

    class Recording(history):
        def __init__(self):
            super().__init__()
            curves.append(self.losses)

    rafale.train._LossHistory = Recording
    names = os.environ.get("CONFIGS")
    for name in names.split(",") if names else bundled_configs():
        cfg = load_config(name, overrides + ["monitor.progress=false"])
        rafale.train.build_data(cfg)  # the data cache is not part of the figure
        wall, cpu = time.perf_counter(), time.process_time()
        ok = rafale.train.debug_overfit(cfg)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        losses = curves[-1]
        marks = "  ".join(f"{s}: {losses[s - 1] / losses[0]:.1%}" for s in MARKS if s <= len(losses))
        print(f"RESULT {name}: {'OK' if ok else 'FAILED'}, {wall:.1f} s wall, {cpu:.1f} s CPU; "
              f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; share of the first after {marks}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
