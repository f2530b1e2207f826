"""Which signals mean "preempted", the exit code that says so, and the shield that keeps them from
killing a `rafale train` process outside training. No heavy imports: the CLI raises the shield
before it imports torch."""

import signal

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "temporary failure, try again"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_noted = False


def _note(signum, frame) -> None:
    global _noted
    _noted = True


def shield() -> None:
    """For the whole life of a `rafale train` process: SIGTERM / SIGUSR1 outside training (start-up,
    the final checkpoint, exit) are noted instead of killing the process with exit code 143, which a
    job script cannot tell from a crash. Training then stops at its first step boundary if one came
    during start-up; one that comes after training changes nothing."""
    for sig in SIGNALS:
        signal.signal(sig, _note)


def ctrl_c_quits() -> None:
    """Outside training Ctrl-C raises KeyboardInterrupt (Python's default), which unwinds through the
    cache build's cleanup: importing Composer replaced it with a handler that calls sys.exit(130)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def noted_outside_training() -> bool:
    return _noted
