"""The data cache's entries as `rafale cache ls | rm` sees them: what each holds (pipeline, sources,
tokenizer, meta.json), its size on disk (what `du` counts: allocated blocks, the directory included),
its last use (the entry directory's mtime, which every open sets: cache.hold_in_use), and whether it
can be removed now.

An entry is refused when it is being built (its build lock is held: cache.load_or_build) or in use (a
live process holds its use lock: cache.hold_in_use). Both are flocks, so a process killed with -9
holds nothing. Removal first renames the entry to a hidden sibling, so no reader ever sees a
half-deleted entry under its name, then deletes it.
"""

import dataclasses
import fcntl
import json
import os
import re
import shutil
import time
from contextlib import ExitStack
from pathlib import Path

from rafale.data.cache import build_lock, use_lock
from rafale.errors import UserError
from rafale.paths import data_cache_dir

DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclasses.dataclass
class Entry:
    path: Path
    key: str
    pipeline: str
    sources: list[str]
    tokenizer: str
    size: int  # bytes allocated on disk, as `du -B1` counts them
    last_use: float  # seconds since the epoch
    state: str  # ready, in use, building

    @property
    def name(self) -> str:
        return self.path.name

    def as_dict(self) -> dict:
        return {"name": self.name, "key": self.key, "pipeline": self.pipeline, "sources": self.sources,
                "tokenizer": self.tokenizer, "bytes": self.size, "last_use": self.last_use, "state": self.state,
                "path": str(self.path)}


def disk_usage(path: Path) -> int:
    """Bytes allocated to `path` and everything below it (st_blocks are 512-byte units), as `du -s -B1`."""
    total = path.lstat().st_blocks * 512
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def _held(lock: Path) -> bool:
    """Whether some live process holds a flock on `lock`."""
    if not lock.exists():
        return False
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def list_entries() -> list[Entry]:
    """Every complete entry (a directory with a readable meta.json) and every entry being built, most
    recently used first."""
    found = []
    root = data_cache_dir()
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        building = re.match(r"^\.(.+-[0-9a-f]{16})\.lock$", path.name)
        if building and _held(path):  # a builder holds it from the first byte read to the rename
            name = building.group(1)
            size = sum(disk_usage(tmp) for tmp in root.glob(f".{name}.tmp-*"))
            found.append(Entry(root / name, name.rpartition("-")[2], name.rpartition("-")[0], [], "?", size,
                               path.stat().st_mtime, "building"))
        if path.name.startswith(".") or not path.is_dir():
            continue
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, ValueError):
            continue
        sources = [s["path"] for split in meta.get("sources", {}).values() for s in split]
        found.append(Entry(path, meta.get("key", ""), meta.get("pipeline", "?"), sources,
                           meta.get("tokenizer", {}).get("path", "?"), disk_usage(path), path.stat().st_mtime,
                           "in use" if _held(use_lock(path)) else "ready"))
    return sorted(found, key=lambda e: -e.last_use)


def parse_duration(text: str) -> float:
    m = DURATION.match(text.strip())
    if not m:
        raise UserError(f"--older-than {text}: expected a number and a unit, e.g. 90m, 12h, 7d or 2w")
    return float(m.group(1)) * SECONDS[m.group(2)]


def select(prefixes: list[str], older_than: str | None) -> list[Entry]:
    """The entries `rafale cache rm` names: by key or name prefix (each naming exactly one), or last used
    longer ago than `older_than`."""
    if not prefixes and older_than is None:
        raise UserError("cache rm: name entries by key prefix (see `rafale cache ls`) or give --older-than")
    entries = list_entries()
    chosen = {}
    for prefix in prefixes:
        hits = [e for e in entries if e.key.startswith(prefix) or e.name.startswith(prefix)]
        if not hits:
            raise UserError(f"cache rm: no entry's key or name starts with '{prefix}'; see `rafale cache ls`")
        if len(hits) > 1:
            raise UserError(f"cache rm: '{prefix}' names {len(hits)} entries ({', '.join(e.name for e in hits)}); "
                            f"give more of the key")
        chosen[hits[0].path] = hits[0]
    if older_than is not None:
        cutoff = time.time() - parse_duration(older_than)
        chosen.update({e.path: e for e in entries if e.last_use < cutoff})
    return list(chosen.values())


def remove(entry: Entry) -> str | None:
    """Deletes `entry`; or, when it is being built or in use, leaves it and says why."""
    if entry.state == "building":
        return f"{entry.name} is being built; let that process finish or stop it first"
    with ExitStack() as stack:
        for lock, why in ((build_lock(entry.path), "being built"), (use_lock(entry.path), "in use by a running process")):
            f = stack.enter_context(open(lock, "a"))
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return f"{entry.name} is {why}; stop that process first, or remove it later"
        doomed = entry.path.parent / f".{entry.name}.rm-{os.getpid()}"
        os.rename(entry.path, doomed)
        shutil.rmtree(doomed)
    return None
