"""`rafale config show`: a config as it will run (overrides applied, defaults filled in) and what it
costs: exact parameter counts of the network it builds, training FLOPs per token, tokens per step
and an estimate of the peak memory of training it on CPU.

Neither torch nor Composer is imported: the counts come from the network config the model section
resolves to (rafale/build.py `model_config`) through the parameter shapes of rafale/models/shapes.py,
which the tests hold to the built networks, and the vocabulary and labels from the tokenizer and the
label column (the pipeline's `network_meta`), not from preparing the data. A network only a
user's code knows (model.class) or FLOPs only a user's pipeline counts (its own `flops`) are
measured on the network built on torch's meta device instead. The memory estimate adds up:

    runtime      the process once torch, Composer and the data libraries are imported (RUNTIME_MB,
                 measured: ru_maxrss after `import rafale.train` on CPU, torch 2.7 and Composer 0.32)
    state        fp32 weights + gradients + optimizer state (AdamW 2, Lion and SGD 1 per parameter)
    activations  what backward keeps per micro-batch token and layer (ACTIVATION_FLOATS), and LoRA's
                 dropped inputs (LORA_DROPOUT_FLOATS)
    head         decoders: the fused head + loss's chunk of logits (models/losses.py); masked LM: the
                 logits, log-softmax and gradient at the masked positions
    retained     the freed activation blocks glibc's malloc keeps in its heap (RETAINED_ACTIVATIONS)

bench/train_memory.py compares it with the measured peak RSS of every bundled config.
"""

from rafale.components import Component
from rafale.config import Config
from rafale.errors import UserError
from rafale.models.family import ModelError

MB = 2 ** 20
RUNTIME_MB = 810
# Floats saved for backward per token and layer, in units of d_model and d_ff: the block input, the
# two norms' inputs and outputs, q, k, v, the attention output and its projection, the residual sum
# (about 10 d), and the MLP's hidden activations: before and after the nonlinearity (2 d_ff), and
# for a gated MLP (swiglu) the gate, its silu, the up projection and their product (4 d_ff).
ACTIVATION_FLOATS = {"gelu": (10, 2), "swiglu": (10, 4)}
# A LoRA adapter with dropout keeps, per token, its dropped input (fp32) and the dropout's mask (one
# byte a float): 1.25 floats per input feature of each targeted layer. Without dropout it keeps nothing
# beyond the rank-sized intermediate, which the base layer's saved input dwarfs.
LORA_DROPOUT_FLOATS = 1.25
# Peak RSS also holds what the allocator keeps. glibc's malloc serves the 0.1-32 MB blocks of activations
# from its heap and keeps them there once backward frees them, fragmented, so the next micro-batch's
# activations fit in them only in part. bench/train_memory.py reads the heap after each backward
# (mallinfo2): its free part is 1.8-3.5x the activations just freed on the bundled configs (4.7 GB for
# 2.0 GB on smollm2-sft), that is 0.75-2.5 working sets kept beyond them; counting one puts the estimate
# at 0.86-0.98 of the measured peak RSS. Logits' chunks, over 32 MB, are mapped and unmapped instead.
# Handing the freed blocks back after each backward (malloc_trim) would save the memory (smollm2-sft:
# 4,275 MB peak), but faulting the pages in again made its steps 1.3x slower (13.5-14 s against 10.5 s).
RETAINED_ACTIVATIONS = 1.0
OPTIMIZER_STATES = {"adamw": 2, "decoupled_adamw": 2, "lion": 1, "sgd": 1}
HEAD_CHUNK_ROWS = 512  # rafale.models.losses: rows of logits the fused head computes at a time
HEAD_PLAIN_MAX_VOCAB = 256  # rafale.models.losses: smaller heads hold their logits whole


def parameter_counts(network, vocab_size: int | None) -> dict:
    """A built network's counts (torch.nn.Module): total (each shared tensor once), embedding (token,
    position and type tables), head (an output projection onto the vocabulary that is not the embedding
    itself) and trainable (requires_grad)."""
    import torch

    params = {id(p): p for p in network.parameters()}.values()
    embeddings = {id(m.weight): m.weight for m in network.modules() if isinstance(m, torch.nn.Embedding)}
    head = {id(m.weight): m.weight for m in network.modules()
            if isinstance(m, torch.nn.Linear) and vocab_size and m.out_features == vocab_size
            and id(m.weight) not in embeddings}
    return {"total": sum(p.numel() for p in params),
            "embedding": sum(p.numel() for p in embeddings.values()),
            "head": sum(p.numel() for p in head.values()),
            "trainable": sum(p.numel() for p in params if p.requires_grad)}


def describe(cfg: Config) -> dict:
    """{"hash", "config", "parameters", "flops_per_token", "tokens_per_step", "memory"}."""
    from rafale.build import model_config, pipeline_of
    from rafale.models import shapes

    pipeline = pipeline_of(cfg)
    if isinstance(cfg.model, Component) or not _counts_own_flops(type(pipeline)):
        return _describe_built(cfg, pipeline)
    meta = pipeline.network_meta()
    family, ncfg = model_config(cfg, meta, pipeline.task)
    lora = _lora(cfg.model.lora)
    try:
        params = shapes.parameter_shapes(ncfg, pipeline.task, len(meta.get("labels") or ()), lora)
    except ModelError as e:
        raise UserError(str(e)) from None
    counts = shapes.counts(params, lora is not None)
    seq = cfg.data.max_seq_len
    return {"hash": cfg.hash(), "config": cfg.to_dict(), "parameters": counts,
            "flops_per_token": pipeline.sequence_flops(ncfg, counts, seq) / seq,
            "tokens_per_step": cfg.train.global_batch_size * seq,
            "memory": memory_estimate(cfg, ncfg, pipeline.task == "causal_lm", counts, ncfg.vocab_size,
                                      lora_inputs=sum(shape[1] for name, shape in params.items()
                                                      if name.endswith(".lora_A")))}


