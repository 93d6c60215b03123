"""Permute and slice the coupled weights of each layer, unit by unit.

After `reorder`, units sit in descending importance, so every candidate width is a prefix slice of the
same weights (of every block, for query-head units): the candidates are nested and share one copy. Permuting
units changes no output.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.models.families import Family
from engine.models.units import UnitGroup


def _keep_rows(linear: nn.Linear, index: torch.Tensor) -> None:
    index = index.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.index_select(0, index), linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.index_select(0, index), linear.bias.requires_grad)
    linear.out_features = len(index)


@torch.no_grad()
def _select_units(group: UnitGroup, units: torch.Tensor) -> None:
    """Keep `units` (in that order; one order per block for a [blocks, n] tensor) in every coupled linear of the
    group, in place."""
    for linear, per_unit in group.rows:
        _keep_rows(linear, group.index(units, per_unit))
    for linear, per_unit in group.cols:
        index = group.index(units, per_unit).to(linear.weight.device)
        linear.weight = nn.Parameter(linear.weight.index_select(1, index), linear.weight.requires_grad)
        linear.in_features = len(index)


def reorder(model: nn.Module, family: Family, attention_orders, ffn_orders) -> None:
    """Permute every layer's units into the given orders (e.g. descending importance), in place. An attention
    order may be one per block ([KV groups, n_rep] for query-head units: each group's heads, best first)."""
    for (attn_group, ffn_group), attn_order, ffn_order in zip(family.groups(model), attention_orders, ffn_orders):
        _select_units(attn_group, torch.as_tensor(attn_order))
        _select_units(ffn_group, torch.as_tensor(ffn_order))


def reorder_regions(model, family: Family, attention_orders, ffn_orders) -> dict[str, dict[int, torch.Tensor]]:
    """What `reorder` does to each coupled tensor of `model` (the meta device will do), as {dim: index}: the same
    permutation, for a checkpoint read and written tensor by tensor (`write_reordered`)."""
    names = {id(module): name for name, module in model.named_modules()}
    regions: dict[str, dict[int, torch.Tensor]] = {}

    def permute(linear, dim: int, index: torch.Tensor) -> None:
        regions.setdefault(f"{names[id(linear)]}.weight", {})[dim] = index
        if dim == 0 and linear.bias is not None:
            regions.setdefault(f"{names[id(linear)]}.bias", {})[0] = index

    for groups, orders in zip(family.groups(model), zip(attention_orders, ffn_orders)):
        for group, order in zip(groups, orders):
            for linear, per_unit in group.rows:
                permute(linear, 0, group.index(order, per_unit))
            for linear, per_unit in group.cols:
                permute(linear, 1, group.index(order, per_unit))
    return regions


def write_reordered(directory, model, family: Family, attention_orders, ffn_orders, out) -> None:
    """Write the checkpoint in `directory`, reordered, into the folder `out`, one tensor read at a time: nothing holds
    the model (a 70B teacher is 140 GB in bf16), only a shard of the output. `model` gives the structure (the meta
    device will do). The tensors keep their names and dtypes, so this writes what `reorder` + `save_pretrained`
    would."""
    from engine.models.export import CheckpointTensors, save_tensors

    source, regions = CheckpointTensors(directory), reorder_regions(model, family, attention_orders, ffn_orders)

    def tensors():
        for name in source.files:
            tensor = source.read(name, (slice(None),))
            for dim, index in regions.get(name, {}).items():
                tensor = tensor.index_select(dim, index)
            yield name, tensor

    save_tensors(tensors(), out)


def slice_to_width(model: nn.Module, family: Family, width) -> None:
    """Drop every unit past each layer's kept prefix, in place (the model becomes really smaller)."""
    for layer, (attn_group, ffn_group), kept_attn, kept_ffn in zip(
        family.layers(model), family.groups(model), width.attention, width.ffn
    ):
        _select_units(attn_group, torch.arange(kept_attn))
        if kept_attn == 0:
            for linear in attn_group.whole:
                _keep_rows(linear, torch.arange(0))
        _select_units(ffn_group, torch.arange(kept_ffn))
        family.set_active_heads(family.attention(layer), kept_attn)
