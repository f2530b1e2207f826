"""What fault safety costs in data preparation, each side in a fresh process:

  one document   `prepare_causal_lm` on ONE large text file (default 200 MB: Tiny Shakespeare repeated)
                 against the same text as files of ~1 MB each: peak RSS and MB/s. Tokenising streams
                 a document in bounded pieces, so the two peaks should match (ratio ~1).
  verify         opening a 1 GB cache entry (a (n, 256) uint16 train.npy) with its xxh3 checksums
                 verified, against opening it with the shape check alone: the seconds verification adds
                 at every launch (page cache warm: the entry was just written).

    python bench/data_faults.py [--mb 200] [--verify-gb 1]    (--mb 0: the verify side only)
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TEXT = common.REPO / "rafale" / "assets" / "tinyshakespeare" / "input.txt"
TOKENIZER = common.REPO / "rafale" / "assets" / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"


def _write_corpus(root: Path, mb: int, files: int) -> list[str]:
    text = TEXT.read_text()
    reps = max(1, round(mb * 1e6 / len(text.encode())))
    per_file = max(1, reps // files)
    paths = []
    for i in range(files):
        path = root / f"part{i:04d}.txt"
        path.write_text("\n".join([text] * (per_file if i < files - 1 else reps - per_file * (files - 1))))
        paths.append(str(path))
    return paths


def prepare_side(paths: list[str], home: str) -> dict:
    os.environ["RAFALE_HOME"] = home
    from rafale.data.causal_lm import prepare_causal_lm

    t0 = time.perf_counter()
    data = prepare_causal_lm(train=paths, tokenizer=str(TOKENIZER), max_seq_len=256)
    seconds = time.perf_counter() - t0
    mb = sum(Path(p).stat().st_size for p in paths) / 1e6
    return {"seconds": seconds, "mb_per_s": mb / seconds, "mb": mb, "tokens": data.meta["stats"]["tokens"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def verify_side(gb: float, home: str) -> dict:
    import numpy as np

    os.environ["RAFALE_HOME"] = home
    from rafale.data import cache

    n = int(gb * 1e9) // (256 * 2)
    arrays = {"train": np.random.default_rng(0).integers(0, 50_000, (n, 256), dtype=np.uint16)}
    path, _, meta, _ = cache.load_or_build("bench", {"n": n}, lambda: (arrays, {}))
    del arrays
    timings = {"verified": [], "shape_only": []}
    for _ in range(3):
        t0 = time.perf_counter()
        assert cache.open_entry(path, meta["key"]) is not None
        timings["verified"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        entry = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in meta["arrays"]}
        assert list(entry["train"].shape) == meta["arrays"]["train"]
        timings["shape_only"].append(time.perf_counter() - t0)
    return {"gb": (path / "train.npy").stat().st_size / 1e9,
            **{k: sorted(v)[1] for k, v in timings.items()}}


def _fresh(side: str, *args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--side", side, *args], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(common.REPO)})
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=int, default=200)
    p.add_argument("--verify-gb", type=float, default=1.0)
    p.add_argument("--side")
    p.add_argument("args", nargs="*")
    a = p.parse_args()
    if a.side == "prepare":
        print(json.dumps(prepare_side(a.args[1:], a.args[0])))
        return
    if a.side == "verify":
        print(json.dumps(verify_side(a.verify_gb, a.args[0])))
        return
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "one").mkdir()
        (root / "many").mkdir()
        one = _write_corpus(root / "one", a.mb, 1) if a.mb else []
        many = _write_corpus(root / "many", a.mb, max(1, a.mb)) if a.mb else []
        single = _fresh("prepare", str(root / "h1"), *one) if a.mb else None
        split = _fresh("prepare", str(root / "h2"), *many) if a.mb else None
        print() if not a.mb else print(f"one {single['mb']:.0f} MB document: {single['peak_rss_mb']:,.0f} MB peak RSS, "
              f"{single['mb_per_s']:.2f} MB/s; as {len(many)} files: {split['peak_rss_mb']:,.0f} MB, "
              f"{split['mb_per_s']:.2f} MB/s; peak ratio {single['peak_rss_mb'] / split['peak_rss_mb']:.2f}")
        v = _fresh("verify", "--verify-gb", str(a.verify_gb), str(root / "h3"))
        print(f"open a {v['gb']:.2f} GB cache entry: {v['verified']:.2f} s with checksums verified, "
              f"{v['shape_only']:.3f} s with the shape check only (+{v['verified'] - v['shape_only']:.2f} s, "
              f"{v['gb'] / v['verified']:.2f} GB/s)")


if __name__ == "__main__":
    main()
