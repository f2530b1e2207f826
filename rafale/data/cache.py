"""The data cache: tokenized, chunked datasets on disk, built once and memory-mapped after.

    $RAFALE_HOME/data/<pipeline>-<key[:16]>/
        train.npy   (n_train_blocks, max_seq_len) uint16/uint32
        val.npy     (n_val_blocks, max_seq_len), possibly 0 rows
        meta.json   key, options, tokenizer, sources, stats

The key is a sha256 over exactly what decides the blocks: the cache format version, the pipeline
and its options, the tokenizer.json bytes, the block size, and the bytes of every source file in
order. Paths are not in it (a moved corpus is still a hit) and neither is anything from the
training side (batch size, seed), so changing those never re-tokenizes.

A build writes into a hidden sibling `.<name>.tmp-<pid>`, fsyncs, then renames it into place, so
a directory under its final name is always complete. An entry is trusted only when its meta.json
parses and carries the key and its arrays have the shapes meta.json records. Concurrent callers
(one per rank) serialize on a flock: the first builds, the others wait and then find a hit.
"""

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from rafale.data import pipelines
from rafale.errors import UserError
from rafale.paths import data_cache_dir, resolve_tokenizer

# Bump when a change to the pipelines or to this layout would change what an entry holds.
FORMAT_VERSION = 1


@dataclasses.dataclass
class PreparedData:
    path: Path
    train: np.ndarray  # (n_blocks, max_seq_len), mmap_mode="r"
    val: np.ndarray | None  # None when there is no validation split
    meta: dict
    hit: bool  # True when the entry was already on disk


def sha256_file(path: Path) -> tuple[str, int]:
    """(hex digest, size in bytes), read in 1 MiB chunks so large corpora are not held in memory."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _describe(path: Path) -> dict:
    digest, size = sha256_file(path)
    return {"path": str(path), "bytes": size, "sha256": digest}


def prepare_causal_lm(train: str | list[str], tokenizer: str, max_seq_len: int,
                      val: str | list[str] | None = None, val_fraction: float = 0.05,
                      doc_separator: str | None = None, eos_token: str | None = None,
                      key_prefix: str = "data") -> PreparedData:
    """The causal-LM blocks for these sources (see pipelines.py), from the cache or built now."""
    if max_seq_len < 2:
        raise UserError(f"{key_prefix}.max_seq_len: must be at least 2 (a block holds the inputs and "
                        f"their next-token targets), got {max_seq_len}")
    paths = {"train": pipelines.list_sources(train, f"{key_prefix}.train"),
             "val": pipelines.list_sources(val, f"{key_prefix}.val") if val is not None else []}
    tok_path = resolve_tokenizer(tokenizer, f"{key_prefix}.tokenizer")
    tok_bytes = tok_path.read_bytes()
    sources = {split: [_describe(p) for p in ps] for split, ps in paths.items()}
    # With explicit val files, val_fraction plays no part, so it stays out of the key.
    options = {"doc_separator": doc_separator, "eos_token": eos_token, "max_seq_len": max_seq_len,
               "val_fraction": None if paths["val"] else val_fraction}
    key_fields = {"format": FORMAT_VERSION, "pipeline": pipelines.PIPELINE, "options": options,
                  "tokenizer_sha256": hashlib.sha256(tok_bytes).hexdigest(),
                  "sources": {split: [s["sha256"] for s in ss] for split, ss in sources.items()}}
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()
    final = data_cache_dir() / f"{pipelines.PIPELINE}-{key[:16]}"

    if entry := open_entry(final, key):
        return entry
    final.parent.mkdir(parents=True, exist_ok=True)
    with _locked(final.parent / f".{final.name}.lock"):
        if entry := open_entry(final, key):  # another process built it while we waited
            return entry
        # Holding the lock, no one else is building this entry: whatever is here was left by an
        # interrupted build (flock is released when its holder dies) or is damaged.
        for stale in [final, *final.parent.glob(f".{final.name}.tmp-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        t0 = time.perf_counter()
        tok = pipelines.load_tokenizer(tok_bytes.decode("utf-8"))
        eos, eos_id = pipelines.resolve_eos(tok, eos_token, tok_path, key_prefix)
        vocab_size = tok.get_vocab_size(with_added_tokens=True)  # ~10 ms per call: once
        train_blocks, val_blocks, stats = pipelines.build_causal_lm(
            paths["train"], paths["val"], tok, vocab_size, max_seq_len, val_fraction, doc_separator,
            eos_id, key_prefix)
        stats["bytes"] = sum(s["bytes"] for ss in sources.values() for s in ss)
        stats["seconds"] = round(time.perf_counter() - t0, 3)
        meta = {"format": FORMAT_VERSION, "key": key, "pipeline": pipelines.PIPELINE, "options": options,
                "tokenizer": {"path": str(tok_path), "sha256": key_fields["tokenizer_sha256"],
                              "eos_token": eos, "eos_id": eos_id},
                "vocab_size": vocab_size, "dtype": str(train_blocks.dtype),
                "sources": sources, "stats": stats}
        _write_atomically(final, {"train.npy": train_blocks, "val.npy": val_blocks}, meta)
    entry = open_entry(final, key)
    assert entry is not None, f"the cache entry just built at {final} does not open"
    return dataclasses.replace(entry, hit=False)


def open_entry(path: Path, key: str) -> PreparedData | None:
    """The entry at `path` if it is complete and built for `key`, else None."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        if not isinstance(meta, dict) or meta.get("key") != key:
            return None
        train = np.load(path / "train.npy", mmap_mode="r")
        val = np.load(path / "val.npy", mmap_mode="r")
        shapes = ((meta["stats"]["train_blocks"], meta["options"]["max_seq_len"]),
                  (meta["stats"]["val_blocks"], meta["options"]["max_seq_len"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if (train.shape, val.shape) != shapes:
        return None
    return PreparedData(path=path, train=train, val=val if len(val) else None, meta=meta, hit=True)


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
        for name, array in arrays.items():
            with open(tmp / name, "wb") as f:
                np.save(f, array)
                f.flush()
                os.fsync(f.fileno())
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
