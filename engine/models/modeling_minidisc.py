"""Hugging Face classes for pruned checkpoints whose layers keep different numbers of units (LLaMA, Mistral,
Qwen2/Qwen2.5, Qwen3 and OPT).

This file imports only torch and transformers: `save_pretrained` copies it next to the weights, so a
checkpoint loads with `trust_remote_code=True` on a machine without the minidisc package (inside the
package, `engine.load_causal_lm` picks these classes by the config's `architectures`).

The configs keep the stock `model_type` ("llama", "qwen3", "opt", ...): each is the stock config plus two per-layer
lists, so AutoConfig and AutoTokenizer (which reads the model config first in transformers 5) load an
exported folder with no custom code, no prompt and no warning. Only the model needs this file, through
`auto_map` and `trust_remote_code=True`.

Per layer i the config lists `kv_heads_per_layer[i]` key/value heads, `query_heads_per_layer[i]` query heads
(LLaMA-like families: a multiple of the KV heads, the same number in each KV group; by default
num_attention_heads // num_key_value_heads per KV head) and `intermediate_sizes[i]` FFN neurons. Any may be 0:
an attention block without heads, or an FFN without neurons, outputs its output projection's bias (zeros
without bias).
"""
from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.models.llama.modeling_llama import LlamaAttention
from transformers.models.mistral.modeling_mistral import MistralAttention
from transformers.models.opt.modeling_opt import OPTAttention
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention


def _cache_argument(forward, hidden_states, args, kwargs):
    """The KV cache passed to an attention forward, by keyword or position, under either of its names
    (transformers 5.24 renamed `past_key_values` to `cache`)."""
    bound = inspect.signature(forward).bind_partial(hidden_states, *args, **kwargs).arguments
    for arguments in (bound, bound.get("kwargs", {})):
        for name in ("cache", "past_key_values"):
            if arguments.get(name) is not None:
                return arguments[name]
    return None


def empty_attention_forward(attention: nn.Module, out_proj: nn.Module, hidden_states, cache):
    """Attention with no heads: the output projection applied to an empty input (its bias, or zeros)."""
    empty_heads = hidden_states.new_zeros(*hidden_states.shape[:-1], 0, attention.head_dim)
    if cache is not None:  # keep the cache's length right for generation
        empty = empty_heads.transpose(1, 2)
        cache.update(empty, empty, attention.layer_idx)
    out = out_proj(hidden_states[..., :0])
    # Exact zeros that keep q/k/v (and Qwen3's per-head q/k norms) in the autograd graph: under DeepSpeed ZeRO-3
    # every parameter needs a gradient each step (a parameter that misses one gets its stale gradient applied
    # again). Calling the modules, not reading their weights, lets ZeRO-3 gather them first.
    for proj in (attention.q_proj, attention.k_proj, attention.v_proj):
        out = out + proj(hidden_states).sum(-1, keepdim=True)
    for norm in (getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)):
        if norm is not None:
            out = out + norm(empty_heads).sum((-2, -1))[..., None]
    return out, None


class PrunableAttention:
    """Mixin for an attention class: it also runs with no heads; `num_heads` is the number of query heads it has.

    It passes every argument through untouched (the parent's signature changes between transformers releases)
    and only takes over when the layer has no heads."""

    out_proj_name = "o_proj"

    def forward(self, hidden_states, *args, **kwargs):
        if self.num_heads == 0:
            cache = _cache_argument(super().forward, hidden_states, args, kwargs)
            return empty_attention_forward(self, getattr(self, self.out_proj_name), hidden_states, cache)
        return super().forward(hidden_states, *args, **kwargs)


class PrunableLlamaAttention(PrunableAttention, LlamaAttention):
    pass


class PrunableMistralAttention(PrunableAttention, MistralAttention):
    pass


class PrunableQwen2Attention(PrunableAttention, Qwen2Attention):
    pass


class PrunableQwen3Attention(PrunableAttention, Qwen3Attention):
    pass


class PrunableOPTAttention(PrunableAttention, OPTAttention):
    out_proj_name = "out_proj"


