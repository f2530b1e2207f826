"""Decoding with a KV cache: token ids in, token ids out (text only where stop strings need it).

Greedy or sampled (rafale/sampling.py), one prompt or a batch of prompts of different lengths. A batch
is left-padded to its longest prompt, so every row's next token sits in the same column: pads get no
attention (a boolean mask) and each row's rotary positions start at 0 on its first real token, as in
transformers' left-padded `generate`. A batch of equal-length prompts takes the unmasked fast path.
Each row stops at an eos token or once its decoded continuation contains a stop string; the batch
stops when every row has. A network that is not rafale's Decoder (model.class: any module mapping
token ids to logits) decodes by recomputing the whole sequence for every token, one prompt length at a time.
"""

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from rafale.errors import UserError
from rafale.models.decoder import Decoder, KVCache
from rafale.sampling import GREEDY, SamplingConfig, generators, next_tokens

# Largest head (V x C weight) that `decoding_head` copies transposed on CPU; see there.
HEAD_COPY_MAX_BYTES = 256 << 20


@dataclass
class Completion:
    """One prompt's continuation."""
    output_ids: list[int]  # the new tokens, through the one that ended the row (eos, or the stop string's last)
    finish_reason: str  # "length" (max_new_tokens), "eos" (emitted eos_token_id) or "stop" (a stop string)
    text: str | None = None  # with `decode`: the continuation's text, eos left out, cut before the stop string


def decoding_head(model: Decoder):
    """`model.head` for the decoding loop. On CPU, MKL's matrix-vector product over a (V, C) weight of
    short rows is slow: pythia-tiny's 50304 x 128 head takes 2.6 ms a token, against 0.7 ms for the
    same product with the weight copied once to (C, V) (one core; 4.8 vs 3.6 ms at batch 8). The gap
    closes as rows grow (128256 x 2048: 58 vs 55 ms), so larger heads are not copied."""
    w = model.embed_out.weight  # the head is embed_out(h), no bias
    if w.device.type != "cpu" or w.numel() * w.element_size() > HEAD_COPY_MAX_BYTES:
        return model.head
    w_t = w.T.contiguous()  # (C, V)
    return lambda h: h @ w_t


