"""The decoder's attention kernels (`model.attention`: sdpa, flex, flash) and packed documents.

A packed row holds several documents one after the other. `documents` (B, T) gives each token's
document index within its row (0, 0, 0, 1, 1, 2, ...: non-decreasing); from it come the rotary
positions, restarting at 0 in every document, and attention that stays inside a document (causal and
block-diagonal), in the form each kernel takes:

    sdpa   torch's scaled_dot_product_attention: on a CPU, one is_causal call per document (the
           rows split at their boundaries: the varlen idea, so no work on the mask's empty blocks);
           elsewhere a (B, 1, T, T) boolean mask (per-document calls would wait on the GPU for the
           lengths); without documents its is_causal fast path
    flex   torch's flex_attention with a BlockMask (document_id[q] == document_id[k] and q >= k), which
           skips the blocks the mask empties; compiled on a GPU, eager (correct but slow) on a CPU
    flash  flash-attn's flash_attn_varlen_func over the batch flattened to one sequence, each document
           one entry of cu_seqlens; without documents flash_attn_func(causal=True). GPUs only, in fp16
           or bf16, and flash-attn ships as source only (FLASH_INSTALL)

Grouped-query attention: flex and flash read the n_kv_heads keys/values directly; for sdpa the caller
expands them (see decoder.Attention).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rafale.models.configs import BACKENDS
from rafale.models.family import ModelError

FLASH_INSTALL = "pip install packaging ninja && pip install flash-attn==2.8.3.post2 --no-build-isolation"


def document_positions(documents: torch.Tensor) -> torch.Tensor:
    """(B, T) rotary positions: each token's offset from the first token of its document."""
    B, T = documents.shape
    idx = torch.arange(T, device=documents.device).expand(B, T)
    start = torch.where(document_starts(documents), idx, 0).cummax(dim=1).values  # (B, T)
    return idx - start


def document_starts(documents: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: True at the first token of every document (position 0 of every row included)."""
    return F.pad(documents[:, 1:] != documents[:, :-1], (1, 0), value=True)


def document_mask(documents: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool "may attend": causal and within the query's document."""
    T = documents.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=documents.device).tril()
    return (documents[:, :, None] == documents[:, None, :]).unsqueeze(1) & causal


def document_lengths(documents: torch.Tensor) -> list[list[int]]:
    """Per row, the lengths of its documents in order (they sum to T): the gaps between its
    document_starts, as cu_seqlens takes them over the flattened rows."""
    end = torch.tensor([documents.shape[1]], device=documents.device)
    return [torch.diff(row.nonzero().flatten(), append=end).tolist() for row in document_starts(documents)]


