"""`minidisc plan`: will a MiniDisc run fit on a cluster, and where should the teacher and the supernet live?

A sandwich step holds, on every GPU at once:

    teacher        the frozen teacher (ZeRO-3 shard, a full bf16 copy, or bitsandbytes int8/nf4)
    model states   the trained supernet under ZeRO-3: bf16 parameters, fp32 gradients, optimiser states
    activations    what autograd saves for ONE width: widths run forward+backward one after another
    loss buffers   the teacher's outputs, kept across the K widths, and the fused KL loss's working set

Everything is computed from the config alone (no weights, so a 70B plan takes milliseconds) by pure
functions; `plan_memory` returns the placements, `recommend` picks one, and printing is separate.
Bytes are per GPU unless a name says otherwise; GiB = 2**30 bytes. About 10% of every GPU is left for
the CUDA context, NCCL buffers, ZeRO-3 prefetch buckets and allocator fragmentation (`HEADROOM`).

What is not modelled: the evaluation pass (no gradients, so no activations, but the teacher's and each
width's full [tokens, vocab] logits, which with a large vocabulary and long sequences can exceed a
training step's loss buffers), the teacher's own forward (one layer of no-grad temporaries, far below a
width's saved activations), and transient gradient buckets of the backward.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .errors import UserError
from .families import family_for
from .grid import DEFAULT_GRID, PERMILLE, format_sparsity, parse_grid, parse_sparsity

GIB = 2**30
HEADROOM = 0.10
CPU_BUFFER = 1.5  # DeepSpeed's `additional_buffer_factor` for pinned CPU buffers (its estimator's default)
BF16 = 2
# fp32 [chunk, vocab] tensors alive at once in the fused KL on CUDA (Triton row loss): the student's and the
# teacher's logits (the gradient overwrites the student's) plus the gradient's bf16 copy (half of one).
CHUNK_FACTOR = 2.5

# --- presets ----------------------------------------------------------------------------------------------------
_LLAMA2 = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0)
_LLAMA3 = dict(vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0)
_OPT = dict(vocab_size=50272, max_position_embeddings=2048, dropout=0.1, attention_dropout=0.0)
PRESETS = {  # published shapes: hidden, FFN, layers, query heads, KV heads
    "llama-2-7b": ("llama", dict(_LLAMA2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=32)),
    "llama-2-13b": ("llama", dict(_LLAMA2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                  num_attention_heads=40, num_key_value_heads=40)),
    "llama-2-70b": ("llama", dict(_LLAMA2, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                  num_attention_heads=64, num_key_value_heads=8)),
    "llama-3-8b": ("llama", dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8)),
    "llama-3-70b": ("llama", dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                  num_attention_heads=64, num_key_value_heads=8)),
    "opt-1.3b": ("opt", dict(_OPT, hidden_size=2048, num_hidden_layers=24, num_attention_heads=32)),
    "opt-6.7b": ("opt", dict(_OPT, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32)),
    "opt-13b": ("opt", dict(_OPT, hidden_size=5120, num_hidden_layers=40, num_attention_heads=40)),
    "opt-30b": ("opt", dict(_OPT, hidden_size=7168, num_hidden_layers=48, num_attention_heads=56)),
}


def preset_config(name: str):
    """A transformers LlamaConfig/OPTConfig with a published model's shapes (no weights, no download)."""
    from transformers import LlamaConfig, OPTConfig

    if name not in PRESETS:
        raise UserError(f"unknown preset '{name}'; presets: {', '.join(PRESETS)}")
    family, shape = PRESETS[name]
    if family == "llama":
        return LlamaConfig(tie_word_embeddings=False, **shape)
    # OPT ties its LM head to the input embeddings; its FFN is 4 x hidden.
    return OPTConfig(ffn_dim=4 * shape["hidden_size"], word_embed_proj_dim=shape["hidden_size"],
                     tie_word_embeddings=True, **shape)


def _config_from_json(path: Path):
    from transformers import CONFIG_MAPPING

    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if model_type not in CONFIG_MAPPING:
        raise UserError(f"{path} has model_type {model_type!r}, which transformers does not know; give the "
                        "config.json of a LLaMA or OPT checkpoint")
    return CONFIG_MAPPING[model_type].from_dict(data)


