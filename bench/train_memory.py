"""Peak training memory: `rafale config show`'s estimate against the measured peak RSS of
`rafale train` on every bundled config (CPU, fp32), a few steps each with the config's own batch, the
evaluation at the end included. Each run is its own process (`os.wait4` gives its ru_maxrss), with
glibc_heap.py's callback reporting the largest size of malloc's heap after a backward and how much of
it was free then (the freed activation blocks malloc keeps).

    python bench/train_memory.py                  # every bundled config, 4 steps each
    python bench/train_memory.py --configs bert-sst2 --steps 2
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from rafale.runs import METRICS_FILE, read_metrics  # noqa: E402

CONFIGS = sorted(p.stem for p in (common.REPO / "rafale" / "configs").glob("*.yaml"))


def measure(config: str, steps: int) -> dict:
    """Peak RSS (MB) of `rafale train -c CONFIG` for `steps` steps in a fresh RAFALE_HOME."""
    with tempfile.TemporaryDirectory() as home:
        env = dict(os.environ, RAFALE_HOME=home, PYTHONUNBUFFERED="1")
        args = [common.PYTHON, "-m", "rafale", "train", "-c", config, f"train.max_duration={steps}ba",
                f"train.save_interval={steps}ba", f"train.eval_interval={steps}ba", "monitor.progress=false",
                "train.callbacks=[{class: ./bench/glibc_heap.py:GlibcHeap}]"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, cwd=common.REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err = proc.stderr.read().decode()
        if proc.returncode != 0:
            raise SystemExit(f"{config}: exit {proc.returncode}: {err[-2000:]}")
        heap = [r for r in read_metrics(next(Path(home, "runs").glob(f"*/{METRICS_FILE}"))) if "memory/heap_mb" in r]
        return {"config": config, "steps": steps, "peak_rss_mb": usage.ru_maxrss / 1024,
                "wall_s": time.perf_counter() - t0, "heap_mb": max(r["memory/heap_mb"] for r in heap),
                "heap_free_mb": max(r["memory/heap_free_mb"] for r in heap)}


def estimate(config: str) -> dict:
    out = subprocess.run([common.PYTHON, "-m", "rafale", "config", "show", "-c", config, "--json"], cwd=common.REPO,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["memory"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--configs", nargs="+", default=CONFIGS)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--measured", help="a JSON file of earlier measurements to compare with instead of training")
    args = p.parse_args()
    print(json.dumps(common.machine()))
    if args.measured:
        rows = [r for r in json.loads(Path(args.measured).read_text()) if r["config"] in args.configs]
    else:
        rows = [measure(c, args.steps) for c in args.configs]
    print(f"{'config':<26}{'measured MB':>12}{'estimate MB':>12}{'ratio':>7}{'heap MB':>9}{'free':>7}"
          f"{'activations':>12}")
    for r in rows:
        r["estimate"] = e = estimate(r["config"])
        est = e["peak_training_mb"]
        print(f"{r['config']:<26}{r['peak_rss_mb']:>12,.0f}{est:>12,.0f}{est / r['peak_rss_mb']:>7.2f}"
              f"{r.get('heap_mb', 0):>9,.0f}{r.get('heap_free_mb', 0):>7,.0f}{e['activations_mb']:>12,.0f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
