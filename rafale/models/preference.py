"""Preference-optimisation losses on pairs of (chosen, rejected) responses: the per-sequence response
log-probabilities they are built from (`sequence_logps`), DPO (`dpo_loss`) and SimPO (`simpo_loss`).

`sequence_logps` takes the final hidden states and the head's weight rather than logits, so the
(B, T, V) fp32 log-softmax is never held whole: only the rows of response tokens go through the head,
a chunk at a time, and with gradients each chunk is recomputed in backward (torch.utils.checkpoint)
instead of keeping its (chunk, V) log-softmax alive. The fused loss in models/losses.py avoids the
recomputation by forming the gradient in forward, which a mean loss allows; here each row's gradient
is scaled by its sequence's incoming gradient, known only in backward. The cost is one more
(chunk, C) x (C, V) matmul per chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rafale.models.losses import CHUNK_ROWS


def _target_logps(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(h @ weight.T)[target] per row: h (n, C), targets (n,) -> (n,) fp32."""
    # The matmul in the model's (or autocast's) dtype as the head's would run, the softmax in fp32.
    logp = torch.log_softmax(F.linear(h, weight).float(), dim=-1)
    return logp.gather(1, targets[:, None]).squeeze(1)


def sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                   chunk_rows: int = CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_logp (B,), n_tokens (B,)): per sequence, the summed log-probability of its response tokens
    and how many there are. hidden (B, T, C) are the final-norm hidden states (`Decoder.forward_hidden`),
    weight (V, C) the head's (`Decoder.embed_out.weight`), labels (B, T) the token ids, loss_mask (B, T)
    true where labels[t] is a response token (labels elsewhere are never read: padding may be -100).
    Position t predicts labels[t + 1], as in the causal loss
    (models/composer.py `next_token_targets`), so the first token never counts. A sequence's mean
    log-probability (SimPO's) is sum_logp / n_tokens."""
    B, T, C = hidden.shape
    # Position (b, t) counts when its target labels[b, t + 1] is a response token; the last predicts nothing.
    counted = F.pad(loss_mask[:, 1:], (0, 1), value=False)
    rows = counted.reshape(-1).nonzero().squeeze(1)  # (n,) flat positions b * T + t
    h, targets = hidden.reshape(-1, C), labels.reshape(-1)[rows + 1]
    grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    parts = []
    for s in range(0, len(rows), chunk_rows):
        idx, ts = rows[s:s + chunk_rows], targets[s:s + chunk_rows]
        if grads:
            parts.append(checkpoint(_target_logps, h[idx], weight, ts, use_reentrant=False))
        else:
            parts.append(_target_logps(h[idx], weight, ts))
    logps = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    sequence = rows // T
    sum_logp = torch.zeros(B, dtype=torch.float32, device=hidden.device).index_add(0, sequence, logps)
    n_tokens = torch.bincount(sequence, minlength=B)
    return sum_logp, n_tokens


def _pair_stats(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, loss: torch.Tensor) -> dict:
    margins = chosen_rewards - rejected_rewards
    return {"loss": loss, "chosen_rewards": chosen_rewards.detach(), "rejected_rewards": rejected_rewards.detach(),
            "margins": margins.detach(), "accuracy": (margins > 0).float().mean().detach()}


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """Sigmoid DPO (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290) on (B,) summed response
    log-probabilities of the policy and the frozen reference. rewards = beta * (policy - reference);
    loss = mean over pairs of -log sigmoid(chosen_reward - rejected_reward). Returns loss (scalar),
    chosen_rewards, rejected_rewards, margins (B,) and accuracy (share of pairs with margin > 0), all
    but the loss detached."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    return _pair_stats(chosen, rejected, -F.logsigmoid(chosen - rejected).mean())


def simpo_loss(policy_chosen_avg: torch.Tensor, policy_rejected_avg: torch.Tensor, beta: float,
               gamma: float) -> dict[str, torch.Tensor]:
    """SimPO (Meng et al. 2024, https://arxiv.org/abs/2405.14734): no reference model, rewards are
    beta times the policy's length-normalised (per-token mean) response log-probabilities, and
    loss = mean of -log sigmoid(beta * (avg_chosen - avg_rejected) - gamma). gamma is the target
    margin in reward units, as in the paper (its hyperparameter tables and code give the ratio
    gamma / beta; pass beta times that ratio). Returns the same entries as `dpo_loss`; accuracy counts
    pairs whose reward margin is > 0 (not > gamma)."""
    chosen, rejected = beta * policy_chosen_avg, beta * policy_rejected_avg
    return _pair_stats(chosen, rejected, -F.logsigmoid(chosen - rejected - gamma).mean())