def _counts_own_flops(pipeline: type) -> bool:
    """Whether the class that defines the pipeline's `sequence_flops` also defines its `flops` (or a
    subclass of it): a user's pipeline that overrides only `flops` needs the network."""
    owner = {attr: next(c for c in pipeline.__mro__ if attr in vars(c)) for attr in ("flops", "sequence_flops")}
    return issubclass(owner["sequence_flops"], owner["flops"])


def _lora(section):
    from rafale.models.configs import LoraConfig

    if section is None:
        return None
    try:
        return LoraConfig(rank=section.rank, alpha=section.alpha, dropout=section.dropout, targets=list(section.targets))
    except ModelError as e:
        raise UserError(str(e)) from None


def _describe_built(cfg: Config, pipeline) -> dict:
    """describe() by building the network on the meta device: model.class networks exist only as the
    user's code builds them, and a user's own `flops` reads the network."""
    import torch

    from rafale.build import build_network

    meta = pipeline.model_meta()
    with torch.device("meta"):
        network = build_network(cfg, meta)
    seq = cfg.data.max_seq_len
    ncfg = getattr(network, "cfg", None)
    vocab = getattr(ncfg, "vocab_size", meta.get("vocab_size"))  # padded, as built
    counts = parameter_counts(network, vocab)
    flops = pipeline.flops(network, _full_sequence(cfg)) / seq
    return {"hash": cfg.hash(), "config": cfg.to_dict(), "parameters": counts, "flops_per_token": flops,
            "tokens_per_step": cfg.train.global_batch_size * seq,
            "memory": memory_estimate(cfg, ncfg, hasattr(network, "embed_out"), counts, vocab)}


def _full_sequence(cfg: Config) -> dict:
    """A batch of one max_seq_len sequence for the pipeline's `flops`: its shapes are all that counts,
    and for masked LM the share of positions with a target (data.mlm_probability)."""
    import torch

    from rafale.data.pipeline import IGNORE_INDEX

    seq = cfg.data.max_seq_len
    labels = torch.full((1, seq), IGNORE_INDEX)
    labels[0, :round(getattr(cfg.data, "mlm_probability", 1.0) * seq)] = 0
    return {"input_ids": torch.zeros(1, seq, dtype=torch.long), "labels": labels}


def memory_estimate(cfg: Config, ncfg, decoder: bool, counts: dict, vocab_size: int | None,
                    lora_inputs: int = 0) -> dict:
    """Peak RSS of training on CPU in fp32, in MB, and its parts, for a network of config `ncfg` (None:
    not rafale's, no activations counted); `decoder`: it has the fused head of a causal LM;
    `lora_inputs`: the input features of every layer LoRA targets, summed over the network."""
    optim = getattr(cfg.optim, "name", "adamw")
    state = counts["total"] * 4 + counts["trainable"] * 4 * (1 + OPTIMIZER_STATES.get(optim, 2))
    activations = head = 0
    if ncfg is not None:
        tokens = min(cfg.train.device_microbatch_size, cfg.train.global_batch_size) * cfg.data.max_seq_len
        d, d_ff = ncfg.d_model, ncfg.d_ff
        per_d, per_ff = ACTIVATION_FLOATS.get(getattr(ncfg, "mlp", "gelu"), ACTIVATION_FLOATS["gelu"])
        activations = tokens * ncfg.n_layers * (per_d * d + per_ff * d_ff) * 4
        if lora_inputs and cfg.model.lora.dropout > 0:
            activations += tokens * lora_inputs * LORA_DROPOUT_FLOATS * 4
        if decoder and vocab_size and vocab_size <= HEAD_PLAIN_MAX_VOCAB:
            head = 3 * tokens * vocab_size * 4  # a small head: logits, log-softmax and gradient, whole
        elif decoder and vocab_size:  # a decoder: the fused head's chunk of logits
            head = min(HEAD_CHUNK_ROWS, tokens) * vocab_size * 4
        elif hasattr(cfg.data, "mlm_probability") and vocab_size:
            # masked LM: logits, their log-softmax and its gradient at the masked positions
            head = 3 * round(cfg.data.mlm_probability * tokens) * vocab_size * 4
    parts = {"runtime_mb": RUNTIME_MB, "state_mb": state / MB, "activations_mb": activations / MB,
             "head_mb": head / MB, "retained_mb": RETAINED_ACTIVATIONS * activations / MB}
    return {"peak_training_mb": sum(parts.values()), **parts}


def format_description(d: dict) -> str:
    import yaml

    p, m = d["parameters"], d["memory"]
    lines = [yaml.safe_dump(d["config"], sort_keys=False).rstrip(), "",
             f"run hash          {d['hash']}",
             f"parameters        {p['total']:,} total, {p['embedding']:,} embedding, {p['head']:,} head, "
             f"{p['trainable']:,} trainable",
             f"FLOPs per token   {d['flops_per_token']:,.0f} (training: forward + backward)",
             f"tokens per step   {d['tokens_per_step']:,} (global_batch_size x max_seq_len)",
             f"peak memory       ~{m['peak_training_mb']:,.0f} MB training on CPU, fp32 (runtime "
             f"{m['runtime_mb']:,.0f} + weights, gradients, optimizer {m['state_mb']:,.0f} + activations "
             f"{m['activations_mb']:,.0f} + head {m['head_mb']:,.0f} + kept by the allocator "
             f"{m['retained_mb']:,.0f})"]
    return "\n".join(lines)
