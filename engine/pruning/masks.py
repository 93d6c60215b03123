"""Structured masks on attention units and FFN neurons, applied with forward pre-hooks.

A mask multiplies the per-unit activation right before the projection that mixes units back into the
hidden state: the per-head attention output before o_proj/out_proj, and the FFN activation before
down_proj/fc2. A layer whose mask is all zeros contributes exactly that projection's bias.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

import kernels
from engine.core.widths import Shape
from engine.models.families import Family
from engine.models.units import UnitGroup


def _mask_input_hook(mask: torch.Tensor, cols_per_unit: int, fused: bool, blocks: int = 1):
    def hook(module, args):
        x = args[0]
        mask_ = mask.repeat(blocks) if blocks > 1 else mask  # the same units in every block (query-head units)
        if fused:  # dL/dmask comes out of the kernel's backward pass
            masked = kernels.masked_heads(x, mask_, cols_per_unit)
        else:
            masked = (x.unflatten(-1, (mask_.numel(), cols_per_unit)) * mask_.to(x.dtype)[:, None]).flatten(-2)
        return (masked,) + tuple(args[1:])

    return hook


@contextmanager
def masked(model: nn.Module, family: Family, attention_masks, ffn_masks, fused: bool = False, per_head: bool = False):
    """Apply per-layer masks (1-D tensors, one value per unit) for the duration of the block (`per_head`: one value
    per query head, as importance scores query-head units).

    fused=True uses the masked-pruning kernels: the per-head mask through `kernels.masked_heads`, and the
    FFN mask inside the activation (`masked_swiglu` for LLaMA, `masked_relu` for OPT) where the family's
    activation allows it; otherwise the mask multiplies the down projection's input.
    """
    undo = []
    try:
        for layer, (attn_group, ffn_group), attn_mask, ffn_mask in zip(
            family.layers(model), family.groups(model, per_head), attention_masks, ffn_masks
        ):
            hook = _mask_input_hook(attn_mask, attn_group.cols_per_unit, fused, attn_group.blocks)
            undo.append(attn_group.mask_site.register_forward_pre_hook(hook).remove)
            restore = family.mask_ffn_activation(layer, ffn_mask) if fused else None
            if restore is None:
                hook = _mask_input_hook(ffn_mask, ffn_group.cols_per_unit, fused=False)
                restore = ffn_group.mask_site.register_forward_pre_hook(hook).remove
            undo.append(restore)
        yield
    finally:
        for restore in reversed(undo):
            restore()


def ones_masks(model: nn.Module, family: Family, requires_grad: bool = False, per_head: bool = False):
    """Masks of ones for every layer: (attention masks, FFN masks)."""
    device = next(model.parameters()).device

    def ones(group: UnitGroup):
        return torch.ones(group.num_units, device=device, dtype=torch.float32, requires_grad=requires_grad)

    groups = family.groups(model, per_head)
    return [ones(a) for a, _ in groups], [ones(f) for _, f in groups]


def shape_masks(model: nn.Module, family: Family, shape: Shape):
    """0/1 masks keeping the units `shape` keeps in every layer, a prefix (of every block: weights must be reordered). A
    layer keeping no query-head units loses its k/v heads too, which then have no effect on the output."""
    attention, ffn = ones_masks(model, family)
    for mask, kept in zip(attention + ffn, shape.attention + shape.ffn):
        mask[kept:] = 0
    return attention, ffn
