"""The network configs, as plain dataclasses with no torch: DecoderConfig (models/decoder.py),
EncoderConfig (models/encoder.py) and LoraConfig (models/lora.py). The families (gpt_neox.py, llama.py,
bert.py) build them from presets and config.json, and `rafale config show` sizes a network from one
alone (models/shapes.py), so importing this module must stay cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from rafale.models.family import ModelError

# The decoder's attention kernels (models/attention.py holds them).
BACKENDS = ("sdpa", "flex", "flash")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class DecoderConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    max_seq_len: int
    n_kv_heads: int | None = None  # None: n_heads (multi-head); fewer: grouped-query attention
    d_ff: int | None = None  # None: 4 * d_model (gelu), 8/3 * d_model rounded up to 64 (swiglu)
    norm: str = "layernorm"  # or "rmsnorm"
    mlp: str = "gelu"  # "gelu": fc_out(gelu(fc_in(x))); "swiglu": fc_out(silu(fc_gate(x)) * fc_in(x))
    bias: bool = True  # a bias on every Linear (NeoX); Llama has none
    qkv_bias: bool | None = None  # None: same as `bias`; Qwen2 has q/k/v biases and no others
    rotary_pct: float = 0.25  # fraction of each head's dims that get rotary (the first ones)
    rope_theta: float = 10000.0
    # None, or Llama 3.1's frequency scaling: {"rope_type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"} as in a Llama-3 config.json.
    rope_scaling: dict | None = None
    parallel_residual: bool = True  # x + attn(ln1(x)) + mlp(ln2(x)), as GPT-J / Pythia
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    attention: str = "sdpa"  # the kernel: sdpa, flex or flash (models/attention.py); same numbers up to rounding
    head_dim: int = field(init=False)
    rotary_dim: int = field(init=False)

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ModelError(f"{name} must be >= 1, got {getattr(self, name)}", name)
        if self.d_model % self.n_heads:
            raise ModelError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})", "n_heads")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise ModelError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})", "n_kv_heads")
        if self.norm not in NORMS:
            raise ModelError(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}", "norm")
        if self.attention not in BACKENDS:
            raise ModelError(f"attention must be one of {', '.join(BACKENDS)}, got {self.attention!r}",
                             "attention")
        if self.mlp not in MLPS:
            raise ModelError(f"mlp must be one of {', '.join(MLPS)}, got {self.mlp!r}", "mlp")
        if self.d_ff is None:
            # SwiGLU has three matrices, not two: 8/3 d keeps the parameter count of a 4d GELU MLP
            # (Llama rounds up to a multiple of 256; 64 keeps the CPU-sized presets small).
            self.d_ff = 4 * self.d_model if self.mlp == "gelu" else 64 * math.ceil(8 * self.d_model / 3 / 64)
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise ModelError(f"rotary_pct must be in [0, 1], got {self.rotary_pct}", "rotary_pct")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type")
            missing = [k for k in LLAMA3_ROPE_KEYS if k not in self.rope_scaling]
            if kind != "llama3" or missing:
                raise ModelError(f"rope_scaling: only rope_type llama3 with {', '.join(LLAMA3_ROPE_KEYS)} is "
                                 f"supported, got {self.rope_scaling}", "rope_scaling")
        self.head_dim = self.d_model // self.n_heads
        # int() truncation as in transformers' GPTNeoXAttention.rotary_ndims.
        self.rotary_dim = int(self.head_dim * self.rotary_pct)
        if self.rotary_dim % 2:
            raise ModelError(f"rotary dims per head (head_dim {self.head_dim} x rotary_pct {self.rotary_pct} = "
                             f"{self.rotary_dim}) must be even; change n_heads", "n_heads")


ENCODER_FAMILIES = ("bert", "roberta")


@dataclass
class EncoderConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    max_seq_len: int  # tokens per sequence, [CLS] / <s> and [SEP] / </s> included
    d_ff: int | None = None  # None: 4 * d_model
    family: str = "bert"  # or "roberta": positions from pad_token_id + 1, RoBERTa's class head
    type_vocab_size: int = 2  # BERT: segments A and B; RoBERTa: 1
    pad_token_id: int = 0  # BERT [PAD] 0, RoBERTa <pad> 1
    norm_eps: float = 1e-12  # BERT 1e-12, RoBERTa 1e-5
    dropout: float = 0.1  # after embeddings, attention output and MLP (hidden_dropout_prob)
    attn_dropout: float = 0.1  # on attention probabilities (attention_probs_dropout_prob)
    classifier_dropout: float | None = None  # None: `dropout`, as transformers does
    init_std: float = 0.02
    head_dim: int = field(init=False)
    position_offset: int = field(init=False)  # position of the first token: 0, or pad_token_id + 1
    n_positions: int = field(init=False)  # rows of the position table (max_position_embeddings)

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "type_vocab_size"):
            if getattr(self, name) < 1:
                raise ModelError(f"{name} must be >= 1, got {getattr(self, name)}", name)
        if self.family not in ENCODER_FAMILIES:
            raise ModelError(f"family must be one of {', '.join(ENCODER_FAMILIES)}, got {self.family!r}", "family")
        if self.d_model % self.n_heads:
            raise ModelError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})", "n_heads")
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ModelError(f"pad_token_id ({self.pad_token_id}) must be a token id below vocab_size "
                             f"({self.vocab_size})", "pad_token_id")
        self.head_dim = self.d_model // self.n_heads
        self.position_offset = self.pad_token_id + 1 if self.family == "roberta" else 0
        self.n_positions = self.max_seq_len + self.position_offset


# The Linear layers of a Block that LoRA can wrap (fc_gate exists only in SwiGLU MLPs), and the groups
# a config may name instead. The embedding and the (possibly tied) head are never wrapped.
TARGETS = ("qkv", "proj", "fc_in", "fc_gate", "fc_out")
GROUPS = {"attention": ("qkv", "proj"), "mlp": ("fc_in", "fc_gate", "fc_out"), "all": TARGETS}


@dataclass
class LoraConfig:
    """rank r, alpha (the update is scaled by alpha / r), dropout on the input of A, and the layers to
    wrap: any of qkv (q, k and v, fused), proj, fc_in, fc_gate (SwiGLU only), fc_out, or the groups
    attention (qkv, proj), mlp (fc_in, fc_gate, fc_out) and all. The default wraps every linear layer
    of every block, as QLoRA (Dettmers et al. 2023) found necessary to match full fine-tuning."""
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | list[str] | str = ("all",)

    def __post_init__(self):
        if self.rank < 1:
            raise ModelError(f"model.lora.rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ModelError(f"model.lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ModelError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        self.targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        unknown = [t for t in self.targets if t not in TARGETS and t not in GROUPS]
        if unknown or not self.targets:
            raise ModelError(f"model.lora.targets: {', '.join(map(repr, unknown)) or 'none given'}; name "
                            f"layers of rafale's blocks: {', '.join(TARGETS)} (q, k and v are one fused qkv), "
                            f"or groups: {', '.join(GROUPS)}")

    def targeted(self, layer_names) -> list[str]:
        """Which of a network's block Linear layers (dotted names, e.g. blocks.0.attn.qkv) the targets
        select, for apply_lora (models/lora.py) and the torch-free counts (models/shapes.py) alike; a
        ModelError when a target matches no layer of this network."""
        wanted = {name: GROUPS.get(name, (name,)) for name in self.targets}
        available = {name.rpartition(".")[2] for name in layer_names}
        missing = [name for name, group in wanted.items() if not available.intersection(group)]
        if missing:
            valid = [t for t in TARGETS if t in available] + list(GROUPS)
            raise ModelError(f"model.lora.targets: {', '.join(missing)} matches no layer of this model; "
                             f"valid targets for it: {', '.join(valid)}")
        leaves = {leaf for group in wanted.values() for leaf in group}
        return [name for name in layer_names if name.rpartition(".")[2] in leaves]
