"""rafale's Decoder against transformers' GPTNeoXForCausalLM on the same random weights (logits, loss,
cached decoding), plus the Composer wrapper (loss, metrics, FSDP / checkpointing hooks, FLOPs) and
presets."""

import math

import pytest
import torch
from composer.distributed.activation_checkpointing import generate_composer_model_check_fn
from composer.distributed.fsdp2_utils import generate_composer_model_policy
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from rafale.errors import UserError
from rafale.models.composer import CausalLM, build_model
from rafale.models.decoder import Decoder, DecoderConfig, KVCache
from rafale.models.hf_maps import GPT_NEOX, GPT_NEOX_CONFIG, inverse, rename
from rafale.models.presets import PRESETS, get_preset

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
        lm = CausalLM(cfg)
        lm.model = ours
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


def test_meta_device_init_matches_eager_init():
    """Composer's FSDP meta init calls Decoder.param_init_fn on every module after `to_empty`;
    that must rebuild everything, rotary tables included."""
    cfg = small()
    eager = Decoder(cfg)
    torch.manual_seed(6)
    eager.apply(eager.param_init_fn)  # same RNG state for both: meta construction draws nothing
    with torch.device("meta"):
        lazy = Decoder(cfg)
    lazy.to_empty(device="cpu")
    torch.manual_seed(6)
    lazy.apply(lazy.param_init_fn)
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
    for name in PRESETS:
        get_preset(name)  # every preset is a valid config


def test_build_model_overrides_and_user_errors():
    cfg = build_model("pythia-tiny", overrides={"d_model": 256, "n_layers": 1}).model.cfg
    assert (cfg.d_model, cfg.d_ff, cfg.head_dim, cfg.n_layers) == (256, 1024, 64, 1)  # d_ff follows d_model
    with pytest.raises(UserError, match="pythia-tiny"):
        get_preset("pythia-tinny")
    with pytest.raises(UserError, match="model.n_head"):
        build_model("pythia-micro", overrides={"n_head": 2})
    with pytest.raises(UserError, match="divisible"):
        build_model("pythia-micro", overrides={"n_heads": 5})
    with pytest.raises(UserError, match="60000 tokens"):
        build_model("pythia-micro", vocab_size=60000)
