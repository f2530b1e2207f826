"""The decoder-only transformer, all of it in this file: config, attention with rotary and a KV cache,
blocks, and the `Decoder` module that training (data/causal_lm.py) and generation (generate.py) share.

Two families are switches on one `DecoderConfig`, not two copies of the model:

    GPT-NeoX / Pythia: LayerNorm, GELU MLP, partial rotary, parallel residual, biases everywhere
    Llama ("gpt-*" presets), Mistral, Qwen2: RMSNorm, SwiGLU MLP, full rotary (Llama-3 frequency
        scaling optional), grouped-query attention, sequential residual, no biases (Qwen2: q/k/v only)

Parameter names map onto transformers' `GPTNeoXForCausalLM` / `LlamaForCausalLM` / `Qwen2ForCausalLM`
through the literal tables of the families (models/gpt_neox.py, models/llama.py: q/k/v are fused here, split there),
and the logits match transformers to float precision (test/test_models_parity.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rafale.models import attention
from rafale.models.configs import DecoderConfig
from rafale.models.losses import linear_cross_entropy

class KVCache:
    """Keys and values of every layer for up to `max_len` positions, allocated once.

    `pos` is the number of positions already written; the next forward writes at [pos, pos + T)
    and takes its rotary positions from there. With grouped-query attention only the n_kv_heads
    are stored: the cache is n_heads / n_kv_heads times smaller than the query side.
    """

    def __init__(self, cfg: DecoderConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        self.max_len = max_len or cfg.max_seq_len
        shape = (batch_size, cfg.n_kv_heads, self.max_len, cfg.head_dim)  # (B, nkv, L, hs)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0


class RMSNorm(nn.Module):
    """As transformers' LlamaRMSNorm: normalized in fp32, cast back, then scaled (the order matters
    in bf16, so torch's nn.RMSNorm, which scales before casting, is not used)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _norm(cfg: DecoderConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


