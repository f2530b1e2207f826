"""The head fused with the cross-entropy (models/losses.py) against the plain path, logits then
F.cross_entropy: same loss, same gradients, for any chunking, ignored targets, a scaled backward
(Composer scales the loss by the microbatch share) and autocast; small heads, which take the plain path;
and CausalLM, which trains through it."""

import pytest
import torch
import torch.nn.functional as F

from rafale.data.causal_lm import CausalLM, TrainOutput, next_token_targets
from rafale.task_model import TaskModel
from rafale.models.decoder import Decoder, DecoderConfig
from rafale.models.losses import PLAIN_MAX_VOCAB, fused_linear_cross_entropy, linear_cross_entropy


def inputs(N=300, C=48, V=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, C, generator=g, requires_grad=True)
    w = (torch.randn(V, C, generator=g) * 0.3).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    targets[:17] = -100
    targets[200:230] = -100
    return h, w, targets


def plain(h, w, targets, scale=1.0):
    loss = F.cross_entropy((h @ w.T).float(), targets, ignore_index=-100)
    h_grad, w_grad = torch.autograd.grad(loss * scale, (h, w))
    return loss.detach(), h_grad, w_grad


@pytest.mark.parametrize("chunk_rows", [1, 64, 100, 300, 4096])
def test_loss_and_gradients_equal_the_plain_path(chunk_rows):
    h, w, targets = inputs()
    ref_loss, ref_h, ref_w = plain(h, w, targets)
    loss = linear_cross_entropy(h, w, targets, chunk_rows=chunk_rows)
    h_grad, w_grad = torch.autograd.grad(loss, (h, w))
    assert loss.shape == () and ref_loss > 1.0  # non-trivial: about ln(V) and above
    assert torch.allclose(loss, ref_loss, atol=1e-6, rtol=0)
    assert torch.allclose(h_grad, ref_h, atol=1e-8, rtol=1e-5)
    assert torch.allclose(w_grad, ref_w, atol=1e-8, rtol=1e-5)
    assert torch.all(h_grad[:17] == 0)  # ignored positions get no gradient


@pytest.mark.parametrize("V", [66, 128, PLAIN_MAX_VOCAB])
def test_small_heads_take_the_plain_path_with_the_fused_numbers(V):
    """Up to PLAIN_MAX_VOCAB rows linear_cross_entropy is the plain expression; the chunked path gives
    the same loss and gradients there too, so the switch changes no result."""
    h, w, targets = inputs(V=V)
    ref_loss, ref_h, ref_w = plain(h, w, targets)
    loss = linear_cross_entropy(h.view(3, 100, -1), w, targets.view(3, 100))
    assert torch.equal(loss.detach(), ref_loss) and loss.grad_fn.name() == "NllLossBackward0"
    h_grad, w_grad = torch.autograd.grad(loss, (h, w))
    assert torch.equal(h_grad, ref_h) and torch.equal(w_grad, ref_w)
    fused = fused_linear_cross_entropy(h, w, targets, chunk_rows=64)
    f_h, f_w = torch.autograd.grad(fused, (h, w))
    assert torch.allclose(fused, loss, atol=1e-6, rtol=0)
    assert torch.allclose(f_h, h_grad, atol=1e-6, rtol=0) and torch.allclose(f_w, w_grad, atol=1e-6, rtol=0)


def test_scaled_backward_batched_shapes_and_no_grad():
    h, w, targets = inputs()
    ref_loss, ref_h, ref_w = plain(h, w, targets, scale=0.25)
    # (B, T, C) hidden states and (B, T) targets, as Decoder passes them.
    loss = linear_cross_entropy(h.view(3, 100, -1), w, targets.view(3, 100), chunk_rows=64)
    h_grad, w_grad = torch.autograd.grad(loss * 0.25, (h, w))
    assert torch.allclose(h_grad, ref_h, atol=1e-8, rtol=1e-5)
    assert torch.allclose(w_grad, ref_w, atol=1e-8, rtol=1e-5)
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(h, w, targets, chunk_rows=64), ref_loss, atol=1e-6, rtol=0)


