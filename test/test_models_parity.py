"""rafale's Decoder against transformers on the same random weights: GPT-NeoX directly (logits, loss,
cached decoding), and GPT-NeoX / Llama / Qwen2 / Mistral checkpoints written by save_pretrained and
imported through model.init_from (GQA ratios, rope theta and llama3 scaling, tied heads, q/k/v biases,
sharded files); plus the Composer wrapper (loss, metrics, FSDP / checkpointing hooks, FLOPs) and presets."""

import math

import pytest
import torch
from composer.distributed.activation_checkpointing import generate_composer_model_check_fn
from composer.distributed.fsdp2_utils import generate_composer_model_policy
from transformers import (GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from rafale.errors import UserError
from rafale.build import network_for
from rafale.models import preset_config as get_preset, preset_names
from rafale.models.decoder import Decoder, DecoderConfig, KVCache, rope_inv_freq
from rafale.models.family import inverse, rename
from rafale.models.gpt_neox import CONFIG as GPT_NEOX_CONFIG, NAMES as GPT_NEOX
from rafale.models.llama import FAMILY as LLAMA
from rafale.data.causal_lm import CausalLM
from rafale.task_model import TaskModel
from test.conftest import causal_lm as build_model

TOL = 1e-4


def hf_pair(cfg: DecoderConfig, seed: int = 0) -> tuple[GPTNeoXForCausalLM, Decoder]:
    """An HF GPT-NeoX with random weights and a rafale Decoder holding the same tensors."""
    torch.manual_seed(seed)
    hf_cfg = GPTNeoXConfig(**{hf: getattr(cfg, ours) for ours, hf in GPT_NEOX_CONFIG.items()},
                           attention_dropout=0.0, hidden_dropout=0.0)
    hf = GPTNeoXForCausalLM(hf_cfg).eval()
    ours = Decoder(cfg).eval()
    missing, unexpected = ours.load_state_dict(rename(hf.state_dict(), GPT_NEOX), strict=True)
    assert not missing and not unexpected
    return hf, ours


def small(**kw) -> DecoderConfig:
    base = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, max_seq_len=128, init_std=0.1)
    return DecoderConfig(**{**base, **kw})


