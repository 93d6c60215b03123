"""`fused_linear_token_stats`: next-token accuracy and cross-entropy straight from hidden states and an LM head.

What evaluation needs of the logits is, per token, whether the argmax is the target and the negative
log-likelihood of the target: logsumexp(logits) - logits[target]. Tokens are processed in chunks of
`chunk_rows(V)` rows (the distillation loss's budget), each chunk's [chunk, V] logits in fp32 from the same
GEMM helper as `fused_linear_distill_loss`, so the extra memory is one chunk whatever the vocabulary and the
number of tokens: never the [N, V] logits and their fp32 copy that `model(...).logits` would build.
"""
from __future__ import annotations

import torch

from .distill_loss import chunk_rows, flatten_mask
from .fused_linear_distill import _logits


def check_head_shapes(hidden, weight, targets) -> None:
    """hidden [..., H], weight [V, H], targets of the hidden states' leading shape, or a ValueError saying which."""
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, {hidden.shape[-1]}] to match the hidden states, "
                         f"got {tuple(weight.shape)}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets must have the hidden states' leading shape {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")


@torch.no_grad()
def fused_linear_token_stats(hidden, weight, targets, *, bias=None, mask=None, chunk_size=None):
    """(correct, nll) per token for logits `hidden @ weight.T (+ bias)`: hidden [N, H] or [B, T, H], weight [V, H],
    targets of the leading shape. `correct` is bool (top-1 equals the target; ties go to the lowest index, as
    torch.argmax), `nll` fp32; tokens outside `mask` get False and 0."""
    check_head_shapes(hidden, weight, targets)
    leading, vocab = hidden.shape[:-1], weight.shape[0]
    h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).to(hidden.device)
    correct = torch.zeros(h.shape[0], dtype=torch.bool, device=h.device)
    nll = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
    step = chunk_rows(vocab, chunk_size, h.device)
    for start in range(0, h.shape[0], step):
        rows = slice(start, start + step)
        logits = _logits(h[rows], weight, bias, vocab)
        correct[rows] = logits.argmax(-1) == t[rows]
        nll[rows] = logits.logsumexp(-1) - logits.gather(1, t[rows, None]).squeeze(1)
    keep = flatten_mask(mask, leading, h.device)
    if keep is not None:
        correct &= keep
        nll = torch.where(keep, nll, torch.zeros((), device=h.device))
    return correct.reshape(leading), nll.reshape(leading)
