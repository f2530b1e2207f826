"""How the next token is chosen from a row of logits: greedy, or sampled after transformers' logits
processors, with one random stream per prompt.

`SamplingConfig` holds the `rafale generate` flags (checked here, so a bad value is a one-line error
naming its flag). The processors are transformers' `RepetitionPenaltyLogitsProcessor`,
`TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper` and `MinPLogitsWarper`, in the order
transformers 4.53's `GenerationMixin._get_logits_processor` applies them: the repetition penalty (a
processor, so greedy decoding applies it too), then, when sampling, temperature, top-k, top-p, min-p.
They are written out here because transformers is only a test dependency of rafale; each equals its
class to 1e-6 (test/test_sampling.py).

Randomness, the rule: the prompt at index i of the whole prompt list (0 for a single --prompt) draws
from its own `torch.Generator`, seeded with `row_seed(seed, i)`, and consumes it once per token it
samples (`torch.multinomial` over the processed probabilities, as transformers samples). Its tokens
therefore depend on the seed, its index, its own text and the model, never on the other prompts of
its batch or on the batch size. The stream is torch's: the same seed gives the same tokens in another
process on the same kind of device (CPU and CUDA generators differ).
"""

from dataclasses import dataclass, fields

import numpy as np
import torch

from rafale.errors import UserError

# dataclass field -> the `rafale generate` flag that sets it (error messages name the flag).
FLAGS = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p",
         "repetition_penalty": "--repetition-penalty", "seed": "--seed"}


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy (argmax); > 0: sample from softmax(logits / temperature)
    top_k: int = 0  # keep the k most likely tokens; 0: all
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p; 1: all
    min_p: float = 0.0  # drop tokens less likely than min_p x the top token's probability; 0: none
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the output; 1: off
    seed: int = 0

    def __post_init__(self):
        checks = {"temperature": (self.temperature >= 0, ">= 0 (0 is greedy)"),
                  "top_k": (self.top_k >= 0, ">= 0 (0 keeps every token)"),
                  "top_p": (0 < self.top_p <= 1, "in (0, 1] (1 keeps every token)"),
                  "min_p": (0 <= self.min_p <= 1, "in [0, 1] (0 keeps every token)"),
                  "repetition_penalty": (self.repetition_penalty > 0, "> 0 (1 is no penalty)"),
                  "seed": (self.seed >= 0, ">= 0")}
        for name, (ok, rule) in checks.items():
            if not ok:
                raise UserError(f"{FLAGS[name]} must be {rule}, got {getattr(self, name)}")
        if not self.do_sample:
            # transformers only warns here; an option that silently does nothing is worse.
            unused = [FLAGS[f.name] for f in fields(self)
                      if f.name in ("top_k", "top_p", "min_p") and getattr(self, f.name) != f.default]
            if unused:
                raise UserError(f"{', '.join(unused)} only act{'s' if len(unused) == 1 else ''} when sampling; "
                                f"add --temperature (e.g. 0.8) or drop {'it' if len(unused) == 1 else 'them'}")

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0


GREEDY = SamplingConfig()


def row_seed(seed: int, index: int) -> int:
    """The seed of prompt `index`'s generator. numpy's SeedSequence hashes the pair, so neighbouring
    seeds or indices give unrelated streams; 32 bits because torch's CPU generator keeps only the low
    32 bits of a seed (two seeds 2**32 apart draw the same numbers)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint32)[0])


def generators(cfg: SamplingConfig, indices: list[int], device: torch.device) -> list[torch.Generator]:
    """One generator per row, for the prompts at `indices` of the whole prompt list."""
    return [torch.Generator(device=device).manual_seed(row_seed(cfg.seed, i)) for i in indices]


# --- transformers' processors, scores (B, V) -> (B, V) ----------------------------------------------

def repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """RepetitionPenaltyLogitsProcessor. `seen` (B, V) bool marks each row's tokens so far (its prompt,
    padding excluded, and its output): the same set transformers gathers from input_ids."""
    return torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)


def temperature(scores: torch.Tensor, t: float) -> torch.Tensor:
    """TemperatureLogitsWarper."""
    return scores / t


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """TopKLogitsWarper: below the k-th largest score -> -inf (ties with it are kept)."""
    kth = torch.topk(scores, min(k, scores.shape[-1]))[0][..., -1, None]
    return scores.masked_fill(scores < kth, -float("inf"))


def top_p(scores: torch.Tensor, p: float) -> torch.Tensor:
    """TopPLogitsWarper: drops the least likely tokens whose probabilities sum to at most 1 - p, never
    the most likely one."""
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - p)
    remove[..., -1:] = False
    return scores.masked_fill(remove.scatter(1, sorted_indices, remove), -float("inf"))


def min_p(scores: torch.Tensor, p: float) -> torch.Tensor:
    """MinPLogitsWarper: drops tokens whose probability is below p x the most likely one's."""
    probs = torch.softmax(scores, dim=-1)
    remove = probs < p * probs.max(dim=-1, keepdim=True)[0]
    sorted_indices = torch.argsort(scores, descending=True, dim=-1)
    sorted_remove = torch.gather(remove, -1, sorted_indices)
    sorted_remove[..., :1] = False  # the most likely token always stays
    return scores.masked_fill(sorted_remove.scatter(1, sorted_indices, sorted_remove), -float("inf"))


def process(scores: torch.Tensor, cfg: SamplingConfig, seen: torch.Tensor | None) -> torch.Tensor:
    """All processors `cfg` switches on, in transformers' order (and under its conditions: a
    temperature of 1, top-k 0, top-p 1 or min-p 0 adds nothing)."""
    if cfg.repetition_penalty != 1.0:
        scores = repetition_penalty(scores, seen, cfg.repetition_penalty)
    if not cfg.do_sample:
        return scores
    if cfg.temperature != 1.0:
        scores = temperature(scores, cfg.temperature)
    if cfg.top_k:
        scores = top_k(scores, cfg.top_k)
    if cfg.top_p < 1.0:
        scores = top_p(scores, cfg.top_p)
    if cfg.min_p:
        scores = min_p(scores, cfg.min_p)
    return scores


def next_tokens(logits: torch.Tensor, cfg: SamplingConfig, seen: torch.Tensor | None,
                gens: list[torch.Generator] | None) -> torch.Tensor:
    """logits (B, V) -> the chosen token of each row (B,). Sampling draws row b from gens[b] alone."""
    scores = process(logits.float(), cfg, seen)
    if not cfg.do_sample:
        return scores.argmax(dim=-1)
    probs = torch.softmax(scores, dim=-1)
    # One draw per row from its own generator: a batched multinomial would share one stream across rows.
    return torch.cat([torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(gens)])
