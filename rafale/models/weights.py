"""Weights in and out for every family: one safetensors loader and one saver.

    checkpoint (a .safetensors file, or an HF directory: model.safetensors or shards + index)
        --open_weights--> a TensorSource (names, shapes, tensors read one at a time, memory-mapped)
        --load_weights(network, family, task, source)--> the network's parameters
    a network's weights --save_weights--> model.safetensors (sharded above max_shard_bytes)

The family says how each rafale tensor is stored (family.py: hf_names, split / join); this module
checks a checkpoint against that before copying anything and names every missing, unexpected and
mis-shaped tensor in one error. Tied tensors (one parameter under two names, as a tied head and the
embedding) are satisfied by either name: SmolLM2 saved with `safetensors.torch.save_model` keeps only
`lm_head.weight`, which transformers loads, and so does rafale. Only safetensors are read: a pickled
.bin could run code on load.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from rafale.models.family import Family, ModelError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


class TensorSource(Protocol):
    """A checkpoint's tensors by their stored names."""

    def keys(self) -> list[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def get(self, key: str) -> torch.Tensor: ...


class SafetensorsSource:
    def __init__(self, handles: dict[str, object], describe: str):
        self.handles, self.describe = handles, describe  # stored name -> open safe_open file

    def keys(self) -> list[str]:
        return list(self.handles)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.handles[key].get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        try:
            return self.handles[key].get_tensor(key)
        except SafetensorError as e:
            raise ModelError(f"{self.describe}: cannot read {key} ({e}); the file is likely corrupt: "
                             f"re-download or re-export it") from None


def weight_files(path: Path) -> list[Path]:
    """The safetensors file(s) of a checkpoint: one file, or an HF directory's single file or shards."""
    if not path.exists():
        raise ModelError(f"{path} does not exist")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ModelError(f"{path} is not a .safetensors file; rafale reads safetensors only (a pickled "
                             f"checkpoint can run code when loaded): convert it, e.g. with transformers' "
                             f"save_pretrained(..., safe_serialization=True)")
        return [path]
    if (path / SAFETENSORS_INDEX).is_file():
        try:
            weight_map = json.loads((path / SAFETENSORS_INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelError(f"{path / SAFETENSORS_INDEX} is not a valid index ({e})") from None
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelError(f"{path / SAFETENSORS_INDEX} lists shard(s) that are not there: {', '.join(missing)}")
        return files
    if (path / SAFETENSORS).is_file():
        return [path / SAFETENSORS]
    pickled = sorted(p.name for p in path.glob("*.bin"))
    hint = (f" ({', '.join(pickled)} is pickled: convert it with transformers' save_pretrained(..., "
            f"safe_serialization=True))") if pickled else ""
    raise ModelError(f"{path} has no {SAFETENSORS} or {SAFETENSORS_INDEX}{hint}")


@contextlib.contextmanager
def open_weights(path: str | Path) -> Iterator[TensorSource]:
    """The checkpoint at `path` as a TensorSource, its files open for the duration."""
    path = Path(path).expanduser()
    with contextlib.ExitStack() as stack:
        handles = {}
        for file in weight_files(path):
            try:
                f = stack.enter_context(safe_open(str(file), framework="pt"))
            except (SafetensorError, OSError) as e:
                raise ModelError(f"{file} is not a readable safetensors file, likely truncated or corrupt "
                                 f"({e}); re-download or re-export it") from None
            handles.update({k: f for k in f.keys()})
        yield SafetensorsSource(handles, str(path))


def tie_groups(network: torch.nn.Module) -> list[list[str]]:
    """The state dict's names grouped by tensor: one group per tensor, several names where tied."""
    groups: dict[int, list[str]] = {}
    for name, t in network.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(name)
    return list(groups.values())


def _listing(kind: str, names: list[str], limit: int = 8) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{kind}: {', '.join(names[:limit])}{more}"


@torch.no_grad()
def load_weights(network: torch.nn.Module, family: Family, task: str, source: TensorSource,
                 describe: str) -> list[str]:
    """Copies the source's tensors into `network` (at most one stored tensor materialised beyond the
    network). Every missing, unexpected or mis-shaped tensor is named in one ModelError before anything
    is copied. Tensors the family lets start fresh (a new head) and the source lacks keep their
    initialisation; their names are returned. A meta-device network only gets the names and shapes
    checked. `describe` names the checkpoint in messages."""
    cfg = network.cfg
    params = network.state_dict(keep_vars=True)
    groups = tie_groups(network)
    hf_names = {name: family.hf_names(cfg, task, name) for group in groups for name in group}
    expected = {}  # full HF name -> expected shape
    for name, names in hf_names.items():
        parts = family.split(cfg, task, name, torch.empty(params[name].shape, device="meta"))
        expected.update({n: tuple(p.shape) for n, p in zip(names, parts)})
    stored = {family.canonical(cfg, k): k for k in source.keys()}
    chosen = {}  # group index -> the member whose tensors the source holds
    for i, group in enumerate(groups):
        member = next((name for name in group if all(n in stored for n in hf_names[name])), None)
        if member is not None:
            chosen[i] = member
    missing = [n for i, group in enumerate(groups) if i not in chosen
               and not family.may_start_fresh(task, group[0]) for n in hf_names[group[0]] if n not in stored]
    unexpected = [key for canon, key in stored.items() if canon not in expected
                  and not family.ignored(cfg, task, canon)]
    shapes = {n: (source.shape(stored[n]), member) for member in chosen.values() for n in hf_names[member]}
    wrong = {n: member for n, (shape, member) in shapes.items() if shape != expected[n]}
    if missing or unexpected or wrong:
        listed = [f"{stored[n]} is {shapes[n][0]}, expected {expected[n]}" for n in wrong]
        parts = [_listing(kind, names) for kind, names in (("missing tensors", missing),
                 ("unexpected tensors", unexpected), ("wrong shapes", listed)) if names]
        raise ModelError(f"{describe} does not fit the model ({describe_network(family, cfg)}): {'; '.join(parts)}"
                         + family.mismatch_hint(cfg, task, list(wrong.values())))
    for member in chosen.values():
        p = params[member]
        if p.device.type != "meta":
            p.copy_(family.join(cfg, task, member, [source.get(stored[n]) for n in hf_names[member]]))
    return [group[0] for i, group in enumerate(groups) if i not in chosen]


def describe_network(family: Family, cfg) -> str:
    parts = [getattr(cfg, "family", family.name), f"d_model {cfg.d_model}", f"{cfg.n_layers} layers",
             f"{cfg.n_heads} heads"]
    if getattr(cfg, "n_kv_heads", None) is not None:
        parts.append(f"{cfg.n_kv_heads} kv heads")
    parts.append(f"vocab {cfg.vocab_size}")
    if hasattr(cfg, "n_positions"):
        parts.append(f"{cfg.n_positions} positions")
    return ", ".join(parts)


def stored_names(network: torch.nn.Module) -> list[str]:
    """The state dict's names with each tied tensor once (under its first name): what a checkpoint
    needs to hold, since transformers re-ties the others from it."""
    return [group[0] for group in tie_groups(network)]


def save_weights(weights: dict[str, torch.Tensor], family: Family, cfg, task: str, out_dir: Path,
                 max_shard_bytes: int) -> list[str]:
    """Writes rafale-named `weights` as HF safetensors: model.safetensors, or shards of at most
    `max_shard_bytes` (a bigger tensor gets a shard of its own) plus the index transformers reads.
    Only one shard's tensors are materialised at a time. Returns the file names."""
    plan = []  # (HF name, rafale name, bytes), in state-dict order
    for name, t in weights.items():
        for hf_name, part in family.to_hf(cfg, task, name, torch.empty(t.shape, dtype=t.dtype, device="meta")).items():
            plan.append((hf_name, name, part.numel() * part.element_size()))
    shards, size = [[]], 0
    for entry in plan:
        if shards[-1] and size + entry[2] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry[2]
    names = ([SAFETENSORS] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for file, shard in zip(names, shards):
        tensors = {}
        for hf_name, name, _ in shard:
            tensors[hf_name] = family.to_hf(cfg, task, name, weights[name])[hf_name].contiguous()
        # transformers refuses safetensors files without this metadata.
        save_file(tensors, str(out_dir / file), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(e[2] for e in plan)},
                 "weight_map": {hf_name: file for file, shard in zip(names, shards) for hf_name, _, _ in shard}}
        (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
    return names
