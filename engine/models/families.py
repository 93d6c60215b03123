"""Model-family adapters: which units of a decoder layer are prunable and which linears they couple.

Every family is described by the same two coupled groups per layer:

- attention units, one of two kinds (`--attention-unit`):
  - `kv-group` (the default): a KV group, its `n_rep` query heads plus its key/value head (for multi-head
    attention n_rep = 1, i.e. one head). Rows of q/k/v and columns of the output projection move together.
  - `query-head`, under grouped-query attention: unit j is the j-th query head of every KV group, so a layer
    keeps the same number of query heads in each group (`repeat_kv` stays valid). The layer's k/v heads are kept
    whole while it keeps any unit and go with the last one. Scores are measured per query head; reordering sorts
    each group's heads, and unit j scores the sum of the groups' j-th best.
- FFN neurons: rows of the up-side linears (gate+up for LLaMA, fc1 for OPT) and columns of the down-side
  linear (down_proj, fc2).

Masking, reordering, slicing, parameter counting and export are written once against `UnitGroup`; what
else differs between families (the configs of exported widths, the shapes and saved activations the memory
plan counts) is a property of the adapter, so this is the only module that knows LLaMA from OPT.

Mistral, Qwen2/Qwen2.5 and Qwen3 share LLaMA's module names and differ only where no unit is involved:
biases on rows (Qwen2's q/k/v) move with their rows, Qwen3's q/k RMSNorms act on each head over head_dim
(shared by all heads, so no width changes them), and sliding-window settings are config keys that exported
configs keep.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from torch import nn

import kernels
from engine.core.errors import UserError
from engine.core.widths import Shape
from engine.models import modeling_minidisc as ours
from engine.models.units import UnitGroup


@dataclass(frozen=True)
class SavedBytes:
    """Bytes autograd saves per token outside attention (bf16 compute), as coefficients of the hidden size h
    and the kept FFN neurons i, for the memory plan. Each family's docstring derives its numbers."""

    norms: tuple[int, int]  # one decoder layer's two norms: (bytes per h, constant)
    ffn_per_neuron: int
    ids: int  # input ids (and position ids), int64
    final_norm: tuple[int, int]  # (bytes per h, constant)
    all_hidden_states: bool  # output_hidden_states keeps all L + 1 states alive (else only the final normed one)
    head_norms: tuple[int, int] = (0, 0)  # per-head q/k norms (Qwen3): (bytes per q/k channel, per q/k head)
    # what a layer keeps only for its weights' gradients (linear inputs), which pruning's importance pass, with
    # frozen weights, does not keep: bytes per h, per neuron, per q/k channel (measured, tests/cli/test_memory_plan)
    weight_inputs: tuple[int, int, int] = (8, 4, 0)


