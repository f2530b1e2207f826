"""The data cache: tokenized datasets on disk, built once and memory-mapped after. The skeleton every
pipeline shares (causal_lm.py, mlm.py, classification.py): resolving its inputs, the key, the token
dtype, the held-out split, and the atomic build, through `prepare_entry`:

    $RAFALE_HOME/data/<pipeline>-<key[:16]>/
        <name>.npy  the pipeline's arrays, e.g. causal_lm's train.npy (n_train_blocks, max_seq_len) and
                    val.npy (n_val_blocks, max_seq_len), possibly 0 rows
        meta.json   key, options, tokenizer, sources, stats, the shape of every array, and the
                    checksum of every array file, taken while writing it

The key is a sha256 over exactly what decides the arrays: the cache format version, the pipeline
and its options, the tokenizer.json bytes and the bytes of every source file in order (their hashes
remembered by path, size and mtime in manifest.py, so a launch reads no corpus). Paths are
not in it (a moved corpus is still a hit) and neither is anything from the training side (batch
size, seed, MLM masking), so changing those never re-tokenizes.

A build writes into a hidden sibling `.<name>.tmp-<pid>`, fsyncs, then renames it into place, so
a directory under its final name is always complete. An entry is trusted only when its meta.json
parses and carries the key, and its arrays have the checksums and shapes meta.json records; a damaged
one is named and rebuilt. Concurrent callers
(one per rank) serialize on a flock: the first builds, the others wait and then find a hit.
"""

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import xxhash

from rafale.data import manifest, tokenize
from rafale.errors import UserError
from rafale.paths import data_cache_dir, resolve_tokenizer

# Bump when a change to the pipelines or to this layout would change what an entry holds.
FORMAT_VERSION = 3  # 3: checksums of the arrays in meta.json


@dataclasses.dataclass
class PreparedData:
    path: Path
    # causal_lm and mlm: (n_blocks, max_seq_len) arrays, mmap_mode="r"; classification: Examples
    # (classification.py). Both index with an int (one row) or an array of ints (a subset).
    train: np.ndarray
    val: np.ndarray | None  # None when there is no validation split
    meta: dict
    hit: bool  # True when the entry was already on disk


def token_dtype(vocab_size: int) -> type:
    # Ids go up to vocab_size - 1, so uint16 holds vocabularies of up to 65,536 tokens.
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def held_out(n: int, val_fraction: float, unit: str, key_prefix: str, fix: str) -> int:
    """How many of `n` items (blocks, rows) the last-val_fraction split holds out, at least one when the
    fraction is not 0. Taking the last ones (as nanoGPT does for Tiny Shakespeare) keeps the held-out
    text contiguous, so it overlaps the training text at a single boundary only, and needs no seed."""
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    if n <= n_val:
        raise UserError(f"{key_prefix}.train: {n:,} {unit}(s), too few for 1 training plus {n_val} validation "
                        f"{unit}(s); {fix} or set {key_prefix}.val_fraction to 0")
    return n_val


@dataclasses.dataclass
class Inputs:
    """A pipeline's sources and tokenizer, resolved: what its build reads."""
    paths: dict[str, list[Path]]  # "train" and "val" (possibly empty) files, in order
    tokenizer_path: Path
    tokenizer_json: bytes
    sources: dict[str, list[dict]]  # per split, each file's path, size and sha256
    key_prefix: str = "data"

    def tokenizer(self):
        return tokenize.load_tokenizer(self.tokenizer_json, f"{self.key_prefix}.tokenizer {self.tokenizer_path}")


def resolve_inputs(train, val, tokenizer: str, key_prefix: str) -> Inputs:
    paths = {"train": tokenize.list_sources(train, f"{key_prefix}.train"),
             "val": tokenize.list_sources(val, f"{key_prefix}.val") if val is not None else []}
    tok_path = resolve_tokenizer(tokenizer, f"{key_prefix}.tokenizer")
    sources = {split: manifest.describe(ps) for split, ps in paths.items()}  # O(files) when unchanged
    return Inputs(paths, tok_path, tok_path.read_bytes(), sources, key_prefix)


def prepare_entry(pipeline: str, train, val, tokenizer: str, max_seq_len: int, val_fraction: float,
                  options: dict, build: Callable[[Inputs], tuple[dict[str, np.ndarray], dict]],
                  key_prefix: str = "data") -> tuple[Path, dict[str, np.ndarray], dict, bool]:
    """The cache entry of one pipeline's data: (directory, arrays memory-mapped, meta, hit).

    The key is exactly what decides the arrays: the pipeline, its `options`, max_seq_len, val_fraction
    (left out with explicit val sources, where it plays no part), the tokenizer's bytes and every
    source's bytes. `build(inputs) -> (arrays, meta)` runs on a miss only; the skeleton adds to its
    meta what every entry records (options, tokenizer path and hash, sources, total bytes)."""
    inputs = resolve_inputs(train, val, tokenizer, key_prefix)
    options = {**options, "max_seq_len": max_seq_len, "val_fraction": None if inputs.paths["val"] else val_fraction}
    tok_sha = hashlib.sha256(inputs.tokenizer_json).hexdigest()

    def build_with_meta():
        arrays, meta = build(inputs)
        meta["stats"]["bytes"] = sum(s["bytes"] for ss in inputs.sources.values() for s in ss)
        meta["tokenizer"] = {"path": str(inputs.tokenizer_path), "sha256": tok_sha, **meta.get("tokenizer", {})}
        return arrays, {"options": options, **meta, "sources": inputs.sources}

    key_fields = {"options": options, "tokenizer_sha256": tok_sha,
                  "sources": {split: [s["sha256"] for s in ss] for split, ss in inputs.sources.items()}}
    return load_or_build(pipeline, key_fields, build_with_meta)


