"""Distillation losses over the vocabulary without N x V temporaries: `distill_loss` on logits and
`fused_linear_distill_loss` on hidden states + LM heads.

Math (docs/kernels.md), per token, with z_s = student_logits / T, z_t = teacher_logits / T, q = softmax(z_s),
p = softmax(z_t), all in fp32 whatever the input dtype:
  forward_kl  D = KL(p || q)                       dD/dz_s = q - p
  reverse_kl  D = KL(q || p)                       dD/dz_s = q * (log q - log p - D)
  jsd(beta)   m = beta p + (1 - beta) q
              D = beta KL(p || m) + (1 - beta) KL(q || m)
                                                   dD/dz_s = (1 - beta) q * (log q - log m - KL(q || m))
  (beta = 0 is forward_kl and beta = 1 reverse_kl, the endpoints of the generalised JSD as TRL defines it.)
The loss per token is T^2 * D, so its gradient to the raw student logits is T * dD/dz_s.

The PyTorch path streams over token chunks: extra memory is O(chunk x V) whatever N is, the per-token
losses are the only thing kept, and gradients are recomputed chunk by chunk in the backward. Nothing
synchronises with the host.
"""
from __future__ import annotations

import math

import torch

KINDS = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "torch", "triton")
# Elements of one [chunk, V] fp32 temporary: ~32 MB on CPUs (measured: 2^21 halves the speed of the head
# GEMMs, 2^23 runs faster than naive at 1/10 of its memory), larger on GPUs where GEMMs want tall chunks.
CHUNK_ELEMENTS = {"cpu": 1 << 23, "cuda": 1 << 26}


def resolve_kind(kind: str, beta: float) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if kind == "jsd" and beta == 0.0:
        return "forward_kl"
    if kind == "jsd" and beta == 1.0:
        return "reverse_kl"
    return kind


def _xlogy_diff(p, a, b):
    """p * (a - b), zero where p == 0 (so -inf logits of padded vocabularies give 0, not NaN; a NaN in p
    still propagates). One temporary, filled in place."""
    return (a - b).mul_(p).masked_fill_(p == 0, 0.0)


def divergence_and_grad(student: torch.Tensor, teacher: torch.Tensor, kind: str, beta: float, temperature: float,
                        need_grad: bool = True):
    """Per-row T^2 * D and its gradient to the raw student logits, for a [n, V] chunk (fp32 math)."""
    scale = 1.0 / temperature
    log_q = torch.log_softmax(student.float() * scale if temperature != 1 else student.float(), dim=-1)
    log_p = torch.log_softmax(teacher.float() * scale if temperature != 1 else teacher.float(), dim=-1)
    if kind == "forward_kl":
        p = log_p.exp()
        div = _xlogy_diff(p, log_p, log_q).sum(-1)
        grad = log_q.exp_().sub_(p) if need_grad else None  # q - p, reusing log_q's storage
        if grad is not None:
            grad.mul_(temperature)
        return div * temperature**2, grad
    q = log_q.exp()
    if kind == "reverse_kl":
        div = _xlogy_diff(q, log_q, log_p).sum(-1)
        grad = (log_q - log_p).sub_(div[:, None]).mul_(q).masked_fill_(q == 0, 0.0) if need_grad else None
    else:
        p = log_p.exp()
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        kl_q = _xlogy_diff(q, log_q, log_m).sum(-1)
        div = beta * _xlogy_diff(p, log_p, log_m).sum(-1) + (1 - beta) * kl_q
        grad = (log_q - log_m).sub_(kl_q[:, None]).mul_(q).masked_fill_(q == 0, 0.0) if need_grad else None
        if grad is not None:
            grad.mul_(1 - beta)
    if grad is not None:
        grad.mul_(temperature)  # d(T^2 D)/d logits = T dD/dz
    return div * temperature**2, grad


