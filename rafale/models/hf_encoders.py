"""HF transformers <-> rafale for BERT and RoBERTa: the weight-name tables (literal data), config.json
<-> `EncoderConfig`, safetensors in (`model.init_from`) and out (`rafale export`).

    HF directory (config.json + safetensors)  --encoder_config_from_hf-->  EncoderConfig
                                              --load_encoder_weights-->   EncoderForMaskedLM / ...Classification
    a run's encoder  --export_encoder-->  BertForMaskedLM, RobertaForMaskedLM,
                                          BertForSequenceClassification or RobertaForSequenceClassification

Names in the tables are the checkpoint's without its "bert." / "roberta." prefix, so a base-model
checkpoint (BertModel, as sentence-transformers save them: "embeddings.*", "encoder.*", "pooler.*")
and a task model's ("bert.embeddings.*", ..., "cls.*" / "lm_head.*" / "classifier.*") read through the
same table. The encoder's tensors must all be there; a head's tensors that are missing (a BertModel
into a masked LM, an MLM checkpoint into a classifier) start fresh, as transformers does. The file
handling (safetensors only, shards, errors naming tensors) is models/hf.py's.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError

from rafale.errors import UserError
from rafale.models.encoder import EncoderConfig, EncoderForClassification, EncoderForMaskedLM
from rafale.models.hf import (DTYPE_NAMES, _listing, _open, _weight_files, hf_dir_or_preset, read_hf_config,
                              save_weights)
from rafale.models.hf_maps import inverse, template

ENCODER: dict[str, str] = {
    "embeddings.word_embeddings.weight": "encoder.embed_tokens.weight",
    "embeddings.position_embeddings.weight": "encoder.embed_positions.weight",
    "embeddings.token_type_embeddings.weight": "encoder.embed_types.weight",
    "embeddings.LayerNorm.weight": "encoder.embed_norm.weight",
    "embeddings.LayerNorm.bias": "encoder.embed_norm.bias",
    "encoder.layer.{}.attention.output.dense.weight": "encoder.blocks.{}.attn.proj.weight",
    "encoder.layer.{}.attention.output.dense.bias": "encoder.blocks.{}.attn.proj.bias",
    "encoder.layer.{}.attention.output.LayerNorm.weight": "encoder.blocks.{}.norm1.weight",
    "encoder.layer.{}.attention.output.LayerNorm.bias": "encoder.blocks.{}.norm1.bias",
    "encoder.layer.{}.intermediate.dense.weight": "encoder.blocks.{}.fc_in.weight",
    "encoder.layer.{}.intermediate.dense.bias": "encoder.blocks.{}.fc_in.bias",
    "encoder.layer.{}.output.dense.weight": "encoder.blocks.{}.fc_out.weight",
    "encoder.layer.{}.output.dense.bias": "encoder.blocks.{}.fc_out.bias",
    "encoder.layer.{}.output.LayerNorm.weight": "encoder.blocks.{}.norm2.weight",
    "encoder.layer.{}.output.LayerNorm.bias": "encoder.blocks.{}.norm2.bias",
}

# rafale's fused [q; k; v] -> HF's three tensors, concatenated in this order.
ENCODER_QKV: dict[str, tuple[str, str, str]] = {
    "encoder.blocks.{}.attn.qkv.weight": ("encoder.layer.{}.attention.self.query.weight",
                                         "encoder.layer.{}.attention.self.key.weight",
                                         "encoder.layer.{}.attention.self.value.weight"),
    "encoder.blocks.{}.attn.qkv.bias": ("encoder.layer.{}.attention.self.query.bias",
                                       "encoder.layer.{}.attention.self.key.bias",
                                       "encoder.layer.{}.attention.self.value.bias"),
}

BERT_MLM_HEAD: dict[str, str] = {
    "cls.predictions.transform.dense.weight": "head.dense.weight",
    "cls.predictions.transform.dense.bias": "head.dense.bias",
    "cls.predictions.transform.LayerNorm.weight": "head.norm.weight",
    "cls.predictions.transform.LayerNorm.bias": "head.norm.bias",
    "cls.predictions.bias": "head.bias",
}
ROBERTA_MLM_HEAD: dict[str, str] = {
    "lm_head.dense.weight": "head.dense.weight",
    "lm_head.dense.bias": "head.dense.bias",
    "lm_head.layer_norm.weight": "head.norm.weight",
    "lm_head.layer_norm.bias": "head.norm.bias",
    "lm_head.bias": "head.bias",
}
# BERT's pooler belongs to BertModel in transformers, to the classification head here.
BERT_CLS_HEAD: dict[str, str] = {
    "pooler.dense.weight": "head.dense.weight",
    "pooler.dense.bias": "head.dense.bias",
    "classifier.weight": "head.out.weight",
    "classifier.bias": "head.out.bias",
}
ROBERTA_CLS_HEAD: dict[str, str] = {
    "classifier.dense.weight": "head.dense.weight",
    "classifier.dense.bias": "head.dense.bias",
    "classifier.out_proj.weight": "head.out.weight",
    "classifier.out_proj.bias": "head.out.bias",
}

# The masked-LM output matrix is the word embedding (not stored apart); its bias is head.bias.
TIED = "head.decoder.weight"
# Checkpoint tensors that are not weights rafale uses: buffers, the tied copies of the MLM output
# matrix and bias, and BERT's next-sentence-prediction head (BertForPreTraining).
SKIPPED = re.compile(r"(^|\.)(position_ids|token_type_ids)$|^cls\.predictions\.decoder\.|^lm_head\.decoder\."
                     r"|^cls\.seq_relationship\.")
# Tensors of HF's base model, which task models store under "bert." / "roberta.".
BASE_ROOTS = ("embeddings.", "encoder.", "pooler.")

# EncoderConfig field -> BertConfig / RobertaConfig attribute (max_seq_len is derived: see below).
CONFIG: dict[str, str] = {
    "vocab_size": "vocab_size",
    "d_model": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "d_ff": "intermediate_size",
    "type_vocab_size": "type_vocab_size",
    "pad_token_id": "pad_token_id",
    "norm_eps": "layer_norm_eps",
    "dropout": "hidden_dropout_prob",
    "attn_dropout": "attention_probs_dropout_prob",
    "classifier_dropout": "classifier_dropout",
    "init_std": "initializer_range",
}

# BertConfig's defaults for keys a config.json omits (RobertaConfig differs in vocabulary and pad id).
_BERT_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2, pad_token_id=0,
                      layer_norm_eps=1e-12, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                      classifier_dropout=None, initializer_range=0.02)
_BERT_FIXED = dict(hidden_act="gelu", position_embedding_type="absolute", is_decoder=False)

# Per model_type: the checkpoint prefix, the HF classes per task, head tables, the values transformers'
# config class assumes for keys a config.json omits, and settings rafale implements one value of.
ARCHITECTURES: dict[str, dict] = {
    "bert": dict(
        prefix="bert.", classes={"mlm": "BertForMaskedLM", "classification": "BertForSequenceClassification"},
        heads={"mlm": BERT_MLM_HEAD, "classification": BERT_CLS_HEAD},
        defaults=_BERT_DEFAULTS, fixed=_BERT_FIXED,
    ),
    "roberta": dict(
        prefix="roberta.", classes={"mlm": "RobertaForMaskedLM",
                                    "classification": "RobertaForSequenceClassification"},
        heads={"mlm": ROBERTA_MLM_HEAD, "classification": ROBERTA_CLS_HEAD},
        defaults=dict(_BERT_DEFAULTS, vocab_size=50265, pad_token_id=1), fixed=_BERT_FIXED,
    ),
}

TASKS = ("mlm", "classification")


def _supported() -> str:
    return ", ".join(f"{t} ({', '.join(a['classes'].values())}, {t.capitalize()}Model)"
                     for t, a in ARCHITECTURES.items())


# ---- config.json ----

def encoder_config_from_hf(hf: dict, where: str) -> EncoderConfig:
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UserError(f"{where}: model_type {model_type!r} is not an encoder rafale implements; "
                        f"supported: {_supported()}")
    arch = ARCHITECTURES[model_type]
    problems = [f"{key}={hf[key]!r} (rafale implements {want!r})"
                for key, want in arch["fixed"].items() if hf.get(key, want) != want]
    if hf.get("problem_type") not in (None, "single_label_classification"):
        problems.append(f"problem_type={hf['problem_type']!r} (rafale implements single_label_classification)")
    if problems:
        raise UserError(f"{where}: config.json ({model_type}) has settings rafale cannot reproduce: "
                        f"{', '.join(problems)}")
    values = {ours: hf.get(key, arch["defaults"][key]) for ours, key in CONFIG.items()}
    family = model_type
    offset = values["pad_token_id"] + 1 if family == "roberta" else 0
    n_positions = hf.get("max_position_embeddings", arch["defaults"]["max_position_embeddings"])
    try:
        return EncoderConfig(**values, family=family, max_seq_len=n_positions - offset)
    except UserError as e:
        raise UserError(f"{where}: config.json: {e}") from None


def hf_encoder_config(cfg: EncoderConfig, task: str, dtype: torch.dtype, labels: list[str] | None = None,
                      bos_token_id: int | None = None, eos_token_id: int | None = None) -> dict:
    """config.json for this network, loadable by transformers' Auto classes without remote code."""
    arch = ARCHITECTURES[cfg.family]
    out = {"architectures": [arch["classes"][task]], "model_type": cfg.family}
    out.update({key: getattr(cfg, ours) for ours, key in CONFIG.items()})
    out.update(arch["fixed"], max_position_embeddings=cfg.n_positions, torch_dtype=DTYPE_NAMES[dtype])
    if bos_token_id is not None:
        out.update(bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    if task == "classification":
        out.update(id2label={str(i): name for i, name in enumerate(labels)},
                   label2id={name: i for i, name in enumerate(labels)},
                   problem_type="single_label_classification")
    return out


def encoder_config(preset: str | None, overrides: dict, init_from: str | None,
                   where: str = "model.init_from") -> EncoderConfig:
    """The network's shape: an HF directory's config.json when `init_from` is one (no size may then be
    changed), else the encoder preset with `overrides`."""
    from rafale.models.encoder_presets import get_encoder_preset

    path = hf_dir_or_preset(preset, init_from, where, "an encoder preset")
    if path is None:
        return get_encoder_preset(preset, overrides)
    if overrides:
        raise UserError(f"model.{next(iter(overrides))}: the sizes of an init_from model come from its "
                        f"config.json and cannot be changed; remove it")
    hf = read_hf_config(path, f"{where} {path}")
    return encoder_config_from_hf(hf, f"{where} {path}")


# ---- weight names ----

def _head_map(family: str, task: str) -> dict[str, str]:
    return ARCHITECTURES[family]["heads"][task]


def hf_names(cfg: EncoderConfig, task: str, name: str) -> list[str]:
    """A rafale tensor name -> the (prefix-less) HF name(s) it is stored as: three for a fused qkv."""
    tmpl, layer = template(name)
    if tmpl in ENCODER_QKV:
        return [n.format(layer) for n in ENCODER_QKV[tmpl]]
    return [inverse({**ENCODER, **_head_map(cfg.family, task)})[tmpl].format(layer)]


def to_hf(task: str, cfg: EncoderConfig, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """One rafale tensor -> {full HF name: tensor} as transformers' task model stores it (works on meta
    tensors). The signature after `task` is the one hf.save_weights calls."""
    names = hf_names(cfg, task, name)
    parts = tensor.chunk(3, dim=0) if len(names) == 3 else (tensor,)
    prefix = ARCHITECTURES[cfg.family]["prefix"]
    return {(prefix + n if n.startswith(BASE_ROOTS) else n): t for n, t in zip(names, parts)}


def task_of(net: torch.nn.Module) -> str:
    return "mlm" if isinstance(net, EncoderForMaskedLM) else "classification"


# ---- weights in ----

@torch.no_grad()
def load_encoder_weights(net: EncoderForMaskedLM | EncoderForClassification, init_from: str | Path,
                         where: str = "model.init_from") -> list[str]:
    """Copies a checkpoint's tensors into `net`. Every encoder tensor must be there with the right shape,
    else one UserError names all that are missing, unexpected or mis-shaped, before anything is copied.
    Head tensors the checkpoint lacks keep their fresh initialization; their names are returned."""
    cfg, task, path = net.cfg, task_of(net), Path(init_from).expanduser()
    prefix = ARCHITECTURES[cfg.family]["prefix"]
    other_task_heads = {n for t in TASKS if t != task for n in _head_map(cfg.family, t)}
    params = {n: p for n, p in net.state_dict(keep_vars=True).items() if n != TIED}
    expected = {}  # prefix-less HF name -> (rafale name, shape); a fused qkv is three thirds
    for name, p in params.items():
        names = hf_names(cfg, task, name)
        for hf_name in names:
            expected[hf_name] = (name, (p.shape[0] // len(names), *p.shape[1:]))
    with contextlib.ExitStack() as stack:
        handles = {}  # prefix-less HF name -> (open file, name in the file)
        for file in _weight_files(path, where):
            f = _open(file, stack, where)
            handles.update({k.removeprefix(prefix): (f, k) for k in f.keys()})
        # Name missing tensors as this checkpoint would hold them (with or without the prefix).
        stored = prefix if any(k != n for n, (_, k) in handles.items()) else ""
        missing = [(stored + n if n.startswith(BASE_ROOTS) else n) for n in expected
                   if n not in handles and not expected[n][0].startswith("head.")]
        unexpected = [handles[n][1] for n in handles
                      if n not in expected and n not in other_task_heads and not SKIPPED.search(n)]
        shapes = {n: tuple(handles[n][0].get_slice(handles[n][1]).get_shape()) for n in expected if n in handles}
        wrong = [f"{handles[n][1]} is {shapes[n]}, expected {tuple(shape)}" for n, (_, shape) in expected.items()
                 if n in shapes and shapes[n] != tuple(shape)]
        if missing or unexpected or wrong:
            parts = [_listing(kind, names) for kind, names in (("missing tensors", missing),
                     ("unexpected tensors", unexpected), ("wrong shapes", wrong)) if names]
            hint = ""
            if any(expected[n][0].startswith("head.out") for n in shapes if shapes[n] != tuple(expected[n][1])):
                hint = (f" (the checkpoint's classifier has another number of labels than the data's "
                        f"{getattr(net, 'num_labels', '?')}: start from its encoder alone, without the classifier)")
            raise UserError(f"{where}: {path} does not fit the model ({cfg.family}, d_model {cfg.d_model}, "
                            f"{cfg.n_layers} layers, {cfg.n_heads} heads, vocab {cfg.vocab_size}, "
                            f"{cfg.n_positions} positions): {'; '.join(parts)}{hint}")
        fresh = []
        for name, p in params.items():
            names = hf_names(cfg, task, name)
            if not all(n in handles for n in names):
                fresh.append(name)
                continue
            if p.device.type == "meta":  # export's skeleton: names and shapes checked, nothing to copy
                continue
            try:
                parts = [handles[n][0].get_tensor(handles[n][1]) for n in names]
            except SafetensorError as e:
                raise UserError(f"{where}: {path}: cannot read {', '.join(names)} ({e}); the file is likely "
                                f"corrupt: re-download or re-export it") from None
            p.copy_(torch.cat(parts) if len(parts) > 1 else parts[0])
    return fresh


# ---- a run out ----

def export_encoder(cfg, ckpt: Path, out_dir: Path, max_shard_bytes: int) -> Path:
    """Writes a masked-LM or classification run's checkpoint as an HF task model directory (the caller,
    export.py, has checked the run and `out_dir`)."""
    from tokenizers import Tokenizer

    from rafale.checkpoints import checkpoint_weights
    from rafale.data.pipelines import special_tokens
    from rafale.paths import resolve_tokenizer
    from rafale.train import build_data, build_model

    data = build_data(cfg)  # the cache: the vocabulary size and, for a classifier, the label names
    labels = data.meta.get("labels")
    with torch.device("meta"):
        net = build_model(cfg, data.meta["vocab_size"], data.meta).model
    task, ecfg = task_of(net), net.cfg
    weights, dtype = checkpoint_weights(ckpt, net.state_dict(), skip={TIED})
    out_dir.mkdir(parents=True, exist_ok=True)
    save_weights(ecfg, weights, out_dir, max_shard_bytes, convert=functools.partial(to_hf, task))
    tok_path = resolve_tokenizer(cfg.data.tokenizer)
    special = special_tokens(Tokenizer.from_file(str(tok_path)), "data.tokenizer", tok_path)
    ids = (special["cls"][1], special["sep"][1]) if ecfg.family == "roberta" else (None, None)
    config = hf_encoder_config(ecfg, task, dtype, labels, *ids)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "tokenizer.json").write_bytes(tok_path.read_bytes())
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": ecfg.max_seq_len,
                  "clean_up_tokenization_spaces": False,
                  **{f"{role}_token": token for role, (token, _) in special.items()}}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    return out_dir