def load_model_config(spec: str):
    """The config of MODEL: a preset name, a checkpoint directory or a config.json file."""
    from .checkpoint import load_config

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
    family_for(config)  # LLaMA and OPT only
    if config.model_type.startswith("minidisc_"):
        raise UserError(f"{spec} is an exported MiniDisc model with per-layer widths; plan the compression of a "
                        "stock LLaMA/OPT teacher")
    return config


# --- shapes and parameter counts --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shapes:
    """What the byte accounting needs from a config (LLaMA and OPT decoders)."""

    family: str
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
    attn_bias: bool  # q/k/v/o biases
    mlp_bias: bool
    norm_bias: bool  # LayerNorm (OPT) has a bias, RMSNorm (LLaMA) does not
    final_norm: bool

    @classmethod
    def of(cls, config) -> "Shapes":
        family = family_for(config)
        llama = family.name == "llama"
        get = lambda name, default: getattr(config, name, default)  # noqa: E731
        return cls(
            family=family.name, layers=family.num_layers, hidden=family.hidden_size,
            heads=config.num_attention_heads, kv_heads=family.num_kv_heads, head_dim=family.head_dim,
            intermediate=family.intermediate_size, vocab=config.vocab_size,
            embed_dim=family.hidden_size if llama else get("word_embed_proj_dim", None) or family.hidden_size,
            positions=0 if llama else config.max_position_embeddings + 2,  # OPT offsets positions by 2
            tied=bool(get("tie_word_embeddings", not llama)),
            attn_bias=bool(get("attention_bias", False)) if llama else bool(get("enable_bias", True)),
            mlp_bias=bool(get("mlp_bias", False)) if llama else bool(get("enable_bias", True)),
            norm_bias=not llama and bool(get("layer_norm_elementwise_affine", True)),
            final_norm=llama or (bool(get("do_layer_norm_before", True))
                                 and not get("_remove_final_layer_norm", False)),
        )

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def up_linears(self) -> int:
        """Linears producing FFN neurons: gate+up (SwiGLU) or fc1."""
        return 2 if self.family == "llama" else 1

    @property
    def norm_params(self) -> int:
        return self.hidden * (2 if self.norm_bias else 1) if self.family == "opt" else self.hidden