def chunk_rows(vocab: int, chunk_size: int | None, device: torch.device) -> int:
    budget = CHUNK_ELEMENTS["cuda" if device.type == "cuda" else "cpu"]
    return chunk_size or max(1, budget // max(vocab, 1))


class StreamingDistill(torch.autograd.Function):
    """Per-token divergence [N] of [N, V] logits; gradients recomputed chunk by chunk in the backward."""

    @staticmethod
    def forward(ctx, student, teacher, kind, beta, temperature, chunk_size):
        losses = torch.empty(student.shape[0], dtype=torch.float32, device=student.device)
        step = chunk_rows(student.shape[1], chunk_size, student.device)
        for start in range(0, student.shape[0], step):
            rows = slice(start, start + step)
            losses[rows], _ = divergence_and_grad(student[rows], teacher[rows], kind, beta, temperature, False)
        ctx.save_for_backward(student, teacher)
        ctx.options = (kind, beta, temperature, step)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        student, teacher = ctx.saved_tensors
        kind, beta, temperature, step = ctx.options
        grad = torch.empty_like(student)
        for start in range(0, student.shape[0], step):
            rows = slice(start, start + step)
            _, g = divergence_and_grad(student[rows], teacher[rows], kind, beta, temperature)
            grad[rows] = g.mul_(grad_losses[rows, None])
        return grad, None, None, None, None, None


def reduce_losses(losses: torch.Tensor, mask: torch.Tensor | None, reduction: str, shape) -> torch.Tensor:
    """Mask and reduce per-token losses; all tokens ignored gives 0 with zero gradients (no NaN, no sync)."""
    if mask is not None:
        losses = torch.where(mask, losses, torch.zeros((), dtype=losses.dtype, device=losses.device))
    if reduction == "none":
        return losses.reshape(shape)
    if reduction == "sum":
        return losses.sum()
    count = losses.numel() if mask is None else mask.sum()
    return losses.sum() / torch.clamp(torch.as_tensor(count, device=losses.device, dtype=losses.dtype), min=1)


def check_options(kind, beta, temperature, reduction, backend):
    kind = resolve_kind(kind, beta)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return kind


def common_vocab(student_vocab: int, teacher_vocab: int, vocab_size: int | None) -> int:
    if vocab_size is None:
        if student_vocab != teacher_vocab:
            raise ValueError(f"student and teacher vocabularies differ ({student_vocab} vs {teacher_vocab}); "
                             "pass vocab_size= to compare their common prefix (padded vocabularies)")
        return student_vocab
    if not 0 < vocab_size <= min(student_vocab, teacher_vocab):
        raise ValueError(f"vocab_size={vocab_size} must be in [1, {min(student_vocab, teacher_vocab)}]")
    return vocab_size


def flatten_mask(mask, leading_shape, device):
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(leading_shape):
        raise ValueError(f"mask must have the logits' leading shape {tuple(leading_shape)}, got {tuple(mask.shape)}")
    return mask.reshape(-1).to(device=device, dtype=torch.bool)


def use_triton(backend: str, tensor: torch.Tensor) -> bool:
    import os

    if backend == "torch" or (backend == "auto" and not tensor.is_cuda):
        return False
    if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)")
    return True


def distill_loss(student_logits, teacher_logits, *, kind="forward_kl", beta=0.5, temperature=1.0, mask=None,
                 reduction="mean", backend="auto", vocab_size=None, chunk_size=None):
    """Distillation divergence between student and teacher logits ([N, V] or [B, T, V]).

    Returns a scalar for reduction "mean" (over kept tokens) or "sum", else per-token losses with the
    logits' leading shape. Gradients flow to the student logits only.
    """
    kind = check_options(kind, beta, temperature, reduction, backend)
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(f"student and teacher logits have different token shapes: {tuple(student_logits.shape)} "
                         f"vs {tuple(teacher_logits.shape)}")
    vocab = common_vocab(student_logits.shape[-1], teacher_logits.shape[-1], vocab_size)
    leading = student_logits.shape[:-1]
    student = student_logits.reshape(-1, student_logits.shape[-1])[:, :vocab]  # views: no copy of the logits
    teacher = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])[:, :vocab]
    flat_mask = flatten_mask(mask, leading, student.device)
    if use_triton(backend, student):
        from .triton_distill import TritonDistill

        if student.stride(-1) != 1 or teacher.stride(-1) != 1:
            student, teacher = student.contiguous(), teacher.contiguous()
        losses = TritonDistill.apply(student, teacher, kind, beta, float(temperature))
    else:
        losses = StreamingDistill.apply(student, teacher, kind, beta, float(temperature), chunk_size)
    return reduce_losses(losses, flat_mask, reduction, leading)