CONFIGS = {
    "neox-parallel-rot0.25-4h": small(),
    "sequential-rot1.0-2h": small(parallel_residual=False, rotary_pct=1.0, n_heads=2),
    "parallel-rot0.5-8h-3layers": small(d_model=128, n_heads=8, n_layers=3, rotary_pct=0.5, d_ff=200),
    "sequential-rot0.25-1h-tied": small(parallel_residual=False, n_heads=1, tie_embeddings=True),
    "rot0-theta500-eps1e-6": small(rotary_pct=0.0, rope_theta=500.0, norm_eps=1e-6),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_loss_match_transformers(name):
    cfg = CONFIGS[name]
    hf, ours = hf_pair(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (3, 50), generator=g)
    labels = x.clone()
    labels[0, :10] = -100
    labels[2, 30:] = -100
    with torch.no_grad():
        ref = hf(x, labels=labels)
        logits = ours(x)
        lm = TaskModel(ours, CausalLM(CausalLM.Section()), {})
        loss = lm.loss(lm({"input_ids": x, "labels": labels}), {"input_ids": x, "labels": labels})
    diff = (logits - ref.logits).abs().max().item()
    print(f"{name}: max |logits - HF| = {diff:.2e}")
    assert ref.logits.std() > 0.1  # non-trivial weights, so a small diff means something
    assert diff <= TOL
    assert torch.allclose(loss, ref.loss, atol=1e-5, rtol=0)
    # Without labels the targets are input_ids themselves.
    with torch.no_grad():
        assert torch.allclose(lm.loss(logits, {"input_ids": x}), hf(x, labels=x).loss, atol=1e-5, rtol=0)


def test_pythia_14m_shapes_match_transformers():
    cfg = get_preset("pythia-14m", {"init_std": 0.05})
    hf, ours = hf_pair(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    print(f"pythia-14m: max |logits - HF| = {diff:.2e}")
    assert diff <= TOL
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())


def test_cached_forward_in_chunks_matches_full_forward():
    """Prefill, a multi-token chunk after a cached prefix (needs the offset causal mask), then single
    tokens: the logits equal one full forward's, and match HF's."""
    cfg = CONFIGS["neox-parallel-rot0.25-4h"]
    hf, ours = hf_pair(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = ours(x)
        cache = KVCache(cfg, batch_size=2, max_len=24)
        parts = [ours(x[:, :9], cache), ours(x[:, 9:16], cache)]
        parts += [ours(x[:, t:t + 1], cache) for t in range(16, 24)]
        assert cache.pos == 24
        chunked = torch.cat(parts, dim=1)
        hf_full = hf(x).logits
    assert (chunked - full).abs().max() <= 1e-5
    assert (chunked - hf_full).abs().max() <= TOL


def test_weights_round_trip_through_the_name_map():
    cfg = CONFIGS["parallel-rot0.5-8h-3layers"]
    hf, ours = hf_pair(cfg)
    back = rename(ours.state_dict(), inverse(GPT_NEOX))
    assert set(back) == set(hf.state_dict())
    assert all(torch.equal(back[k], v) for k, v in hf.state_dict().items())
    with pytest.raises(KeyError, match="gpt_neox.layers.0.attention.extra"):
        rename({"gpt_neox.layers.0.attention.extra": torch.zeros(1)}, GPT_NEOX)


def test_init_is_deterministic_and_follows_init_std():
    cfg = small(init_std=0.02)
    torch.manual_seed(5)
    a = Decoder(cfg)
    torch.manual_seed(5)
    b = Decoder(cfg)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert abs(a.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.002
    assert torch.all(a.blocks[0].attn.qkv.bias == 0) and torch.all(a.norm_f.weight == 1)


def _eager_and_meta_initialised(cfg) -> tuple[Decoder, Decoder]:
    """A Decoder initialised eagerly, and one built on the meta device and materialised the way
    Composer's FSDP meta init does it (to_empty, re-tie a tied head, param_init_fn on every module),
    from the same RNG state: meta construction draws nothing."""
    eager = Decoder(cfg)
    torch.manual_seed(6)
    eager.apply(eager.param_init_fn)
    with torch.device("meta"):
        lazy = Decoder(cfg)
    lazy.to_empty(device="cpu")
    if cfg.tie_embeddings:
        lazy.embed_out.weight = lazy.embed_in.weight  # to_empty unties; Composer's meta init re-ties the same way
    torch.manual_seed(6)
    lazy.apply(lazy.param_init_fn)
    return eager, lazy


def test_meta_device_init_matches_eager_init():
    """Composer's FSDP meta init calls Decoder.param_init_fn on every module after `to_empty`;
    that must rebuild everything, rotary tables included."""
    eager, lazy = _eager_and_meta_initialised(small())
    assert all(torch.equal(a, b) for a, b in zip(eager.state_dict().values(), lazy.state_dict().values()))
    assert torch.equal(eager.rope_cos, lazy.rope_cos) and torch.equal(eager.rope_sin, lazy.rope_sin)


# --- The Composer wrapper ---


def micro_batch(vocab: int, B: int = 2, T: int = 32) -> dict:
    x = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(4))
    labels = x.clone()
    labels[:, :5] = -100
    return {"input_ids": x, "labels": labels}


def test_composer_loss_backward_and_eval_metrics():
    torch.manual_seed(0)
    model = build_model("pythia-micro", vocab_size=50277)
    batch = micro_batch(50277)
    out = model(batch)
    assert out.shape == (2, 32, 50304)
    loss = model.loss(out, batch)
    # Random init: the loss is about ln(V).
    assert abs(loss.item() - math.log(50304)) < 0.5
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

    assert model.get_metrics(is_train=True) == {}
    metrics = model.get_metrics(is_train=False)
    assert set(metrics) == {"LanguageCrossEntropy", "LanguagePerplexity"}
    with torch.no_grad():
        outputs = model.eval_forward(batch)
        for metric in metrics.values():
            model.update_metric(batch, outputs, metric)
            model.update_metric(batch, outputs, metric)  # two identical batches: same mean
    assert torch.allclose(metrics["LanguageCrossEntropy"].compute(), loss.detach(), atol=1e-5)
    assert torch.allclose(metrics["LanguagePerplexity"].compute(), loss.detach().exp(), rtol=1e-5)


def test_fsdp_and_activation_checkpointing_select_exactly_the_blocks():
    model = build_model("pythia-micro")
    blocks = list(model.model.blocks)
    assert [m for m in model.modules() if model.fsdp_wrap_fn(m)] == blocks
    assert [m for m in model.modules() if model.activation_checkpointing_fn(m)] == blocks
    # What Composer's FSDP2 / activation checkpointing actually do with this model: the Decoder
    # child is one unit, each block another; nothing else.
    policy = generate_composer_model_policy(model)
    assert [m for m in model.modules() if policy._lambda_fn(m)] == [model.model, *blocks]
    check = generate_composer_model_check_fn(model)
    assert [m for m in model.modules() if check(m)] == blocks


def test_flops_per_batch():
    model = build_model("pythia-micro")
    d = model.model
    cfg = d.cfg
    # Everything that is a matmul per token: blocks, final norm, head; not the embedding lookup.
    n = sum(p.numel() for p in d.blocks.parameters()) + sum(p.numel() for p in d.norm_f.parameters())
    n += d.embed_out.weight.numel()
    B, T = 4, 64
    expected = B * (6 * n * T + 3 * cfg.n_layers * 4 * cfg.d_model * T * T)
    assert model.flops_per_batch({"input_ids": torch.zeros(B, T, dtype=torch.long)}) == expected


# --- Presets and build_model ---


def test_pythia_presets_have_the_published_shapes():
    # (d_model, n_layers, n_heads) from EleutherAI/pythia-* config.json; all have d_ff = 4 * d_model.
    published = {"pythia-14m": (128, 6, 4), "pythia-70m": (512, 6, 8), "pythia-160m": (768, 12, 12),
                 "pythia-410m": (1024, 24, 16), "pythia-1b": (2048, 16, 8), "pythia-1.4b": (2048, 24, 16)}
    for name, (d, layers, heads) in published.items():
        cfg = get_preset(name)
        assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_ff) == (d, layers, heads, 4 * d)
        assert (cfg.vocab_size, cfg.max_seq_len, cfg.rotary_pct, cfg.rope_theta) == (50304, 2048, 0.25, 1e4)
        assert cfg.parallel_residual and not cfg.tie_embeddings
    for name in preset_names('causal_lm'):
        get_preset(name)  # every preset is a valid config


def test_build_model_overrides_and_user_errors():
    cfg = build_model("pythia-tiny", overrides={"d_model": 256, "n_layers": 1}).model.cfg
    assert (cfg.d_model, cfg.d_ff, cfg.head_dim, cfg.n_layers) == (256, 1024, 64, 1)  # d_ff follows d_model
    with pytest.raises(UserError, match="pythia-tiny"):
        network_for("causal_lm", "pythia-tinny")
    with pytest.raises(UserError, match="model.n_head"):
        build_model("pythia-micro", overrides={"n_head": 2})
    with pytest.raises(UserError, match="divisible"):
        build_model("pythia-micro", overrides={"n_heads": 5})
    with pytest.raises(UserError, match="60000 tokens"):
        build_model("pythia-micro", vocab_size=60000)


# --- Llama / Qwen2 / Mistral, and HF checkpoints imported through model.init_from ---


def randomize(model: torch.nn.Module, std: float = 0.15) -> None:
    """Non-trivial values in every tensor (norm scales and biases too, which HF initializes to 1 / 0),
    so a tensor loaded into the wrong place or not at all shows in the logits."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            mean = 1.0 if name.endswith("norm.weight") else 0.0
            p.copy_(mean + torch.randn(p.shape, generator=g) * (std if p.dim() >= 2 else 0.1))


def import_pair(hf_cls, hf_cfg, tmp_path, **save_kw):
    """A random transformers model saved with save_pretrained, and rafale's import of that directory."""
    torch.manual_seed(0)
    hf = hf_cls(hf_cfg).eval()
    randomize(hf)
    hf.save_pretrained(tmp_path, **save_kw)
    ours = network_for("causal_lm", init_from=str(tmp_path)).eval()
    return hf, ours


def llama(cls=LlamaConfig, **kw):
    base = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=8,
                max_position_embeddings=128, rms_norm_eps=1e-6, attention_dropout=0.0)
    return cls(**{**base, **kw})


