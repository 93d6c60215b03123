"""`fused_linear_cross_entropy`: the next-token cross-entropy straight from hidden states and an LM head.

Tokens are processed in chunks of `chunk_rows(V)` rows: each chunk's logits [chunk, V] in fp32 give its losses,
logsumexp(z) - z[target], and its logit gradients, softmax(z) - onehot(target), which are folded into the gradients
of the hidden states, head weight and bias in the forward (as `fused_linear_distill_loss` does for "mean"). So no
[N, V] fp32 tensor exists, and the backward never reads the head's weight, which under ZeRO-3 may be partitioned
again between forward and backward: it scales the finished gradients, or, where the N tokens' logit gradients in
the head's dtype are smaller than an fp32 [V, H] sum (`keeps_logit_grads`), makes the head's from them.

    loss = sum_i w_i (logsumexp(z_i) - z_i[t_i]),   w_i = kept_i / sum(kept)
    dloss/dz_i = w_i (softmax(z_i) - onehot(t_i)),  dloss/dh_i = dloss/dz_i @ W,  dloss/dW = sum_i dloss/dz_i^T h_i
"""
from __future__ import annotations

import torch

from .distill_loss import chunk_rows, flatten_mask
from .fused_linear_distill import _accumulate, _head_grad, _logits, _mm_fp32, keeps_logit_grads
from .fused_linear_token_stats import check_head_shapes


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Returns (sum_i row_weights[i] * loss_i, the per-token losses, not differentiable); gradients finished in the
    forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, row_weights, chunk_size):
        vocab, fp32 = weight.shape[0], dict(dtype=torch.float32, device=weight.device)
        losses = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_h, grad_w, kept = torch.empty_like(hidden), None, None
        if keeps_logit_grads(hidden.shape[0], weight.shape[1], weight.element_size()):
            kept = torch.empty(hidden.shape[0], vocab, dtype=weight.dtype, device=weight.device)
        else:
            grad_w = torch.zeros(weight.shape, **fp32)
        grad_b = None if bias is None else torch.zeros(bias.shape, **fp32)
        step = chunk_rows(vocab, chunk_size, hidden.device)
        with torch.no_grad():
            for start in range(0, hidden.shape[0], step):
                rows = slice(start, start + step)
                logits, target = _logits(hidden[rows], weight, bias, vocab), targets[rows]
                lse = logits.logsumexp(-1)
                losses[rows] = lse - logits.gather(1, target[:, None]).squeeze(1)
                grad = logits.sub_(lse[:, None]).exp_()  # the softmax, in the logits' memory
                grad[torch.arange(len(target), device=grad.device), target] -= 1
                grad.mul_(row_weights[rows, None])
                if grad_b is not None:
                    grad_b += grad.sum(0)
                grad = grad.to(weight.dtype)  # head-gradient GEMMs run in the weights' precision
                grad_h[rows] = _mm_fp32(grad, weight).to(grad_h.dtype)
                if kept is not None:
                    kept[rows] = grad
                else:
                    _accumulate(grad_w, grad.t(), hidden[rows])
        losses = torch.where(row_weights > 0, losses, torch.zeros((), device=losses.device))
        head = (grad_w,) if kept is None else (kept, hidden)  # the head's gradient, or what it is made of
        ctx.save_for_backward(grad_h, *([] if grad_b is None else [grad_b]), *head)
        ctx.weight_dtype, ctx.weight_shape, ctx.has_bias = weight.dtype, weight.shape, bias is not None
        ctx.mark_non_differentiable(losses)
        return (losses * row_weights).sum(), losses

    @staticmethod
    def backward(ctx, grad_out, _):
        grad_h, *rest = ctx.saved_tensors
        dtype = ctx.weight_dtype
        grad_b = (rest.pop(0) * grad_out).to(dtype) if ctx.has_bias else None
        grad_w = ((rest[0] * grad_out).to(dtype) if len(rest) == 1 else
                  _head_grad(*rest, ctx.weight_shape, grad_out, dtype))
        return grad_h * grad_out.to(grad_h.dtype), grad_w, grad_b, None, None, None


def fused_linear_cross_entropy(hidden, weight, targets, *, bias=None, mask=None, copies: int = 1, chunk_size=None):
    """Mean next-token cross-entropy of logits `hidden @ weight.T (+ bias)` against `targets` over the tokens in
    `mask` (None: all), never materialising the [N, V] logits. hidden [N, H] or [B, T, H], targets and mask of its
    leading shape, weight [V, H]. Gradients flow to the hidden states, weight and bias.

    `copies`: the first dimension stacks that many students on the same tokens (e.g. K widths of one supernet); the
    mean is then over all of them and `copies` per-student means [K] come back too, not differentiable:
    returns (loss, per_copy)."""
    check_head_shapes(hidden, weight, targets)
    leading = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    keep = flatten_mask(mask, leading, h.device)
    kept = torch.ones(h.shape[0], dtype=torch.float32, device=h.device) if keep is None else keep.float()
    target = targets.reshape(-1).to(h.device).clamp(min=0)  # ignored tokens (-100) get weight 0 through the mask
    row_weights = kept / kept.sum().clamp(min=1)  # tensor ops: no host sync
    loss, losses = FusedLinearCrossEntropy.apply(h, weight, bias, target, row_weights, chunk_size)
    kept = kept.view(copies, -1)
    return loss, (losses.view(copies, -1) * kept).sum(1) / kept.sum(1).clamp(min=1)
