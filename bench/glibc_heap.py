"""A Composer callback for bench/train_memory.py: the size of glibc malloc's heap after each backward
(`memory/heap_mb`, mallinfo2's `arena`: bytes taken from the system outside mmap) and the part of it
that is free (`memory/heap_free_mb`, `fordblks`), the largest over a step's micro-batches, logged to
the run's metrics.jsonl at the step's end (which keeps one record a step). What the heap holds beyond
the live tensors is what peak RSS counts and `config show`'s `retained_mb` estimates."""

import ctypes
import ctypes.util

from composer.core import Callback, State
from composer.loggers import Logger


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


class GlibcHeap(Callback):
    def __init__(self):
        self.libc = ctypes.CDLL(ctypes.util.find_library("c"))
        self.libc.mallinfo2.restype = _MallInfo2  # glibc >= 2.33

        self.heap = self.free = 0

    def after_backward(self, state: State, logger: Logger) -> None:
        info = self.libc.mallinfo2()
        self.heap, self.free = max(self.heap, info.arena), max(self.free, info.fordblks)

    def batch_end(self, state: State, logger: Logger) -> None:
        logger.log_metrics({"memory/heap_mb": self.heap / 2**20, "memory/heap_free_mb": self.free / 2**20})
        self.heap = self.free = 0
