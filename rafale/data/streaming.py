"""Training data through mosaicml-streaming: the prepared blocks written as MDS shards, and read back
with `StreamingDataset` (the optional extra `rafale[streaming]`).

    rafale prepare -c CONFIG --to-mds DIR
        DIR/train/            one MDS dataset of the training blocks (a mixture: DIR/train/<i>-<name>/ per
                              source, its own blocks undrawn, so that Streams with proportions draw them)
        DIR/val/              the validation blocks, when there are any
        DIR/rafale-meta.json  the cache entry's meta (vocabulary, eos token): training needs no corpus

    data.streaming: {remote: DIR or s3://..., local: cache dir}
        train: StreamingDataset (a mixture: one Stream per source, proportion = its weight), shuffled
               and resumed by Streaming itself; Composer saves its state_dict(samples seen this epoch)
               in every checkpoint and load_state_dict's it on resume instead of replaying batches
        val:   StreamingDataset, not shuffled

A sample is {"input_ids": LongTensor(T)} (and "documents" under packing: document), exactly what the
cache's BlockDataset / PackedBlockDataset give, so the collator and the loss are the pipeline's own.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from rafale.errors import UserError

INSTALL = "pip install 'rafale[streaming]'"
META = "rafale-meta.json"


def require():
    """The streaming package, or the one-line fix."""
    try:
        import streaming
    except ImportError as e:
        raise UserError(f"data.streaming needs the mosaicml-streaming package ({e}); {INSTALL}") from None
    return streaming


def source_split(i: int, path: str) -> str:
    """The MDS directory of mixture source i under train/: its index and file name, path-safe."""
    return f"train/{i}-{re.sub(r'[^A-Za-z0-9._-]+', '_', Path(path).name) or 'source'}"


def _columns(rows, dtype: str, T: int) -> dict[str, str]:
    from rafale.data.causal_lm import PackedBlocks

    columns = {"input_ids": f"ndarray:{dtype}:{T}"}
    if isinstance(rows, PackedBlocks):
        columns["documents"] = f"ndarray:int32:{T}"  # a token's document index in its block (< T)
    return columns


def _write(rows, out: Path, dtype: str) -> None:
    from streaming import MDSWriter

    from rafale.data.causal_lm import PackedBlocks

    T = rows.shape[1]
    with MDSWriter(out=str(out), columns=_columns(rows, dtype, T)) as writer:
        for i in range(len(rows)):
            if isinstance(rows, PackedBlocks):
                ids, documents = rows[i]
                writer.write({"input_ids": np.asarray(ids, dtype=dtype), "documents": documents.astype(np.int32)})
            else:
                writer.write({"input_ids": np.asarray(rows[i], dtype=dtype)})


def write_mds(prepared, out: Path) -> list[Path]:
    """Writes a causal_lm PreparedData (cache.py) as MDS under `out`, through a hidden sibling renamed
    into place (as the cache builds its entries). Returns the MDS directories written."""
    require()
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--to-mds {out}: exists and is not an empty directory; remove it or name a new one")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    meta, dtype = prepared.meta, prepared.meta["dtype"]
    splits = []
    if "mixture" in meta:  # each source's own blocks: the Streams' proportions do the drawing
        for i, (m, blocks) in enumerate(zip(meta["mixture"], prepared.train.arrays)):
            splits.append((source_split(i, m["path"]), blocks))
    else:
        splits.append(("train", prepared.train))
    if prepared.val is not None and len(prepared.val):
        splits.append(("val", prepared.val))
    try:
        for split, rows in splits:
            _write(rows, tmp / split, dtype)
        (tmp / META).write_text(json.dumps(meta, indent=1))
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [out / split for split, _ in splits]


def _is_local(remote: str) -> bool:
    return "://" not in remote or remote.startswith("file://")


def _local_path(remote: str) -> Path:
    return Path(remote.removeprefix("file://")).expanduser()


def default_local(remote: str) -> Path:
    from rafale.paths import rafale_home

    return rafale_home() / "streaming" / hashlib.sha256(remote.encode()).hexdigest()[:16]


def _check_remote(section) -> None:
    """A local remote must hold what --to-mds writes (cloud remotes are found out when read)."""
    remote = section.streaming.remote
    if not _is_local(remote):
        return
    root = _local_path(remote)
    want = [source_split(i, src.path) for i, src in enumerate(_sources(section))] if _sources(section) else ["train"]
    missing = [w for w in want if not (root / w / "index.json").is_file()]
    if not root.is_dir() or missing or not (root / META).is_file():
        what = "no such directory" if not root.is_dir() else f"no MDS dataset {missing[0]}/" if missing else \
            f"no {META}"
        raise UserError(f"data.streaming.remote: {remote}: {what}; write it with `rafale prepare -c CONFIG "
                        f"--to-mds {remote}`")


def _sources(section) -> list:
    """The mixture's sources (data/mixture.py), or [] for plain data.train."""
    from rafale.data import mixture

    return mixture.sources_of(section) if mixture.is_mixture(section.train) else []


