"""Greedy generation: the KV-cache path against full recomputation and against transformers'
`generate` on the same weights (GPT-NeoX, and Llama / Qwen2 imported from save_pretrained directories);
early stop at eos; the length limit. Batches of prompts of 1 to 100 tokens, left-padded: the padded
forward against each prompt alone and transformers' masked forward, batched greedy decoding against
one prompt at a time and transformers' left-padded `generate`, rows ending at eos on their own."""

import pytest
import torch
from transformers import (GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from rafale.errors import UserError
from rafale.build import network_for
from rafale.generate import generate, generate_batch, padded_causal_mask
from rafale.models.decoder import Decoder, DecoderConfig
from rafale.models.family import rename
from rafale.models.gpt_neox import CONFIG as GPT_NEOX_CONFIG, NAMES as GPT_NEOX

N_NEW = 32


# Llama-family models through the import path; q/k/v biases (Qwen2) random so they matter.
IMPORTED = {
    "llama-gqa4": (LlamaForCausalLM, LlamaConfig, dict(num_attention_heads=8, num_key_value_heads=2, rope_theta=500.0)),
    "qwen2-gqa2-bias": (Qwen2ForCausalLM, Qwen2Config, dict(num_attention_heads=4, num_key_value_heads=2)),
}


def make_pair(name: str, max_len: int, tmp_path_factory):
    """(HF model, rafale Decoder) sharing random weights, large enough init that argmax is not flat."""
    if name in IMPORTED:
        hf_cls, cfg_cls, kw = IMPORTED[name]
        torch.manual_seed(0)
        hf = hf_cls(cfg_cls(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                            max_position_embeddings=max_len, initializer_range=0.15, **kw)).eval()
        with torch.no_grad():
            for pname, p in hf.named_parameters():
                if pname.endswith("bias"):
                    p.normal_(0.0, 0.2)
        path = tmp_path_factory.mktemp(name)
        hf.save_pretrained(path)
        return hf, network_for("causal_lm", init_from=str(path)).eval()
    kw = dict(vocab_size=1000, d_model=64, n_layers=3, n_heads=4, max_seq_len=max_len, init_std=0.15)
    if name == "sequential-rot1.0":
        kw.update(parallel_residual=False, rotary_pct=1.0, n_heads=2)
    cfg = DecoderConfig(**kw)
    torch.manual_seed(0)
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(**{hf: getattr(cfg, ours) for ours, hf in GPT_NEOX_CONFIG.items()})).eval()
    ours = Decoder(cfg).eval()
    ours.load_state_dict(rename(hf.state_dict(), GPT_NEOX))
    return hf, ours


@pytest.fixture(scope="module", params=["parallel-rot0.25", "sequential-rot1.0", *IMPORTED])
def pair(request, tmp_path_factory):
    return make_pair(request.param, 96, tmp_path_factory)


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


# One batch mixing prompts of 1 to 100 tokens: every row but one is left-padded, by up to 99 positions.
MIXED_LENGTHS = [1, 100, 7, 33, 64, 2]


@pytest.fixture(scope="module", params=["parallel-rot0.25", "llama-gqa4"])
def long_pair(request, tmp_path_factory):
    return make_pair(request.param, max(MIXED_LENGTHS) + N_NEW, tmp_path_factory)


def mixed_prompts(vocab: int = 1000) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in MIXED_LENGTHS]


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) as transformers' tokenizers pad on the left (pad id 0)."""
    T = max(map(len, prompts))
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p)
        mask[b, T - len(p):] = 1
    return ids, mask


def hf_left_padded_generate(hf, prompts: list[list[int]], **kw) -> list[list[int]]:
    ids, mask = left_padded(prompts)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=N_NEW, pad_token_id=0, **kw)
    return out[:, ids.shape[1]:].tolist()


def test_left_padded_forward_matches_each_row_alone_and_transformers(long_pair):
    """forward_hidden with per-row positions and a padding mask: every real position's logits equal that
    prompt's own unpadded forward (the is_causal fast path) and transformers' with the attention mask."""
    hf, ours = long_pair
    prompts = mixed_prompts()
    ids, hf_mask = left_padded(prompts)
    T = ids.shape[1]
    real = hf_mask.bool()
    positions = (torch.arange(T) - (T - hf_mask.sum(1, keepdim=True))).clamp(min=0)
    with torch.no_grad():
        padded = ours.head(ours.forward_hidden(ids, position_ids=positions,
                                               attn_mask=padded_causal_mask(real, 0, T)))
        ref = hf(ids, attention_mask=hf_mask, position_ids=positions).logits
        for b, p in enumerate(prompts):
            alone = ours(torch.tensor([p]))[0]
            assert (padded[b, T - len(p):] - alone).abs().max() <= 1e-5
            assert (padded[b, T - len(p):] - ref[b, T - len(p):]).abs().max() <= 1e-4
    assert not padded.isnan().any()  # pad queries attend to themselves, so nothing is 0/0


def test_batched_greedy_equals_single_prompts_and_transformers_left_padded(long_pair):
    hf, ours = long_pair
    prompts = mixed_prompts()
    batched = generate_batch(ours, prompts, N_NEW)
    uncached = generate_batch(ours, prompts, N_NEW, use_cache=False)
    ref = hf_left_padded_generate(hf, prompts, eos_token_id=None)
    assert len({t for c in batched for t in c.output_ids}) > 50  # real continuations, not one token repeated
    for b, p in enumerate(prompts):
        alone = generate_batch(ours, [p], N_NEW)[0]
        assert batched[b].finish_reason == "length" and len(batched[b].output_ids) == N_NEW
        assert batched[b].output_ids == alone.output_ids == uncached[b].output_ids == ref[b]


def test_batched_rows_stop_at_eos_alone(long_pair):
    """Rows that emit eos end there (finish_reason eos, eos the last output id) while the others go on;
    transformers' left-padded generate agrees up to each row's eos."""
    hf, ours = long_pair
    prompts = mixed_prompts()
    free = generate_batch(ours, prompts, N_NEW)
    eos = free[1].output_ids[3]  # row 1 emits it at step 3 or earlier
    out = generate_batch(ours, prompts, N_NEW, eos_token_id=eos)
    ref = hf_left_padded_generate(hf, prompts, eos_token_id=eos)
    reasons = set()
    for b in range(len(prompts)):
        ids = free[b].output_ids
        end = ids.index(eos) + 1 if eos in ids else N_NEW
        assert out[b].output_ids == ids[:end] == ref[b][:end]
        assert out[b].finish_reason == ("eos" if eos in ids else "length")
        reasons.add(out[b].finish_reason)
    assert reasons == {"eos", "length"}  # both kinds of row in the batch
