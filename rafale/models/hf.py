"""HF transformers <-> rafale: config.json <-> `DecoderConfig`, and safetensors weights in (`model.init_from`)
and out (`rafale export`), read and written one tensor at a time. The name tables are data in
models/hf_maps.py; this file is the code around them.

    HF directory (config.json, model.safetensors or model-0000N-of-0000M.safetensors + index)
        --config_from_hf-->  DecoderConfig  --load_weights-->  Decoder
    Decoder weights  --to_hf, save_weights-->  model.safetensors (sharded above max_shard_bytes)
    DecoderConfig    --hf_config-->            config.json

q/k/v: GPT-NeoX fuses them per head as [q_h, k_h, v_h], which is rafale's layout as is. Llama, Mistral
and Qwen2 store q_proj (nh*hs rows), k_proj and v_proj (nkv*hs rows each) apart; rafale's fused qkv
holds, for each key/value head g, its n_rep = nh/nkv query heads, then k_g, then v_g:

    qkv rows = [q_{g*n_rep} .. q_{g*n_rep+n_rep-1}, k_g, v_g] for g = 0 .. nkv-1   (hs rows each)

`fuse_qkv` builds that from the three HF tensors (weights and Qwen2's biases alike) and `split_qkv`
undoes it. Only safetensors are read: a pickled .bin could run code on load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from rafale.errors import UserError
from rafale.models.decoder import Decoder, DecoderConfig
from rafale.models.hf_maps import ARCHITECTURES, LLAMA_QKV, NON_WEIGHTS, inverse, template
from rafale.models.presets import get_preset

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
HEAD = "embed_out.weight"  # absent from checkpoints of tied models: it is embed_in.weight
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _supported() -> str:
    return ", ".join(f"{t} ({a['hf_class']})" for t, a in ARCHITECTURES.items())


# ---- config.json ----

def read_hf_config(hf_dir: Path, where: str) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{where}: {hf_dir} has no config.json; point it at an HF model directory "
                        f"(config.json + model.safetensors), or at a .safetensors file and set model.preset")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{where}: {path} is not valid JSON ({e}); fix or re-download it") from None


def model_type_of(hf: dict, where: str) -> str:
    """The config's model_type (or the one its `architectures` class implies), if rafale supports it."""
    by_class = {a["hf_class"]: t for t, a in ARCHITECTURES.items()}
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type") or next((by_class[a] for a in archs if a in by_class), None)
    if model_type in ARCHITECTURES:
        return model_type
    named = model_type or (archs[0] if archs else None)
    what = f"architecture {named!r}" + (f" ({', '.join(archs)})" if archs and named != archs[0] else "")
    if named is None:
        what = "a config.json with no model_type or architectures"
    raise UserError(f"{where}: {what} is not supported; supported architectures: {_supported()}")


def config_from_hf(hf: dict, where: str) -> DecoderConfig:
    """The DecoderConfig of an HF config.json (as a dict), or a UserError naming every setting rafale
    does not implement."""
    model_type = model_type_of(hf, where)
    arch = ARCHITECTURES[model_type]
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
        raise UserError(f"{where}: config.json ({model_type}) has settings rafale cannot reproduce: "
                        f"{', '.join(problems)}")
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * values["n_heads"] != values["d_model"]:
        raise UserError(f"{where}: config.json has head_dim {head_dim}, but rafale needs hidden_size / "
                        f"num_attention_heads ({values['d_model']} / {values['n_heads']})")
    scaling = values.get("rope_scaling")
    if scaling is not None:
        scaling = dict(scaling)
        scaling.setdefault("rope_type", scaling.pop("type", None))  # older configs say "type"
        values["rope_scaling"] = None if scaling["rope_type"] == "default" else scaling
    # Sliding-window attention is plain causal attention for sequences no longer than the window, so
    # capping the context there keeps the logits exact. Mistral's config class defaults to a 4096
    # window when the key is absent (v0.2+ write null); Qwen2 slides only with use_sliding_window.
    window = None
    if model_type == "mistral":
        window = hf.get("sliding_window", 4096)
    elif model_type == "qwen2" and hf.get("use_sliding_window"):
        window = hf.get("sliding_window", 4096)
    if window is not None:
        values["max_seq_len"] = min(values["max_seq_len"], window)
    try:
        return DecoderConfig(**values, **arch["switches"])
    except UserError as e:
        raise UserError(f"{where}: config.json: {e}") from None


def family_of(cfg: DecoderConfig) -> str:
    """The transformers architecture whose weight names and config hold this model: gpt_neox, llama, or
    qwen2 (q/k/v biases only). A mix of the two styles (say LayerNorm with SwiGLU) has none."""
    model_type = "gpt_neox" if cfg.norm == "layernorm" else "qwen2" if cfg.qkv_bias and not cfg.bias else "llama"
    want = dict(ARCHITECTURES[model_type]["switches"])
    if model_type == "gpt_neox":
        want.update(n_kv_heads=cfg.n_heads, rope_scaling=None)
    wrong = [f"{k}={v!r} (it has {getattr(cfg, k)!r})" for k, v in want.items() if getattr(cfg, k) != v]
    if wrong:
        raise UserError(f"this model has no transformers architecture: as {model_type} "
                        f"({ARCHITECTURES[model_type]['hf_class']}) it would need {', '.join(wrong)}")
    return model_type


