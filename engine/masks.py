"""Structured masks on attention units and FFN neurons, applied with forward pre-hooks.

A mask multiplies the per-unit activation right before the projection that mixes units back into the
hidden state: the per-head attention output before o_proj/out_proj, and the FFN activation before
down_proj/fc2. A layer whose mask is all zeros contributes exactly that projection's bias.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .families import Family, UnitGroup
from .grid import Width


def _mask_input_hook(mask: torch.Tensor, cols_per_unit: int):
    def hook(module, args):
        x = args[0]
        units = x.unflatten(-1, (mask.numel(), cols_per_unit))
        masked = units * mask.to(x.dtype)[:, None]
        return (masked.flatten(-2),) + tuple(args[1:])

    return hook


@contextmanager
def masked(model: nn.Module, family: Family, attention_masks, ffn_masks):
    """Apply per-layer masks (1-D tensors, one value per unit) for the duration of the block."""
    handles = []
    try:
        for (attn_group, ffn_group), attn_mask, ffn_mask in zip(family.groups(model), attention_masks, ffn_masks):
            for group, mask in ((attn_group, attn_mask), (ffn_group, ffn_mask)):
                hook = _mask_input_hook(mask, group.cols_per_unit)
                handles.append(group.mask_site.register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def ones_masks(model: nn.Module, family: Family, requires_grad: bool = False):
    """Masks of ones for every layer: (attention masks, FFN masks)."""
    device = next(model.parameters()).device

    def ones(group: UnitGroup):
        return torch.ones(group.num_units, device=device, dtype=torch.float32, requires_grad=requires_grad)

    groups = family.groups(model)
    return [ones(a) for a, _ in groups], [ones(f) for _, f in groups]


def width_masks(model: nn.Module, family: Family, width: Width):
    """0/1 masks keeping the first `width` units of every layer (weights must be reordered)."""
    attention, ffn = ones_masks(model, family)
    for mask, kept in zip(attention + ffn, width.attention + width.ffn):
        mask[kept:] = 0
    return attention, ffn