def _linear(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


def decoder_linears(s: Shapes) -> list[int]:
    """Parameter counts of one decoder layer's linears (weights + biases), the ones int8/nf4 quantise."""
    attention = [_linear(s.hidden, s.q_dim, s.attn_bias), _linear(s.hidden, s.kv_dim, s.attn_bias),
                 _linear(s.hidden, s.kv_dim, s.attn_bias), _linear(s.q_dim, s.hidden, s.attn_bias)]
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
    """Parameters of the model, tied weights counted once, from the config alone (no instantiation)."""
    s = Shapes.of(config)
    per_layer = sum(decoder_linears(s)) + 2 * s.norm_params
    return (s.layers * per_layer + sum(_embeddings(s)) + sum(_projections(s))
            + (s.norm_params if s.final_norm else 0))


def largest_layer_parameters(config) -> int:
    """The largest single module's own parameters: what ZeRO-3 gathers at once (DeepSpeed's `model_to_params`
    takes the same maximum over modules). For LLaMA/OPT it is the embedding or the LM head."""
    s = Shapes.of(config)
    return max(decoder_linears(s) + _embeddings(s) + _projections(s))


def unit_parameters(config) -> tuple[int, int]:
    """(parameters of one attention unit, of one FFN neuron). An attention unit is a KV group: its n_rep
    query heads' q rows and o columns plus one head's k and v rows (biases of q/k/v rows included; the o
    bias belongs to the hidden size, which is never pruned). Every unit of a kind costs the same in every
    layer, so a width's count depends only on how many units it keeps in total."""
    s = Shapes.of(config)
    q_rows, kv_rows = s.q_dim // s.kv_heads, s.head_dim
    bias = int(s.attn_bias)
    attention = q_rows * (s.hidden + bias) + 2 * kv_rows * (s.hidden + bias) + q_rows * s.hidden
    neuron = s.up_linears * (s.hidden + int(s.mlp_bias)) + s.hidden
    return attention, neuron


def kept_units(total: int, permille: int) -> int:
    """Units kept when `permille`/1000 of `total` are removed (same rounding as `engine.grid.keep_counts`)."""
    return total - (permille * total + PERMILLE // 2) // PERMILLE


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


# --- the cluster and the run ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_memory_gib: float
    cpu_memory_gib: float | None = None  # per node; None = not checked

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def usable_bytes(self) -> int:
        return int(self.gpu_memory_gib * GIB * (1 - HEADROOM))

    def validate(self) -> "Cluster":
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise UserError("--nodes and --gpus-per-node must be at least 1")
        if not self.gpu_memory_gib > 0:
            raise UserError(f"--gpu-memory must be a positive number of GiB per GPU (got {self.gpu_memory_gib:g})")
        if self.cpu_memory_gib is not None and not self.cpu_memory_gib > 0:
            raise UserError(f"--cpu-memory must be a positive number of GiB per node (got {self.cpu_memory_gib:g})")
        return self


@dataclass(frozen=True)
class PlanOptions:
    """The `minidisc compress` options that decide memory, with the same meanings and defaults, except the
    batch size: by default one sequence per GPU per micro-step, whatever the number of GPUs."""

    target: int = 900  # per-mille
    truncate: int = 500
    grid: tuple[int, ...] = DEFAULT_GRID
    batch_size: int | None = None  # sequences per optimiser step over all GPUs; None = one per GPU micro-step
    seq_len: int = 256
    grad_accum: int = 1
    sandwich_sample: int = 0
    gradient_checkpointing: bool = False

    def validate(self) -> "PlanOptions":
        if self.target == 0:
            raise UserError("--target-sparsity must be above 0: a student at sparsity 0 is the teacher")
        if self.truncate > self.target:
            raise UserError(f"--truncate {format_sparsity(self.truncate)} is above --target-sparsity "
                            f"{format_sparsity(self.target)}: the candidate TAs lie between them")
        for name in ("batch_size", "grad_accum"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
        if self.seq_len < 2:
            raise UserError("--seq-len must be at least 2 (a token and the next one)")
        if self.sandwich_sample < 0:
            raise UserError("--sandwich-sample cannot be negative")
        return self

    @property
    def candidates(self) -> list[int]:
        """The supernet's widths: grid sparsities (target included) between --truncate and the target."""
        grid = sorted(set(self.grid) | {self.target})
        return [s for s in grid if self.truncate <= s <= self.target]

    @property
    def widths_per_step(self) -> int:
        k = len(self.candidates)
        return min(k, self.sandwich_sample + 2) if self.sandwich_sample else k

    def micro_batch(self, cluster: Cluster) -> int:
        """Sequences per GPU per forward (as `engine.trainer.micro_batch`)."""
        from .config import split_batch

        if self.batch_size is None:
            return 1
        return split_batch(self.batch_size, cluster.gpus, self.grad_accum, "GPUs")


# --- byte accounting --------------------------------------------------------------------------------------------
TEACHERS = ("replicated", "zero3", "int8", "nf4")  # preference order among teachers
TRAINED = ("adamw", "adamw8bit", "offload-opt", "offload-all")  # preference order for the trained model
CPU_BYTES = {"adamw": 0, "adamw8bit": 0, "offload-opt": 16, "offload-all": 18}


@dataclass(frozen=True)
class ModelStates:
    params_grads: int  # bf16 parameter shard + fp32 gradient shard + the gathered largest layer
    optimizer: int  # fp32 master weights + optimiser moments (on the GPU)
    cpu_per_node: int


def trained_model_states(total: int, largest: int, cluster: Cluster, trained: str) -> ModelStates:
    """The supernet's model states under ZeRO-3 with bf16 mixed precision (DeepSpeed's
    `estimate_zero3_model_states_mem_needs` accounting, zero_init=True).

    Per parameter: 2 bytes bf16 weights + 4 fp32 gradient partition + 4 fp32 master + 8 AdamW m and v
    = 18, sharded over all GPUs, plus 4 bytes x the largest module while ZeRO-3 gathers it (bf16 weights
    and their gradient). bitsandbytes AdamW8bit keeps m and v in 1 byte each (its per-2048-block absmax is
    0.2% more): 12 bytes. `offload-opt` keeps master, moments and fp32 gradients in CPU memory (16 bytes x
    params / nodes, times DeepSpeed's 1.5 pinned-buffer factor) and only the bf16 shard on the GPU;
    `offload-all` also moves the bf16 shard to the CPU (18 bytes), leaving the gathered layer on the GPU.
    Without offload DeepSpeed still stages the largest layer in fp32 per GPU on the CPU."""
    per_gpu = lambda nbytes: int(nbytes * total / cluster.gpus)  # noqa: E731
    gathered = 4 * largest
    if trained in ("adamw", "adamw8bit"):
        moments = 8 if trained == "adamw" else 2
        cpu = largest * 4 * cluster.gpus_per_node * CPU_BUFFER
        return ModelStates(gathered + per_gpu(2 + 4), per_gpu(4 + moments), int(cpu))
    cpu = total * CPU_BYTES[trained] / cluster.nodes * CPU_BUFFER
    params_on_gpu = per_gpu(2) if trained == "offload-opt" else 0
    return ModelStates(gathered + params_on_gpu, 0, int(cpu))


def teacher_bytes(config, teacher: str, cluster: Cluster) -> int:
    """The frozen teacher on one GPU (no gradients, no optimiser).

    zero3:      2 bytes x params / GPUs, plus 2 bytes x the larger of the largest module (gathered during
                its forward) and the LM head, which `engine.trainer.train_step` keeps gathered while all
                widths read it.
    replicated: a full bf16 copy on every GPU (ZeRO stage 0): no gathers, the fastest.
    int8:       bitsandbytes LLM.int8: 1 byte per decoder-linear weight plus an fp32 scale per output row;
                embeddings, norms, biases and the LM head in bf16.
    nf4:        4 bits per decoder-linear weight plus its block absmax under double quantisation (the
                QLoRA setting: an 8-bit absmax per 64 weights and an fp32 constant per 256 blocks,
                ~0.016 bytes/weight; without double quantisation it is 4/64 = 0.0625); the rest in bf16.
    The quantised teachers also dequantise one linear at a time (2 bytes x the largest decoder linear)."""
    s = Shapes.of(config)
    total = parameter_count(config)
    if teacher == "replicated":
        return BF16 * total
    if teacher == "zero3":
        head = s.vocab * s.embed_dim
        return int(BF16 * total / cluster.gpus) + BF16 * max(largest_layer_parameters(config), head)
    weights, rows = _quantised_weights(s)
    if teacher == "int8":
        quantised = weights + 4 * rows
    else:
        quantised = math.ceil(weights / 2 + weights / 64 + 4 * weights / (64 * 256))
    workspace = BF16 * max(decoder_linears(s))
    return int(quantised + BF16 * (total - weights) + workspace)


def _quantised_weights(s: Shapes) -> tuple[int, int]:
    """(weights bitsandbytes quantises, their output rows): decoder-linear and projection weights, not biases."""
    attention_rows, ffn_rows = s.q_dim + 2 * s.kv_dim + s.hidden, s.up_linears * s.intermediate + s.hidden
    per_layer = (s.hidden * (s.q_dim + 2 * s.kv_dim) + s.q_dim * s.hidden
                 + s.up_linears * s.hidden * s.intermediate + s.intermediate * s.hidden)
    projections = _projections(s)
    return (s.layers * per_layer + sum(projections),
            s.layers * (attention_rows + ffn_rows) + (s.hidden + s.embed_dim if projections else 0))


def layer_activation_bytes(s: Shapes, q_dim: int, kv_dim: int, heads: int, neurons: int) -> int:
    """Bytes autograd saves per token in one decoder layer (bf16 compute, SDPA/flash attention: no
    [seq, seq] scores are kept), counted from what each op saves for its backward:

    LLaMA, per RMSNorm (x2): the fp32 upcast of its input (4h; HF computes the norm in fp32), the
    normalised bf16 tensor the weight multiplies (2h), its output, saved by the next linears (2h), and
    the fp32 rsqrt (4) = 8h + 4. Attention: rotated q and k, v and the output kept by flash attention
    (2 x (2q + 2kv)); o_proj's input is a view of that output; RoPE multiplies by constant cos/sin, which
    saves nothing of q's size; the log-sum-exp (4 bytes per head). SwiGLU: gate (SiLU's input), SiLU's
    output, up, and their product (down_proj's input) = 4 x intermediate x 2 bytes.
        LLaMA: 16h + 8 + 4q + 4kv + 4 heads + 8i
    OPT, per LayerNorm (x2): input and output (2h each) and fp32 mean and rstd (8). Attention: q, k, v and
    the output (2 x (q + 2kv + q)). FFN: ReLU saves its output, which is also fc2's input (2i, not 2 x 2i).
    No dropout masks: the trainer keeps the student in eval mode (deterministic, resumable).
        OPT: 8h + 16 + 4q + 4kv + 4 heads + 2i
    h = hidden, q/kv = query/key-value dims kept, i = FFN neurons kept."""
    attention = 2 * (2 * q_dim + 2 * kv_dim) + 4 * heads
    if s.family == "llama":
        return 2 * (8 * s.hidden + 4) + attention + 8 * neurons
    return 2 * (4 * s.hidden + 8) + attention + 2 * neurons


def _model_level_bytes(s: Shapes) -> int:
    """Per token outside the layers: input ids (and OPT's position ids, int64) and the final norm
    (LLaMA: fp32 input copy, normalised tensor, rsqrt; OPT: its input and statistics). The fused loss
    saves no input of the final norm's output: its gradient is finished in the forward."""
    ids = 8 if s.family == "llama" else 16
    final = (6 * s.hidden + 4 if s.family == "llama" else 2 * s.hidden + 8) if s.final_norm else 0
    return ids + final


def hidden_state_bytes(s: Shapes) -> int:
    """Per token: layer outputs that only `output_hidden_states=True` keeps alive while the loss is computed.
    LLaMA's norms save an fp32 copy of their input, not the bf16 input, so all L + 1 entries are extra;
    OPT's LayerNorms save their bf16 input, which is the previous layer's output, so only the final normed
    state is extra."""
    return BF16 * s.hidden * ((s.layers + 1) if s.family == "llama" else 1)


def mse_bytes(s: Shapes) -> int:
    """Per token: the hidden-state MSE's `pow` saves the fp32 difference at every compared layer."""
    from .objective import hidden_layer_indices

    return 4 * s.hidden * len(hidden_layer_indices(s.layers))


def activation_bytes(config, tokens: int, permille: int = 0, checkpointing: bool = False) -> int:
    """Bytes held for one width's backward at the end of its forward, for `tokens` = micro-batch x
    sequence length, at the candidate `permille` (0 = the full model). Widths are forwarded and
    back-propagated one after another, so only the widest candidate's activations count.

    Without checkpointing: L x `layer_activation_bytes` at the width's (global) share of heads and
    neurons + `hidden_state_bytes` + `mse_bytes` + `_model_level_bytes`, all x tokens. With
    --gradient-checkpointing each layer keeps only its bf16 input (2h per token, which are also the
    kept hidden states), plus one full-width layer's activations while it is recomputed."""
    s = Shapes.of(config)
    kv = kept_units(s.layers * s.kv_heads, permille)
    neurons = kept_units(s.layers * s.intermediate, permille)
    n_rep = s.heads // s.kv_heads
    full_layer = layer_activation_bytes(s, s.q_dim, s.kv_dim, s.heads, s.intermediate)
    fixed = _model_level_bytes(s) + mse_bytes(s)
    if checkpointing:
        per_token = s.layers * BF16 * s.hidden + BF16 * s.hidden + full_layer + fixed
    else:
        empty = layer_activation_bytes(s, 0, 0, 0, 0)
        kept = layer_activation_bytes(s, kv * n_rep * s.head_dim, kv * s.head_dim, kv * n_rep, neurons)
        per_token = s.layers * empty + (kept - empty) + hidden_state_bytes(s) + fixed
    return per_token * tokens


def loss_buffer_bytes(config, tokens: int) -> dict[str, int]:
    """Bytes of the loss that do not scale with the trained width, for one micro-batch.

    teacher_outputs: the teacher's hidden states, bf16, kept across all K widths: the ones the loss reads,
        every ceil(L/6)-th and the last (`hidden_layer_indices`; `engine.objective.teacher_outputs` drops
        the others).
    kl_chunk: the fused KL's chunk working set: rows = `kernels.distill_loss.chunk_rows` on CUDA (2^26
        elements / vocab, at most the micro-batch's tokens) x vocab x fp32 x `CHUNK_FACTOR`.
    head_grad: `FusedLinearDistill` finishes the LM-head gradient in the forward: an fp32 [vocab, hidden]
        buffer saved until the backward, cast to bf16 there, plus the bf16 gradient of the hidden states."""
    import torch

    from kernels.distill_loss import chunk_rows

    from .objective import hidden_layer_indices

    s = Shapes.of(config)
    rows = min(tokens, chunk_rows(s.vocab, None, torch.device("cuda")))
    return {
        "teacher_outputs": BF16 * len(hidden_layer_indices(s.layers)) * s.hidden * tokens,
        "kl_chunk": int(rows * s.vocab * 4 * CHUNK_FACTOR),
        "head_grad": (4 + BF16) * s.vocab * s.embed_dim + BF16 * s.embed_dim * tokens,
    }


# --- placements -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Placement:
    """One way to place the teacher and the trained supernet, with its per-GPU bytes."""

    teacher: str  # replicated | zero3 | int8 | nf4
    trained: str  # adamw | adamw8bit | offload-opt | offload-all
    teacher_bytes: int
    params_grads_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    loss_bytes: int
    usable_bytes: int
    cpu_per_node_bytes: int
    cpu_fits: bool = True

    @property
    def name(self) -> str:
        return f"{self.teacher} / {self.trained}"

    @property
    def total_bytes(self) -> int:
        return (self.teacher_bytes + self.params_grads_bytes + self.optimizer_bytes + self.activation_bytes
                + self.loss_bytes)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.usable_bytes and self.cpu_fits

    @property
    def preference(self) -> tuple:
        """Sort key: exact teachers before quantised ones, then AdamW < AdamW8bit < optimiser offload <
        full offload, then replicated (no gathers) < zero3, int8 < nf4."""
        return (self.teacher in ("int8", "nf4"), TRAINED.index(self.trained), TEACHERS.index(self.teacher))

    def to_dict(self) -> dict:
        return {**asdict(self), "name": self.name, "total_bytes": self.total_bytes, "fits": self.fits}


def _placement(config, cluster: Cluster, options: PlanOptions, teacher: str, trained: str) -> Placement:
    tokens = options.micro_batch(cluster) * options.seq_len
    states = trained_model_states(parameter_count(config), largest_layer_parameters(config), cluster, trained)
    cpu_fits = cluster.cpu_memory_gib is None or states.cpu_per_node <= cluster.cpu_memory_gib * GIB
    return Placement(
        teacher=teacher, trained=trained, teacher_bytes=teacher_bytes(config, teacher, cluster),
        params_grads_bytes=states.params_grads, optimizer_bytes=states.optimizer,
        activation_bytes=activation_bytes(config, tokens, min(options.candidates), options.gradient_checkpointing),
        loss_bytes=sum(loss_buffer_bytes(config, tokens).values()), usable_bytes=cluster.usable_bytes,
        cpu_per_node_bytes=states.cpu_per_node, cpu_fits=cpu_fits)


def plan_memory(config, cluster: Cluster, options: PlanOptions) -> list[Placement]:
    """The placements worth showing: every teacher placement with the supernet fully on the GPUs under
    AdamW, then AdamW8bit, optimiser offload and full offload, each with the most preferred teacher that
    fits (or, when none fits, the smallest)."""
    cluster, options = cluster.validate(), options.validate()
    rows = [_placement(config, cluster, options, teacher, "adamw") for teacher in TEACHERS]
    for trained in TRAINED[1:]:
        options_ = [_placement(config, cluster, options, teacher, trained) for teacher in TEACHERS]
        fitting = [row for row in options_ if row.fits]
        rows.append(fitting[0] if fitting else min(options_, key=lambda row: row.total_bytes))
    return rows


WHY_TEACHER = {"replicated": "an exact teacher without ZeRO-3 gathers", "zero3": "an exact teacher (sharded)",
               "int8": "an int8 teacher (quantised: its outputs differ slightly)",
               "nf4": "an nf4 teacher (quantised: its outputs differ slightly)"}
WHY_TRAINED = {"adamw": "full-precision AdamW, nothing offloaded", "adamw8bit": "8-bit AdamW moments, nothing "
               "offloaded", "offload-opt": "the optimiser offloaded to the CPU (slower steps)",
               "offload-all": "parameters and optimiser offloaded to the CPU (slowest)"}


def recommend(rows: list[Placement]) -> tuple[Placement | None, str]:
    """The most preferred placement that fits, and why in one line (None when nothing fits)."""
    fitting = sorted((row for row in rows if row.fits), key=lambda row: row.preference)
    if not fitting:
        smallest = min(rows, key=lambda row: row.total_bytes)
        return None, (f"nothing fits: the smallest placement ({smallest.name}) needs "
                      f"{smallest.total_bytes / GIB:.1f} GiB per GPU, {smallest.usable_bytes / GIB:.1f} GiB usable")
    best = fitting[0]
    skipped = [row.name for row in rows if row.preference < best.preference and not row.fits]
    reason = (f"{best.name}: {WHY_TEACHER[best.teacher]} and {WHY_TRAINED[best.trained]}; uses "
              f"{best.total_bytes / GIB:.1f} of {best.usable_bytes / GIB:.1f} usable GiB per GPU")
    verb = "does" if len(skipped) == 1 else "do"
    return best, reason + (f" ({', '.join(skipped)} {verb} not fit)" if skipped else "")


def ds_config_for(best: Placement) -> dict:
    """The `minidisc compress` options that run a placement."""
    train = {"adamw": "ds_configs/zero3_train.json", "adamw8bit": "ds_configs/zero3_train.json",
             "offload-opt": "ds_configs/zero3_train_offload_optimizer.json",
             "offload-all": "ds_configs/zero3_train_offload.json"}[best.trained]
    options = [f"--deepspeed {train}", f"--teacher-placement {best.teacher}"]
    if best.teacher == "zero3":
        options.append("--teacher-deepspeed ds_configs/zero3_inference.json")
    if best.trained == "adamw8bit":
        options.append("--optimizer adamw8bit")
    return {"deepspeed": train, "teacher_deepspeed": "ds_configs/zero3_inference.json" if best.teacher == "zero3"
            else None, "options": " ".join(options)}


MAX_NODES_FACTOR = 64  # how far `advice` looks for a node count that fits


def _smallest(config, cluster: Cluster, options: PlanOptions) -> Placement:
    """The recommended placement, or the one needing the least memory when nothing fits."""
    rows = plan_memory(config, cluster, options)
    return recommend(rows)[0] or min(rows, key=lambda row: row.total_bytes)


def _more_nodes(config, cluster: Cluster, options: PlanOptions) -> tuple[Cluster, Placement]:
    """The fewest nodes (up to MAX_NODES_FACTOR x) at which something fits, keeping the micro-batch."""
    micro = options.micro_batch(cluster)
    for nodes in range(cluster.nodes + 1, MAX_NODES_FACTOR * cluster.nodes + 1):
        more = replace(cluster, nodes=nodes)
        row = _smallest(config, more, replace(options, batch_size=micro * more.gpus * options.grad_accum))
        if row.fits:
            break
    return more, row


def _verdict(row: Placement) -> str:
    return f"fits ({row.name})" if row.fits else f"still needs {row.total_bytes / GIB:.1f} GiB"


def advice(config, cluster: Cluster, options: PlanOptions) -> list[str]:
    """What to change when nothing fits: each remedy alone, then all together, with whether it is enough.
    More GPUs keep the micro-batch (the global batch grows with them)."""
    tips = []
    more, row = _more_nodes(config, cluster, options)
    tips.append(f"more GPUs: {_verdict(row)} at {more.nodes} nodes x {cluster.gpus_per_node} GPUs")
    lean = options
    if options.micro_batch(cluster) > 1:
        lean = replace(lean, batch_size=cluster.gpus * options.grad_accum)
        tips.append(f"--batch-size {lean.batch_size} (micro-batch 1): {_verdict(_smallest(config, cluster, lean))}")
    if not options.gradient_checkpointing:
        checkpointed = replace(options, gradient_checkpointing=True)
        tips.append(f"--gradient-checkpointing: {_verdict(_smallest(config, cluster, checkpointed))}")
        lean = replace(lean, gradient_checkpointing=True)
    if lean != options and not any(tip.split(": ", 1)[1].startswith("fits") for tip in tips):
        more, row = _more_nodes(config, cluster, lean)
        tips.append(f"micro-batch 1 with gradient checkpointing and more GPUs: {_verdict(row)} at {more.nodes} "
                    f"nodes x {cluster.gpus_per_node} GPUs")
    return tips


def plan_report(config, cluster: Cluster, options: PlanOptions, model: str) -> dict:
    """Everything `minidisc plan` shows, as JSON-friendly data."""
    rows = plan_memory(config, cluster, options)
    best, reason = recommend(rows)
    tokens = options.micro_batch(cluster) * options.seq_len
    total = parameter_count(config)
    return {
        "model": model,
        "family": Shapes.of(config).family,
        "cluster": {**asdict(cluster), "gpus": cluster.gpus, "usable_bytes": cluster.usable_bytes,
                    "headroom": HEADROOM},
        "run": {"micro_batch": options.micro_batch(cluster), "seq_len": options.seq_len,
                "grad_accum": options.grad_accum, "gradient_checkpointing": options.gradient_checkpointing,
                "candidates": [format_sparsity(s) for s in options.candidates],
                "widths_per_step": options.widths_per_step, "tokens_per_micro_batch": tokens},
        "parameters": {"teacher": total, "supernet": total, "largest_layer": largest_layer_parameters(config),
                       "candidates": [{"sparsity": s / PERMILLE, "parameters": width_parameters(config, s),
                                       "fraction": width_parameters(config, s) / total}
                                      for s in options.candidates]},
        "loss_buffers": loss_buffer_bytes(config, tokens),
        "placements": [row.to_dict() for row in rows],
        "recommended": best.name if best else None,
        "reason": reason,
        "ds_config": ds_config_for(best) if best else None,
        "advice": [] if best else advice(config, cluster, options),
    }


# --- printing ---------------------------------------------------------------------------------------------------
def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.1f}"


def print_plan(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    import sys

    # Results go to stdout (logs to stderr); piped output gets room for every column.
    console = Console() if sys.stdout.isatty() else Console(width=120)
    cluster, run = report["cluster"], report["run"]
    params = Table(title=f"Parameters of {report['model']} ({report['family']})")
    for column in ("model", "sparsity", "parameters", "of teacher"):
        params.add_column(column, justify="right")
    params.add_row("teacher = supernet", "0", f"{report['parameters']['teacher']:,}", "100.0%")
    for row in report["parameters"]["candidates"]:
        params.add_row("candidate", f"{row['sparsity']:g}", f"{row['parameters']:,}", f"{row['fraction']:.1%}")
    console.print(params)
    table = Table(title=f"Per-GPU memory (GiB) on {cluster['nodes']} x {cluster['gpus_per_node']} GPUs of "
                  f"{cluster['gpu_memory_gib']:g} GiB ({cluster['usable_bytes'] / GIB:.1f} usable)")
    columns = ("teacher / trained", "teacher", "params+grads", "optimizer", "activations", "loss bufs", "total",
               "fits", "CPU/node")  # CPU per node, not per GPU
    for column in columns:
        table.add_column(column, justify="left" if column == columns[0] else "right")
    for row in report["placements"]:
        mark = " *" if row["name"] == report["recommended"] else ""
        table.add_row(row["name"] + mark, *(_gib(row[key]) for key in ("teacher_bytes", "params_grads_bytes",
                      "optimizer_bytes", "activation_bytes", "loss_bytes", "total_bytes")),
                      "yes" if row["fits"] else "no", _gib(row["cpu_per_node_bytes"]),
                      style="bold green" if mark else None)
    console.print(table)
    console.print("offload-opt: optimizer states and fp32 gradients in CPU memory; offload-all: the bf16 parameters "
                  "too; CPU/node includes DeepSpeed's 1.5x pinned-buffer factor")
    console.print(f"micro-batch {run['micro_batch']} x {run['seq_len']} tokens, {len(run['candidates'])} candidate "
                  f"widths ({', '.join(run['candidates'])}), {run['widths_per_step']} trained per step"
                  f"{', gradient checkpointing' if run['gradient_checkpointing'] else ''}")
    if report["recommended"]:
        ds = report["ds_config"]
        console.print(f"recommended: {report['reason']}")
        console.print(f"run it with: minidisc compress {ds['options']}"
                      f"{' --gradient-checkpointing' if run['gradient_checkpointing'] else ''} ...")
    else:
        console.print(f"[bold red]{report['reason']}[/]; what to change:")
        for tip in report["advice"]:
            console.print(f"  - {tip}")


def options_from_args(args) -> tuple[Cluster, PlanOptions]:
    grid = parse_grid(args.grid) if args.grid else DEFAULT_GRID
    cluster = Cluster(args.nodes, args.gpus_per_node, args.gpu_memory, args.cpu_memory)
    options = PlanOptions(target=parse_sparsity(args.target_sparsity), truncate=parse_sparsity(args.truncate),
                          grid=grid, batch_size=args.batch_size, seq_len=args.seq_len, grad_accum=args.grad_accum,
                          sandwich_sample=args.sandwich_sample, gradient_checkpointing=args.gradient_checkpointing)
    return cluster.validate(), options.validate()


def run_plan(args) -> dict:
    """`minidisc plan`: print the plan (a table, or JSON with --json) and return it."""
    cluster, options = options_from_args(args)
    report = plan_report(load_model_config(args.model), cluster, options, args.model)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_plan(report)
    return report
