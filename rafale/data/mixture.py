"""Exact mixtures: `data.train: [{path, weight}, ...]` (llm-foundry's Streams with proportions,
gapetron's weighted datasets) for the causal_lm and mlm pipelines.

    each source -> its own cache entry (cache.py), so changing the weights, or adding a source,
                   re-tokenizes nothing already cached
    epoch size  -> the blocks of all sources together (N)
    per source  -> exactly round(N * weight / sum of weights) blocks an epoch, rounded by largest
                   remainder so that the counts sum to N (ties go to the earlier source)
    drawing     -> a source drawn c times with n blocks repeats all of them c // n times, then takes
                   c % n of them evenly spaced (block floor(k * n / (c % n))): up-sampled when c > n,
                   down-sampled when c < n, the same blocks every epoch in a new shuffled order

The drawn blocks are a fixed index over the entries (MixedRows), a function of the counts only, so
Composer's sampler shuffles and resumes over it exactly as over one entry's blocks. Validation holds
out the last `val_fraction` of each source's blocks (or reads `data.val`), unweighted.

A source may set its own `text_field`; `pipeline`, `tokenizer` and `max_seq_len` are the section's
for all of them (blocks of one batch must be alike), so a source giving another value is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

OWN_KEYS = ("path", "weight", "text_field")
SHARED_KEYS = ("pipeline", "tokenizer", "max_seq_len")


def is_mixture(train) -> bool:
    return isinstance(train, list) and any(isinstance(item, dict) for item in train)


def problems(train, section, mixes: bool, key: str = "data.train") -> list[str]:
    """Config-time checks of a mixture (no file is read), as messages naming the key."""
    if not is_mixture(train):
        return []
    if not mixes:
        return [f"{key}: {{path, weight}} sources (a mixture) are read by the causal_lm and mlm pipelines only; "
                f"give this pipeline files or directories"]
    found = []
    for i, item in enumerate(train):
        where = f"{key}[{i}]"
        if not isinstance(item, dict):
            found.append(f"{where}: {item!r} is a plain path in a mixture; give every source as "
                         f"{{path: ..., weight: ...}}")
            continue
        unknown = sorted(set(item) - set(OWN_KEYS) - set(SHARED_KEYS))
        if unknown:
            found.append(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; a source "
                         f"takes {', '.join(OWN_KEYS)}")
        if not isinstance(item.get("path"), str) or not item.get("path"):
            found.append(f"{where}.path: missing; name the source's file or directory")
        weight = item.get("weight")
        if weight is None or isinstance(weight, bool) or not isinstance(weight, (int, float)):
            found.append(f"{where}.weight: expected a number > 0, got {weight!r}")
        elif not weight > 0 or weight != weight or weight == float("inf"):
            found.append(f"{where}.weight: must be > 0 and finite, got {weight}; remove the source to leave it out")
        if "text_field" in item and not isinstance(item["text_field"], str):
            found.append(f"{where}.text_field: expected a string, got {item['text_field']!r}")
        for shared in SHARED_KEYS:
            if shared in item and item[shared] != getattr(section, shared):
                found.append(f"{where}.{shared}: {item[shared]!r} disagrees with data.{shared} "
                             f"({getattr(section, shared)!r}); the sources of a mixture share the pipeline, "
                             f"tokenizer and max_seq_len: mix them in one pipeline, or drop the key")
    return found


def exact_counts(weights: list[float], total: int) -> list[int]:
    """`total` split in proportion to `weights` by largest remainder: sums to `total`, each count within
    1 of its exact share. Exact shares are computed as integers where weights are, so 0.5 / 0.3 / 0.2
    of 1,000 is 500 / 300 / 200 without floating-point residue."""
    from fractions import Fraction

    shares = [Fraction(w).limit_denominator(10**9) for w in weights]
    exact = [total * s / sum(shares) for s in shares]
    counts = [int(e) for e in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    return counts


def draw(n: int, count: int) -> np.ndarray:
    """`count` block indices out of `n`: every block count // n times, then count % n evenly spaced."""
    repeats, rest = divmod(count, n)
    return np.concatenate([np.tile(np.arange(n, dtype=np.int64), repeats),
                           np.arange(rest, dtype=np.int64) * n // max(rest, 1)])


class MixedRows:
    """Rows of several (n_i, T) arrays through an index of (array, row) pairs: indexes like a (N, T) array
    (an int gives one row, an array of ints a stacked copy) without copying the blocks."""

    def __init__(self, arrays: list[np.ndarray], which: np.ndarray, rows: np.ndarray):
        self.arrays, self.which, self.rows = arrays, which, rows
        self.shape = (len(rows), arrays[0].shape[1])
        self.ndim = 2
        self.dtype = arrays[0].dtype

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, (int, np.integer)):
            return self.arrays[self.which[i]][self.rows[i]]
        return np.stack([self[int(j)] for j in np.asarray(i)]) if len(np.asarray(i)) else \
            np.empty((0, self.shape[1]), self.dtype)

    @classmethod
    def concatenated(cls, arrays: list[np.ndarray]) -> "MixedRows":
        return cls(arrays, np.repeat(np.arange(len(arrays)), [len(a) for a in arrays]),
                   np.concatenate([np.arange(len(a), dtype=np.int64) for a in arrays]))


@dataclass
class Source:
    path: str
    weight: float
    text_field: str


def sources_of(section) -> list[Source]:
    return [Source(item["path"], float(item["weight"]), item.get("text_field", section.text_field))
            for item in section.train]


def prepare(section, prepare_one: Callable, key: str = "data.train"):
    """The mixture's PreparedData. `prepare_one(train, text_field, val, val_fraction)` is the pipeline's
    own prepare for plain sources (a cache entry each)."""
    from rafale.data.cache import PreparedData, data_cache_dir
    from rafale.errors import UserError

    srcs = sources_of(section)
    explicit_val = section.val is not None
    parts = []
    for i, s in enumerate(srcs):
        try:
            parts.append(prepare_one(s.path, s.text_field, None, 0.0 if explicit_val else section.val_fraction))
        except UserError as e:  # say which source of the mixture, then what the pipeline said
            raise UserError(f"{key}[{i}] ({s.path}): {e}") from None
    val_part = prepare_one(section.val, section.text_field, None, 0.0) if explicit_val else None
    metas = [p.meta for p in parts]
    for s, m in zip(srcs[1:], metas[1:]):
        if m.get("dtype") != metas[0].get("dtype") or m.get("vocab_size") != metas[0].get("vocab_size"):
            raise UserError(f"{key}: {s.path} was tokenized unlike {srcs[0].path}; clear the cache entries "
                            f"(`rafale cache rm`) and prepare again")
    available = [len(p.train) for p in parts]
    total = sum(available)
    counts = exact_counts([s.weight for s in srcs], total)
    picks = [draw(n, c) for n, c in zip(available, counts)]
    train = MixedRows([p.train for p in parts], np.repeat(np.arange(len(parts)), counts), np.concatenate(picks))
    vals = [val_part.train] if val_part is not None else [p.val for p in parts if p.val is not None]
    val = MixedRows.concatenated(vals) if vals else None
    stats = {name: sum(m["stats"][name] for m in metas) for name in ("documents", "tokens", "bytes")}
    stats.update(train_blocks=len(train), val_blocks=len(val) if val is not None else 0)
    mix = [{"path": s.path, "weight": s.weight, "entry": str(p.path), "blocks": n, "drawn": c,
            "share": c / total, "repeats": c / n} for s, p, n, c in zip(srcs, parts, available, counts)]
    meta = {**metas[0], "stats": stats, "mixture": mix}
    return PreparedData(path=data_cache_dir(), train=train, val=val, meta=meta,
                        hit=all(p.hit for p in parts) and (val_part is None or val_part.hit))


def report(meta: dict) -> str:
    """The realised shares and repeats, one line per source (what `rafale prepare` prints)."""
    mix = meta["mixture"]
    width = max(len(Path(m["path"]).name) for m in mix)
    lines = [f"mixture of {len(mix)} sources, {sum(m['drawn'] for m in mix):,} blocks an epoch:"]
    for m in mix:
        lines.append(f"  {Path(m['path']).name:<{width}}  weight {m['weight']:g}  {m['blocks']:,} blocks -> "
                     f"{m['drawn']:,} drawn ({m['share']:.1%}), x{m['repeats']:.2f}  [{Path(m['entry']).name}]")
    return "\n".join(lines)
