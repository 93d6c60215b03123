"""Model shapes for the memory plan: published presets, configs from JSON, parameter counts per width (from the
config alone, no weights)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engine.cli.memory_plan.presets import PRESETS
from engine.core.errors import UserError
from engine.core.hub import model_folder
from engine.core.widths import removed_units
from engine.models.families import FAMILIES, SavedBytes, family_for
from engine.models.loading import is_per_layer, load_config


def preset_config(name: str):
    """A transformers LlamaConfig/OPTConfig with a published model's shapes (no weights, no download)."""
    if name not in PRESETS:
        raise UserError(f"unknown preset '{name}'; presets: {', '.join(PRESETS)}")
    family, shape = PRESETS[name]
    return FAMILIES[family].preset_config(shape)


def _config_from_json(path: Path):
    from transformers import CONFIG_MAPPING

    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if model_type not in CONFIG_MAPPING:
        raise UserError(f"{path} has model_type {model_type!r}, which transformers does not know; give the "
                        "config.json of a LLaMA, Mistral, Qwen2, Qwen3 or OPT checkpoint")
    return CONFIG_MAPPING[model_type].from_dict(data)


def load_model_config(spec: str):
    """The config of MODEL: a preset name, a checkpoint directory or a config.json file."""
    if spec not in PRESETS:
        spec = model_folder(spec, weights=False)  # a Hub id: its config.json, from the cache or the Hub
    path = Path(spec)
    if spec in PRESETS:
        config = preset_config(spec)
    elif path.is_dir():
        config = load_config(path)
    elif path.is_file():
        config = _config_from_json(path)
    elif "/" in spec or spec.endswith(".json") or spec.startswith("."):
        raise UserError(f"{spec} does not exist: give a checkpoint directory, a config.json or a preset "
                        f"({', '.join(PRESETS)})")
    else:
        raise UserError(f"unknown preset '{spec}' and no such path; presets: {', '.join(PRESETS)}")
    family_for(config)  # a supported family
    if is_per_layer(config):
        raise UserError(f"{spec} is an exported MiniDisc model with per-layer widths; plan the compression of a "
                        "stock teacher")
    return config


@dataclass(frozen=True)
class Shapes:
    """What the byte accounting needs from a config (any family's decoder)."""

    up_linears: int  # linears producing FFN neurons: gate+up (SwiGLU) or fc1
    saved: SavedBytes  # what autograd saves outside attention
    layers: int
    hidden: int
    heads: int  # query heads
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    embed_dim: int  # width of the token embeddings and LM head (OPT's word_embed_proj_dim)
    positions: int  # learned position embeddings (OPT), 0 for rotary
    tied: bool
    qkv_bias: bool  # biases on the q/k/v rows (LLaMA with attention_bias, Qwen2, OPT)
    out_bias: bool  # a bias on the attention output projection (not Qwen2)
    mlp_bias: bool
    head_norms: bool  # RMSNorms over head_dim on queries and keys (Qwen3): 2 x head_dim weights per layer
    norm_bias: bool  # LayerNorm (OPT) has a bias, RMSNorm (LLaMA) does not
    final_norm: bool

    @classmethod
    def of(cls, config) -> "Shapes":
        family = family_for(config)
        return cls(up_linears=family.up_linears, saved=family.saved_bytes, layers=family.num_layers,
                   hidden=family.hidden_size, heads=config.num_attention_heads, kv_heads=family.num_kv_heads,
                   head_dim=family.head_dim, intermediate=family.intermediate_size, vocab=config.vocab_size,
                   **family.shape_traits())

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def norm_params(self) -> int:
        return self.hidden * (2 if self.norm_bias else 1)

    @property
    def layer_norm_params(self) -> int:
        """A decoder layer's norms: two over the hidden size, and Qwen3's two over head_dim."""
        return 2 * self.norm_params + (2 * self.head_dim if self.head_norms else 0)


def _linear(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


def decoder_linears(s: Shapes) -> list[int]:
    """Parameter counts of one decoder layer's linears (weights + biases), the ones int8/nf4 quantise."""
    attention = [_linear(s.hidden, s.q_dim, s.qkv_bias), _linear(s.hidden, s.kv_dim, s.qkv_bias),
                 _linear(s.hidden, s.kv_dim, s.qkv_bias), _linear(s.q_dim, s.hidden, s.out_bias)]
    ffn = [_linear(s.hidden, s.intermediate, s.mlp_bias)] * s.up_linears + [
        _linear(s.intermediate, s.hidden, s.mlp_bias)]
    return attention + ffn


def _projections(s: Shapes) -> list[int]:
    """OPT-350m style project_in/project_out between embed_dim and hidden (no bias)."""
    return [] if s.embed_dim == s.hidden else [s.embed_dim * s.hidden] * 2


def _embeddings(s: Shapes) -> list[int]:
    """Token embeddings, learned positions and an untied LM head (a tied head is the embedding)."""
    return [s.vocab * s.embed_dim] + ([s.positions * s.hidden] if s.positions else []) + (
        [] if s.tied else [s.vocab * s.embed_dim])


def parameter_count(config) -> int:
    """Parameters of the model, tied weights counted once, from the config alone (no instantiation: a 70B plan).
    `engine.models.units.count_parameters` counts a loaded model; tests/cli/test_memory_plan.py ties the two."""
    s = Shapes.of(config)
    per_layer = sum(decoder_linears(s)) + s.layer_norm_params
    return (s.layers * per_layer + sum(_embeddings(s)) + sum(_projections(s))
            + (s.norm_params if s.final_norm else 0))


def largest_layer_parameters(config) -> int:
    """The largest single module's own parameters: what ZeRO-3 gathers at once (DeepSpeed's `model_to_params`
    takes the same maximum over modules). For these families it is the embedding or the LM head."""
    s = Shapes.of(config)
    return max(decoder_linears(s) + _embeddings(s) + _projections(s))


def unit_parameters(config) -> tuple[int, int]:
    """(parameters of one attention unit, of one FFN neuron). An attention unit is a KV group: its n_rep
    query heads' q rows and o columns plus one head's k and v rows (biases of q/k/v rows included; the o
    bias belongs to the hidden size, which is never pruned). Every unit of a kind costs the same in every
    layer, so a width's count depends only on how many units it keeps in total."""
    s = Shapes.of(config)
    q_rows, kv_rows = s.q_dim // s.kv_heads, s.head_dim
    bias = int(s.qkv_bias)
    attention = q_rows * (s.hidden + bias) + 2 * kv_rows * (s.hidden + bias) + q_rows * s.hidden
    neuron = s.up_linears * (s.hidden + int(s.mlp_bias)) + s.hidden
    return attention, neuron


def kept_units(total: int, permille: int) -> int:
    """Units kept when `permille`/1000 of `total` are removed (before --ffn-multiple's rounding per layer)."""
    return total - removed_units(total, permille)


def width_parameters(config, permille: int) -> int:
    """Parameters of the candidate at `permille`: the global ranking removes that share of all attention
    units and of all FFN neurons. `minidisc prune` rounds each layer's FFN removals to a multiple of
    --ffn-multiple, which moves the count by less than that many neurons per layer."""
    s = Shapes.of(config)
    attention, neuron = unit_parameters(config)
    units, neurons = s.layers * s.kv_heads, s.layers * s.intermediate
    removed_units = units - kept_units(units, permille)
    removed_neurons = neurons - kept_units(neurons, permille)
    return parameter_count(config) - removed_units * attention - removed_neurons * neuron
