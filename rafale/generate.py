"""Greedy decoding with a KV cache: token ids in, token ids out (the CLI does the text)."""

import torch

from rafale.errors import UserError
from rafale.models.decoder import Decoder, KVCache

# Largest head (V x C weight) that `decoding_head` copies transposed on CPU; see there.
HEAD_COPY_MAX_BYTES = 256 << 20


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


@torch.inference_mode()
def generate(model: Decoder, prompt_ids: torch.Tensor, max_new_tokens: int,
             eos_token_id: int | None = None, use_cache: bool = True) -> torch.Tensor:
    """prompt_ids (B, T) -> the greedily chosen new tokens (B, n), n <= max_new_tokens.

    Stops early once every row has produced `eos_token_id`; a row that finished first is filled with
    eos after it. `use_cache=False` recomputes the whole sequence for every token (the reference the
    cached path is tested against)."""
    B, T = prompt_ids.shape
    limit = model.cfg.max_seq_len
    if T < 1 or max_new_tokens < 1:
        raise UserError(f"generate needs a non-empty prompt and max_new_tokens >= 1 "
                        f"(got {T} prompt tokens, max_new_tokens={max_new_tokens})")
    if T + max_new_tokens > limit:
        raise UserError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                        f"max_seq_len ({limit}); shorten the prompt or ask for fewer tokens")
    device = model.embed_in.weight.device
    seq = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=device)  # prompt, then new tokens
    seq[:, :T] = prompt_ids
    done = torch.zeros(B, dtype=torch.bool, device=device)
    cache = KVCache(model.cfg, B, T + max_new_tokens, device, model.embed_in.weight.dtype) if use_cache else None

    head = decoding_head(model)
    # The head runs on the last position only: the prompt's other logits are never needed.
    logits = head(model.forward_hidden(seq[:, :T], cache)[:, -1])  # (B, V)
    n = 0
    while True:
        token = logits.argmax(dim=-1)  # (B,)
        if eos_token_id is not None:
            token = token.masked_fill(done, eos_token_id)
            done |= token == eos_token_id
        seq[:, T + n] = token
        n += 1
        if n == max_new_tokens or (eos_token_id is not None and bool(done.all())):
            break
        if cache is not None:
            h = model.forward_hidden(seq[:, T + n - 1:T + n], cache)  # one new position against the cache
        else:
            h = model.forward_hidden(seq[:, :T + n])
        logits = head(h[:, -1])
    return seq[:, T:T + n].clone()
