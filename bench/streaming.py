"""Training steps/s from the local cache against MDS shards through StreamingDataset (a local directory
as the remote), the same tiny config on both sides, alternating, in one run.

    python bench/streaming.py [--steps 60] [--warmup 5] [--reps 2]

Each side is a real `rafale train` process; a callback stamps the end of every step, and steps/s counts
the steps after the warm-up (start-up and imports left out). Ratio = MDS / cache.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STAMP = '''
import os, time
from composer.core import Callback

class Stamp(Callback):
    def batch_end(self, state, logger):
        with open(os.environ["STAMPS"], "a") as f:
            f.write(f"{time.perf_counter()}\\n")
'''


def run(args: list[str], env: dict) -> None:
    result = subprocess.run([sys.executable, "-m", "rafale", *args], cwd=REPO, env={**os.environ, **env},
                            capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"rafale {' '.join(args)} failed:\n{result.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=2)
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="rafale-bench-streaming-"))
    (root / "stamp.py").write_text(STAMP)
    cfg = {"run": {"name": "bench-streaming"}, "model": {"preset": "pythia-tiny"},
           "data": {"train": "tinyshakespeare/input.txt", "tokenizer": "tinyshakespeare-bpe-4096", "max_seq_len": 128},
           "train": {"max_duration": f"{a.steps}ba", "global_batch_size": 16, "device_microbatch_size": 16,
                     "eval_interval": "100000ba", "save_interval": "100000ba",
                     "callbacks": [{"class": str(root / "stamp.py") + ":Stamp"}]},
           "monitor": {"progress": False}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    home = {"RAFALE_HOME": str(root / "home")}
    run(["prepare", "-c", str(root / "cfg.yaml"), "--to-mds", str(root / "mds")], home)
    sides = {"cache": [], "mds": [f"data.streaming.remote={root / 'mds'}"]}
    rates: dict[str, list[float]] = {side: [] for side in sides}
    for rep in range(a.reps):
        for side, extra in sides.items():
            stamps = root / f"{side}-{rep}.txt"
            run(["train", "-c", str(root / "cfg.yaml"), *extra], {**home, "FORCE": "1", "STAMPS": str(stamps)})
            t = [float(x) for x in stamps.read_text().split()]
            rates[side].append((len(t) - a.warmup) / (t[-1] - t[a.warmup - 1]))
            print(f"{side:5s} rep {rep}: {rates[side][-1]:.2f} steps/s", flush=True)
    cache, mds = statistics.median(rates["cache"]), statistics.median(rates["mds"])
    print(f"cache {cache:.2f} steps/s, mds {mds:.2f} steps/s, ratio mds/cache {mds / cache:.3f} "
          f"(pythia-tiny, 16 x 128 tokens, median of {a.reps}, load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