def neox(**kw):
    base = dict(vocab_size=512, hidden_size=64, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128, attention_dropout=0.0, hidden_dropout=0.0)
    return GPTNeoXConfig(**{**base, **kw})


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}

# name -> (HF class, HF config, the rafale config fields the import must produce)
IMPORTS = {
    "neox-parallel-rot0.25-mha": (GPTNeoXForCausalLM, neox(), dict(parallel_residual=True, rotary_dim=4)),
    "neox-sequential-rot1.0-tied-theta500": (
        GPTNeoXForCausalLM, neox(use_parallel_residual=False, rotary_pct=1.0, tie_word_embeddings=True,
                                 rotary_emb_base=500), dict(parallel_residual=False, tie_embeddings=True)),
    "llama-mha-untied": (LlamaForCausalLM, llama(), dict(n_kv_heads=8, tie_embeddings=False, qkv_bias=False)),
    "llama-gqa2-theta500": (LlamaForCausalLM, llama(num_key_value_heads=4, rope_theta=500.0), dict(n_kv_heads=4)),
    "llama-gqa4-tied": (LlamaForCausalLM, llama(num_key_value_heads=2, tie_word_embeddings=True),
                        dict(n_kv_heads=2, tie_embeddings=True)),
    # head_dim 16: the frequencies fall in all three llama3 bands (kept, interpolated, slowed down).
    "llama-gqa4-llama3-rope": (LlamaForCausalLM, llama(num_attention_heads=4, num_key_value_heads=1,
                                                      rope_scaling=LLAMA3_ROPE), dict(n_kv_heads=1)),
    "qwen2-gqa2-qkv-bias-tied-theta1e6": (
        Qwen2ForCausalLM, llama(Qwen2Config, num_key_value_heads=4, tie_word_embeddings=True, rope_theta=1e6),
        dict(qkv_bias=True, bias=False, tie_embeddings=True)),
    "qwen2-mha-untied": (Qwen2ForCausalLM, llama(Qwen2Config, num_attention_heads=4, num_key_value_heads=4),
                         dict(qkv_bias=True, n_kv_heads=4)),
    # A 64-token sliding window: exact for sequences up to 64, so the import caps max_seq_len there.
    "mistral-gqa4-window64": (MistralForCausalLM, llama(MistralConfig, num_key_value_heads=2, sliding_window=64),
                              dict(n_kv_heads=2, max_seq_len=64)),
}