def padded_causal_mask(real: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """The (B, 1, end - start, end) "may attend" mask of queries at columns start..end-1 over keys
    0..end-1: causal, pads (real == False) hidden, and every query sees itself, so that a pad query
    attends to something (its output is never read, but a NaN there would reach the real rows as
    0 * NaN through the next layer's attention)."""
    keys = torch.arange(end, device=real.device)
    queries = keys[start:, None]
    may = (keys <= queries) & real[:, None, :end]  # (B, Tq, Tk)
    return (may | (keys == queries))[:, None]


class _FullRecompute:
    """Decoder's decoding interface over a network that only maps input_ids (B, T) to logits (B, T, V):
    its "hidden states" are the logits and its head is the identity; there is no KV cache or mask."""

    def __init__(self, network: torch.nn.Module):
        self.network = network
        weight = next(network.parameters())
        self.device, self.dtype = weight.device, weight.dtype
        self.cfg = SimpleNamespace(max_seq_len=getattr(network, "max_seq_len", None) or 1 << 62, vocab_size=None)

    def forward_hidden(self, input_ids: torch.Tensor, cache=None) -> torch.Tensor:
        return self.network(input_ids)


@torch.inference_mode()
def _decode_any(model, prompts, max_new_tokens, eos, sampling, stop, decode, indices, use_cache, n_tokens=None):
    """_decode for any network: rafale's Decoder as is; another one by full recomputation, prompts of
    one length together (without a padding mask, rows of different lengths cannot share a batch)."""
    if isinstance(model, Decoder):
        return _decode(model, prompts, max_new_tokens, eos, sampling, stop, decode, indices, use_cache, n_tokens)
    model = _FullRecompute(model)
    groups: dict[int, list[int]] = {}
    for b, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(b)
    rows: dict[int, tuple] = {}
    for members in groups.values():
        tokens, ends, reasons, texts = _decode(model, [prompts[b] for b in members], max_new_tokens, eos, sampling,
                                               stop, decode, [indices[b] for b in members], use_cache=False,
                                               n_tokens=n_tokens)
        for j, b in enumerate(members):
            rows[b] = (tokens[j], ends[j], reasons[j], texts[j])
    n = max(len(r[0]) for r in rows.values())
    fill = eos[0] if eos else 0
    tokens = torch.full((len(prompts), n), fill, dtype=torch.long)
    for b, (t, _, _, _) in rows.items():
        tokens[b, :len(t)] = t
    return tokens, *([rows[b][k] for b in range(len(prompts))] for k in (1, 2, 3))


@torch.inference_mode()
def _decode(model: Decoder, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos: Sequence[int],
            sampling: SamplingConfig, stop: Sequence[str], decode: Callable[[list[int]], str] | None,
            indices: Sequence[int], use_cache: bool, n_tokens: int | None = None):
    """The decoding loop; `eos`: the token ids that end a row; `n_tokens`: the tokenizer's size, when the
    head has padding rows past it (never generated). Returns (new tokens (B, n), every finished
    row filled after its end, per-row token counts, finish reasons, texts or None)."""
    assert decode is not None or not stop, "stop strings need `decode`"
    B, lengths = len(prompts), [len(p) for p in prompts]
    T, limit = max(lengths), model.cfg.max_seq_len
    if min(lengths) < 1 or max_new_tokens < 1:
        raise UserError(f"generate needs non-empty prompts and max_new_tokens >= 1 "
                        f"(got a prompt of {min(lengths)} tokens, max_new_tokens={max_new_tokens})")
    if T + max_new_tokens > limit:
        raise UserError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                        f"max_seq_len ({limit}); shorten the prompt or ask for fewer tokens")
    plain = isinstance(model, _FullRecompute)
    device, dtype = (model.device, model.dtype) if plain else (model.embed_in.weight.device, model.embed_in.weight.dtype)
    L = T + max_new_tokens
    fill = eos[0] if eos else 0  # after a row's end; never part of its output
    seq = torch.full((B, L), fill, dtype=torch.long, device=device)  # left pads, prompt, then new tokens
    for b, p in enumerate(prompts):
        seq[b, T - len(p):T] = torch.tensor(p, dtype=torch.long)
    real = positions = None
    if min(lengths) < T:
        pad = torch.tensor([T - n for n in lengths], device=device)[:, None]
        cols = torch.arange(L, device=device)
        real = cols >= pad  # (B, L)
        positions = (cols - pad).clamp(min=0)  # (B, L); a pad's position is never seen

    def forward(start: int, end: int, cache: KVCache | None) -> torch.Tensor:
        """Hidden states of columns start..end-1 (all keys from 0 when there is no cache)."""
        if real is None:
            return model.forward_hidden(seq[:, start:end], cache)
        return model.forward_hidden(seq[:, start:end], cache, positions[:, start:end],
                                    padded_causal_mask(real, start, end))

    gens = generators(sampling, list(indices), device) if sampling.do_sample else None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    hit_eos = torch.zeros(B, dtype=torch.bool, device=device)
    ends = torch.full((B,), max_new_tokens, device=device)
    eos_ids = torch.tensor(eos, dtype=torch.long, device=device)
    outputs: list[list[int]] = [[] for _ in range(B)]  # host copies, kept only to look for stop strings
    texts: list[str | None] = [None] * B
    cache = KVCache(model.cfg, B, L, device, dtype) if use_cache and not plain else None

    head = (lambda h: h) if plain else decoding_head(model)
    if n_tokens is not None:
        unpadded = head
        head = lambda h: unpadded(h)[..., :n_tokens]  # noqa: E731  (the padding rows are no tokens)
    # The head runs on the last position only: the prompt's other logits are never needed.
    logits = head(forward(0, T, cache)[:, -1])  # (B, V)
    seen = None
    if sampling.repetition_penalty != 1.0:
        seen = torch.zeros(B, logits.shape[-1], dtype=torch.bool, device=device)
        for b, p in enumerate(prompts):
            seen[b, torch.tensor(p, device=device)] = True
    n = 0
    while True:
        token = next_tokens(logits, sampling, seen, gens).masked_fill(done, fill)  # (B,)
        seq[:, T + n] = token
        n += 1
        if seen is not None:
            seen[torch.arange(B, device=device), token] = True
        if eos:
            new_eos = ~done & torch.isin(token, eos_ids)
            ends.masked_fill_(new_eos, n)
            hit_eos |= new_eos
            done |= new_eos
        if stop:
            live = (~done).tolist()
            for b, t in enumerate(token.tolist()):
                if not live[b]:
                    continue
                outputs[b].append(t)
                text = decode(outputs[b])
                cuts = [i for i in map(text.find, stop) if i >= 0]
                if cuts:
                    texts[b], done[b], ends[b] = text[:min(cuts)], True, n
        if n == max_new_tokens or bool(done.all()):
            break
        if cache is not None:
            h = forward(T + n - 1, T + n, cache)  # one new position against the cache
        else:
            h = forward(0, T + n, None)
        logits = head(h[:, -1])
    ends, hit_eos = ends.tolist(), hit_eos.tolist()
    reasons = ["eos" if e else "stop" if t is not None else "length" for e, t in zip(hit_eos, texts)]
    return seq[:, T:T + n].clone(), ends, reasons, texts