class _Claim:
    """Streaming registers a dataset's local directories in shared memory, and a process killed with
    `kill -9` leaves them registered: the next StreamingDataset on the same local directory then
    refuses to start ("Reused local directory"). Local rank 0 holds a flock on the local directory for
    the life of the process (released by any exit, even kill -9); holding it proves that no live run
    uses the directory, so registrations naming it are stale and are released."""

    _held: dict[str, object] = {}

    @classmethod
    def take(cls, local: Path) -> None:
        key = str(local)
        if key in cls._held:
            return
        local.mkdir(parents=True, exist_ok=True)
        f = open(local / ".rafale-lock", "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise UserError(f"data.streaming.local: {local} is in use by another run; give this run its own "
                            f"data.streaming.local") from None
        cls._held[key] = f
        _release_registrations(local)


def _release_registrations(local: Path) -> None:
    from streaming.base.constant import LOCALS, SHM_TO_CLEAN
    from streaming.base.shared.prefix import _get_path, _unpack_locals  # no public API for one prefix
    from multiprocessing.shared_memory import SharedMemory

    released = False
    for prefix in range(1 << 16):
        try:
            shm = SharedMemory(_get_path(prefix, LOCALS), create=False)
        except FileNotFoundError:
            break
        theirs, _ = _unpack_locals(bytes(shm.buf))
        shm.close()
        if not any(Path(d) == local or local in Path(d).parents for d in theirs):
            continue
        for name in SHM_TO_CLEAN:
            try:
                SharedMemory(_get_path(prefix, name), create=False).unlink()
            except FileNotFoundError:
                pass
        released = True
    if released:
        print(f"rafale: data.streaming.local: released what a stopped run left registered on {local}",
              file=sys.stderr, flush=True)


def _dataset_class():
    from streaming import StreamingDataset

    class StreamingBlocks(StreamingDataset):
        """Samples as the cache's datasets give them (loaders.py): int64 token ids."""

        def __getitem__(self, idx):
            sample = super().__getitem__(idx)
            out = {"input_ids": torch.from_numpy(sample["input_ids"].astype(np.int64))}
            if "documents" in sample:
                out["documents"] = torch.from_numpy(sample["documents"].astype(np.int64))
            return out

    return StreamingBlocks


def prepare(section, batch_size: int, seed: int):
    """The PreparedData of data.streaming: train (and val) as StreamingDatasets of per-device
    `batch_size`, shuffled with `seed`; meta from the remote's rafale-meta.json."""
    require()
    from composer.utils import dist
    from streaming import Stream
    from streaming.base.storage.download import CloudDownloader

    from rafale.data.cache import PreparedData

    s = section.streaming
    remote = s.remote
    local = Path(s.local).expanduser() if s.local else default_local(remote)
    _check_remote(section)
    if dist.get_local_rank() == 0:
        _Claim.take(local)
        CloudDownloader.direct_download(f"{remote.rstrip('/')}/{META}", str(local / f".{META}.{os.getpid()}"))
        os.replace(local / f".{META}.{os.getpid()}", local / META)  # the remote's, fresh every launch
    dist.barrier()
    meta = json.loads((local / META).read_text())
    if meta["options"]["max_seq_len"] != section.max_seq_len:
        raise UserError(f"data.max_seq_len ({section.max_seq_len}) differs from the {meta['options']['max_seq_len']} "
                        f"tokens of the blocks in data.streaming.remote {remote}; set it to theirs or write "
                        f"the shards again")
    Blocks = _dataset_class()
    common = dict(remote=remote, local=str(local), batch_size=batch_size)
    sources = _sources(section)
    if sources:  # the config's weights: changing them needs no new shards
        total = sum(src.weight for src in sources)
        streams = [Stream(remote=remote, local=str(local), split=source_split(i, src.path), proportion=src.weight / total)
                   for i, src in enumerate(sources)]
        train = Blocks(streams=streams, batch_size=batch_size, shuffle=True, shuffle_seed=seed)
    else:
        train = Blocks(split="train", shuffle=True, shuffle_seed=seed, **common)
    val = Blocks(split="val", shuffle=False, **common) if meta["stats"]["val_blocks"] else None
    return PreparedData(path=local, train=train, val=val, meta=meta, hit=True)
