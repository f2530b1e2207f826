"""The parameters of rafale's networks from their configs alone, without torch: name -> shape as the
built network's named_parameters() lists them (a tied tensor once, under its first name), and the
counts `rafale config show` prints. The layouts mirror models/decoder.py, models/encoder.py and
models/lora.py; test/test_config_show.py holds them to the built networks for every preset.
"""

from __future__ import annotations

from rafale.models.configs import DecoderConfig, EncoderConfig, LoraConfig
from rafale.models.family import ModelError

Shapes = dict[str, tuple[int, ...]]

# The lookup tables of each network (token, position and type embeddings) and its output projection
# onto the vocabulary when that is a tensor of its own (an untied decoder head).
EMBEDDINGS = ("embed_in.weight", "encoder.embed_tokens.weight", "encoder.embed_positions.weight",
              "encoder.embed_types.weight")
HEADS = ("embed_out.weight",)


def _linear(name: str, n_in: int, n_out: int, bias: bool) -> Shapes:
    return {f"{name}.weight": (n_out, n_in), **({f"{name}.bias": (n_out,)} if bias else {})}


def _norm(name: str, dim: int, bias: bool) -> Shapes:
    return {f"{name}.weight": (dim,), **({f"{name}.bias": (dim,)} if bias else {})}


def decoder_shapes(cfg: DecoderConfig) -> Shapes:
    d, ln = cfg.d_model, cfg.norm == "layernorm"  # LayerNorm has a bias, RMSNorm none
    out = {"embed_in.weight": (cfg.vocab_size, d)}
    for i in range(cfg.n_layers):
        b = f"blocks.{i}"
        out.update(_norm(f"{b}.norm1", d, ln))
        out.update(_linear(f"{b}.attn.qkv", d, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, cfg.qkv_bias))
        out.update(_linear(f"{b}.attn.proj", d, d, cfg.bias))
        out.update(_norm(f"{b}.norm2", d, ln))
        out.update(_linear(f"{b}.mlp.fc_in", d, cfg.d_ff, cfg.bias))
        if cfg.mlp == "swiglu":
            out.update(_linear(f"{b}.mlp.fc_gate", d, cfg.d_ff, cfg.bias))
        out.update(_linear(f"{b}.mlp.fc_out", cfg.d_ff, d, cfg.bias))
    out.update(_norm("norm_f", d, ln))
    if not cfg.tie_embeddings:
        out["embed_out.weight"] = (cfg.vocab_size, d)
    return out


def encoder_shapes(cfg: EncoderConfig, task: str, num_labels: int | None = None) -> Shapes:
    d = cfg.d_model
    out = {"encoder.embed_tokens.weight": (cfg.vocab_size, d), "encoder.embed_positions.weight": (cfg.n_positions, d),
           "encoder.embed_types.weight": (cfg.type_vocab_size, d), **_norm("encoder.embed_norm", d, True)}
    for i in range(cfg.n_layers):
        b = f"encoder.blocks.{i}"
        out.update({**_linear(f"{b}.attn.qkv", d, 3 * d, True), **_linear(f"{b}.attn.proj", d, d, True),
                    **_norm(f"{b}.norm1", d, True), **_linear(f"{b}.fc_in", d, cfg.d_ff, True),
                    **_linear(f"{b}.fc_out", cfg.d_ff, d, True), **_norm(f"{b}.norm2", d, True)})
    out.update(_linear("head.dense", d, d, True))
    if task == "mlm":  # the output matrix is the word embedding (tied): only its bias is new
        out.update({**_norm("head.norm", d, True), "head.bias": (cfg.vocab_size,)})
    else:
        if num_labels is None or num_labels < 2:
            raise ModelError(f"a classifier needs at least 2 labels, the data has {num_labels}")
        out.update(_linear("head.out", d, num_labels, True))
    return out


def lora_shapes(shapes: Shapes, lora: LoraConfig) -> Shapes:
    """The adapters apply_lora adds: lora_A (rank, in) and lora_B (out, rank) beside each targeted
    block Linear; a ModelError when a target matches no layer, as apply_lora raises."""
    linears = {n[:-len(".weight")]: s for n, s in shapes.items() if n.startswith("blocks.") and len(s) == 2}
    out = {}
    for name in lora.targeted(list(linears)):
        n_out, n_in = linears[name]
        out.update({f"{name}.lora_A": (lora.rank, n_in), f"{name}.lora_B": (n_out, lora.rank)})
    return out


def parameter_shapes(cfg, task: str, num_labels: int | None = None, lora: LoraConfig | None = None) -> Shapes:
    """name -> shape of the network `cfg` builds for `task`, with `lora`'s adapters when given."""
    shapes = decoder_shapes(cfg) if isinstance(cfg, DecoderConfig) else encoder_shapes(cfg, task, num_labels)
    return {**shapes, **lora_shapes(shapes, lora)} if lora is not None else shapes


def counts(shapes: Shapes, lora: bool = False) -> dict:
    """total, embedding (the lookup tables), head (an output projection onto the vocabulary that is not
    the embedding itself) and trainable (with LoRA: the adapters alone, the base is frozen)."""
    size = {name: _numel(shape) for name, shape in shapes.items()}
    adapters = sum(n for name, n in size.items() if name.endswith((".lora_A", ".lora_B")))
    return {"total": sum(size.values()), "embedding": sum(size.get(n, 0) for n in EMBEDDINGS),
            "head": sum(size.get(n, 0) for n in HEADS), "trainable": adapters if lora else sum(size.values())}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n
