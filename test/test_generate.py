"""Greedy generation: the KV-cache path against full recomputation and against transformers'
`generate` on the same weights (GPT-NeoX, and Llama / Qwen2 imported from save_pretrained directories);
early stop at eos; the length limit."""

import pytest
import torch
from transformers import (GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from rafale.errors import UserError
from rafale.generate import generate
from rafale.build import network_for
from rafale.models.decoder import Decoder, DecoderConfig
from rafale.models.family import rename
from rafale.models.gpt_neox import CONFIG as GPT_NEOX_CONFIG, NAMES as GPT_NEOX

N_NEW = 32


# Llama-family models through the import path; q/k/v biases (Qwen2) random so they matter.
IMPORTED = {
    "llama-gqa4": (LlamaForCausalLM, LlamaConfig, dict(num_attention_heads=8, num_key_value_heads=2, rope_theta=500.0)),
    "qwen2-gqa2-bias": (Qwen2ForCausalLM, Qwen2Config, dict(num_attention_heads=4, num_key_value_heads=2)),
}


@pytest.fixture(scope="module", params=["parallel-rot0.25", "sequential-rot1.0", *IMPORTED])
def pair(request, tmp_path_factory):
    """(HF model, rafale Decoder) sharing random weights, large enough init that argmax is not flat."""
    if request.param in IMPORTED:
        hf_cls, cfg_cls, kw = IMPORTED[request.param]
        torch.manual_seed(0)
        hf = hf_cls(cfg_cls(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                            max_position_embeddings=96, initializer_range=0.15, **kw)).eval()
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.2)
        path = tmp_path_factory.mktemp(request.param)
        hf.save_pretrained(path)
        return hf, network_for("causal_lm", init_from=str(path)).eval()
    kw = dict(vocab_size=1000, d_model=64, n_layers=3, n_heads=4, max_seq_len=96, init_std=0.15)
    if request.param == "sequential-rot1.0":
        kw.update(parallel_residual=False, rotary_pct=1.0, n_heads=2)
    cfg = DecoderConfig(**kw)
    torch.manual_seed(0)
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(**{hf: getattr(cfg, ours) for ours, hf in GPT_NEOX_CONFIG.items()})).eval()
    ours = Decoder(cfg).eval()
    ours.load_state_dict(rename(hf.state_dict(), GPT_NEOX))
    return hf, ours


def prompts(B: int, T: int = 11, vocab: int = 1000) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(B))


@pytest.mark.parametrize("B", [1, 3])
def test_cached_equals_uncached_equals_transformers(pair, B):
    hf, ours = pair
    x = prompts(B)
    cached = generate(ours, x, N_NEW)
    uncached = generate(ours, x, N_NEW, use_cache=False)
    with torch.no_grad():
        # eos_token_id=None: HF must not stop early; pad_token_id set only to keep it quiet.
        ref = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=N_NEW,
                          eos_token_id=None, pad_token_id=0)[:, x.shape[1]:]
    assert cached.shape == (B, N_NEW) and cached.dtype == torch.long
    for row in cached:
        assert len(set(row.tolist())) > 5  # a real continuation, not one token repeated
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, ref)


def test_stops_when_every_row_has_emitted_eos(pair):
    _, ours = pair
    x = prompts(2)
    free = generate(ours, x, N_NEW)
    eos = free[0, 4].item()  # row 0 emits it at step 4 (or earlier)

    def first(row):
        hits = (row == eos).nonzero()
        return hits[0].item() if len(hits) else None

    out = generate(ours, x, N_NEW, eos_token_id=eos)
    ends = [first(r) for r in free]
    n = N_NEW if None in ends else max(ends) + 1
    assert out.shape == (2, n)
    for row, end in zip(range(2), ends):
        stop = n if end is None else end + 1
        assert torch.equal(out[row, :stop], free[row, :stop])  # same tokens up to and including eos
        assert torch.all(out[row, stop:] == eos)  # then eos padding
    single = generate(ours, x[:1], N_NEW, eos_token_id=eos)
    assert torch.equal(single[0], free[0, :ends[0] + 1])


def test_length_limit_is_a_user_error(pair):
    _, ours = pair
    x = prompts(1, T=90)
    assert generate(ours, x, 6).shape == (1, 6)  # exactly max_seq_len (96) in all
    with pytest.raises(UserError, match="max_seq_len"):
        generate(ours, x, 7)
