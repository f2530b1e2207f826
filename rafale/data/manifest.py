"""Content hashes of corpus files, remembered by (path, size, mtime) so that finding a cache entry costs
one stat per file, not a read of every byte.

    $RAFALE_HOME/data/manifest.json   {"files": {absolute path: [size, mtime_ns, sha256]}}

A file whose size and mtime match its record is not read again; any other (new, moved, touched,
edited) is hashed once and recorded. The cache key is made of the hashes, never of the paths or
times, so a moved or touched-but-identical file still finds its entry and an edited one does not.
As with make and rsync, an edit that keeps both the size and the mtime (to the nanosecond) is not
seen; `touch` the file to have it hashed again.

A `datasets.save_to_disk` directory is hashed as the list of its files' (relative path, sha256).
The manifest is rewritten atomically under a lock, merged with what other processes recorded
meanwhile, and records of files that no longer exist are dropped; a damaged one is ignored (every
file is hashed again).
"""

import fcntl
import hashlib
import json
import os
from pathlib import Path

from rafale.paths import data_cache_dir

MANIFEST = "manifest.json"


def sha256_file(path: Path) -> tuple[str, int]:
    """(hex digest, size in bytes), read in 1 MiB chunks so large corpora are not held in memory."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def describe(paths: list[Path]) -> list[dict]:
    """{"path", "bytes", "sha256"} of each source (a file or a save_to_disk directory), in order."""
    manifest = data_cache_dir() / MANIFEST
    known = _read(manifest)
    learned = {}

    def digest(file: Path) -> tuple[str, int]:
        st = file.stat()
        record = known.get(str(file))
        if record is not None and record[:2] == [st.st_size, st.st_mtime_ns]:
            return record[2], st.st_size
        sha, size = sha256_file(file)
        learned[str(file)] = [st.st_size, st.st_mtime_ns, sha]
        return sha, size

    described = []
    for path in paths:
        path = Path(os.path.abspath(path))
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            parts = [(str(f.relative_to(path)), *digest(f)) for f in files]
            sha = hashlib.sha256(json.dumps([[rel, s] for rel, s, _ in parts]).encode()).hexdigest()
            described.append({"path": str(path), "bytes": sum(n for *_, n in parts), "sha256": sha})
        else:
            sha, size = digest(path)
            described.append({"path": str(path), "bytes": size, "sha256": sha})
    if learned:
        _record(manifest, learned)
    return described


def _read(manifest: Path) -> dict:
    try:
        files = json.loads(manifest.read_text())["files"]
        return files if isinstance(files, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _record(manifest: Path, learned: dict) -> None:
    manifest.parent.mkdir(parents=True, exist_ok=True)
    with open(manifest.parent / f".{MANIFEST}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        files = {p: r for p, r in _read(manifest).items() if os.path.exists(p)}
        files.update(learned)
        tmp = manifest.parent / f".{MANIFEST}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                json.dump({"files": files}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, manifest)
        finally:
            tmp.unlink(missing_ok=True)  # a full disk leaves no partial manifest behind
