"""The width-switchable model (supernet): one set of full-size weights, any candidate width active.

Each prunable linear becomes a `SliceableLinear` (same parameters, so state dicts and DeepSpeed ZeRO-3
partitions are untouched) that slices a prefix of its rows/columns inside its own forward, i.e. after
DeepSpeed's pre-forward hook has gathered the full weight. Gradients flow into the shared full weights.
At width w the forward equals the teacher masked to w (see `engine.pruning.masks`), including layers that keep
no heads or no neurons.

Several widths can run in one forward (`stack`): the batch holds one copy of the inputs per width, and every
decoder layer runs each copy at its width before the next layer starts. Under ZeRO-3 a layer's parameters are
then gathered once per forward (and once per backward) for all K widths, instead of once per width; the price
is that the activations of all K widths are alive together until the backward.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.core.widths import Shape
from engine.models.families import family_for
from engine.models.loading import load_causal_lm
from engine.models.plan import PruningPlan
from engine.models.units import model_shape


class SliceableLinear(nn.Linear):
    """nn.Linear that uses only `active_out` of its rows and `active_in` of its columns (None = all): the first
    ones, or with `blocks` > 1 an equal prefix of each of that many equal blocks (query-head units: the first query
    heads of every KV group)."""

    active_out: int | None = None
    active_in: int | None = None
    blocks: int = 1

    def forward(self, x):
        if self.active_out == 0 or self.active_in == 0:
            return self._empty_forward(x)
        weight, bias = self.weight, self.bias
        if self.active_out is not None:
            weight = self._prefix(weight, 0, self.active_out)
            bias = None if bias is None else self._prefix(bias, 0, self.active_out)
        if self.active_in is not None:
            weight = self._prefix(weight, 1, self.active_in)
        return F.linear(x, weight, bias)

    def _prefix(self, tensor, dim: int, kept: int):
        if self.blocks == 1:
            return tensor.narrow(dim, 0, kept)
        return tensor.unflatten(dim, (self.blocks, -1)).narrow(dim + 1, 0, kept // self.blocks).flatten(dim, dim + 1)

    def _empty_forward(self, x):
        """Output of a slice with no rows or no columns, without a matmul (ZeRO-3's linear cannot
        backpropagate through empty shapes). `anchor` is an exact zero that keeps the input and every
        parameter in the autograd graph, so each gets a (zero) gradient: DeepSpeed ZeRO-3 otherwise keeps
        the stale gradient of a parameter that missed a step and applies it again."""
        anchor = x[..., :0].sum(-1, keepdim=True) + self.weight[:0].sum()
        if self.bias is not None:
            anchor = anchor + self.bias[:0].sum()
        if self.active_out == 0:
            return x[..., :0] + anchor
        out = self.out_features if self.active_out is None else self.active_out
        return anchor.expand(*x.shape[:-1], out) if self.bias is None else anchor + self.bias[:out]


class Supernet(nn.Module):
    """A reordered causal LM whose active width is switchable by sparsity (`set_sparsity`).

    The model may itself be a width of the reordered teacher (a trained TA): every sparser width of the plan is a
    prefix of it too, which is how a joint TA -> student stage trains the widths past the TA."""

    def __init__(self, model: nn.Module, plan: PruningPlan | None = None):
        super().__init__()
        self.model = model
        self.plan = plan  # only `set_sparsity` needs it
        self.train(model.training)  # the wrapper's mode is the model's (from_pretrained: eval, no dropout)
        self.family = family_for(model.config)
        groups = self.family.groups(model)
        for layer, (attn_group, ffn_group) in zip(self.family.layers(model), groups):
            self.family.attention(layer).__class__ = self.family.prunable_attention
            for group in (attn_group, ffn_group):
                for linear, _ in group.rows + group.cols:
                    linear.__class__ = SliceableLinear
                    linear.blocks = group.blocks
                for linear in group.whole:
                    linear.__class__ = SliceableLinear
        self.full_shape = model_shape(model, self.family)
        self.stacked: list[Shape] = []
        self._layers = list(zip(self.family.layers(model), groups))  # (decoder layer, its two unit groups)
        for index, layer in enumerate(self.family.layers(model)):
            layer.forward = self._stacked_forward(index, layer.forward)
        self.set_shape(self.full_shape)

    @classmethod
    def from_pretrained(cls, directory, **kwargs) -> "Supernet":
        """Load a pruned (reordered) teacher written by `minidisc prune`; kwargs go to from_pretrained."""
        plan = PruningPlan.load(directory)
        return cls(load_causal_lm(Path(directory), **kwargs), plan)

    @property
    def config(self):
        return self.model.config

    def set_sparsity(self, sparsity) -> Shape:
        """Activate the grid candidate at `sparsity` (fraction removed, e.g. 0.9; or int per-mille)."""
        shape = self.plan.shape(sparsity)
        self.set_shape(shape)
        return shape

    def set_shape(self, shape: Shape) -> None:
        """Activate any per-layer width (kept attention units and FFN neurons per layer)."""
        self.stack([shape])

    def stack(self, shapes: list[Shape]) -> None:
        """Activate K widths at once: the model's batch is then K equal parts, part k at shapes[k] (K = 1: the
        usual forward at one width)."""
        for shape in shapes:
            for (_, groups), kept_attn, kept_ffn in zip(self._layers, shape.attention, shape.ffn):
                for group, kept in zip(groups, (kept_attn, kept_ffn)):
                    if not 0 <= kept <= group.num_units:
                        raise ValueError(f"width keeps {kept} units of a layer that has {group.num_units}")
        self.stacked = list(shapes)
        if len(shapes) == 1:
            for index in range(len(self._layers)):
                self._set_layer_shape(index, shapes[0])

    def _set_layer_shape(self, index: int, shape: Shape) -> None:
        layer, groups = self._layers[index]
        for group, kept in zip(groups, (shape.attention[index], shape.ffn[index])):
            for linear, per_unit in group.rows:
                linear.active_out = kept * per_unit * group.blocks
            for linear, per_unit in group.cols:
                linear.active_in = kept * per_unit * group.blocks
            for linear in group.whole:
                linear.active_out = None if kept else 0
        self.family.set_active_heads(self.family.attention(layer), shape.attention[index])

    def _stacked_forward(self, index: int, forward):
        """Decoder layer `index`'s forward, run once per stacked width on that width's part of the batch."""
        def stacked(*args, **kwargs):
            shapes = self.stacked
            if len(shapes) <= 1:
                return forward(*args, **kwargs)
            hidden = args[0] if args else kwargs["hidden_states"]
            rows = hidden.shape[0]
            if rows % len(shapes):
                raise ValueError(f"{len(shapes)} stacked widths need a batch of {len(shapes)} equal parts, got "
                                 f"{rows} rows: repeat the batch once per width, or set_shape for one width")
            outputs = []
            for k, shape in enumerate(shapes):
                self._set_layer_shape(index, shape)
                part = _batch_part(rows, k, len(shapes))
                outputs.append(forward(*map(part, args), **{name: part(value) for name, value in kwargs.items()}))
            return _concat(outputs)

        return stacked

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def _batch_part(rows: int, k: int, parts: int):
    """A function giving part k of `parts` of any batched tensor argument (leading dimension `rows`, at least 2-D:
    hidden states, masks, position ids or embeddings); tuples part-wise; anything else unchanged (e.g. a [1, T]
    position tensor, a 1-D cache position)."""
    size = rows // parts

    def part(value):
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == rows:
            return value[k * size:(k + 1) * size]
        if isinstance(value, tuple):
            return tuple(part(v) for v in value)
        return value

    return part


def _concat(outputs: list):
    """The parts' outputs joined along the batch: tensors, or tuples whose tensors are joined (OPT's layers)."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)
    return type(first)(torch.cat(parts) if isinstance(parts[0], torch.Tensor) and parts[0].dim() else parts[0]
                       for parts in zip(*outputs))
