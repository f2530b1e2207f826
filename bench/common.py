"""What the benchmarks share: the machine description, worker subprocesses that answer in JSON,
interleaved repetitions, medians, peak RSS.

Every workload file is both a library (its `run(quick)` returns result rows) and a worker script
(`python bench/<workload>.py --side NAME ...` measures one side once and prints one JSON line).
"""

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
RESULT_PREFIX = "BENCH_RESULT "


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    import torch

    device = "cpu"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": device, "torch": torch.__version__, "python": platform.python_version(),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def emit(result: dict) -> None:
    """A worker's answer: one marked JSON line on stdout (anything else it prints is ignored)."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_worker(script: str, args: list[str], env: dict | None = None, timeout: float = 900) -> dict:
    """Runs `python bench/<script> ARGS` in a fresh process and returns the JSON it emitted."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.run([PYTHON, str(REPO / "bench" / script), *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"bench/{script} {' '.join(args)} exited {proc.returncode} without a result:\n"
                       f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def interleave(sides: dict, reps: int, log=print) -> dict[str, list[dict]]:
    """Calls sides[name]() for every name in turn, `reps` times (A B C A B C ...), so that a change in
    machine load hits every side alike. Returns name -> the list of results."""
    results = {name: [] for name in sides}
    for rep in range(reps):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            results[name].append(fn())
            log(f"    rep {rep + 1}/{reps} {name}: {time.perf_counter() - t0:.1f}s")
    return results


def median(values) -> float:
    return float(statistics.median(values))


def row(workload: str, metric: str, rafale: float, alternative: str, alt: float, goal: str = "",
        higher_is_better: bool = True, **extra) -> dict:
    """One line of the results table; ratio is always rafale / alternative."""
    return {"workload": workload, "metric": metric, "rafale": rafale, "alternative": alternative,
            "alt": alt, "ratio": rafale / alt if alt else float("nan"), "goal": goal,
            "higher_is_better": higher_is_better, **extra}
