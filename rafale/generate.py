"""Greedy decoding with a KV cache: token ids in, token ids out (the CLI does the text)."""

import torch

from rafale.errors import UserError
from rafale.models.decoder import Decoder, KVCache


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

    # The head runs on the last position only: the prompt's other logits are never needed.
    logits = model.head(model.forward_hidden(seq[:, :T], cache)[:, -1])  # (B, V)
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
        logits = model.head(h[:, -1])
    return seq[:, T:T + n].clone()