def cu_seqlens(documents: torch.Tensor) -> tuple[torch.Tensor, int]:
    """flash-attn's varlen description of the rows flattened into one sequence: (cumulative document
    lengths (n_docs + 1,) int32, starting at 0 and ending at B * T; the longest document's length)."""
    starts = document_starts(documents).flatten().nonzero().flatten()
    total = torch.tensor([documents.numel()], device=documents.device)
    cu = torch.cat([starts, total]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def load_flash():
    """flash-attn's module, or a ModelError saying how to get it."""
    if not torch.cuda.is_available():
        raise ModelError(f"flash needs a CUDA GPU with the flash-attn package, which ships as source only "
                         f"({FLASH_INSTALL}); this machine has no GPU: use sdpa or flex", "attention")
    try:
        import flash_attn
    except ImportError:
        raise ModelError(f"flash needs the flash-attn package, which ships as source only: {FLASH_INSTALL} "
                         f"(a CUDA toolkit to build it; or use sdpa)", "attention") from None
    return flash_attn


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(device: torch.device):
    # flex_attention's speed comes from compiling it; torch 2.7 cannot compile its backward on a CPU,
    # where the eager version runs (same numbers, much slower: see bench/README.md).
    if device.type == "cuda":
        return _compiled_flex()
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


@dataclass
class Plan:
    """How every layer of one forward attends: built once per forward (masks are shared by the layers)."""
    backend: str
    sdpa_mask: torch.Tensor | None = None  # (B, 1, T, Tk) bool; None: causal
    sdpa_documents: list[list[int]] | None = None  # per row, its documents' lengths: one causal call each
    block_mask: object = None  # flex
    cu_seqlens: torch.Tensor | None = None  # flash with documents
    max_seqlen: int = 0
    flash: object = None  # flash-attn's module (or anything with its two functions)

    @property
    def expands_kv(self) -> bool:
        """Whether keys/values must be repeated to n_heads before `attend` (SDPA's kernels need it)."""
        return self.backend == "sdpa"


def plan(backend: str, documents: torch.Tensor | None, T: int, device: torch.device,
         sdpa_mask: torch.Tensor | None = None, flash=None) -> Plan:
    """The attention of a forward over T tokens per row, inside `documents` when given (else causal)."""
    if backend == "sdpa":
        if documents is not None and device.type == "cpu":
            return Plan("sdpa", sdpa_documents=document_lengths(documents))
        return Plan("sdpa", sdpa_mask=document_mask(documents) if documents is not None else sdpa_mask)
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        if documents is None:
            def mask_mod(b, h, q, k):
                return q >= k
            B = None
        else:
            def mask_mod(b, h, q, k):
                return (documents[b, q] == documents[b, k]) & (q >= k)
            B = documents.shape[0]
        return Plan("flex", block_mask=create_block_mask(mask_mod, B, None, T, T, device=device))
    if backend == "flash":
        if documents is None:
            return Plan("flash", flash=flash)
        cu, longest = cu_seqlens(documents)
        return Plan("flash", cu_seqlens=cu, max_seqlen=longest, flash=flash)
    raise ModelError(f"attention must be one of {', '.join(BACKENDS)}, got {backend!r}", "attention")


def _attend_per_document(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[list[int]]) -> torch.Tensor:
    """Block-diagonal causal attention as one is_causal SDPA call per document: (B, nh, T, hs). Rows
    and documents are taken with unbind / split and put back with cat / stack, whose backwards are
    views and one copy (a slice's backward would zero-fill a gradient of q's size per document)."""
    rows = []
    for qb, kb, vb, docs in zip(q.unbind(0), k.unbind(0), v.unbind(0), lengths):
        parts = [F.scaled_dot_product_attention(qd[None], kd[None], vd[None], is_causal=True)[0]
                 for qd, kd, vd in zip(qb.split(docs, 1), kb.split(docs, 1), vb.split(docs, 1))]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
    return torch.stack(rows)


def attend(p: Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q (B, nh, T, hs), k / v (B, nkv, Tk, hs) -> (B, T, nh * hs)."""
    B, nh, T, hs = q.shape
    if p.backend == "sdpa" and p.sdpa_documents is not None:
        y = _attend_per_document(q, k, v, p.sdpa_documents)
    elif p.backend == "sdpa":
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=p.sdpa_mask, is_causal=p.sdpa_mask is None and T > 1)
    elif p.backend == "flex":
        y = _flex(q.device)(q, k, v, block_mask=p.block_mask, enable_gqa=k.shape[1] != nh)
    else:
        # flash-attn's layout is (B, T, heads, hs); varlen takes the batch flattened to (B * T, heads, hs).
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if p.cu_seqlens is None:
            y = p.flash.flash_attn_func(q, k, v, causal=True)
        else:
            flat = lambda t: t.reshape(B * T, t.shape[2], hs)
            y = p.flash.flash_attn_varlen_func(flat(q), flat(k), flat(v), p.cu_seqlens, p.cu_seqlens,
                                               p.max_seqlen, p.max_seqlen, causal=True)
        return y.reshape(B, T, nh * hs)
    return y.transpose(1, 2).reshape(B, T, nh * hs)