def hf_config(cfg: DecoderConfig, bos_token_id: int, eos_token_id: int, dtype: torch.dtype) -> dict:
    """config.json for this model, loadable by transformers' AutoModelForCausalLM."""
    model_type = family_of(cfg)
    arch = ARCHITECTURES[model_type]
    out = {"architectures": [arch["hf_class"]], "model_type": model_type}
    out.update({key: getattr(cfg, ours) for ours, key in arch["config"].items()})
    out.update(arch["fixed"])
    out.update(bos_token_id=bos_token_id, eos_token_id=eos_token_id, torch_dtype=DTYPE_NAMES[dtype])
    return out


def hf_dir_or_preset(preset: str | None, init_from: str | None, where: str, kind: str) -> Path | None:
    """The HF model directory `init_from` names, or None when the shape comes from the preset (after
    checking that a .safetensors `init_from` exists and that a preset is set)."""
    path = Path(init_from).expanduser() if init_from is not None else None
    if path is not None and path.is_dir():
        return path
    if path is not None:
        _weight_files(path, where)  # a missing path or a non-safetensors file fails here, early
    if preset is None:
        raise UserError(f"model.preset: none set; name {kind}, or set model.init_from to an HF model "
                        f"directory (its config.json gives the shape)")
    return None


def model_config(preset: str | None, overrides: dict | None = None, init_from: str | None = None,
                 where: str = "model.init_from") -> DecoderConfig:
    """The model's shape: from an HF directory's config.json when `init_from` is one (only max_seq_len
    may then be lowered), else the preset with `overrides` (a .safetensors `init_from` must fit it)."""
    path = hf_dir_or_preset(preset, init_from, where, "a preset")
    if path is None:
        return get_preset(preset, overrides)
    cfg = config_from_hf(read_hf_config(path, f"{where} {path}"), f"{where} {path}")
    overrides = dict(overrides or {})
    max_seq_len = overrides.pop("max_seq_len", None)
    if overrides:
        raise UserError(f"model.{next(iter(overrides))}: the sizes of an init_from model come from its "
                        f"config.json and cannot be changed; remove it")
    if max_seq_len is not None:
        if max_seq_len > cfg.max_seq_len:
            raise UserError(f"model.max_seq_len ({max_seq_len}) exceeds the {cfg.max_seq_len} positions of "
                            f"{path}; lower it or remove it")
        cfg = dataclasses.replace(cfg, max_seq_len=max_seq_len)
    return cfg


# ---- weights ----