class Family:
    """Base adapter. Subclasses name the modules of one Hugging Face architecture."""

    name: str
    architectures: tuple[str, ...]
    attention_proj_name: str  # name of the attention output projection inside the attention module
    prunable_attention: type  # attention subclass that also runs with zero heads
    up_linears: int  # linears producing FFN neurons: gate+up (SwiGLU) or fc1
    saved_bytes: SavedBytes

    def __init__(self, config):
        self.config = config
        # `minidisc prune --attention-unit` writes its choice into the pruned teacher's config (exports inherit it)
        self.attention_unit = getattr(config, "minidisc_attention_unit", None) or "kv-group"
        if self.attention_unit not in ATTENTION_UNITS:
            raise UserError(f"minidisc_attention_unit {self.attention_unit!r} in the model's config is not one of "
                            f"{', '.join(ATTENTION_UNITS)}")

    # --- shapes -----------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def query_heads_per_group(self) -> int:
        return self.config.num_attention_heads // self.num_kv_heads

    @property
    def query_head_units(self) -> bool:
        """Whether attention units are query-head units (`minidisc prune` only chooses them for a GQA teacher; a
        slice of it keeps them even when its groups have one query head left)."""
        return self.attention_unit == "query-head"

    @property
    def query_heads_per_unit(self) -> int:
        return self.num_kv_heads if self.query_head_units else self.query_heads_per_group

    def heads(self, kept: int) -> tuple[int, int]:
        """(query heads, KV heads) of a layer keeping `kept` attention units."""
        if self.query_head_units:
            return kept * self.num_kv_heads, self.num_kv_heads if kept else 0
        return kept * self.query_heads_per_group, kept

    @property
    def num_kv_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.config.hidden_size // self.config.num_attention_heads

    @property
    def intermediate_size(self) -> int:
        raise NotImplementedError

    # --- modules ----------------------------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def attention_group(self, layer: nn.Module, per_head: bool = False) -> UnitGroup:
        """The layer's attention units; `per_head`: every query head its own unit, for scoring query-head units."""
        attn, d = layer.self_attn, self.head_dim
        out_proj = getattr(attn, self.attention_proj_name)
        kv_heads = attn.k_proj.out_features // d
        if per_head:
            return UnitGroup(rows=((attn.q_proj, d),), cols=((out_proj, d),), num_units=attn.q_proj.out_features // d)
        if self.query_head_units:
            blocks = max(kv_heads, 1)  # a layer that kept no units has no k/v heads (and no query heads)
            return UnitGroup(rows=((attn.q_proj, d),), cols=((out_proj, d),),
                             num_units=attn.q_proj.out_features // (d * blocks), blocks=blocks,
                             whole=(attn.k_proj, attn.v_proj))
        n_rep = self.query_heads_per_group
        return UnitGroup(rows=((attn.q_proj, n_rep * d), (attn.k_proj, d), (attn.v_proj, d)),
                         cols=((out_proj, n_rep * d),), num_units=kv_heads)

    def ffn_group(self, layer: nn.Module) -> UnitGroup:
        raise NotImplementedError

    def groups(self, model: nn.Module, per_head: bool = False) -> list[tuple[UnitGroup, UnitGroup]]:
        """(attention group, FFN group) for every decoder layer (`per_head`: see `attention_group`)."""
        return [(self.attention_group(layer, per_head), self.ffn_group(layer)) for layer in self.layers(model)]

    def unit_scores(self, head_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """From one layer's scores per query head (in head order), query-head units: (each KV group's heads in
        descending order [groups, n_rep], the units' scores: the sum over groups of their j-th best head)."""
        by_group = head_scores.reshape(self.num_kv_heads, -1)
        ranked = torch.sort(by_group, dim=1, descending=True, stable=True)
        return ranked.indices, ranked.values.sum(0)

    def set_active_heads(self, attention: nn.Module, kept: int) -> None:
        """Tell an attention module how many query heads its (sliced) projections now produce."""
        attention.num_heads = self.heads(kept)[0]

    def stock_attention_units(self, wanted: int) -> int:
        """The attention-unit count nearest to `wanted` that the family's stock config can describe."""
        raise NotImplementedError

    def mask_ffn_activation(self, layer: nn.Module, mask):
        """Apply an FFN neuron mask inside the activation with a fused kernel; returns an undo callable,
        or None when the layer's activation has no fused kernel."""
        return None

    # --- configs --------------------------------------------------------------------------------
    @classmethod
    def preset_config(cls, shape: dict):
        """A stock config with a published model's shapes (`minidisc plan`'s presets)."""
        raise NotImplementedError

    def pruned_config(self, base: dict, shape: Shape, uniform: bool):
        """(model class, config) of the model sliced to `shape`: stock when uniform, per-layer otherwise.
        `base` is the teacher's config as a dict, without the keys that name a class or a width."""
        raise NotImplementedError

    def shape_traits(self) -> dict:
        """What the memory plan's `Shapes` needs beyond the unit counts: embedding width, learned positions,
        tying, biases, the final norm."""
        raise NotImplementedError


class LlamaFamily(Family):
    """LLaMA. Saved per token: per RMSNorm (x2) the fp32 upcast of its input (4h; HF computes the norm in
    fp32), the normalised bf16 tensor the weight multiplies (2h), its output, saved by the next linears (2h),
    and the fp32 rsqrt (4) = 8h + 4; SwiGLU saves gate (SiLU's input), SiLU's output, up and their product
    (down_proj's input) = 4 x 2 bytes per neuron. Outside the layers: the input ids (8) and the final norm
    (fp32 input copy, normalised tensor, rsqrt: 6h + 4). The norms save an fp32 copy of their input, not the
    bf16 input, so all L + 1 hidden states that `output_hidden_states` keeps are extra.

    The LLaMA-like families below subclass it and name their own classes."""

    name = "llama"
    architectures = ("LlamaForCausalLM",)
    config_class, model_class = transformers.LlamaConfig, transformers.LlamaForCausalLM
    per_layer_class = ours.MiniDiscLlamaForCausalLM
    prunable_attention = ours.PrunableLlamaAttention
    heads_divide_hidden = True  # LlamaConfig requires hidden_size % num_attention_heads == 0, head_dim or not
    attention_proj_name = "o_proj"
    up_linears = 2
    saved_bytes = SavedBytes(norms=(16, 8), ffn_per_neuron=8, ids=8, final_norm=(6, 4), all_hidden_states=True)

    @property
    def num_kv_heads(self) -> int:
        return self.config.num_key_value_heads or self.config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads

    @property
    def intermediate_size(self) -> int:
        return self.config.intermediate_size

    def layers(self, model):
        return model.model.layers

    def set_active_heads(self, attention, kept):
        query, kv = self.heads(kept)
        attention.num_heads = query
        attention.num_key_value_groups = query // kv if kv else self.query_heads_per_group  # what repeat_kv uses

    def mask_ffn_activation(self, layer, mask):
        mlp = layer.mlp
        if self.config.hidden_act not in ("silu", "swish"):
            return None
        mlp.forward = lambda x: mlp.down_proj(kernels.masked_swiglu(mlp.gate_proj(x), mlp.up_proj(x), mask))
        return lambda: delattr(mlp, "forward")

    def stock_attention_units(self, wanted):
        units = self.query_heads_per_group if self.query_head_units else self.num_kv_heads
        valid = [k for k in range(1, units + 1)
                 if not self.heads_divide_hidden or self.hidden_size % self.heads(k)[0] == 0]
        return min(valid, key=lambda k: (abs(k - wanted), -k))

    def ffn_group(self, layer):
        mlp = layer.mlp
        return UnitGroup(rows=((mlp.gate_proj, 1), (mlp.up_proj, 1)), cols=((mlp.down_proj, 1),),
                         num_units=mlp.gate_proj.out_features)

    @classmethod
    def preset_config(cls, shape):
        return cls.config_class(**{"tie_word_embeddings": False, **shape})

    def pruned_config(self, base, shape, uniform):
        base = {**base, "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim}
        if uniform:
            query, kv = self.heads(shape.attention[0])
            base.update(num_attention_heads=query, num_key_value_heads=kv, intermediate_size=shape.ffn[0])
            return self.model_class, self.config_class(**base, architectures=[self.model_class.__name__])
        per_layer, heads = self.per_layer_class, [self.heads(kept) for kept in shape.attention]
        return per_layer, per_layer.config_class(
            **base, kv_heads_per_layer=[kv for _, kv in heads], query_heads_per_layer=[q for q, _ in heads],
            intermediate_sizes=list(shape.ffn), architectures=[per_layer.__name__])

    def biases(self) -> tuple[bool, bool]:
        """(q/k/v biases, output-projection bias)."""
        bias = bool(getattr(self.config, "attention_bias", False))
        return bias, bias

    def shape_traits(self):
        qkv_bias, out_bias = self.biases()
        get = lambda name: bool(getattr(self.config, name, False))  # noqa: E731
        return dict(embed_dim=self.hidden_size, positions=0, tied=get("tie_word_embeddings"),
                    qkv_bias=qkv_bias, out_bias=out_bias, mlp_bias=get("mlp_bias"),
                    head_norms=self.saved_bytes.head_norms != (0, 0), norm_bias=False, final_norm=True)


class MistralFamily(LlamaFamily):
    """Mistral: LLaMA's layers without biases; `sliding_window` stays in exported configs."""

    name = "mistral"
    architectures = ("MistralForCausalLM",)
    config_class, model_class = transformers.MistralConfig, transformers.MistralForCausalLM
    per_layer_class = ours.MiniDiscMistralForCausalLM
    prunable_attention = ours.PrunableMistralAttention
    heads_divide_hidden = False

    def biases(self):
        return False, False


class Qwen2Family(LlamaFamily):
    """Qwen2 and Qwen2.5: LLaMA's layers with q/k/v biases (not on o_proj); `use_sliding_window`,
    `sliding_window`, `max_window_layers` and `layer_types` stay in exported configs."""

    name = "qwen2"
    architectures = ("Qwen2ForCausalLM",)
    config_class, model_class = transformers.Qwen2Config, transformers.Qwen2ForCausalLM
    per_layer_class = ours.MiniDiscQwen2ForCausalLM
    prunable_attention = ours.PrunableQwen2Attention
    heads_divide_hidden = False

    def biases(self):
        return True, False


class Qwen3Family(LlamaFamily):
    """Qwen3: LLaMA's layers with an RMSNorm over head_dim on every query and key head, before RoPE. Each saves
    per token what a LLaMA norm does, per q/k channel instead of per hidden channel: the fp32 input copy (4) and
    the normalised bf16 tensor (2) per channel and the fp32 rsqrt (4) per head; its output is only rotated, which
    saves nothing of its size."""

    name = "qwen3"
    architectures = ("Qwen3ForCausalLM",)
    config_class, model_class = transformers.Qwen3Config, transformers.Qwen3ForCausalLM
    per_layer_class = ours.MiniDiscQwen3ForCausalLM
    prunable_attention = ours.PrunableQwen3Attention
    heads_divide_hidden = False
    saved_bytes = SavedBytes(norms=(16, 8), ffn_per_neuron=8, ids=8, final_norm=(6, 4), all_hidden_states=True,
                             head_norms=(6, 4), weight_inputs=(8, 4, 2))


class OPTFamily(Family):
    """OPT. Saved per token: per LayerNorm (x2) its input and output (2h each) and the fp32 mean and rstd
    (8) = 4h + 8; ReLU saves its output, which is also fc2's input (2 bytes per neuron, not 2 x 2). No
    dropout masks: the trainer keeps the student in eval mode. Outside the layers: input and position ids
    (int64: 16) and the final LayerNorm (its input and statistics: 2h + 8). The LayerNorms save their bf16
    input, which is the previous layer's output, so of the hidden states only the final normed one is extra."""

    name = "opt"
    architectures = ("OPTForCausalLM",)
    attention_proj_name = "out_proj"
    up_linears = 1
    saved_bytes = SavedBytes(norms=(8, 16), ffn_per_neuron=2, ids=16, final_norm=(2, 8), all_hidden_states=False,
                             weight_inputs=(4, 0, 0))

    @property
    def intermediate_size(self) -> int:
        return self.config.ffn_dim

    def layers(self, model):
        return model.model.decoder.layers

    def ffn_group(self, layer):
        return UnitGroup(rows=((layer.fc1, 1),), cols=((layer.fc2, 1),), num_units=layer.fc1.out_features)

    prunable_attention = ours.PrunableOPTAttention

    def mask_ffn_activation(self, layer, mask):
        if self.config.activation_function != "relu":
            return None
        original = layer.activation_fn
        layer.activation_fn = _MaskedReLU(mask)
        return lambda: setattr(layer, "activation_fn", original)

    def stock_attention_units(self, wanted):
        # OPTConfig fixes head_dim = hidden_size // num_attention_heads: a stock OPT keeps every head.
        return self.num_kv_heads

    @classmethod
    def preset_config(cls, shape):
        # OPT ties its LM head to the input embeddings; its FFN is 4 x hidden.
        return transformers.OPTConfig(ffn_dim=4 * shape["hidden_size"], word_embed_proj_dim=shape["hidden_size"],
                                      tie_word_embeddings=True, **shape)

    def pruned_config(self, base, shape, uniform):
        if uniform:
            if shape.attention[0] != self.num_kv_heads:
                raise UserError("stock OPT keeps every attention head (head_dim is tied to hidden_size)")
            return transformers.OPTForCausalLM, transformers.OPTConfig(**{**base, "ffn_dim": shape.ffn[0]},
                                                                       architectures=["OPTForCausalLM"])
        return ours.MiniDiscOPTForCausalLM, ours.MiniDiscOPTConfig(
            **base, heads_per_layer=list(shape.attention), ffn_dims=list(shape.ffn),
            architectures=["MiniDiscOPTForCausalLM"])

    def shape_traits(self):
        get = lambda name, default: getattr(self.config, name, default)  # noqa: E731
        bias = bool(get("enable_bias", True))
        return dict(embed_dim=get("word_embed_proj_dim", None) or self.hidden_size,
                    positions=self.config.max_position_embeddings + 2,  # OPT offsets positions by 2
                    tied=bool(get("tie_word_embeddings", True)), qkv_bias=bias, out_bias=bias, mlp_bias=bias,
                    head_norms=False,
                    norm_bias=bool(get("layer_norm_elementwise_affine", True)),
                    final_norm=bool(get("do_layer_norm_before", True)) and not get("_remove_final_layer_norm", False))


class _MaskedReLU(nn.Module):
    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return kernels.masked_relu(x, self.mask)


ATTENTION_UNITS = ("kv-group", "query-head")
FAMILIES = {family.name: family for family in (LlamaFamily, MistralFamily, Qwen2Family, Qwen3Family, OPTFamily)}
FAMILIES |= {"minidisc_llama": LlamaFamily, "minidisc_opt": OPTFamily}  # model types of older exports
SUPPORTED = ("LlamaForCausalLM ('llama'), MistralForCausalLM ('mistral'), Qwen2ForCausalLM ('qwen2', Qwen2 and "
             "Qwen2.5), Qwen3ForCausalLM ('qwen3'), each with MHA or grouped-query attention, and OPTForCausalLM "
             "('opt')")


def family_for(config) -> Family:
    """The adapter for a Hugging Face config, or a UserError naming the supported families."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        archs = ", ".join(getattr(config, "architectures", None) or []) or "unknown architecture"
        raise UserError(f"unsupported model family '{model_type}' ({archs}); MiniDisc supports {SUPPORTED}")
    return FAMILIES[model_type](config)
