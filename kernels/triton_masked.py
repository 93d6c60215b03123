"""Triton kernels for `masked_pruning`: elementwise forward; backward writes the input gradients and adds
each block's column sums of (unmasked activation * dL/dh) into dL/dmask with atomics, in one pass."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ACTS = {"identity": 0, "relu": 1, "swiglu": 2}


@triton.jit
def _masked_fwd(x_ptr, u_ptr, m_ptr, out_ptr, R, C, GROUP: tl.constexpr, ACT: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    valid = (rows[:, None] < R) & (cols[None, :] < C)
    offsets = rows[:, None].to(tl.int64) * C + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + cols // GROUP, mask=cols < C, other=0.0).to(tl.float32)
    if ACT == 0:
        a = x
    elif ACT == 1:
        a = tl.maximum(x, 0.0)
    else:
        u = tl.load(u_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
        a = x / (1.0 + tl.exp(-x)) * u
    tl.store(out_ptr + offsets, (a * m[None, :]).to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _masked_bwd(dh_ptr, x_ptr, u_ptr, m_ptr, dx_ptr, du_ptr, dm_ptr, R, C, GROUP: tl.constexpr, ACT: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    valid = (rows[:, None] < R) & (cols[None, :] < C)
    offsets = rows[:, None].to(tl.int64) * C + cols[None, :]
    dh = tl.load(dh_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + cols // GROUP, mask=cols < C, other=0.0).to(tl.float32)[None, :]
    if ACT == 0:
        a = x
        dx = dh * m
    elif ACT == 1:
        a = tl.maximum(x, 0.0)
        dx = tl.where(x > 0, dh * m, 0.0)
    else:
        u = tl.load(u_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-x))
        silu = x * sig
        a = silu * u
        dx = dh * m * u * sig * (1.0 + x * (1.0 - sig))
        tl.store(du_ptr + offsets, (dh * m * silu).to(du_ptr.dtype.element_ty), mask=valid)
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=valid)
    tl.atomic_add(dm_ptr + cols, tl.sum(a * dh, 0), mask=cols < C)


def _blocks(columns: int):
    return 16, min(256, triton.next_power_of_2(columns))


def masked_forward(x, up, mask, act, group):
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    u2 = x2 if up is None else up.reshape(-1, up.shape[-1]).contiguous()
    out = torch.empty_like(x2)
    rows, cols = x2.shape
    block_r, block_c = _blocks(cols)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
    _masked_fwd[grid](x2, u2, mask.contiguous(), out, rows, cols, GROUP=group, ACT=ACTS[act], BLOCK_R=block_r,
                      BLOCK_C=block_c)
    return out.view(x.shape)


def masked_backward(grad_h, x, up, mask, act, group):
    """(dL/dx, dL/dup or None, dL/dmask in fp32)."""
    dh = grad_h.reshape(-1, grad_h.shape[-1]).contiguous()
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    u2 = x2 if up is None else up.reshape(-1, up.shape[-1]).contiguous()
    dx, du = torch.empty_like(x2), (None if up is None else torch.empty_like(u2))
    rows, cols = x2.shape
    dm_cols = torch.zeros(cols, dtype=torch.float32, device=x.device)
    block_r, block_c = _blocks(cols)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
    _masked_bwd[grid](dh, x2, u2, mask.contiguous(), dx, dx if du is None else du, dm_cols, rows, cols, GROUP=group,
                      ACT=ACTS[act], BLOCK_R=block_r, BLOCK_C=block_c)
    d_mask = dm_cols.view(-1, group).sum(1) if group > 1 else dm_cols
    return dx.view(x.shape), None if du is None else du.view(up.shape), d_mask
