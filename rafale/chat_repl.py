"""`rafale chat`: a multi-turn conversation with a model in the terminal, through its chat template.

Each turn renders the whole conversation with the generation prompt (data/chat.py's ChatTemplate, as
transformers' apply_chat_template does), decodes with a KV cache and prints the answer's text as its
tokens come, through `tokenizers`' DecodeStream (a character split over several byte-level tokens is
printed once whole, never as replacement characters). The answer ends at the model's end token or
after --max-new-tokens. Commands: /reset (forget the conversation), /system TEXT (set the system
message and start over; /system alone removes it), /exit. Ctrl-C stops the answer being written and
keeps what was written of it; at the prompt it only clears the line; Ctrl-D leaves. When the
conversation no longer fits the model's context with room for an answer, its earliest exchanges are
dropped (the system message kept) and a notice says how many messages went.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterator

import torch
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from rafale.data.chat import ChatTemplate
from rafale.models.decoder import Decoder, KVCache
from rafale.sampling import SamplingConfig, generators, next_tokens

PROMPT = "you> "
ANSWER = "bot> "


@torch.inference_mode()
def stream_tokens(model: Decoder, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int],
                  sampling: SamplingConfig, turn: int) -> Iterator[int]:
    """The new tokens of one answer, one at a time, the end token included (and last)."""
    device = model.embed_in.weight.device
    cache = KVCache(model.cfg, 1, len(prompt_ids) + max_new_tokens, device, model.embed_in.weight.dtype)
    gens = generators(sampling, [turn], device) if sampling.do_sample else None
    seen = None
    if sampling.repetition_penalty != 1.0:
        seen = torch.zeros(1, model.cfg.vocab_size, dtype=torch.bool, device=device)
        seen[0, torch.tensor(prompt_ids, device=device)] = True
    h = model.forward_hidden(torch.tensor([prompt_ids], device=device), cache)
    for _ in range(max_new_tokens):
        token = next_tokens(model.head(h[:, -1]), sampling, seen, gens)
        t = int(token)
        yield t
        if t in eos_ids:
            return
        if seen is not None:
            seen[0, t] = True
        h = model.forward_hidden(token[:, None], cache)


def text_pieces(tokenizer: Tokenizer, tokens: Iterator[int]) -> Iterator[str]:
    """The text of `tokens` as it becomes printable: DecodeStream holds back the bytes of a character
    until its last token arrives (an incomplete one at the very end is never printed)."""
    stream = DecodeStream(skip_special_tokens=True)
    for token in tokens:
        piece = stream.step(tokenizer, token)
        if piece:
            yield piece


def fit_history(messages: list[dict], encode: Callable[[list[dict]], list[int]],
                budget: int) -> tuple[list[int], int]:
    """(prompt ids, how many messages were dropped from `messages`, in place): the earliest exchanges
    (a user message and what follows it up to the next one) go until the prompt is at most `budget`
    tokens; leading system messages stay. The latest user message always stays."""
    head = 1 if messages and messages[0]["role"] == "system" else 0
    dropped = 0
    ids = encode(messages)
    while len(ids) > budget and len(messages) - head > 1:
        nxt = next((i for i in range(head + 1, len(messages)) if messages[i]["role"] == "user"), len(messages) - 1)
        dropped += nxt - head
        del messages[head:nxt]
        ids = encode(messages)
    return ids, dropped


def repl(model: Decoder, tokenizer: Tokenizer, template: ChatTemplate, eos_ids: list[int], max_new_tokens: int,
         sampling: SamplingConfig, out=sys.stdout) -> int:
    context = model.cfg.max_seq_len
    budget = context - max_new_tokens
    system: str | None = None
    messages: list[dict] = []

    def encode(msgs: list[dict]) -> list[int]:
        text = template.render(msgs, add_generation_prompt=True, where="the conversation")
        return tokenizer.encode(text, add_special_tokens=False).ids

    def say(text: str) -> None:
        out.write(text)
        out.flush()

    say("/reset, /system TEXT, /exit; Ctrl-C stops an answer, Ctrl-D leaves\n")
    turn = 0
    while True:
        try:
            line = input(PROMPT)
        except EOFError:
            say("\n")
            return 0
        except KeyboardInterrupt:
            say("\n")
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            messages = [{"role": "system", "content": system}] if system else []
            say("(conversation reset)\n")
            continue
        if text == "/system" or text.startswith("/system "):
            system = text[len("/system"):].strip() or None
            messages = [{"role": "system", "content": system}] if system else []
            say("(system message set; conversation reset)\n" if system else "(system message removed)\n")
            continue
        messages.append({"role": "user", "content": line})
        ids, dropped = fit_history(messages, encode, budget)
        if len(ids) > budget:
            messages.pop()
            say(f"(that message alone is {len(ids)} tokens: with {max_new_tokens} for the answer it exceeds the "
                f"model's {context}-token context; write less or lower --max-new-tokens)\n")
            continue
        if dropped:
            say(f"(history truncated: dropped the {dropped} earliest message{'s' if dropped > 1 else ''} to fit "
                f"the model's {context}-token context)\n")
        say(ANSWER)
        pieces, stopped = [], False
        try:
            tokens = (t for t in stream_tokens(model, ids, max_new_tokens, eos_ids, sampling, turn) if t not in eos_ids)
            for piece in text_pieces(tokenizer, tokens):
                pieces.append(piece)
                say(piece)
        except KeyboardInterrupt:
            stopped = True
        say(" [stopped]\n" if stopped else "\n")
        messages.append({"role": "assistant", "content": "".join(pieces)})
        turn += 1
