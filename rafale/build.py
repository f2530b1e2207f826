"""Builders from a config: the pipeline and its data, the network and its ComposerModel, the optimizer,
the schedule, the user's callbacks. One function per object, no Trainer: rafale/train.py calls these
and then makes the one `Trainer(...)`; generate, eval and export call the ones they need.

This is also where model problems become user messages: rafale/models/ raises plain `ModelError`s,
and `network_for` names the config key each one belongs to (model.preset, model.init_from, model.n_heads).

Module level imports no torch: `network_config` resolves the network config a model section builds
from the families' tables alone, which is all `rafale config show` needs.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from typing import TYPE_CHECKING

from rafale import components
from rafale.components import Component
from rafale.config import Config, vocab_follows_tokenizer
from rafale.data.pipeline import Pipeline, pipeline_class
from rafale.errors import UserError
from rafale.models import ModelError, family_for_hf, preset, preset_names
from rafale.paths import resolve_model_file

if TYPE_CHECKING:
    import torch

# The size keys of the model section that override a preset's.
SIZE_KEYS = ("n_layers", "n_heads", "d_model", "d_ff", "max_seq_len", "vocab_size")

# A decoder trained from scratch gets the tokenizer's size rounded up to this: matmul-friendly rows
# (as nanoGPT's 50304 for GPT-2's 50257); the padding rows are never targets and never generated.
VOCAB_MULTIPLE = 64


def padded_vocab(n_tokens: int) -> int:
    return -(-n_tokens // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def pipeline_of(cfg: Config) -> Pipeline:
    return pipeline_class(cfg.data.pipeline)(cfg.data, cfg.train)


def build_data(cfg: Config):
    """The prepared data: the pipeline's cache entry, or with data.streaming the MDS shards it was
    written to (data/streaming.py)."""
    if getattr(cfg.data, "streaming", None) is not None:
        from composer.utils import dist

        from rafale.data import streaming

        return streaming.prepare(cfg.data, cfg.train.global_batch_size // dist.get_world_size(), cfg.run.seed)
    return pipeline_of(cfg).prepare()


# ---- the network ----

def _read_hf_config(hf_dir: Path, where: str) -> dict:
    import json

    path = hf_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{where}: {hf_dir} has no config.json; point it at an HF model directory "
                        f"(config.json + model.safetensors), or at a .safetensors file and set model.preset")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{where}: {path} is not valid JSON ({e}); fix or re-download it") from None


def _preset_config(task: str, name: str | None, overrides: dict, where: str):
    if name is None:
        kind = "a preset" if task == "causal_lm" else "an encoder preset"
        raise UserError(f"model.preset: none set; name {kind}, or set {where} to an HF model directory "
                        f"(its config.json gives the shape)")
    try:
        family, fields = preset(name)
    except ModelError as e:
        raise UserError(f"model.preset: {e}") from None
    if task not in family.tasks:
        if task == "causal_lm":
            raise UserError(f"model.preset: {name} is an encoder; train it with data.pipeline mlm or "
                            f"classification, or pick a decoder preset for causal_lm")
        raise UserError(f"model.preset: {name!r} is not an encoder preset; the mlm and classification pipelines "
                        f"take one of: {', '.join(preset_names(task))}")
    settable = [f.name for f in dataclasses.fields(family.make_config(fields)) if f.init]
    for key in overrides:
        if key not in settable:
            raise UserError(f"model.{key}: not a model setting; valid ones: {', '.join(settable)}")
    try:
        return family, family.make_config({**fields, **overrides})
    except ModelError as e:
        key = f"model.{e.field}" if e.field in overrides else f"model.preset {name!r}"
        raise UserError(f"{key}: {e}") from None


def _imported_config(task: str, hf_dir: Path, overrides: dict, where: str, hf: dict | None = None):
    """(family, network config) of an HF directory's config.json (or of `hf`, a GGUF file's)."""
    hf = hf if hf is not None else _read_hf_config(hf_dir, f"{where} {hf_dir}")
    try:
        family, _ = family_for_hf(hf, task)
        cfg = family.config_from_hf(hf)
    except ModelError as e:
        raise UserError(f"{where} {hf_dir}: {e}") from None
    overrides = dict(overrides)
    resized = {k: overrides.pop(k) for k in family.resizable_on_import if k in overrides}
    if overrides:
        raise UserError(f"model.{next(iter(overrides))}: the sizes of an init_from model come from its "
                        f"config.json and cannot be changed; remove it")
    for key, value in resized.items():
        if value > getattr(cfg, key):
            raise UserError(f"model.{key} ({value}) exceeds the {getattr(cfg, key)} positions of {hf_dir}; "
                            f"lower it or remove it")
        cfg = dataclasses.replace(cfg, **{key: value})
    return family, cfg


def network_for(task: str, preset_name: str | None = None, init_from: str | None = None,
                overrides: dict | None = None, vocab_size: int | None = None, pad_id: int | None = None,
                labels: list[str] | None = None, where: str = "model.init_from",
                attention: str = "sdpa") -> torch.nn.Module:
    """A network for `task` of the preset's shape with `overrides` (model.n_layers, ...), randomly
    initialised; or, with `init_from`, holding that checkpoint's weights: an HF model directory (its
    config.json gives the shape, the preset is ignored) or a .safetensors file of the preset's shape.
    The tokenizer's `vocab_size` (and an encoder's `pad_id`) must fit the model. Builds on the current
    default device (torch.device("meta") for a skeleton: names and shapes only). `attention` is the
    decoder's kernel (model.attention)."""
    from rafale.models.weights import load_weights, open_weights, weight_files

    path = resolve_model_file(init_from, where) if init_from is not None else None
    if path is not None and path.suffix != ".gguf" and not path.is_dir():
        try:
            weight_files(path)  # a missing path or a non-safetensors file fails here, early
        except ModelError as e:
            raise UserError(f"{where}: {e}") from None
    family, cfg, gguf = network_config(task, preset_name, init_from, overrides, vocab_size, pad_id, where, attention)
    try:
        network = family.build(cfg, task, num_labels=len(labels) if labels is not None else None)
        if gguf is not None:
            fresh = load_weights(network, family, task, gguf, describe=str(path))
        elif path is not None:
            with open_weights(path) as weights:
                fresh = load_weights(network, family, task, weights, describe=str(path))
            if fresh and next(network.parameters()).device.type != "meta":
                print(f"{where}: {', '.join(fresh)} not in the checkpoint, initialized fresh", file=sys.stderr)
    except ModelError as e:
        raise UserError(f"{where}: {e}") from None
    return network


