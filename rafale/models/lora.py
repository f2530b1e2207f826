"""LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) for the decoder's linear layers: the config,
`apply_lora` (which freezes everything else), the adapter tensors for a checkpoint, merging them back
into plain nn.Linear layers, and the adapter in PEFT's format for the HF export of the same model.

A LoRA layer computes  y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T,  A (rank, in) initialised as
PEFT does (kaiming-uniform, a = sqrt(5)), B (out, rank) zeros, so a fresh adapter changes nothing.

Names: `LoraLinear` is an nn.Linear that keeps the frozen base tensors under their own names and adds
two parameters beside them:

    blocks.{i}.attn.qkv.weight   (frozen, unchanged name)   blocks.{i}.attn.qkv.lora_A   (rank, in)
    blocks.{i}.attn.qkv.bias     (frozen, if any)           blocks.{i}.attn.qkv.lora_B   (out, rank)

so base checkpoints, the families' HF name tables (models/llama.py, gpt_neox.py) and FSDP's per-Block wrapping see the same
tensors as without LoRA, and the adapter is the state-dict entries ending in `.lora_A` / `.lora_B`
(`lora_state_dict`). (PEFT instead nests the base under `base_layer.`, which would rename every
wrapped weight.)

q, k and v are one fused Linear here (models/decoder.py), so one LoRA pair covers all three. In PEFT's
terms that is three pairs sharing A: the rows of B split into q/k/v exactly as the weight's rows do
(`split_qkv`, models/llama.py), since delta_q = B_q A. GPT-NeoX's HF query_key_value has rafale's row
layout already, and stays one pair (`peft_adapter`).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from rafale.models.configs import LoraConfig  # noqa: F401 (re-exported)
from rafale.models.decoder import Decoder

ADAPTER_SUFFIXES = (".lora_A", ".lora_B")


class LoraLinear(nn.Linear):
    """A frozen nn.Linear (the base's own weight and bias, same names) plus the trainable low-rank
    update scale * B A, applied to dropout(x)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        # On the meta device: no memory for the placeholder weight, replaced by the base's at once.
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.lora_dropout = nn.Dropout(dropout)
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **like))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, rank, **like))
        self.reset_lora_parameters()
        self.disabled = False  # True inside `adapters_disabled`: the base layer alone
        self.train(base.training)  # a new module is in training mode; dropout must follow the model's

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        # PEFT's init (LoraLayer.reset_lora_parameters): A as nn.Linear's default, B zero.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return F.linear(x, self.weight, self.bias)
        # The scale is applied to the rank-sized intermediate, the cheaper of the two places.
        low = F.linear(self.lora_dropout(x), self.lora_A) * self.scale
        return F.linear(x, self.weight, self.bias) + F.linear(low, self.lora_B)


def _lora_layers(module: nn.Module) -> list[tuple[str, LoraLinear]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, LoraLinear)]


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent), leaf, new)


def apply_lora(decoder: Decoder, cfg: LoraConfig) -> tuple[int, int]:
    """Wraps the targeted Linear layers of every block in place and freezes all other parameters.
    Returns (trainable, total) parameter counts. Load base weights before: the adapter's names are
    not in HF checkpoints."""
    linears = {name: m for name, m in decoder.blocks.named_modules(prefix="blocks") if type(m) is nn.Linear}
    targeted = cfg.targeted(list(linears))
    decoder.requires_grad_(False)
    for name in targeted:
        _replace(decoder, name, LoraLinear(linears[name], cfg.rank, cfg.alpha, cfg.dropout))
    params = list(decoder.parameters())  # tied weights once, as parameters() deduplicates
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def has_lora(module: nn.Module) -> bool:
    return any(isinstance(m, LoraLinear) for m in module.modules())


@contextlib.contextmanager
def adapters_disabled(module: nn.Module):
    """Inside, every LoRA layer of `module` computes its frozen base alone: the model before
    fine-tuning, without a second copy of it (DPO's reference model)."""
    layers = [m for _, m in _lora_layers(module)]
    for m in layers:
        m.disabled = True
    try:
        yield
    finally:
        for m in layers:
            m.disabled = False


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only (`<layer>.lora_A`, `<layer>.lora_B`), named as in module.state_dict()."""
    return {k: v for k, v in module.state_dict().items() if k.endswith(ADAPTER_SUFFIXES)}


@torch.no_grad()
def merge_lora(decoder: Decoder) -> None:
    """Folds scale * B A into each wrapped layer's weight (in fp32, cast back) and puts back a plain
    nn.Linear holding it: the same state-dict names and forward cost as before `apply_lora`.
    requires_grad stays as `apply_lora` left it (all frozen)."""
    for name, m in _lora_layers(decoder):
        m.weight += (m.scale * (m.lora_B.float() @ m.lora_A.float())).to(m.weight.dtype)
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        _replace(decoder, name, plain)


def peft_adapter(decoder: Decoder) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, adapter_model.safetensors tensors) for PEFT's
    `PeftModel.from_pretrained` on the transformers model that `rafale export` writes for this decoder
    (the family's names). Fused qkv in a Llama-family model becomes q/k/v_proj pairs sharing A (copied
    per pair: safetensors refuses tensors that share memory)."""
    layers = _lora_layers(decoder)
    assert layers, "no LoRA layers: call apply_lora first"
    settings = {(m.rank, m.alpha, m.lora_dropout.p) for _, m in layers}
    assert len(settings) == 1, f"one rank/alpha/dropout for every layer, as apply_lora makes: {settings}"
    (rank, alpha, dropout), = settings
    from rafale.models import family_of

    family = family_of(decoder.cfg)
    tensors, modules = {}, set()
    copy = dict(memory_format=torch.contiguous_format)  # clone() would keep a split's strided layout
    for name, m in layers:
        # B has the weight's rows, so the weight's mapping splits it (q/k/v) or renames it.
        for hf_weight, b in family.to_hf(decoder.cfg, "causal_lm", f"{name}.weight", m.lora_B.detach()).items():
            hf_module = hf_weight.removesuffix(".weight")
            tensors[f"base_model.model.{hf_module}.lora_A.weight"] = m.lora_A.detach().clone(**copy)
            tensors[f"base_model.model.{hf_module}.lora_B.weight"] = b.clone(**copy)
            modules.add(hf_module.rpartition(".")[2])
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "lora_dropout": dropout, "target_modules": sorted(modules), "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
              "inference_mode": True, "base_model_name_or_path": None}
    return config, tensors
