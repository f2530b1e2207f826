"""The BERT family (BERT and RoBERTa): presets, transformers' config and weight names for the base model
and the two task heads (masked LM, sequence classification), as literal data.

Names in the tables are the checkpoint's without its "bert." / "roberta." prefix, so a base-model
checkpoint (BertModel, as sentence-transformers save them: "embeddings.*", "encoder.*", "pooler.*") and
a task model's ("bert.embeddings.*", ..., "cls.*" / "lm_head.*" / "classifier.*") read through the same
table (`canonical` adds the prefix a base model omits). The encoder's tensors must all be there; a
head's tensors that are missing (a BertModel into a masked LM, an MLM checkpoint into a classifier)
start fresh, as transformers does.
"""

from __future__ import annotations

import copy
import re
from typing import TYPE_CHECKING

from rafale.models.configs import EncoderConfig
from rafale.models.decoder_family import DTYPE_NAMES
from rafale.models.family import Family, ModelError, inverse, template

if TYPE_CHECKING:  # the tables load without torch (rafale config show); the networks need it
    import torch

# Google's compact BERTs (Turc et al. 2019, google/bert_uncased_L-*_H-*), bert-base / large (uncased)
# with the bert-base-uncased vocabulary (30,522 WordPiece tokens); FacebookAI's RoBERTa with its
# byte-level BPE vocabulary of 50,265, 514 position rows = 512 tokens after the pad offset. bert-micro
# and roberta-micro are CPU sizes for tests; roberta-tiny is RoBERTa in bert-tiny's shape. The exact HF
# shapes mean a checkpoint of one loads with model.init_from.
_BERT = dict(family="bert", vocab_size=30522, max_seq_len=512, type_vocab_size=2, pad_token_id=0,
             norm_eps=1e-12)
_ROBERTA = dict(family="roberta", vocab_size=50265, max_seq_len=512, type_vocab_size=1, pad_token_id=1,
                norm_eps=1e-5)

PRESETS: dict[str, dict] = {
    "bert-micro": dict(_BERT, d_model=64, n_layers=2, n_heads=2, max_seq_len=128),
    "bert-tiny": dict(_BERT, d_model=128, n_layers=2, n_heads=2),
    "bert-mini": dict(_BERT, d_model=256, n_layers=4, n_heads=4),
    "bert-small": dict(_BERT, d_model=512, n_layers=4, n_heads=8),
    "bert-medium": dict(_BERT, d_model=512, n_layers=8, n_heads=8),
    "bert-base": dict(_BERT, d_model=768, n_layers=12, n_heads=12),
    "bert-large": dict(_BERT, d_model=1024, n_layers=24, n_heads=16),
    "roberta-micro": dict(_ROBERTA, d_model=64, n_layers=2, n_heads=2, max_seq_len=128),
    "roberta-tiny": dict(_ROBERTA, d_model=128, n_layers=2, n_heads=2),
    "roberta-base": dict(_ROBERTA, d_model=768, n_layers=12, n_heads=12),
    "roberta-large": dict(_ROBERTA, d_model=1024, n_layers=24, n_heads=16),
}

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
QKV: dict[str, tuple[str, str, str]] = {
    "encoder.blocks.{}.attn.qkv.weight": ("encoder.layer.{}.attention.self.query.weight",
                                         "encoder.layer.{}.attention.self.key.weight",
                                         "encoder.layer.{}.attention.self.value.weight"),
    "encoder.blocks.{}.attn.qkv.bias": ("encoder.layer.{}.attention.self.query.bias",
                                       "encoder.layer.{}.attention.self.key.bias",
                                       "encoder.layer.{}.attention.self.value.bias"),
}