def network_config(task: str, preset_name: str | None = None, init_from: str | None = None,
                   overrides: dict | None = None, vocab_size: int | None = None, pad_id: int | None = None,
                   where: str = "model.init_from", attention: str = "sdpa"):
    """(family, network config, the GGUFModel when init_from is a .gguf file) of what `network_for`
    builds with these arguments, and the same UserErrors, without torch: the shape comes from the
    preset, config.json or the GGUF metadata; checkpoint tensors are not read."""
    overrides = overrides or {}
    path = resolve_model_file(init_from, where) if init_from is not None else None
    gguf = None
    if path is not None and path.suffix == ".gguf":
        try:
            from rafale.models.gguf import read_gguf

            gguf = read_gguf(path)
        except ModelError as e:
            raise UserError(f"{where}: {e}") from None
        family, cfg = _imported_config(task, path, overrides, where, hf=gguf.config)
    elif path is not None and path.is_dir():
        family, cfg = _imported_config(task, path, overrides, where)
    else:
        family, cfg = _preset_config(task, preset_name, overrides, where)
    if attention != "sdpa":
        if not any(f.name == "attention" for f in dataclasses.fields(cfg)):
            raise UserError(f"model.attention: {attention} is implemented for the decoder families; "
                            f"encoders attend with sdpa")
        check_attention(attention)
        cfg = dataclasses.replace(cfg, attention=attention)
    source = repr(init_from or preset_name)
    if vocab_size is not None and "vocab_size" in overrides and overrides["vocab_size"] < vocab_size:
        raise UserError(f"model.vocab_size ({overrides['vocab_size']}) is smaller than the tokenizer's {vocab_size} "
                        f"tokens; raise it to at least {vocab_size}, or remove it (a decoder from scratch then gets "
                        f"{padded_vocab(vocab_size)})")
    encoder_hint = "use its own tokenizer (bert-* presets: bert-base-uncased, roberta-*: roberta-base)"
    if vocab_size is not None and vocab_size > cfg.vocab_size:
        fix = encoder_hint if task != "causal_lm" else f"use a tokenizer with at most {cfg.vocab_size} tokens"
        raise UserError(f"the tokenizer has {vocab_size} tokens but model {source} embeds only {cfg.vocab_size}; {fix}")
    if pad_id is not None and pad_id != cfg.pad_token_id:
        raise UserError(f"the tokenizer pads with id {pad_id} but model {source} expects pad_token_id "
                        f"{cfg.pad_token_id}; {encoder_hint}")
    return family, cfg, gguf


