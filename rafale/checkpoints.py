"""Reading a Composer checkpoint back as a plain model state dict (for generate, eval, export).

Composer writes either one `.pt` file (single process, DDP) or, under FSDP, a directory of
torch.distributed.checkpoint shards. Both come back here as `{"model.<name>": tensor}`, the
ComposerModel's own state dict, without a process group.
"""

import tempfile
from pathlib import Path

import torch

from rafale.errors import UserError
from rafale.runs import damaged_checkpoint


def read_model_state(ckpt: Path) -> dict[str, torch.Tensor]:
    ckpt = Path(ckpt)
    if ckpt.is_dir():  # FSDP sharded: consolidate the shards into one file first
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            whole = Path(tmp) / "whole.pt"
            dcp_to_torch_save(str(ckpt), str(whole))
            state = torch.load(whole, map_location="cpu", weights_only=False)
    else:
        # mmap: tensors are read from disk on use, so loading does not hold a second copy in memory.
        # weights_only=False: Composer pickles its training state; this is our own run's file.
        try:
            state = torch.load(ckpt, map_location="cpu", mmap=True, weights_only=False)
        except (RuntimeError, EOFError, ValueError, OSError) as e:  # what a damaged zip or pickle raises
            raise UserError(damaged_checkpoint(ckpt, " ".join(str(e).split())[:200])) from None
    return state["state"]["model"]


def checkpoint_weights(ckpt: Path, expected: dict[str, torch.Tensor], skip: set[str] = frozenset()
                       ) -> tuple[dict[str, torch.Tensor], torch.dtype]:
    """The network's tensors from a checkpoint, by the names and shapes of `expected` (a state dict
    of the run's model, e.g. built on the meta device), minus `skip`; and their one dtype.
    A name or shape that differs means config.yaml no longer describes the checkpoint."""
    state = read_model_state(ckpt)  # memory-mapped: tensors are read as they are used
    weights, dtypes = {}, set()
    for name, meta in expected.items():
        if name in skip:
            continue
        tensor = state.get(f"model.{name}")
        if tensor is None or tensor.shape != meta.shape:
            raise UserError(f"checkpoint {Path(ckpt).name} does not match the run's config.yaml ({name}: "
                            f"{None if tensor is None else tuple(tensor.shape)} vs {tuple(meta.shape)}); "
                            f"was config.yaml edited?")
        weights[name] = tensor
        dtypes.add(tensor.dtype)
    assert len(dtypes) == 1, dtypes
    return weights, dtypes.pop()