# The masked-LM output matrix is the word embedding (tied: `head.decoder.weight` and
# `encoder.embed_tokens.weight` are one tensor, stored under either name); its bias is head.bias.
BERT_MLM_HEAD: dict[str, str] = {
    "cls.predictions.transform.dense.weight": "head.dense.weight",
    "cls.predictions.transform.dense.bias": "head.dense.bias",
    "cls.predictions.transform.LayerNorm.weight": "head.norm.weight",
    "cls.predictions.transform.LayerNorm.bias": "head.norm.bias",
    "cls.predictions.bias": "head.bias",
    "cls.predictions.decoder.weight": "head.decoder.weight",
}
ROBERTA_MLM_HEAD: dict[str, str] = {
    "lm_head.dense.weight": "head.dense.weight",
    "lm_head.dense.bias": "head.dense.bias",
    "lm_head.layer_norm.weight": "head.norm.weight",
    "lm_head.layer_norm.bias": "head.norm.bias",
    "lm_head.bias": "head.bias",
    "lm_head.decoder.weight": "head.decoder.weight",
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

# Checkpoint tensors that are not weights rafale uses: buffers, the tied copy of the MLM output bias,
# and BERT's next-sentence-prediction head (BertForPreTraining).
SKIPPED = re.compile(r"(^|\.)(position_ids|token_type_ids)$|^cls\.predictions\.decoder\.bias$"
                     r"|^lm_head\.decoder\.bias$|^cls\.seq_relationship\.")
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
_FIXED = dict(hidden_act="gelu", position_embedding_type="absolute", is_decoder=False)

# Per model_type: the checkpoint prefix, the HF classes per task, head tables, and the values
# transformers' config class assumes for keys a config.json omits.
ARCHITECTURES: dict[str, dict] = {
    "bert": dict(prefix="bert.", classes={"mlm": "BertForMaskedLM", "classification": "BertForSequenceClassification"},
                 heads={"mlm": BERT_MLM_HEAD, "classification": BERT_CLS_HEAD}, defaults=_BERT_DEFAULTS),
    "roberta": dict(prefix="roberta.", classes={"mlm": "RobertaForMaskedLM",
                                                "classification": "RobertaForSequenceClassification"},
                    heads={"mlm": ROBERTA_MLM_HEAD, "classification": ROBERTA_CLS_HEAD},
                    defaults=dict(_BERT_DEFAULTS, vocab_size=50265, pad_token_id=1)),
}


class Bert(Family):
    name = "bert"
    tasks = ("mlm", "classification")
    presets = PRESETS
    model_types = tuple(ARCHITECTURES)
    resizable_on_import = ()  # the position table's shape is the context length

    def hf_classes(self, model_type: str) -> tuple[str, ...]:
        return (*ARCHITECTURES[model_type]["classes"].values(), f"{model_type.capitalize()}Model")

    def make_config(self, fields: dict) -> EncoderConfig:
        return EncoderConfig(**copy.deepcopy(fields))

    def build(self, cfg: EncoderConfig, task: str, num_labels: int | None = None):
        from rafale.models.encoder import EncoderForClassification, EncoderForMaskedLM

        return EncoderForMaskedLM(cfg) if task == "mlm" else EncoderForClassification(cfg, num_labels)

    def owns(self, cfg) -> bool:
        return isinstance(cfg, EncoderConfig)

    def config_from_hf(self, hf: dict) -> EncoderConfig:
        model_type = hf.get("model_type")
        if model_type not in ARCHITECTURES:
            raise ModelError(f"model_type {model_type!r} is not an encoder rafale implements; supported: "
                             + ", ".join(f"{t} ({', '.join(self.hf_classes(t))})" for t in ARCHITECTURES))
        arch = ARCHITECTURES[model_type]
        problems = [f"{key}={hf[key]!r} (rafale implements {want!r})"
                    for key, want in _FIXED.items() if hf.get(key, want) != want]
        if hf.get("problem_type") not in (None, "single_label_classification"):
            problems.append(f"problem_type={hf['problem_type']!r} (rafale implements single_label_classification)")
        if problems:
            raise ModelError(f"config.json ({model_type}) has settings rafale cannot reproduce: {', '.join(problems)}")
        values = {ours: hf.get(key, arch["defaults"][key]) for ours, key in CONFIG.items()}
        offset = values["pad_token_id"] + 1 if model_type == "roberta" else 0
        n_positions = hf.get("max_position_embeddings", arch["defaults"]["max_position_embeddings"])
        try:
            return EncoderConfig(**values, family=model_type, max_seq_len=n_positions - offset)
        except ModelError as e:
            raise ModelError(f"config.json: {e}") from None

    def hf_config(self, cfg: EncoderConfig, task: str, dtype: torch.dtype, bos_token_id: int | None = None,
                  eos_token_id: int | None = None, labels: list[str] | None = None) -> dict:
        """config.json for this network, loadable by transformers' Auto classes without remote code."""
        arch = ARCHITECTURES[cfg.family]
        out = {"architectures": [arch["classes"][task]], "model_type": cfg.family}
        out.update({key: getattr(cfg, ours) for ours, key in CONFIG.items()})
        out.update(_FIXED, max_position_embeddings=cfg.n_positions, torch_dtype=DTYPE_NAMES[str(dtype)])
        if bos_token_id is not None:
            out.update(bos_token_id=bos_token_id, eos_token_id=eos_token_id)
        if task == "classification":
            out.update(id2label={str(i): name for i, name in enumerate(labels)},
                       label2id={name: i for i, name in enumerate(labels)},
                       problem_type="single_label_classification")
        return out

    # --- weight names ---
    def _names(self, family: str, task: str) -> dict[str, str]:
        return inverse({**ENCODER, **ARCHITECTURES[family]["heads"][task]})

    def hf_names(self, cfg: EncoderConfig, task: str, name: str) -> list[str]:
        tmpl, layer = template(name)
        names = QKV[tmpl] if tmpl in QKV else (self._names(cfg.family, task)[tmpl],)
        return [_full(ARCHITECTURES[cfg.family]["prefix"], n).format(layer) for n in names]

    def split(self, cfg, task, name, tensor):
        return list(tensor.chunk(3, dim=0)) if template(name)[0] in QKV else [tensor]

    def join(self, cfg, task, name, parts):
        import torch

        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def canonical(self, cfg: EncoderConfig, hf_key: str) -> str:
        return _full(ARCHITECTURES[cfg.family]["prefix"], hf_key)  # a base model's names carry no prefix

    def ignored(self, cfg: EncoderConfig, task: str, hf_key: str) -> bool:
        arch = ARCHITECTURES[cfg.family]
        other_heads = {_full(arch["prefix"], n) for t, table in arch["heads"].items() if t != task for n in table}
        return bool(SKIPPED.search(hf_key)) or hf_key in other_heads

    def may_start_fresh(self, task: str, name: str) -> bool:
        return name.startswith("head.")

    def mismatch_hint(self, cfg, task: str, names: list[str]) -> str:
        if task == "classification" and any(n.startswith("head.out.") for n in names):
            return (" (the checkpoint's classifier has another number of labels than the data's: start from its "
                    "encoder alone, without the classifier)")
        return ""


def _full(prefix: str, name: str) -> str:
    """A name of the tables as a task model stores it: base-model tensors under the prefix."""
    return prefix + name if name.startswith(BASE_ROOTS) else name


FAMILY = Bert()