@pytest.mark.parametrize("name", list(IMPORTS))
def test_imported_hf_checkpoint_matches_transformers(name, tmp_path):
    hf_cls, hf_cfg, expect = IMPORTS[name]
    hf, ours = import_pair(hf_cls, hf_cfg, tmp_path)
    for field_name, value in expect.items():
        assert getattr(ours.cfg, field_name) == value, field_name
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    x = torch.randint(0, hf_cfg.vocab_size, (2, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(x, labels=x)
        logits = ours(x)
    diff = (logits - ref.logits).abs().max().item()
    print(f"{name}: max |logits - HF| = {diff:.2e}")
    assert ref.logits.std() > 0.5
    assert diff <= TOL
    assert torch.allclose(CausalLM.loss(None, logits, {"input_ids": x}), ref.loss, atol=1e-5, rtol=0)


def test_sharded_checkpoint_imports(tmp_path):
    hf, ours = import_pair(LlamaForCausalLM, llama(num_key_value_heads=2), tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    x = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max() <= TOL


def test_safetensors_file_with_a_preset(tmp_path):
    """A lone .safetensors file takes its shape from model.preset: here gpt-micro's, saved by transformers."""
    cfg = get_preset("gpt-micro")
    hf = LlamaForCausalLM(LlamaConfig(**LLAMA.hf_config(cfg, 'causal_lm', torch.float32, bos_token_id=0, eos_token_id=0)))
    randomize(hf.eval(), std=0.05)
    hf.save_pretrained(tmp_path)
    ours = network_for("causal_lm", "gpt-micro", vocab_size=50277, init_from=str(tmp_path / "model.safetensors")).eval()
    x = torch.randint(0, 50277, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max() <= TOL
    with pytest.raises(UserError, match="model.safetensors does not fit the model.*wrong shapes"):
        build_model("gpt-tiny", init_from=str(tmp_path / "model.safetensors"))


def test_llama3_rope_frequencies_equal_transformers():
    """Llama-3.2-1B's real rope settings: rafale's frequencies are transformers' to the bit."""
    cfg = get_preset("llama-3.2-1b")
    hf_cfg = LlamaConfig(**LLAMA.hf_config(cfg, 'causal_lm', torch.float32, bos_token_id=0, eos_token_id=0))
    ref = LlamaRotaryEmbedding(hf_cfg).inv_freq
    ours = rope_inv_freq(cfg)
    assert torch.equal(ours, ref)
    assert not torch.equal(ours, rope_inv_freq(get_preset("llama-3.2-1b", {"rope_scaling": None})))


def test_gqa_cached_chunks_match_full_forward(tmp_path):
    hf, ours = import_pair(Qwen2ForCausalLM, llama(Qwen2Config, num_key_value_heads=2), tmp_path)
    cfg = ours.cfg
    x = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = KVCache(cfg, batch_size=2, max_len=24)
        assert cache.k[0].shape == (2, 2, 24, cfg.head_dim)  # n_kv_heads, not n_heads
        parts = [ours(x[:, :9], cache), ours(x[:, 9:16], cache)]
        parts += [ours(x[:, t:t + 1], cache) for t in range(16, 24)]
        chunked = torch.cat(parts, dim=1)
        assert (chunked - ours(x)).abs().max() <= 1e-5
        assert (chunked - hf(x).logits).abs().max() <= TOL


def test_llama_style_meta_init_matches_eager_init():
    eager, lazy = _eager_and_meta_initialised(get_preset("gpt-micro", {"rope_scaling": LLAMA3_ROPE}))
    assert lazy.embed_out.weight is lazy.embed_in.weight
    assert all(torch.equal(a, b) for a, b in zip(eager.state_dict().values(), lazy.state_dict().values()))
    assert torch.equal(eager.rope_cos, lazy.rope_cos)
    assert torch.all(lazy.norm_f.weight == 1) and lazy.blocks[0].attn.qkv.bias is None


def test_llama_style_hooks_and_flops():
    model = build_model("gpt-micro")
    blocks = list(model.model.blocks)
    policy = generate_composer_model_policy(model)
    assert [m for m in model.modules() if policy._lambda_fn(m)] == [model.model, *blocks]
    check = generate_composer_model_check_fn(model)
    assert [m for m in model.modules() if check(m)] == blocks
    cfg = model.model.cfg
    d, hs, nh, nkv, f, V, L = cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.vocab_size, cfg.n_layers
    assert (nh, nkv, f) == (4, 2, 192)
    # Per layer: q (d x nh*hs), k and v (d x nkv*hs each), o, three SwiGLU matrices, two RMSNorm
    # scales; then the final norm and the tied head, counted once.
    n = L * (d * nh * hs + 2 * d * nkv * hs + nh * hs * d + 3 * d * f + 2 * d) + d + V * d
    B, T = 2, 64
    expected = B * (6 * n * T + 3 * L * 4 * nh * hs * T * T)
    assert model.flops_per_batch({"input_ids": torch.zeros(B, T, dtype=torch.long)}) == expected


def test_real_checkpoint_presets_have_the_published_shapes():
    # (vocab, d_model, layers, heads, kv heads, d_ff, positions, rope theta, norm eps, tied, q/k/v bias)
    # from each model's config.json on the HF hub.
    published = {
        "llama-3.2-1b": (128256, 2048, 16, 32, 8, 8192, 131072, 500000.0, 1e-5, True, False),
        "qwen2.5-0.5b": (151936, 896, 24, 14, 2, 4864, 32768, 1000000.0, 1e-6, True, True),
        "smollm2-135m": (49152, 576, 30, 9, 3, 1536, 8192, 100000.0, 1e-5, True, False),
        "tinyllama-1.1b": (32000, 2048, 22, 32, 4, 5632, 2048, 10000.0, 1e-5, False, False),
    }
    for name, shape in published.items():
        c = get_preset(name)
        assert (c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.d_ff, c.max_seq_len, c.rope_theta,
                c.norm_eps, c.tie_embeddings, c.qkv_bias) == shape, name
        assert (c.norm, c.mlp, c.bias, c.rotary_pct, c.parallel_residual, c.head_dim) == \
            ("rmsnorm", "swiglu", False, 1.0, False, 64)
    assert get_preset("llama-3.2-1b").rope_scaling["factor"] == 32.0
    # SmolLM2-135M has 134,515,008 parameters (tied head counted once).
    with torch.device("meta"):
        assert sum(p.numel() for p in Decoder(get_preset("smollm2-135m")).parameters()) == 134_515_008
    assert build_model("gpt-tiny", overrides={"d_model": 256}).model.cfg.d_ff == 704  # 8/3 d, up to 64
