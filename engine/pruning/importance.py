"""Unit importance: sum over calibration batches of |dL/dmask| for the causal-LM loss (eval mode).

Then each layer's scores are divided by their L2 norm (heads and neurons separately) so one global
ranking can compare layers (MiniDisc step 1, after Michel et al. 2019 / CoFi-style head importance).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from engine.core.progress import progress
from engine.models.families import Family
from engine.pruning.masks import masked, ones_masks

log = logging.getLogger(__name__)


def unit_importance(model: nn.Module, family: Family, batches, fused: bool = True, counted: list[bool] | None = None):
    """Raw importance per layer: (attention units, FFN neurons), accumulated |dL/dmask| per batch (`counted`: which
    batches add to it; the others only run, as a rank with fewer batches must under ZeRO-3).

    `batches` yields LongTensors of token ids [B, T]; labels are the inputs (causal LM loss). The model's
    own parameters get no gradient: only the masks need one, which saves the weight-gradient memory.
    fused=True applies the masks with the masked-pruning kernels (dL/dmask from their backward pass). Under
    query-head units the attention scores are per query head (`Family.unit_scores` turns them into units').
    """
    per_head = family.query_head_units
    was_training = model.training
    model.eval()
    requires_grad = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    attention_masks, ffn_masks = ones_masks(model, family, requires_grad=True, per_head=per_head)
    masks = attention_masks + ffn_masks
    totals = [torch.zeros_like(m, dtype=torch.float64) for m in masks]
    device = next(model.parameters()).device
    try:
        with masked(model, family, attention_masks, ffn_masks, fused=fused, per_head=per_head):
            for i, input_ids in enumerate(progress(batches, description="importance")):
                input_ids = input_ids.to(device)
                loss = model(input_ids=input_ids, labels=input_ids).loss
                grads = torch.autograd.grad(loss, masks)
                if counted is None or counted[i]:
                    for total, grad in zip(totals, grads):
                        total += grad.abs().double()
    finally:
        for p, flag in zip(model.parameters(), requires_grad):
            p.requires_grad_(flag)
        model.train(was_training)
    n = len(attention_masks)
    return [t.cpu() for t in totals[:n]], [t.cpu() for t in totals[n:]]


def normalize_per_layer(scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Divide each layer's scores by their L2 norm (a layer of all-zero scores stays zero)."""
    return [s / s.norm() if s.norm() > 0 else s.clone() for s in scores]
