"""Preference losses (models/preference.py): DPO and SimPO against their formulas evaluated here with
math.log / math.exp, DPO = ln 2 when the policy is the reference, gradients that raise the chosen and
lower the rejected log-probabilities (on the loss and through a LoRA model), and the chunked
per-sequence response log-probabilities against a plain log_softmax + gather of the whole logits."""

import copy
import math

import pytest
import torch

from rafale.models.decoder import Decoder
from rafale.models.lora import LoraConfig, apply_lora
from rafale.models.preference import dpo_loss, sequence_logps, simpo_loss
from rafale.models import preset_config as get_preset

# Four pairs of summed log-probabilities: policy chosen / rejected, reference chosen / rejected.
PC = [-10.0, -25.5, -3.25, -40.0]
PR = [-12.0, -20.0, -3.0, -41.5]
RC = [-11.0, -24.0, -4.0, -40.0]
RR = [-11.5, -21.0, -2.0, -40.0]


def t(values, grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def neg_logsigmoid(z: float) -> float:
    return math.log(1.0 + math.exp(-z))


def test_dpo_matches_the_formula():
    beta = 0.1
    out = dpo_loss(t(PC), t(PR), t(RC), t(RR), beta)
    chosen = [beta * (p - r) for p, r in zip(PC, RC)]
    rejected = [beta * (p - r) for p, r in zip(PR, RR)]
    margins = [c - r for c, r in zip(chosen, rejected)]  # 0.15, -0.6, 0.175, 0.15
    assert out["loss"].item() == pytest.approx(sum(map(neg_logsigmoid, margins)) / 4, abs=1e-12)
    assert out["chosen_rewards"].tolist() == pytest.approx(chosen, abs=1e-12)
    assert out["rejected_rewards"].tolist() == pytest.approx(rejected, abs=1e-12)
    assert out["margins"].tolist() == pytest.approx(margins, abs=1e-12)
    assert out["accuracy"].item() == 0.75


def test_dpo_is_ln2_with_zero_margins_when_the_policy_is_the_reference():
    out = dpo_loss(t(PC), t(PR), t(PC), t(PR), beta=0.5)
    assert out["loss"].item() == pytest.approx(math.log(2), abs=1e-12)
    assert out["margins"].tolist() == [0.0] * 4 and out["accuracy"].item() == 0.0


def test_simpo_matches_the_formula_with_gamma_in_reward_units():
    beta, gamma = 2.0, 0.8
    lengths_c, lengths_r = [5, 17, 2, 40], [6, 10, 3, 35]
    avg_c = [s / n for s, n in zip(PC, lengths_c)]
    avg_r = [s / n for s, n in zip(PR, lengths_r)]
    out = simpo_loss(t(avg_c), t(avg_r), beta, gamma)
    want = sum(neg_logsigmoid(beta * (c - r) - gamma) for c, r in zip(avg_c, avg_r)) / 4
    assert out["loss"].item() == pytest.approx(want, abs=1e-12)
    assert out["chosen_rewards"].tolist() == pytest.approx([beta * c for c in avg_c], abs=1e-12)
    assert out["margins"].tolist() == pytest.approx([beta * (c - r) for c, r in zip(avg_c, avg_r)], abs=1e-12)
    assert out["accuracy"].item() == pytest.approx(sum(c > r for c, r in zip(avg_c, avg_r)) / 4)
    # A reward margin of exactly gamma is the loss's midpoint: ln 2.
    at_margin = simpo_loss(t([-1.0]), t([-1.0 - gamma / beta]), beta, gamma)
    assert at_margin["loss"].item() == pytest.approx(math.log(2), abs=1e-12)


@pytest.mark.parametrize("loss", ["dpo", "simpo"])
def test_the_gradient_raises_chosen_and_lowers_rejected(loss):
    chosen, rejected = t(PC, grad=True), t(PR, grad=True)
    if loss == "dpo":
        out = dpo_loss(chosen, rejected, t(RC), t(RR), beta=0.1)
    else:
        out = simpo_loss(chosen, rejected, beta=2.0, gamma=1.0)
    out["loss"].backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()  # descent moves them apart
    assert torch.equal(chosen.grad, -rejected.grad)


def batch(B=3, T=37, V=384, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 10:] = True  # prompt of 10 tokens, response to the end
    mask[1, 5:20] = True  # response then padding
    labels[1, 20:] = -100  # padding ids are never read
    return labels, mask  # sequence 2: no response token at all


def reference_logps(logits, labels, mask):
    logp = torch.log_softmax(logits.float(), dim=-1)[:, :-1]
    targets, counted = labels[:, 1:], mask[:, 1:]
    picked = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return (picked * counted).sum(1), counted.sum(1)


@pytest.mark.parametrize("chunk_rows", [1, 7, 512])
def test_sequence_logps_equal_a_full_log_softmax_and_gather(chunk_rows):
    torch.manual_seed(0)
    model = Decoder(get_preset("gpt-micro", {"vocab_size": 384, "tie_embeddings": False}))
    labels, mask = batch()
    hidden = model.forward_hidden(labels.clamp(min=0)).detach().requires_grad_()
    weight = model.embed_out.weight

    want_sum, want_n = reference_logps(model.head(hidden), labels, mask)
    want_grads = torch.autograd.grad(want_sum @ torch.tensor([1.0, -2.0, 3.0]), (hidden, weight))
    got_sum, got_n = sequence_logps(hidden, weight, labels, mask, chunk_rows=chunk_rows)
    got_grads = torch.autograd.grad(got_sum @ torch.tensor([1.0, -2.0, 3.0]), (hidden, weight))

    assert got_n.tolist() == want_n.tolist() == [27, 15, 0]
    assert got_sum[2] == 0 and want_sum[0] < -100  # ~ln(384) per token: far from zero
    assert torch.allclose(got_sum, want_sum, atol=1e-4, rtol=1e-6)
    for got, want in zip(got_grads, want_grads):
        assert torch.allclose(got, want, atol=1e-7, rtol=1e-5)
    assert hidden.grad is None and got_grads[0][2].abs().sum() == 0  # no response: no gradient
    with torch.no_grad():
        assert torch.allclose(sequence_logps(hidden, weight, labels, mask, chunk_rows)[0], want_sum,
                              atol=1e-4, rtol=1e-6)


def test_no_log_softmax_of_all_rows_is_kept_for_backward():
    """What autograd saves is at most a chunk's rows: never a (rows, V) log-softmax of the whole batch."""
    g = torch.Generator().manual_seed(0)
    V, C = 5000, 16
    hidden = torch.randn(4, 65, C, generator=g, requires_grad=True)
    weight = torch.randn(V, C, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (4, 65), generator=g)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        logps, _ = sequence_logps(hidden, weight, labels, torch.ones(4, 65, dtype=torch.bool), chunk_rows=32)
    assert max(saved) <= weight.numel()  # the head's weight itself; nothing of size (256, V) or (32, V)
    logps.sum().backward()
    assert hidden.grad.shape == hidden.shape and weight.grad.abs().sum() > 0


def test_one_dpo_step_on_a_lora_policy_moves_chosen_up_and_rejected_down():
    torch.manual_seed(0)
    reference = Decoder(get_preset("gpt-micro", {"vocab_size": 384})).eval()
    policy = copy.deepcopy(reference)
    apply_lora(policy, LoraConfig(rank=4, alpha=8.0))
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 384, (2, 12), generator=g)
    chosen = torch.cat([prompt, torch.randint(0, 384, (2, 20), generator=g)], 1)
    rejected = torch.cat([prompt, torch.randint(0, 384, (2, 20), generator=g)], 1)
    ids = torch.cat([chosen, rejected])  # one forward for both halves, as a trainer would batch them
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 12:] = True

    def logps(model):
        return sequence_logps(model.forward_hidden(ids), model.embed_out.weight, ids, mask, chunk_rows=16)[0]

    with torch.no_grad():
        ref = logps(reference)
    before = logps(policy)
    out = dpo_loss(before[:2], before[2:], ref[:2], ref[2:], beta=0.5)
    assert out["loss"].item() == pytest.approx(math.log(2), abs=1e-6)  # the policy starts as the reference
    out["loss"].backward()
    trainable = [p for p in policy.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in trainable:
            p -= 0.5 * p.grad
        after = logps(policy)
    assert (after[:2] > before[:2]).all() and (after[2:] < before[2:]).all()
    assert dpo_loss(after[:2], after[2:], ref[:2], ref[2:], beta=0.5)["loss"] < out["loss"]