def load_or_build(pipeline: str, key_fields: dict,
                  build: Callable[[], tuple[dict[str, np.ndarray], dict]]) -> tuple[Path, dict, dict, bool]:
    """The entry of `pipeline` keyed by `key_fields` (everything that decides its arrays): found on
    disk, or made now by `build() -> (arrays by name, meta)`, which runs on a miss only, under the
    lock. Returns (entry directory, arrays memory-mapped, meta, hit)."""
    key_fields = {"format": FORMAT_VERSION, "pipeline": pipeline, **key_fields}
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()
    final = data_cache_dir() / f"{pipeline}-{key[:16]}"
    final.parent.mkdir(parents=True, exist_ok=True)
    hold_in_use(final)
    if entry := open_entry(final, key, quiet=True):
        return final, *entry, True
    with _locked(final.parent / f".{final.name}.lock"):
        if entry := open_entry(final, key):  # another process built it while we waited
            return final, *entry, True
        # Holding the lock, no one else is building this entry: whatever is here was left by an
        # interrupted build (flock is released when its holder dies) or is damaged.
        for stale in [final, *final.parent.glob(f".{final.name}.tmp-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        t0 = time.perf_counter()
        arrays, meta = build()  # `rafale cache rm` sees the held build lock: "being built"
        meta.setdefault("stats", {})["seconds"] = round(time.perf_counter() - t0, 3)
        meta = {"format": FORMAT_VERSION, "key": key, "pipeline": pipeline, **meta,
                "arrays": {name: list(a.shape) for name, a in arrays.items()}}
        _write_atomically(final, {f"{name}.npy": a for name, a in arrays.items()}, meta)
    entry = open_entry(final, key)
    assert entry is not None, f"the cache entry just built at {final} does not open"
    return final, *entry, False


def build_lock(entry: Path) -> Path:
    return entry.parent / f".{entry.name}.lock"


def use_lock(entry: Path) -> Path:
    return entry.parent / f".{entry.name}.use.lock"


_HELD: dict[Path, object] = {}  # entry -> its open use-lock file, held until this process exits


def hold_in_use(entry: Path) -> None:
    """Marks `entry` as in use by this process for as long as it lives (a shared flock, which the kernel
    drops when the process dies, even by kill -9), so `rafale cache rm` refuses it; and records now as its
    last use (the directory's mtime). Taken before the entry is opened: a removal under way finishes
    first, and the entry is then rebuilt."""
    if entry not in _HELD:
        f = open(use_lock(entry), "a")
        fcntl.flock(f, fcntl.LOCK_SH)
        _HELD[entry] = f
    try:
        os.utime(entry)
    except OSError:  # not built yet (the build's rename dates it), or a read-only cache: no record
        pass


def open_entry(path: Path, key: str, quiet: bool = False) -> tuple[dict[str, np.ndarray], dict] | None:
    """(arrays, meta) of the entry at `path` if it is complete, built for `key` and undamaged, else None.
    A damaged one (an array whose bytes no longer match the checksum taken while writing it) is named
    on stderr; the caller rebuilds it."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        if not isinstance(meta, dict) or meta.get("key") != key:
            return None
        for file, expected in meta["checksums"].items():
            if (found := checksum_file(path / file)) != expected:
                if not quiet:  # (load_or_build looks twice: once before taking the lock)
                    print(f"rafale: cache entry {path.name} is damaged ({file}: checksum {found}, written as "
                          f"{expected}); rebuilding it", file=sys.stderr, flush=True)
                return None
        arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in meta["arrays"]}
        if any(list(a.shape) != meta["arrays"][name] for name, a in arrays.items()):
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return arrays, meta


# Checksums of the arrays: xxh3-64 is ~10x faster than blake2b here (2.6 vs 0.2 GB/s on one core), and
# the point is damage, not tampering. Verified at every open: see VERIFY in the README for the cost.
CHECKSUM = "xxh3_64"


def checksum_file(path: Path) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return f"{CHECKSUM}:{h.hexdigest()}"


class _HashingWriter:
    """A file that hashes what is written through it: the checksum is taken while writing, of exactly
    the bytes written, without reading the file back."""

    def __init__(self, f):
        self.f, self.h = f, xxhash.xxh3_64()

    def write(self, data) -> int:
        self.h.update(data)
        return self.f.write(data)

    def checksum(self) -> str:
        return f"{CHECKSUM}:{self.h.hexdigest()}"


@contextmanager
def _locked(lock_path: Path):
    # The lock file is left in place: unlinking it would let a waiter lock a file nobody else sees.
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(final: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        meta = {**meta, "checksums": {}}
        for name, array in arrays.items():
            with open(tmp / name, "wb") as f:
                writer = _HashingWriter(f)
                np.save(writer, array)  # not a real file: numpy writes it in chunks through write()
                f.flush()
                os.fsync(f.fileno())
            meta["checksums"][name] = writer.checksum()
        # meta.json last: it is what makes an entry count as complete.
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Rename wins: a builder that got here first (on a filesystem where flock does not reach
            # the other process) already put a complete entry in place; ours is dropped below.
            if open_entry(final, meta["key"]) is None:
                raise
        _fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