def split_qkv(cfg: DecoderConfig, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rafale's fused qkv (weight or bias) -> HF's (q, k, v); see the module docstring for the layout."""
    nkv, n_rep, hs = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    rest = qkv.shape[1:]
    groups = qkv.view(nkv, n_rep + 2, hs, *rest)
    q = groups[:, :n_rep].reshape(nkv * n_rep * hs, *rest)
    return q, groups[:, n_rep].reshape(nkv * hs, *rest), groups[:, n_rep + 1].reshape(nkv * hs, *rest)


def fuse_qkv(cfg: DecoderConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HF's (q, k, v) -> rafale's fused qkv; the inverse of `split_qkv`."""
    nkv, n_rep, hs = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    rest = q.shape[1:]
    groups = (q.reshape(nkv, n_rep, hs, *rest), k.reshape(nkv, 1, hs, *rest), v.reshape(nkv, 1, hs, *rest))
    return torch.cat(groups, dim=1).reshape(-1, *rest)


def to_hf(cfg: DecoderConfig, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """One rafale tensor -> the HF tensor(s) it is stored as. Works on meta tensors (names and shapes only)."""
    model_type = family_of(cfg)
    tmpl, layer = template(name)
    if model_type != "gpt_neox" and tmpl in LLAMA_QKV:
        return {n.format(layer): t for n, t in zip(LLAMA_QKV[tmpl], split_qkv(cfg, tensor))}
    return {inverse(ARCHITECTURES[model_type]["names"])[tmpl].format(layer): tensor}


def _weight_files(path: Path, where: str) -> list[Path]:
    """The safetensors file(s) of a checkpoint: one file, or an HF directory's single file or shards."""
    if not path.exists():
        raise UserError(f"{where}: {path} does not exist")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise UserError(f"{where}: {path} is not a .safetensors file; rafale reads safetensors only (a "
                            f"pickled checkpoint can run code when loaded): convert it, e.g. with "
                            f"transformers' save_pretrained(..., safe_serialization=True)")
        return [path]
    if (path / SAFETENSORS_INDEX).is_file():
        try:
            weight_map = json.loads((path / SAFETENSORS_INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{where}: {path / SAFETENSORS_INDEX} is not a valid index ({e})") from None
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{where}: {path / SAFETENSORS_INDEX} lists shard(s) that are not there: "
                            f"{', '.join(missing)}")
        return files
    if (path / SAFETENSORS).is_file():
        return [path / SAFETENSORS]
    pickled = sorted(p.name for p in path.glob("*.bin"))
    hint = (f" ({', '.join(pickled)} is pickled: convert it with transformers' save_pretrained(..., "
            f"safe_serialization=True))") if pickled else ""
    raise UserError(f"{where}: {path} has no {SAFETENSORS} or {SAFETENSORS_INDEX}{hint}")


def _open(file: Path, stack: contextlib.ExitStack, where: str):
    try:
        return stack.enter_context(safe_open(str(file), framework="pt"))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{where}: {file} is not a readable safetensors file, likely truncated or corrupt "
                        f"({e}); re-download or re-export it") from None


def _listing(kind: str, names: list[str], limit: int = 8) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{kind}: {', '.join(names[:limit])}{more}"


@torch.no_grad()
def load_weights(decoder: Decoder, init_from: str | Path, where: str = "model.init_from") -> None:
    """Copies the checkpoint's tensors into `decoder`, one at a time (the checkpoint is memory-mapped;
    at most one HF tensor is materialized beyond the model). Every missing, unexpected or mis-shaped
    tensor is named in one UserError before anything is copied. A meta-device `decoder` (export's
    skeleton) only gets the names and shapes checked."""
    cfg, path = decoder.cfg, Path(init_from).expanduser()
    params = {n: p for n, p in decoder.state_dict(keep_vars=True).items()
              if not (cfg.tie_embeddings and n == HEAD)}
    expected = {}  # HF name -> (rafale name, shape)
    for name, p in params.items():
        for hf_name, t in to_hf(cfg, name, torch.empty(p.shape, device="meta")).items():
            expected[hf_name] = (name, tuple(t.shape))
    # A tied model's head may be stored anyway (some checkpoints keep both); it is the embedding.
    optional = set(to_hf(cfg, HEAD, torch.empty(0, device="meta"))) if cfg.tie_embeddings else set()
    with contextlib.ExitStack() as stack:
        handles = {}  # HF name -> open file
        for file in _weight_files(path, where):
            f = _open(file, stack, where)
            handles.update({k: f for k in f.keys()})
        missing = [n for n in expected if n not in handles]
        unexpected = [n for n in handles if n not in expected and n not in optional and not NON_WEIGHTS.search(n)]
        shapes = {n: tuple(handles[n].get_slice(n).get_shape()) for n in expected if n in handles}
        wrong = [f"{n} is {shapes[n]}, expected {shape}" for n, (_, shape) in expected.items()
                 if n in shapes and shapes[n] != shape]
        if missing or unexpected or wrong:
            parts = [_listing(kind, names) for kind, names in (("missing tensors", missing),
                     ("unexpected tensors", unexpected), ("wrong shapes", wrong)) if names]
            raise UserError(f"{where}: {path} does not fit the model ({family_of(cfg)}, d_model {cfg.d_model}, "
                            f"{cfg.n_layers} layers, {cfg.n_heads} heads, {cfg.n_kv_heads} kv heads, vocab "
                            f"{cfg.vocab_size}): {'; '.join(parts)}")
        for name, p in params.items():
            if p.device.type == "meta":
                continue
            hf_names = list(to_hf(cfg, name, torch.empty(p.shape, device="meta")))
            try:
                parts = [handles[n].get_tensor(n) for n in hf_names]
            except SafetensorError as e:
                raise UserError(f"{where}: {path}: cannot read {', '.join(hf_names)} ({e}); the file is "
                                f"likely corrupt: re-download or re-export it") from None
            p.copy_(parts[0] if len(parts) == 1 else fuse_qkv(cfg, *parts))


def save_weights(cfg: DecoderConfig, weights: dict[str, torch.Tensor], out_dir: Path,
                 max_shard_bytes: int, convert=None) -> list[str]:
    """Writes rafale-named `weights` (a tied model's head left out) as HF safetensors: model.safetensors,
    or shards of at most `max_shard_bytes` (a bigger tensor gets a shard of its own) plus the index
    transformers reads. Only one shard's tensors are materialized at a time. Returns the file names.
    `convert(cfg, name, tensor)` gives a tensor's HF name(s): the decoder's `to_hf` unless given
    (encoders pass theirs, models/hf_encoders.py)."""
    to_hf_ = convert or to_hf
    plan = []  # (HF name, rafale name, bytes), in state-dict order
    for name, t in weights.items():
        for hf_name, part in to_hf_(cfg, name, torch.empty(t.shape, dtype=t.dtype, device="meta")).items():
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
            tensors[hf_name] = to_hf_(cfg, name, weights[name])[hf_name].contiguous()
        # transformers refuses safetensors files without this metadata.
        save_file(tensors, str(out_dir / file), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(e[2] for e in plan)},
                 "weight_map": {hf_name: file for file, shard in zip(names, shards) for hf_name, _, _ in shard}}
        (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
    return names