def check_attention(attention: str, precision: str | None = None) -> None:
    """A UserError when model.attention's kernel cannot run here (flash: no GPU, no flash-attn, fp32)."""
    from rafale.models.attention import load_flash

    if attention != "flash":
        return
    try:
        load_flash()
    except ModelError as e:
        raise UserError(f"model.attention: {e}") from None
    if precision == "fp32":
        raise UserError("model.attention: flash has fp16 / bf16 kernels only; set train.precision to auto, "
                        "amp_bf16 or amp_fp16, or use sdpa")


def build_network(cfg: Config, meta: dict, task: str | None = None, attention: str | None = None) -> torch.nn.Module:
    """The network of the config's model section for its pipeline's task, sized by the data's `meta`;
    `attention` replaces model.attention (None: keep it)."""
    task = task or pipeline_class(cfg.data.pipeline).task
    m = cfg.model
    if isinstance(m, Component):
        network = _component_network(m, meta)
    else:
        network = network_for(task, m.preset, m.init_from, labels=meta.get("labels") if task == "classification"
                              else None, **_network_args(cfg, meta, task, attention))
    if not isinstance(m, Component) and m.lora is not None:
        _add_lora(network, m.lora)
    limit = getattr(getattr(network, "cfg", None), "max_seq_len", getattr(network, "max_seq_len", None))
    _check_context(cfg, limit)
    return network


def model_config(cfg: Config, meta: dict, task: str | None = None):
    """(family, network config) of what build_network builds for a model section of rafale's own
    networks (not model.class), with its UserErrors, without torch."""
    task = task or pipeline_class(cfg.data.pipeline).task
    family, ncfg, _ = network_config(task, cfg.model.preset, cfg.model.init_from,
                                     **_network_args(cfg, meta, task, None))
    if cfg.model.lora is not None and family.tasks != ("causal_lm",):
        raise UserError(LORA_DECODERS_ONLY)
    _check_context(cfg, ncfg.max_seq_len)
    return family, ncfg


def _network_args(cfg: Config, meta: dict, task: str, attention: str | None) -> dict:
    """network_for's sizing arguments from the model section and the data's meta."""
    m = cfg.model
    sizes = {k: getattr(m, k) for k in SIZE_KEYS if getattr(m, k) is not None}
    if vocab_follows_tokenizer(cfg):
        sizes.setdefault("vocab_size", padded_vocab(meta["vocab_size"]))
    pad_id = meta.get("special", {})["pad"][1] if task != "causal_lm" else None
    return dict(overrides=sizes, vocab_size=meta["vocab_size"], pad_id=pad_id, attention=attention or m.attention)


def _check_context(cfg: Config, limit: int | None) -> None:
    if limit is not None and limit < cfg.data.max_seq_len:
        raise UserError(f"data.max_seq_len ({cfg.data.max_seq_len}) exceeds the model's max_seq_len "
                        f"({limit}); lower it or set model.max_seq_len")


def as_built(cfg: Config, network: torch.nn.Module) -> Config:
    """The config to save in the run directory: with the vocabulary the tokenizer gave the network written
    out, so that the run's checkpoint is read back at its size whatever the rule later becomes."""
    if not vocab_follows_tokenizer(cfg) or cfg.model.vocab_size is not None:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=network.cfg.vocab_size))


LORA_DECODERS_ONLY = ("model.lora: LoRA applies to rafale's decoders (presets and imported causal LMs); "
                      "remove it for this model")


def _add_lora(network: torch.nn.Module, lora) -> tuple[int, int]:
    """model.lora: wraps the targeted layers with adapters and freezes the rest."""
    from rafale.models.decoder import Decoder
    from rafale.models.lora import LoraConfig, apply_lora

    if not isinstance(network, Decoder):
        raise UserError(LORA_DECODERS_ONLY)
    try:
        return apply_lora(network, LoraConfig(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                                              targets=list(lora.targets)))
    except ModelError as e:
        raise UserError(str(e)) from None


def _component_network(m: Component, meta: dict) -> torch.nn.Module:
    """model.class: the network a user's class or function builds; it gets the tokenizer's vocab_size when
    it takes one and the config does not give it."""
    target = components.load(m.path, "model.class")
    extra = {"vocab_size": meta["vocab_size"]} if components.accepts(target, "vocab_size") and \
        "vocab_size" not in m.kwargs else {}
    network = components.build(m, "model.class", **extra)
    import torch

    if not isinstance(network, torch.nn.Module):
        raise UserError(f"model.class: {m.path} returned a {type(network).__name__}, not a torch.nn.Module")
    return network


