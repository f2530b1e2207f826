"""What the decoder families (gpt_neox.py, llama.py) share: a table-driven config.json in and out.

Each decoder family describes, per transformers model_type it reads, literal tables: the HF class,
the DecoderConfig field -> config.json attribute map, the DecoderConfig switches the architecture
fixes, the values transformers' config class assumes for keys a config.json omits, and the settings
rafale implements one value of. This module is the code that reads those tables.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from rafale.models.configs import DecoderConfig
from rafale.models.family import Family, ModelError, template

if TYPE_CHECKING:  # the family's tables load without torch; the network (models/decoder.py) needs it
    import torch

    from rafale.models.decoder import Decoder

# config.json's torch_dtype of the dtypes rafale exports, by torch's name for them (torch.float32, ...).
DTYPE_NAMES = {"torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}


class DecoderFamily(Family):
    tasks = ("causal_lm",)
    resizable_on_import = ("max_seq_len",)  # rotary positions: a shorter context loads the same weights
    # model_type -> dict(hf_class, config, switches, defaults, fixed)
    architectures: dict[str, dict]
    names: dict[str, str]  # HF template -> rafale template, for the tensors stored one to one

    @property
    def model_types(self) -> tuple[str, ...]:
        return tuple(self.architectures)

    def hf_classes(self, model_type: str) -> tuple[str, ...]:
        return (self.architectures[model_type]["hf_class"],)

    def make_config(self, fields: dict) -> DecoderConfig:
        # A deep copy: rope_scaling is a dict that must not be shared with (and mutated through) a config.
        return DecoderConfig(**copy.deepcopy(fields))

    def build(self, cfg: DecoderConfig, task: str, num_labels: int | None = None) -> Decoder:
        from rafale.models.decoder import Decoder

        return Decoder(cfg)

    def export_type(self, cfg: DecoderConfig) -> str:
        """The model_type a model of this family is exported as (a ModelError if none fits)."""
        raise NotImplementedError

    def check_switches(self, cfg: DecoderConfig, model_type: str, want: dict) -> None:
        wrong = [f"{k}={v!r} (it has {getattr(cfg, k)!r})" for k, v in want.items() if getattr(cfg, k) != v]
        if wrong:
            raise ModelError(f"this model has no transformers architecture: as {model_type} "
                             f"({self.architectures[model_type]['hf_class']}) it would need {', '.join(wrong)}")

    def config_from_hf(self, hf: dict) -> DecoderConfig:
        model_type = self.hf_architecture(hf)
        arch = self.architectures[model_type]
        problems = [f"{key}={hf[key]!r} (rafale implements {want!r})"
                    for key, want in arch["fixed"].items() if hf.get(key, want) != want]
        values = {}
        for ours, key in arch["config"].items():
            value = hf.get(key)
            if value is None:
                if key not in arch["defaults"]:
                    problems.append(f"{key} is missing")
                    continue
                value = arch["defaults"][key]
            values[ours] = value
        if problems:
            raise ModelError(f"config.json ({model_type}) has settings rafale cannot reproduce: "
                             f"{', '.join(problems)}")
        head_dim = hf.get("head_dim")
        if head_dim is not None and head_dim * values["n_heads"] != values["d_model"]:
            raise ModelError(f"config.json has head_dim {head_dim}, but rafale needs hidden_size / "
                             f"num_attention_heads ({values['d_model']} / {values['n_heads']})")
        scaling = values.get("rope_scaling")
        if scaling is not None:
            scaling = dict(scaling)
            scaling.setdefault("rope_type", scaling.pop("type", None))  # older configs say "type"
            values["rope_scaling"] = None if scaling["rope_type"] == "default" else scaling
        values["max_seq_len"] = min(values["max_seq_len"], self.attention_window(model_type, hf))
        try:
            return DecoderConfig(**values, **arch["switches"])
        except ModelError as e:
            raise ModelError(f"config.json: {e}") from None

    def attention_window(self, model_type: str, hf: dict) -> float:
        """The longest context whose attention is plain causal attention (sliding windows: see llama.py)."""
        return float("inf")

    def hf_config(self, cfg: DecoderConfig, task: str, dtype: torch.dtype, bos_token_id: int | None = None,
                  eos_token_id: int | None = None, labels: list[str] | None = None) -> dict:
        """config.json for this model, loadable by transformers' AutoModelForCausalLM."""
        model_type = self.export_type(cfg)
        arch = self.architectures[model_type]
        out = {"architectures": [arch["hf_class"]], "model_type": model_type}
        out.update({key: getattr(cfg, ours) for ours, key in arch["config"].items()})
        out.update(arch["fixed"])
        out.update(bos_token_id=bos_token_id, eos_token_id=eos_token_id, torch_dtype=DTYPE_NAMES[str(dtype)])
        return out

    def hf_names(self, cfg: DecoderConfig, task: str, name: str) -> list[str]:
        tmpl, layer = template(name)
        return [self._inverse[tmpl].format(layer)]

    @property
    def _inverse(self) -> dict[str, str]:
        return {v: k for k, v in self.names.items()}