def rope_inv_freq(cfg: DecoderConfig) -> torch.Tensor:
    """(rotary_dim / 2,) rotation frequencies, with Llama 3.1's scaling when configured: wavelengths
    longer than the original context are slowed down by `factor`, short ones kept, the band between
    interpolated (transformers' `_compute_llama3_parameters`, same float32 arithmetic)."""
    rd = cfg.rotary_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd)
    if cfg.rope_scaling is None:
        return inv_freq
    s = cfg.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates the first cos.shape[-1] dims of each head of x (..., hs); cos/sin broadcast against x's
    leading dims, and `sin` carries rotate_half's sign: cat(-sin, sin) over the two halves.

    The NeoX / HF convention: dim i pairs with dim i + rd/2 (not adjacent dims as in the original
    RoFormer), x_rot * cos + rotate_half(x_rot) * sin with rotate_half = cat(-x2, x1). With the sign in
    the table the products are the same ((-x2) * s == x2 * (-s) exactly), so the same bits, in fewer
    ops: on CPU every op on a rotary half of a small head reads runs of rd/2 floats, and a slice's
    backward zero-fills a gradient of x's size (`split` and `cat` are used instead)."""
    rd = cos.shape[-1]
    if rd == 0:
        return x
    x_rot, x_pass = x.split((rd, x.shape[-1] - rd), dim=-1)
    x1, x2 = x_rot.chunk(2, dim=-1)
    return torch.cat((x_rot * cos + torch.cat((x2, x1), dim=-1) * sin, x_pass), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.n_rep = cfg.n_heads // cfg.n_kv_heads  # query heads per key/value head
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)

    def _split_qkv(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        # One group per key/value head: [its n_rep query heads, its key, its value]. With n_rep = 1
        # that is GPT-NeoX's per-head [q_h, k_h, v_h], so HF's query_key_value loads as is; Llama's
        # separate q/k/v_proj are interleaved into it on import (models/llama.py). Query head h reads
        # key/value head h // n_rep, as transformers' repeat_kv pairs them. Queries and keys are
        # rotated together, and split with `split` (whose backward is one cat, where a slice's or a
        # select's zero-fills the whole qkv gradient each).
        B, T, _ = qkv.shape
        qkv = qkv.view(B, T, self.n_kv_heads, self.n_rep + 2, self.head_dim)
        qk, v = qkv.split((self.n_rep + 1, 1), dim=3)
        q, k = apply_rotary(qk, cos, sin).split((self.n_rep, 1), dim=3)
        q = q.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        return q, k.squeeze(3).transpose(1, 2), v.squeeze(3).transpose(1, 2)  # (B, nkv, T, hs) x 2

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None, pos: int = 0,
                plan: attention.Plan | None = None) -> torch.Tensor:
        """x (B, T, C); cos/sin (T, 1, 1, rd), or (B, T, 1, 1, rd) for per-row positions (apply_rotary). With `kv` (this layer's
        cache buffers) the new keys/values are written at [pos, pos + T) and attention runs over
        [0, pos + T). `plan` says which kernel attends and with what mask (models/attention.py); None is
        SDPA's plain causal attention."""
        B, T, C = x.shape
        q, k, v = self._split_qkv(self.qkv(x), cos, sin)  # (B, nh, T, hs), (B, nkv, T, hs) x 2
        if kv is not None:
            k_buf, v_buf = kv
            k_buf[:, :, pos:pos + T] = k
            v_buf[:, :, pos:pos + T] = v
            k, v = k_buf[:, :, :pos + T], v_buf[:, :, :pos + T]  # (B, nkv, pos+T, hs)
        plan = plan or attention.Plan("sdpa")
        if self.n_rep > 1 and plan.expands_kv:
            # SDPA's enable_gqa would skip this copy, but in torch 2.7 only its flash and math kernels
            # take it (fp32 on a GPU would fall back to math, O(T^2) memory); expanding keeps them all.
            k, v = k.repeat_interleave(self.n_rep, dim=1), v.repeat_interleave(self.n_rep, dim=1)
        return self.proj(attention.attend(plan, q, k, v))  # (B, T, nh*hs) -> (B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        self.fc_in = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)  # SwiGLU's "up"
        if self.swiglu:
            self.fc_gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.fc_out = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)  # SwiGLU's "down"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.fc_out(F.silu(self.fc_gate(x)) * self.fc_in(x))
        # Exact erf GELU: transformers' "gelu", which Pythia uses (not the tanh approximation).
        return self.fc_out(F.gelu(self.fc_in(x)))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.parallel_residual = cfg.parallel_residual
        self.norm1 = _norm(cfg)
        self.attn = Attention(cfg)
        self.norm2 = _norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, kv=None, pos=0, plan=None):
        a = self.attn(self.norm1(x), cos, sin, kv, pos, plan)
        if self.parallel_residual:
            return x + a + self.mlp(self.norm2(x))
        x = x + a
        return x + self.mlp(self.norm2(x))


