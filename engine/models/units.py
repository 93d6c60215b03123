"""A layer's prunable units and what a width keeps of them: `UnitGroup` (the linears one kind of unit couples), and
the parameter and FLOP counts of a width, written once for every family (`engine.models.families` builds the
groups; `family` arguments below are its adapters)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.core.widths import Shape


@dataclass(frozen=True)
class UnitGroup:
    """Linears of one layer coupled through one kind of prunable unit.

    `rows`: (linear, output rows per unit) whose outputs (and biases) belong to units.
    `cols`: (linear, input columns per unit) whose inputs belong to units; the first one is where the
    unit mask is applied (its input is the per-unit activation).
    `blocks`: the coupled dimension is `blocks` equal blocks that each hold every unit once (query-head units:
    one block per KV group), so a width keeps a prefix of every block.
    `whole`: linears whose rows are all kept while the group keeps any unit, and all removed with the last one.
    """

    rows: tuple[tuple[nn.Linear, int], ...]
    cols: tuple[tuple[nn.Linear, int], ...]
    num_units: int
    blocks: int = 1
    whole: tuple[nn.Linear, ...] = ()

    def index(self, units: torch.Tensor, per_unit: int) -> torch.Tensor:
        """Indices in a coupled dimension covering `units` in every block, in that order: `units` is one order
        for all blocks [n], or one per block [blocks, n]."""
        units = torch.as_tensor(units)
        units = units.expand(self.blocks, -1) if units.dim() == 1 else units
        first = torch.arange(self.blocks)[:, None] * self.num_units  # each block's first unit
        return (((first + units) * per_unit)[..., None] + torch.arange(per_unit)).flatten()

    @property
    def mask_site(self) -> nn.Linear:
        return self.cols[0][0]

    @property
    def cols_per_unit(self) -> int:
        return self.cols[0][1]



def model_shape(model, family) -> Shape:
    """The units each layer of `model` has (a reordered teacher's full width, or a pruned model's own)."""
    groups = family.groups(model)
    return Shape(tuple(a.num_units for a, _ in groups), tuple(f.num_units for _, f in groups))


def _removed(group: UnitGroup, kept: int) -> tuple[int, int]:
    """(weights, biases) that keeping `kept` of a group's units removes from its linears."""
    removed = (group.num_units - kept) * group.blocks
    weights = biases = 0
    for linear, per_unit in group.rows:
        weights += removed * per_unit * linear.in_features
        biases += removed * per_unit * (linear.bias is not None)
    for linear, per_unit in group.cols:
        weights += removed * per_unit * linear.out_features
    for linear in group.whole if kept == 0 else ():
        weights += linear.in_features * linear.out_features
        biases += linear.out_features * (linear.bias is not None)
    return weights, biases


def _removed_per_group(model, family, shape: Shape):
    for groups, kept_attn, kept_ffn in zip(family.groups(model), shape.attention, shape.ffn):
        yield _removed(groups[0], kept_attn)
        yield _removed(groups[1], kept_ffn)


def count_parameters(model, family, shape: Shape) -> int:
    """Parameters of `model` restricted to `shape` (tied weights counted once; works under ZeRO-3)."""
    unique = {id(p): p for p in model.parameters()}.values()
    total = sum(getattr(p, "ds_numel", p.numel()) for p in unique)
    return total - sum(weights + biases for weights, biases in _removed_per_group(model, family, shape))


def forward_flops(model, family, shape: Shape, context: int) -> int:
    """Forward FLOPs per token of `model` restricted to `shape`, the estimate of Kaplan et al. (2020): 2 per
    weight of every linear layer (the LM head included, embedding lookups free) plus 2 x context x the
    attention width of every layer: the scores and the weighted values, 2 FLOPs each per key and attention
    channel, over the half of the context a causal token sees on average."""
    weights = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    weights -= sum(removed for removed, _ in _removed_per_group(model, family, shape))
    attention = sum(family.heads(kept)[0] * family.head_dim for kept in shape.attention)
    return 2 * weights + 2 * context * attention