def build_model(cfg: Config, meta: dict):
    """The ComposerModel Composer trains: the network and its pipeline's objective."""
    from rafale.task_model import TaskModel

    network, pipeline = build_network(cfg, meta), pipeline_of(cfg)
    pipeline.check_network(network)
    if getattr(cfg.model, "lora", None) is not None and os.environ.get("RANK", "0") == "0":
        params = list(network.parameters())
        trainable, total = sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
        print(f"model.lora: {trainable:,} trainable parameters of {total:,} ({trainable / total:.2%})", flush=True)
    return TaskModel(network, pipeline, meta)


# ---- optimizer, schedule, callbacks ----

def param_groups(model: torch.nn.Module, weight_decay: float, no_decay: list[str]) -> list[dict]:
    """Two groups: decayed, and the parameter kinds in `no_decay` (norm, bias, embedding)."""
    import torch

    kinds: dict[int, set[str]] = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            k = kinds.setdefault(id(p), set())
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)) or "norm" in type(module).__name__.lower():
                k.add("norm")
            if name == "bias":
                k.add("bias")
            if isinstance(module, torch.nn.Embedding):
                k.add("embedding")
    params = [p for p in model.parameters() if p.requires_grad]
    skip = set(no_decay)
    return [{"params": [p for p in params if not kinds[id(p)] & skip], "weight_decay": weight_decay},
            {"params": [p for p in params if kinds[id(p)] & skip], "weight_decay": 0.0}]


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """optim.name's optimizer over two parameter groups (weight decay, none); or optim.class with its
    keyword arguments over the trainable parameters as one group."""
    import torch

    o = cfg.optim
    if isinstance(o, Component):
        return components.build(o, "optim.class", [p for p in model.parameters() if p.requires_grad])
    groups = param_groups(model, o.weight_decay, o.no_decay)
    if o.name == "adamw":
        # fused: one kernel for all parameters; on CPU torch otherwise loops per parameter (83 ms of a
        # ~1.5 s pythia-tiny step on one core, against 11 ms fused: bench/README.md).
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=True)
    from composer.optim import DecoupledAdamW, DecoupledSGDW

    if o.name == "decoupled_adamw":  # Composer's: decay not scaled by lr (Loshchilov & Hutter)
        return DecoupledAdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    if o.name == "sgd":
        return DecoupledSGDW(groups, lr=o.lr, momentum=o.momentum)
    from rafale.optim import Lion

    return Lion(groups, lr=o.lr, betas=tuple(o.betas))


def build_scheduler(cfg: Config):
    s = cfg.schedule
    if isinstance(s, Component):
        return components.build(s, "schedule.class")
    from composer.optim import (ConstantWithWarmupScheduler, CosineAnnealingWithWarmupScheduler,
                                LinearWithWarmupScheduler)

    from rafale.optim import InverseSqrtWithWarmupScheduler, WSDScheduler

    if s.name == "cosine":
        return CosineAnnealingWithWarmupScheduler(t_warmup=s.warmup, alpha_f=s.min_lr_ratio)
    if s.name == "linear":
        return LinearWithWarmupScheduler(t_warmup=s.warmup, alpha_i=1.0, alpha_f=s.min_lr_ratio)
    if s.name == "inverse_sqrt":
        return InverseSqrtWithWarmupScheduler(t_warmup=s.warmup)
    if s.name == "wsd":
        return WSDScheduler(t_warmup=s.warmup, t_decay=s.decay, alpha_f=s.min_lr_ratio, shape=s.decay_shape)
    return ConstantWithWarmupScheduler(t_warmup=s.warmup)


def build_user_callbacks(cfg: Config) -> list:
    """train.callbacks: Composer callbacks by import path, with their keyword arguments."""
    from composer.core import Callback

    built = []
    for i, c in enumerate(cfg.train.callbacks):
        key = f"train.callbacks[{i}]"
        callback = components.build(c, key)
        if not isinstance(callback, Callback):
            raise UserError(f"{key}: {c.path} is not a composer.core.Callback (it is a {type(callback).__name__})")
        built.append(callback)
    return built


def check_components(cfg: Config) -> None:
    """Every component the config names imports and takes its keyword arguments: judged before a run
    directory is made, so a typo costs nothing."""
    if isinstance(cfg.optim, Component):
        components.check_call(components.load(cfg.optim.path, "optim.class"), "optim.class", ([],), cfg.optim.kwargs)
    if isinstance(cfg.schedule, Component):
        components.check_call(components.load(cfg.schedule.path, "schedule.class"), "schedule.class", (),
                              cfg.schedule.kwargs)
    for i, c in enumerate(cfg.train.callbacks):
        key = f"train.callbacks[{i}]"
        components.check_call(components.load(c.path, key), key, (), c.kwargs)