class EmptyLinear(nn.Module):
    """A linear layer with no inputs or no outputs (a layer pruned to zero units).

    Its zero-element weight is a buffer, not a parameter: DeepSpeed ZeRO-3 cannot partition or gather
    empty parameters. A bias with elements (the output projection of a head-less OPT attention) stays a
    trained parameter. Same state-dict keys as nn.Linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, device=device, dtype=dtype))
        if bias and out_features:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        elif bias:
            self.register_buffer("bias", torch.empty(0, device=device, dtype=dtype))
        else:
            self.bias = None

    def forward(self, x):
        out = x[..., :0].sum(-1, keepdim=True).expand(*x.shape[:-1], self.out_features)  # zeros, x in the graph
        return out if self.bias is None or not self.out_features else out + self.bias


def _resized(linear: nn.Linear, in_features: int, out_features: int) -> nn.Module:
    weight, bias = linear.weight, linear.bias is not None
    kind = nn.Linear if in_features and out_features else EmptyLinear
    return kind(in_features, out_features, bias=bias, device=weight.device, dtype=weight.dtype)


def _check_layers(config, name: str, values) -> list[int]:
    values = list(values) if values is not None else None
    if values is None or len(values) != config.num_hidden_layers:
        raise ValueError(f"{name} must list one value per layer ({config.num_hidden_layers})")
    return [int(v) for v in values]


def _per_layer_lists(config) -> None:
    """Fill and check a LLaMA-like per-layer config's lists (default: every layer at full width)."""
    config.kv_heads_per_layer = _check_layers(config, "kv_heads_per_layer", config.kv_heads_per_layer
                                              or [config.num_key_value_heads] * config.num_hidden_layers)
    n_rep = config.num_attention_heads // config.num_key_value_heads
    config.query_heads_per_layer = _check_layers(config, "query_heads_per_layer", config.query_heads_per_layer
                                                 or [kv * n_rep for kv in config.kv_heads_per_layer])
    for kv, query in zip(config.kv_heads_per_layer, config.query_heads_per_layer):
        if (query % kv if kv else query):
            raise ValueError(f"query_heads_per_layer: {query} query heads cannot share {kv} KV heads evenly")
    config.intermediate_sizes = _check_layers(config, "intermediate_sizes", config.intermediate_sizes
                                              or [config.intermediate_size] * config.num_hidden_layers)


def _resize_llama_like_layers(model, prunable_attention: type) -> None:
    """Give each decoder layer of a LLaMA-like model (LLaMA, Mistral, Qwen2, Qwen3: the same module names) the
    query and KV heads and FFN neurons its config lists. Qwen3's q/k norms act per head over head_dim: no width
    changes them."""
    config = model.config
    _per_layer_lists(config)  # (transformers < 5.23 configs are not dataclasses: no __post_init__ filled them)
    hidden = config.hidden_size
    for layer, kv_heads, query_heads, neurons in zip(model.model.layers, config.kv_heads_per_layer,
                                                     config.query_heads_per_layer, config.intermediate_sizes):
        attn, mlp, head_dim = layer.self_attn, layer.mlp, layer.self_attn.head_dim
        if kv_heads == 0:  # the only layers that need more than the stock module
            attn.__class__ = prunable_attention
        else:
            attn.num_key_value_groups = query_heads // kv_heads  # what repeat_kv uses
        attn.num_heads = query_heads
        attn.q_proj = _resized(attn.q_proj, hidden, query_heads * head_dim)
        attn.k_proj = _resized(attn.k_proj, hidden, kv_heads * head_dim)
        attn.v_proj = _resized(attn.v_proj, hidden, kv_heads * head_dim)
        attn.o_proj = _resized(attn.o_proj, query_heads * head_dim, hidden)
        mlp.gate_proj = _resized(mlp.gate_proj, hidden, neurons)
        mlp.up_proj = _resized(mlp.up_proj, hidden, neurons)
        mlp.down_proj = _resized(mlp.down_proj, neurons, hidden)
        mlp.intermediate_size = neurons


