"""Triton kernels for the distillation losses: one program per token row, streaming over vocabulary tiles.

Forward (`_distill_fwd`): pass 1 keeps running maxima and sums of exp for the student and teacher rows
(their log-sum-exps); pass 2 accumulates the divergence with the LSEs known. It writes the loss, both LSEs
and, for reverse KL / JSD, K = KL(q || m) that the gradient needs. Backward (`_distill_bwd`) recomputes each
tile from the saved LSEs and writes T * upstream * dD/dz_s, in place when asked. All math is fp32.
See `kernels/distill_loss.py` for the formulas; this module is imported only when Triton is used.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2
KIND_IDS = {"forward_kl": FORWARD_KL, "reverse_kl": REVERSE_KL, "jsd": JSD}


@triton.jit
def _row_lse(ptr, V, inv_t, BLOCK: tl.constexpr):
    m = -float("inf")
    d = 0.0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        z = tl.load(ptr + cols, mask=cols < V, other=-float("inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(z, 0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
    return m + tl.log(d)


@triton.jit
def _log_mixture(log_p, log_q, log_beta, log_1m_beta):
    a = log_p + log_beta
    b = log_q + log_1m_beta
    hi = tl.maximum(a, b)
    return hi + tl.log(tl.exp(a - hi) + tl.exp(b - hi))


@triton.jit
def _distill_fwd(s_ptr, t_ptr, loss_ptr, lse_s_ptr, lse_t_ptr, k_ptr, stride_s, stride_t, V, inv_t, t_sq, beta,
                 log_beta, log_1m_beta, KIND: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    lse_s = _row_lse(s_row, V, inv_t, BLOCK)
    lse_t = _row_lse(t_row, V, inv_t, BLOCK)
    acc_p = 0.0  # sum p (log p - log x), x = q or m
    acc_q = 0.0  # sum q (log q - log x), x = p or m
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < V
        log_q = tl.load(s_row + cols, mask=valid, other=0.0).to(tl.float32) * inv_t - lse_s
        log_p = tl.load(t_row + cols, mask=valid, other=0.0).to(tl.float32) * inv_t - lse_t
        p = tl.where(valid, tl.exp(log_p), 0.0)
        q = tl.where(valid, tl.exp(log_q), 0.0)
        if KIND == 0:
            acc_p += tl.sum(tl.where(p == 0, 0.0, p * (log_p - log_q)), 0)
        elif KIND == 1:
            acc_q += tl.sum(tl.where(q == 0, 0.0, q * (log_q - log_p)), 0)
        else:
            log_m = _log_mixture(log_p, log_q, log_beta, log_1m_beta)
            acc_p += tl.sum(tl.where(p == 0, 0.0, p * (log_p - log_m)), 0)
            acc_q += tl.sum(tl.where(q == 0, 0.0, q * (log_q - log_m)), 0)
    if KIND == 0:
        div = acc_p
    elif KIND == 1:
        div = acc_q
    else:
        div = beta * acc_p + (1.0 - beta) * acc_q
    tl.store(loss_ptr + row, div * t_sq)
    tl.store(lse_s_ptr + row, lse_s)
    tl.store(lse_t_ptr + row, lse_t)
    tl.store(k_ptr + row, acc_q)


@triton.jit
def _distill_bwd(s_ptr, t_ptr, g_ptr, lse_s_ptr, lse_t_ptr, k_ptr, up_ptr, stride_s, stride_t, stride_g, V, inv_t,
                 temperature, beta, log_beta, log_1m_beta, KIND: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lse_s = tl.load(lse_s_ptr + row)
    lse_t = tl.load(lse_t_ptr + row)
    k = tl.load(k_ptr + row)
    scale = tl.load(up_ptr + row) * temperature
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < V
        log_q = tl.load(s_ptr + row * stride_s + cols, mask=valid, other=0.0).to(tl.float32) * inv_t - lse_s
        log_p = tl.load(t_ptr + row * stride_t + cols, mask=valid, other=0.0).to(tl.float32) * inv_t - lse_t
        q = tl.exp(log_q)
        if KIND == 0:
            grad = q - tl.exp(log_p)
        elif KIND == 1:
            grad = tl.where(q == 0, 0.0, q * (log_q - log_p - k))
        else:
            log_m = _log_mixture(log_p, log_q, log_beta, log_1m_beta)
            grad = tl.where(q == 0, 0.0, (1.0 - beta) * q * (log_q - log_m - k))
        tl.store(g_ptr + row * stride_g + cols, (grad * scale).to(g_ptr.dtype.element_ty), mask=valid)


def _block(vocab: int) -> int:
    return min(4096, triton.next_power_of_2(vocab))


def _scalars(kind, beta, temperature):
    log_beta = math.log(beta) if beta > 0 else 0.0
    log_1m_beta = math.log1p(-beta) if beta < 1 else 0.0
    return KIND_IDS[kind], 1.0 / temperature, beta, log_beta, log_1m_beta


def distill_forward(student, teacher, kind, beta, temperature):
    """Per-row losses [n] and the statistics the backward needs (LSEs and K)."""
    n, vocab = student.shape
    kind_id, inv_t, beta, log_beta, log_1m_beta = _scalars(kind, beta, temperature)
    stats = torch.empty(4, n, dtype=torch.float32, device=student.device)  # loss, lse_s, lse_t, k
    _distill_fwd[(n,)](student, teacher, stats[0], stats[1], stats[2], stats[3], student.stride(0),
                       teacher.stride(0), vocab, inv_t, temperature**2, beta, log_beta, log_1m_beta,
                       KIND=kind_id, BLOCK=_block(vocab))
    return stats


def distill_backward(student, teacher, stats, upstream, kind, beta, temperature, out):
    n, vocab = student.shape
    kind_id, inv_t, beta, log_beta, log_1m_beta = _scalars(kind, beta, temperature)
    _distill_bwd[(n,)](student, teacher, out, stats[1], stats[2], stats[3], upstream, student.stride(0),
                       teacher.stride(0), out.stride(0), vocab, inv_t, temperature, beta, log_beta, log_1m_beta,
                       KIND=kind_id, BLOCK=_block(vocab))
    return out


def triton_row_loss(student, teacher, kind, beta, temperature, need_grad=True):
    """Same contract as `distill_loss.divergence_and_grad` on fp32 chunk logits; the gradient overwrites
    the student chunk in place (it is a temporary of the fused linear loss)."""
    stats = distill_forward(student, teacher, kind, beta, temperature)
    if not need_grad:
        return stats[0], None
    ones = torch.ones(student.shape[0], dtype=torch.float32, device=student.device)
    return stats[0], distill_backward(student, teacher, stats, ones, kind, beta, temperature, out=student)


class TritonDistill(torch.autograd.Function):
    """Per-token divergence [N] of [N, V] logits with the Triton kernels."""

    @staticmethod
    def forward(ctx, student, teacher, kind, beta, temperature):
        stats = distill_forward(student, teacher, kind, beta, temperature)
        ctx.save_for_backward(student, teacher, stats)
        ctx.options = (kind, beta, temperature)
        return stats[0].clone()

    @staticmethod
    def backward(ctx, grad_losses):
        student, teacher, stats = ctx.saved_tensors
        grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
        distill_backward(student, teacher, stats, grad_losses.float().contiguous(), *ctx.options, out=grad)
        return grad, None, None, None, None
