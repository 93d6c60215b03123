"""Masked activations for importance estimation: the forward applies a structured mask, the backward also
returns dL/dmask reduced over tokens in the same pass (no extra activation copy).

  masked_swiglu(gate, up, mask)      h = silu(gate) * up * mask          (LLaMA FFN, mask per neuron)
  masked_relu(x, mask)               h = relu(x) * mask                  (OPT FFN, mask per neuron)
  masked_heads(x, mask, group)       h = x * mask[col // group]          (attention output before o_proj,
                                                                           `group` columns per mask unit)
  dL/dmask_j = sum over tokens (and the unit's columns) of (unmasked activation) * dL/dh.

`backend` as in `distill_loss`: "auto" runs Triton on CUDA tensors and PyTorch elsewhere.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .distill_loss import BACKENDS, use_triton


def _rows(x):
    return x.reshape(-1, x.shape[-1])


def _reduce_units(dmask_cols: torch.Tensor, group: int) -> torch.Tensor:
    return dmask_cols.view(-1, group).sum(1) if group > 1 else dmask_cols


class _MaskedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, mask, triton):
        ctx.save_for_backward(gate, up, mask)
        ctx.triton = triton
        if triton:
            from .triton_masked import masked_forward

            return masked_forward(gate, up, mask, "swiglu", 1)
        return F.silu(gate) * up * mask.to(gate.dtype)

    @staticmethod
    def backward(ctx, grad_h):
        gate, up, mask = ctx.saved_tensors
        if ctx.triton:
            from .triton_masked import masked_backward

            d_gate, d_up, d_mask = masked_backward(grad_h, gate, up, mask, "swiglu", 1)
            return d_gate, d_up, d_mask.to(mask.dtype), None
        g, u, m = gate.float(), up.float(), mask.float()
        sig = torch.sigmoid(g)
        silu = g * sig
        dh = grad_h.float()
        d_mask = _rows(silu * u * dh).sum(0)
        dh_m = dh * m
        d_gate = dh_m * u * sig * (1 + g * (1 - sig))
        return d_gate.to(gate.dtype), (dh_m * silu).to(up.dtype), d_mask.to(mask.dtype), None


class _MaskedScale(torch.autograd.Function):
    """h = act(x) * mask[col // group] with act = relu or identity."""

    @staticmethod
    def forward(ctx, x, mask, group, relu, triton):
        ctx.save_for_backward(x, mask)
        ctx.group, ctx.relu, ctx.triton = group, relu, triton
        if triton:
            from .triton_masked import masked_forward

            return masked_forward(x, None, mask, "relu" if relu else "identity", group)
        act = F.relu(x) if relu else x
        return act * mask.to(x.dtype).repeat_interleave(group)

    @staticmethod
    def backward(ctx, grad_h):
        x, mask = ctx.saved_tensors
        if ctx.triton:
            from .triton_masked import masked_backward

            d_x, _, d_mask = masked_backward(grad_h, x, None, mask, "relu" if ctx.relu else "identity", ctx.group)
            return d_x, d_mask.to(mask.dtype), None, None, None
        act = F.relu(x) if ctx.relu else x
        d_mask = _reduce_units(_rows(act.float() * grad_h.float()).sum(0), ctx.group)
        d_x = grad_h * mask.to(grad_h.dtype).repeat_interleave(ctx.group)
        if ctx.relu:
            d_x = d_x * (x > 0)
        return d_x, d_mask.to(mask.dtype), None, None, None


def _check(backend, x, mask, units):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if mask.dim() != 1 or mask.numel() != units:
        raise ValueError(f"mask must be 1-D with {units} entries, got shape {tuple(mask.shape)}")
    return use_triton(backend, x)


def masked_swiglu(gate, up, mask, *, backend="auto"):
    """silu(gate) * up * mask (mask per neuron, last dimension); gradients to gate, up and mask."""
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    return _MaskedSwiGLU.apply(gate, up, mask, _check(backend, gate, mask, gate.shape[-1]))


def masked_relu(x, mask, *, backend="auto"):
    """relu(x) * mask (mask per neuron, last dimension); gradients to x and mask."""
    return _MaskedScale.apply(x, mask, 1, True, _check(backend, x, mask, x.shape[-1]))


def masked_heads(x, mask, group: int, *, backend="auto"):
    """x * mask per unit of `group` consecutive columns (per-head attention output before o_proj)."""
    if x.shape[-1] != mask.numel() * group:
        raise ValueError(f"last dimension {x.shape[-1]} is not {mask.numel()} units x {group} columns")
    return _MaskedScale.apply(x, mask, group, False, _check(backend, x, mask, mask.numel()))