# One config and one model class per LLaMA-like family: the stock classes plus the two per-layer lists. They
# are spelled out (not made by a factory) because `auto_map` names them in this file by their class names.
class MiniDiscLlamaConfig(LlamaConfig):
    model_type = "llama"  # the stock type: see the module docstring
    kv_heads_per_layer: list[int] | None = None
    query_heads_per_layer: list[int] | None = None
    intermediate_sizes: list[int] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _per_layer_lists(self)


class MiniDiscLlamaForCausalLM(LlamaForCausalLM):
    config_class = MiniDiscLlamaConfig

    def __init__(self, config: MiniDiscLlamaConfig):
        super().__init__(config)
        _resize_llama_like_layers(self, PrunableLlamaAttention)
        self.post_init()


class MiniDiscMistralConfig(MistralConfig):
    model_type = "mistral"
    kv_heads_per_layer: list[int] | None = None
    query_heads_per_layer: list[int] | None = None
    intermediate_sizes: list[int] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _per_layer_lists(self)


class MiniDiscMistralForCausalLM(MistralForCausalLM):
    config_class = MiniDiscMistralConfig

    def __init__(self, config: MiniDiscMistralConfig):
        super().__init__(config)
        _resize_llama_like_layers(self, PrunableMistralAttention)
        self.post_init()


class MiniDiscQwen2Config(Qwen2Config):
    model_type = "qwen2"
    kv_heads_per_layer: list[int] | None = None
    query_heads_per_layer: list[int] | None = None
    intermediate_sizes: list[int] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _per_layer_lists(self)


class MiniDiscQwen2ForCausalLM(Qwen2ForCausalLM):
    config_class = MiniDiscQwen2Config

    def __init__(self, config: MiniDiscQwen2Config):
        super().__init__(config)
        _resize_llama_like_layers(self, PrunableQwen2Attention)
        self.post_init()


class MiniDiscQwen3Config(Qwen3Config):
    model_type = "qwen3"
    kv_heads_per_layer: list[int] | None = None
    query_heads_per_layer: list[int] | None = None
    intermediate_sizes: list[int] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _per_layer_lists(self)


class MiniDiscQwen3ForCausalLM(Qwen3ForCausalLM):
    config_class = MiniDiscQwen3Config

    def __init__(self, config: MiniDiscQwen3Config):
        super().__init__(config)
        _resize_llama_like_layers(self, PrunableQwen3Attention)
        self.post_init()


class MiniDiscOPTConfig(OPTConfig):
    model_type = "opt"
    heads_per_layer: list[int] | None = None
    ffn_dims: list[int] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.heads_per_layer = _check_layers(self, "heads_per_layer", self.heads_per_layer
                                             or [self.num_attention_heads] * self.num_hidden_layers)
        self.ffn_dims = _check_layers(self, "ffn_dims", self.ffn_dims or [self.ffn_dim] * self.num_hidden_layers)


class MiniDiscOPTForCausalLM(OPTForCausalLM):
    config_class = MiniDiscOPTConfig

    def __init__(self, config: MiniDiscOPTConfig):
        super().__init__(config)
        head_dim, hidden = config.hidden_size // config.num_attention_heads, config.hidden_size
        for layer, heads, neurons in zip(self.model.decoder.layers, config.heads_per_layer, config.ffn_dims):
            attn = layer.self_attn
            if heads == 0:
                attn.__class__ = PrunableOPTAttention
            attn.num_heads = heads
            attn.q_proj = _resized(attn.q_proj, hidden, heads * head_dim)
            attn.k_proj = _resized(attn.k_proj, hidden, heads * head_dim)
            attn.v_proj = _resized(attn.v_proj, hidden, heads * head_dim)
            attn.out_proj = _resized(attn.out_proj, heads * head_dim, hidden)
            layer.fc1 = _resized(layer.fc1, hidden, neurons)
            layer.fc2 = _resized(layer.fc2, neurons, hidden)
        self.post_init()


# Per-layer classes by the architecture name that exported configs list.
PER_LAYER_CLASSES = {model.__name__: (model.config_class, model)
                     for model in (MiniDiscLlamaForCausalLM, MiniDiscMistralForCausalLM, MiniDiscQwen2ForCausalLM,
                                   MiniDiscQwen3ForCausalLM, MiniDiscOPTForCausalLM)}