def test_a_frozen_head_gets_no_weight_gradient_and_the_same_loss_and_hidden_gradient():
    """LoRA on a tied embedding freezes the head: the fused path then skips the (V, C) weight gradient
    (its buffer and matmul) and gives bit for bit the loss and hidden-state gradient of a trainable head."""
    h, w, targets = inputs()
    loss = fused_linear_cross_entropy(h, w, targets, chunk_rows=64)
    h_grad, _ = torch.autograd.grad(loss, (h, w))
    frozen = w.detach()
    frozen_loss = fused_linear_cross_entropy(h, frozen, targets, chunk_rows=64)
    frozen_loss.backward()
    assert torch.equal(frozen_loss, loss) and torch.equal(h.grad, h_grad)
    assert frozen.grad is None


def test_every_target_ignored_gives_nan_like_cross_entropy():
    h, w, targets = inputs()
    targets[:] = -100
    assert torch.isnan(F.cross_entropy(h @ w.T, targets))
    assert torch.isnan(linear_cross_entropy(h, w, targets))


def test_autocast_bf16_matches_the_plain_path_under_autocast():
    h, w, targets = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref_h, ref_w = plain(h, w, targets)
        loss = linear_cross_entropy(h, w, targets, chunk_rows=64)
    h_grad, w_grad = torch.autograd.grad(loss, (h, w))
    assert h_grad.dtype == w_grad.dtype == torch.float32
    assert torch.allclose(loss, ref_loss, atol=1e-3, rtol=0)
    # bf16 has 8 bits of mantissa: gradients agree to a couple of percent of their scale.
    assert (h_grad - ref_h).abs().max() <= 0.02 * ref_h.abs().max()
    assert (w_grad - ref_w).abs().max() <= 0.02 * ref_w.abs().max()


def test_causal_lm_trains_through_the_fused_loss_with_the_plain_gradients():
    cfg = DecoderConfig(vocab_size=700, d_model=64, n_layers=2, n_heads=4, max_seq_len=64, init_std=0.1)
    torch.manual_seed(0)
    model = TaskModel(Decoder(cfg), CausalLM(CausalLM.Section()), {})
    x = torch.randint(0, cfg.vocab_size, (4, 40), generator=torch.Generator().manual_seed(1))
    labels = x.clone()
    labels[1, :12] = -100
    batch = {"input_ids": x, "labels": labels}

    out = model(batch)
    assert isinstance(out, TrainOutput) and out.shape == (4, 40, cfg.vocab_size)
    loss = model.loss(out, batch)
    loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    logits = model.model(x)
    ref = F.cross_entropy(logits.flatten(0, 1), next_token_targets(batch).flatten(), ignore_index=-100)
    ref.backward()
    assert torch.allclose(loss, ref, atol=1e-6, rtol=0)
    for name, p in model.named_parameters():
        assert torch.allclose(fused[name], p.grad, atol=1e-7, rtol=1e-4), name

    # Eval: the summed loss and token count the metrics accumulate, without the logits.
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(batch), logits)  # eval mode: forward gives the logits
        outputs = model.eval_forward(batch)
    n = (next_token_targets(batch) != -100).sum()
    assert outputs.n_tokens == n and torch.allclose(outputs.sum_loss, ref.detach() * n, rtol=1e-6)
    metrics = model.get_metrics(is_train=False)
    for _ in range(2):
        for metric in metrics.values():
            model.update_metric(batch, outputs, metric)
    assert torch.allclose(metrics["LanguageCrossEntropy"].compute(), ref.detach(), atol=1e-6)
    assert torch.allclose(metrics["LanguagePerplexity"].compute(), ref.detach().exp(), rtol=1e-6)