def generate(model: Decoder, prompt_ids: torch.Tensor, max_new_tokens: int,
             eos_token_id: int | None = None, use_cache: bool = True) -> torch.Tensor:
    """prompt_ids (B, T) -> the greedily chosen new tokens (B, n), n <= max_new_tokens.

    Stops early once every row has produced `eos_token_id`; a row that finished first is filled with
    eos after it. `use_cache=False` recomputes the whole sequence for every token (the reference the
    cached path is tested against)."""
    eos = [] if eos_token_id is None else [eos_token_id]
    return _decode_any(model, prompt_ids.tolist(), max_new_tokens, eos, GREEDY, (), None, range(len(prompt_ids)),
                       use_cache)[0]


def generate_batch(model: Decoder, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   eos_token_id: int | Sequence[int] | None = None, sampling: SamplingConfig = GREEDY,
                   stop: Sequence[str] = (), decode: Callable[[list[int]], str] | None = None,
                   indices: Sequence[int] | None = None, use_cache: bool = True,
                   n_tokens: int | None = None) -> list[Completion]:
    """Continues prompts of any lengths together, one `Completion` each. `eos_token_id`: one id or several
    (Llama 3 instruct models end a turn with either of two). `indices` are the prompts' places in the
    whole prompt list (default 0..B-1): they pick each row's random stream, see rafale/sampling.py.
    `decode` (token ids -> text) fills `Completion.text`; stop strings need it. `n_tokens`: the tokenizer's
    size; logits past it (a vocabulary padded to a multiple of 64) are never chosen."""
    indices = range(len(prompts)) if indices is None else indices
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    tokens, ends, reasons, texts = _decode_any(model, prompts, max_new_tokens, eos, sampling, stop, decode,
                                               list(indices), use_cache, n_tokens)
    out = []
    for row, end, reason, text in zip(tokens.tolist(), ends, reasons, texts):
        ids = row[:end]
        if decode is not None and text is None:
            text = decode(ids[:-1] if reason == "eos" else ids)
        out.append(Completion(ids, reason, text))
    return out


def generate_all(model: Decoder, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int = 8,
                 **kwargs) -> Iterator[Completion]:
    """`generate_batch` over consecutive batches of `batch_size` prompts, yielding completions in the
    prompts' order as each batch finishes. A prompt's result does not depend on `batch_size`."""
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        yield from generate_batch(model, batch, max_new_tokens, indices=range(start, start + len(batch)),
                                  **kwargs)
