"""Workarounds for bugs in the pinned libraries (mosaicml 0.32.1, torch 2.7.0), in one place.

Each is applied once, when training starts (rafale.train), and says what breaks without it and when
it can go (when the pin moves past the fix). Nothing else (generate, eval, export) runs with them. The others live beside the code they serve: the WandB logger's
checkpoint lookup and the FileLogger's per-launch file name (rafale/monitoring.py), and the HSDP
mesh degree (rafale/train.py).
"""

from composer.utils import dist


def _per_node_signal_file_name(original):
    """Composer 0.32 broadcasts rank 0's name for its per-node signal files ("._signal_file_node0_x"),
    so nodes sharing a filesystem (NFS, Lustre, or two launchers on one machine) create and delete
    the same file and crash on autoresume. Suffixing this node's rank keeps each node to its own file."""

    def name(*args, **kwargs) -> str:
        return f"{original(*args, **kwargs)}_on{dist.get_node_rank()}"

    name.rafale_patched = True
    return name


def apply() -> None:
    if not getattr(dist.get_node_signal_file_name, "rafale_patched", False):
        dist.get_node_signal_file_name = _per_node_signal_file_name(dist.get_node_signal_file_name)
