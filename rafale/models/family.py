"""What a model family is: the one adapter through which rafale knows an architecture.

A family (gpt_neox.py, llama.py, bert.py) holds everything about its architecture that is not the
network itself: its presets (named shapes), its transformers config.json in and out, and its
weight-name map with any fuse / split, per task head. The network modules (decoder.py, encoder.py)
know tensors only; weights.py reads and writes every family's safetensors through the methods below,
in the shape of torchtitan's ModelSpec + state_dict_adapter.

Errors here are plain `ModelError`s, not user messages: the code that builds a model from a config
(rafale/build.py) knows which config key a problem belongs to and says so.
"""

from __future__ import annotations

import difflib
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the families load without torch (rafale config show)
    import torch

# Tasks a network can be built for; a pipeline names the one it trains (rafale/data/pipeline.py).
TASKS = ("causal_lm", "mlm", "classification")

_LAYER = re.compile(r"\.(\d+)\.")


class ModelError(ValueError):
    """A model setting, checkpoint or config.json rafale cannot use. `field` is the model setting at
    fault (a DecoderConfig / EncoderConfig field) when there is one."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def template(key: str) -> tuple[str, str | None]:
    """`blocks.3.attn.qkv.weight` -> (`blocks.{}.attn.qkv.weight`, "3"); keys outside layers -> (key, None)."""
    m = _LAYER.search(key)
    return (key[:m.start()] + ".{}." + key[m.end():], m.group(1)) if m else (key, None)


def rename(state_dict: dict[str, torch.Tensor], name_map: dict[str, str]) -> dict[str, torch.Tensor]:
    """Renames every key through `name_map` (source template -> target template). A key the map does
    not know raises KeyError naming it: a silently dropped tensor would leave random weights behind."""
    out = {}
    for key, tensor in state_dict.items():
        tmpl, layer = template(key)
        if tmpl not in name_map:
            raise KeyError(f"no mapping for parameter {key!r}")
        out[name_map[tmpl].format(layer)] = tensor
    return out


def inverse(name_map: dict[str, str]) -> dict[str, str]:
    """The map the other way round (rafale -> HF)."""
    return {v: k for k, v in name_map.items()}


def close_names(name: str, names) -> str:
    close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.5)
    return f"did you mean {', '.join(close)}? " if close else ""


class Family:
    """One architecture family. Subclasses fill in the data and the few methods that differ."""

    name: str  # rafale's name for it (gpt_neox, llama, bert)
    tasks: tuple[str, ...]  # what its networks can be built for
    presets: dict[str, dict]  # preset name -> config fields
    model_types: tuple[str, ...]  # the config.json model_type values it reads
    resizable_on_import: tuple[str, ...]  # sizes an imported checkpoint's config.json may have changed

    # --- shapes ---
    def make_config(self, fields: dict):
        """The network config (DecoderConfig / EncoderConfig) of these fields; ModelError if invalid."""
        raise NotImplementedError

    def build(self, cfg, task: str, num_labels: int | None = None) -> torch.nn.Module:
        """A freshly initialised network of `cfg` for `task`."""
        raise NotImplementedError

    def owns(self, cfg) -> bool:
        """Whether a network config of this kind belongs to this family (for export)."""
        raise NotImplementedError

    # --- config.json ---
    def hf_architecture(self, hf: dict) -> str | None:
        """The model_type of an HF config.json if this family reads it, else None."""
        model_type = hf.get("model_type")
        if model_type is None:  # some configs name only their class
            model_type = next((t for a in hf.get("architectures") or [] for t in self.model_types
                               if a in self.hf_classes(t)), None)
        return model_type if model_type in self.model_types else None

    def hf_classes(self, model_type: str) -> tuple[str, ...]:
        raise NotImplementedError

    def config_from_hf(self, hf: dict):
        raise NotImplementedError

    def hf_config(self, cfg, task: str, dtype: torch.dtype, bos_token_id: int | None = None,
                  eos_token_id: int | None = None, labels: list[str] | None = None) -> dict:
        raise NotImplementedError

    # --- weight names: rafale tensor <-> the HF tensor(s) it is stored as ---
    def hf_names(self, cfg, task: str, name: str) -> list[str]:
        """The full HF name(s) of a rafale tensor: several when rafale fuses them (q/k/v)."""
        raise NotImplementedError

    def split(self, cfg, task: str, name: str, tensor: torch.Tensor) -> list[torch.Tensor]:
        """A rafale tensor as its HF parts, in the order of hf_names (works on meta tensors)."""
        return [tensor]

    def join(self, cfg, task: str, name: str, parts: list[torch.Tensor]) -> torch.Tensor:
        """The inverse of split."""
        return parts[0]

    def canonical(self, cfg, hf_key: str) -> str:
        """A checkpoint's tensor name as hf_names spells it (encoders: the prefix a base model omits)."""
        return hf_key

    def ignored(self, cfg, task: str, hf_key: str) -> bool:
        """Tensors a checkpoint may hold that this task does not use (buffers, other heads)."""
        return False

    def may_start_fresh(self, task: str, name: str) -> bool:
        """Whether a rafale tensor a checkpoint lacks may keep its fresh initialisation (a new head)."""
        return False

    def mismatch_hint(self, cfg, task: str, names: list[str]) -> str:
        """A way out to add when these rafale tensors have the wrong shape in a checkpoint."""
        return ""

    def to_hf(self, cfg, task: str, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.hf_names(cfg, task, name), self.split(cfg, task, name, tensor)))