class Decoder(nn.Module):
    """Token ids (B, T) -> logits (B, T, vocab_size). One module with the blocks in `self.blocks`,
    so Composer can FSDP-wrap it as a whole and each block inside it (`fsdp_wrap_fn`).

    With cfg.attention "flash", `flash_kernels` is the module holding flash_attn_func and
    flash_attn_varlen_func (default: flash-attn itself, a ModelError when it cannot run here)."""

    def __init__(self, cfg: DecoderConfig, flash_kernels=None):
        super().__init__()
        self.cfg = cfg
        self.flash = (flash_kernels or attention.load_flash()) if cfg.attention == "flash" else None
        self.embed_in = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_f = _norm(cfg)
        self.embed_out = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            # One tensor under both names, as transformers ties them (both keys stay in the state dict).
            self.embed_out.weight = self.embed_in.weight
        # Rotary tables for every position, in fp32 whatever the model dtype (as HF computes them);
        # non-persistent: derived from the config, so they are not part of checkpoints.
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, cfg.rotary_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, cfg.rotary_dim), persistent=False)
        self.apply(self.param_init_fn)

    @torch.no_grad()
    def param_init_fn(self, module: nn.Module) -> None:
        """Initializes one module's own tensors. Composer calls it per module after FSDP meta init."""
        std = self.cfg.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif module is self:
            inv_freq = rope_inv_freq(self.cfg).to(self.rope_cos.device)  # (rd/2,)
            positions = torch.arange(self.cfg.max_seq_len, dtype=torch.float32, device=inv_freq.device)
            freqs = torch.outer(positions, inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)  # (max_seq_len, rd)
            self.rope_cos.copy_(emb.cos())
            self.rope_sin.copy_(emb.sin())

    def fsdp_wrap_fn(self, module: nn.Module) -> bool:
        # Composer's FSDP2 asks the ComposerModel's direct child (this module) which submodules to wrap.
        return isinstance(module, Block)

    def activation_checkpointing_fn(self, module: nn.Module) -> bool:
        return isinstance(module, Block)

    def forward_hidden(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                       position_ids: torch.Tensor | None = None,
                       attn_mask: torch.Tensor | None = None,
                       documents: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> final-norm hidden states (B, T, C), before the head. With `cache`, the
        tokens continue the cached prefix and the cache advances by T.

        Rows that do not all start at position 0 (left padding, packed documents) pass `position_ids`
        (B, T), each token's rotary position, and `attn_mask` (B, 1, T, cache.pos + T) bool, True where
        query i may attend key j; the caller builds causality and padding into it, and gives every query
        at least one key (a query that attends to nothing gets NaN from SDPA). Without them: positions
        cache.pos .. cache.pos + T - 1 in every row and causal attention (SDPA's is_causal fast path).

        Packed rows (training and evaluation, no cache) pass `documents` (B, T) instead: each token's
        document index in its row; positions restart at every document and attention stays inside it.
        Without a cache the kernel is cfg.attention's; decoding with a cache always runs SDPA."""
        B, T = input_ids.shape
        if documents is not None:
            if cache is not None or position_ids is not None or attn_mask is not None:
                raise ValueError("documents describe whole packed rows: pass them without a cache, positions or mask")
            position_ids = attention.document_positions(documents)
        pos = cache.pos if cache is not None else 0
        if pos + T > self.cfg.max_seq_len:
            raise ValueError(f"{pos + T} positions exceed the model's max_seq_len ({self.cfg.max_seq_len})")
        dtype = self.embed_in.weight.dtype
        # Shaped to broadcast over the (B, T, nkv, n_rep + 1, hs) queries and keys that Attention rotates.
        if position_ids is None:
            cos = self.rope_cos[pos:pos + T, None, None].to(dtype)  # (T, 1, 1, rd)
            sin = self.rope_sin[pos:pos + T, None, None].to(dtype)
        else:
            cos = self.rope_cos[position_ids][:, :, None, None].to(dtype)  # (B, T, 1, 1, rd)
            sin = self.rope_sin[position_ids][:, :, None, None].to(dtype)
        half = self.cfg.rotary_dim // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)  # rotate_half's sign (apply_rotary)
        mask = attn_mask
        if mask is None and pos > 0 and T > 1:
            # A chunk after a cached prefix: query i sits at position pos + i and sees keys 0..pos+i.
            # (SDPA's is_causal aligns the triangle top-left, which is wrong once keys outnumber queries.)
            keys = torch.arange(pos + T, device=input_ids.device)
            mask = keys[None, :] <= (pos + torch.arange(T, device=input_ids.device))[:, None]  # (T, pos+T)
        if cache is None and mask is None:
            plan = attention.plan(self.cfg.attention, documents, T, input_ids.device, flash=self.flash)
        else:
            plan = attention.Plan("sdpa", sdpa_mask=mask)
        x = self.embed_in(input_ids)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            kv = (cache.k[i], cache.v[i]) if cache is not None else None
            x = block(x, cos, sin, kv, pos, plan)
        if cache is not None:
            cache.pos += T
        return self.norm_f(x)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., C) -> logits (..., vocab_size)."""
        return self.embed_out(h)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                targets: torch.Tensor | None = None, documents: torch.Tensor | None = None,
                response_mask: torch.Tensor | None = None):
        """Logits (B, T, V); or, given `targets` (B, T) (-100 where none), the mean cross-entropy
        against them, with the head fused into the loss so the logits are never held whole
        (models/losses.py); or, given `response_mask` (B, T), each sequence's summed log-probability of
        its masked tokens and their count (models/preference.py `sequence_logps`). Inside forward, so
        FSDP has the head's weight gathered either way. `documents`: packed rows (see forward_hidden)."""
        h = self.forward_hidden(input_ids, cache, documents=documents)
        if targets is not None:
            return linear_cross_entropy(h, self.embed_out.weight, targets)
        if response_mask is not None:
            from rafale.models.preference import sequence_logps

            return sequence_logps(h, self.embed_out.weight, input_ids, response_mask)
        return self.head(h)
