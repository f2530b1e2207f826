"""The LM head fused with the next-token cross-entropy, computed a chunk of positions at a time.

In a small model the fp32 logits (B, T, V) are the largest tensor of a training step, and
F.cross_entropy keeps two more of that size (its log-softmax, then the logits' gradient): at
pythia-tiny's vocabulary of 50304, batch 8 x 256 tokens, that is 1.2 GB for a 14M-parameter model.
`linear_cross_entropy` never holds them whole. For each chunk of rows it computes the logits, their
log-sum-exp and the loss, and since the loss is a mean (its gradient is known up to the incoming
scalar), also the chunk's logit gradient softmax - onehot at once, turning it into the gradients of
the hidden states and the head weight before the next chunk; backward only scales them. Same FLOPs
as the plain path (no recomputation), a chunk-sized working set instead of three (B*T, V) tensors.
The numbers are F.cross_entropy's up to float summation order (test/test_fused_loss.py); the idea
is Liger-Kernel's fused linear cross-entropy (https://github.com/linkedin/Liger-Kernel).

A head of at most PLAIN_MAX_VOCAB rows takes the plain path instead: there the logits are no larger
than the hidden states, so there is no memory to save, and the chunk loop's small ops cost more than
they save.
"""

import torch
import torch.nn.functional as F

# Rows per chunk: the (512, V) fp32 buffer is 103 MB at V = 50304. A whole pythia-tiny training step
# (batch 8 x 256) on 2 CPU cores took 0.75 / 0.73 / 0.73 s with 256 / 512 / 1024 rows and 0.78 s with
# 2048 (against 1.13 s for logits + F.cross_entropy): 512 is the smallest buffer at full speed.
CHUNK_ROWS = 512
# The head's forward + backward alone (1 CPU thread, d_model 128), fused / plain time: 1.27 at 128 rows
# and 1.09 at 256 for 768 positions, 1.11 at 128 and 0.98 at 256 for 2048; 0.96 and 0.90 at 384 and 512.
PLAIN_MAX_VOCAB = 256


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                chunk_rows: int) -> torch.Tensor:
        # h (N, C), weight (V, C), targets (N,). Under autocast the matmuls run in the autocast
        # dtype, as nn.Linear's would, and the softmax in fp32, as F.cross_entropy's on .float() logits.
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        # Grad mode is off inside forward; needs_input_grad says whether a backward can follow, and
        # for which input: a frozen head (LoRA on a tied embedding) needs no (V, C) fp32 weight
        # gradient, nor its matmul.
        grads, weight_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1], ctx.needs_input_grad[1]
        h_c, w_c = h.to(dtype), weight.to(dtype)
        valid = targets != ignore_index
        n_valid = valid.sum()
        safe_targets = targets.masked_fill(~valid, 0)  # a gather index for ignored rows; their loss is zeroed
        # Row weights: 1 / n for the rows that count, 0 for ignored ones. A tensor, so no host sync;
        # 0 valid targets give nan, as F.cross_entropy's mean does.
        row_scale = valid / n_valid.float()  # (N,)
        loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if grads else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if weight_grad else None
        # One (chunk, V) fp32 buffer for every chunk, reused in place: logits -> log-probs -> gradient.
        # Allocating it afresh per chunk costs page faults on every one of its pages each time.
        buf = torch.empty(min(chunk_rows, h.shape[0]), weight.shape[0], dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk_rows):
            hs, ts = h_c[s:s + chunk_rows], safe_targets[s:s + chunk_rows, None]
            vs, rs = valid[s:s + chunk_rows, None], row_scale[s:s + chunk_rows, None]
            logp = buf[:len(hs)]  # (n, V)
            if dtype == torch.float32:
                torch.mm(hs, w_c.T, out=logp)
            else:
                logp.copy_(hs @ w_c.T)
            torch.log_softmax(logp, dim=-1, out=logp)  # in place: each row is read whole before it is written
            loss_sum -= (logp.gather(1, ts) * vs).sum()
            if grads:
                # d(mean loss) / d(logits) = (softmax - onehot(target)) * row_scale. The row scale is
                # applied to the (n, C) operands rather than to the (n, V) gradient: same product.
                g = logp.exp_().scatter_add_(1, ts, torch.full(ts.shape, -1.0, device=h.device)).to(dtype)
                grad_h[s:s + chunk_rows] = (g @ w_c) * rs
                if grad_w is None:
                    continue
                hs = hs * rs.to(dtype)
                if grad_w.dtype == g.dtype:
                    grad_w.addmm_(g.T, hs)
                else:
                    grad_w += (g.T @ hs).float()
        if grads:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if weight_grad else None)
        return loss_sum / n_valid

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss if grad_w is not None else None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """F.cross_entropy((h @ weight.T).float(), targets, ignore_index=ignore_index) (mean over the
    non-ignored targets) without the logits. h (..., C), weight (V, C), targets (...) -> scalar.
    Heads of up to PLAIN_MAX_VOCAB rows compute exactly that expression (see the module docstring)."""
    if weight.shape[0] <= PLAIN_MAX_VOCAB:
        logits = (h.reshape(-1, h.shape[-1]) @ weight.T).float()
        return F.cross_entropy(logits, targets.reshape(-1), ignore_index=ignore_index)
    return fused_linear_cross_entropy(h, weight, targets, ignore_index, chunk_rows)


def fused_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int = -100, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """linear_cross_entropy's chunked path, whatever the vocabulary."""
    return _LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), ignore_index,
                                     chunk_rows)
