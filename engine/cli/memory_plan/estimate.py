"""Per-GPU memory of a MiniDisc run for each placement of the teacher and the trained supernet.

A sandwich step holds, on every GPU at once:

    teacher        the frozen teacher (ZeRO-3 shard, a full bf16 copy, or bitsandbytes int8/nf4)
    model states   the trained supernet under ZeRO-3: bf16 parameters and gradients, fp32 master, moments
    activations    what autograd saves for the widths of one forward: all the step's widths by default, stacked
                   (--stack-widths 0), the widest n with --stack-widths n, the widest alone with 1
    loss buffers   the teacher's outputs, kept across the K widths, and the fused KL loss's working set
    or, instead of the last two (never alive with them), the optimiser step's fp32 gradient of one sub-group

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

import math
from dataclasses import asdict, dataclass

from engine.cli.memory_plan.shapes import (
    Shapes,
    _projections,
    decoder_linears,
    kept_units,
    largest_layer_parameters,
    parameter_count,
)
from engine.config import split_batch
from engine.core import widths
from engine.core.errors import UserError
from engine.core.widths import DEFAULT_GRID, candidate_widths, check_target_and_truncate
from engine.distillation.loss import hidden_layer_indices

GIB = 2**30
HEADROOM = 0.10
CPU_BUFFER = 1.5  # DeepSpeed's `additional_buffer_factor` for pinned CPU buffers (its estimator's default)
BF16 = 2
# fp32 [chunk, vocab] tensors alive at once in the fused KL on CUDA (Triton row loss): the student's and the
# teacher's logits (the gradient overwrites the student's) plus the gradient's bf16 copy (half of one).
CHUNK_FACTOR = 2.5

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
    truncate: int = 0
    grid: tuple[int, ...] = DEFAULT_GRID
    batch_size: int | None = None  # sequences per optimiser step over all GPUs; None = one per GPU micro-step
    seq_len: int = 256
    grad_accum: int = 1
    sandwich_sample: int = 0
    gradient_checkpointing: bool = False
    stack_widths: int = 0  # widths per forward; 0 = all of a step's

    def validate(self) -> "PlanOptions":
        check_target_and_truncate(self.target, self.truncate)
        for name in ("batch_size", "grad_accum"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
        if self.seq_len < 2:
            raise UserError("--seq-len must be at least 2 (a token and the next one)")
        if self.sandwich_sample < 0 or self.stack_widths < 0:
            raise UserError("--sandwich-sample and --stack-widths cannot be negative")
        return self

    @property
    def candidates(self) -> list[int]:
        """The supernet's widths: grid sparsities (target included) between --truncate and the target."""
        return candidate_widths(self.grid, self.truncate, self.target)

    @property
    def widths_per_step(self) -> int:
        return widths.widths_per_step(len(self.candidates), self.sandwich_sample)

    @property
    def widths_held(self) -> list[int]:
        """The widths whose activations are alive at once, at most: those of the first forward of a step (its
        widest, --stack-widths of them; with --sandwich-sample, the widest ones it may draw, then the sparsest)."""
        candidates, k = sorted(self.candidates), self.widths_per_step
        step = candidates if k >= len(candidates) else candidates[:k - 1] + candidates[-1:]
        return step[:self.stack_widths or k]

    def micro_batch(self, cluster: Cluster) -> int:
        """Sequences per GPU per forward (as `engine.training.trainer.micro_batch`)."""
        if self.batch_size is None:
            return 1
        return split_batch(self.batch_size, cluster.gpus, self.grad_accum, "GPUs")


# --- byte accounting --------------------------------------------------------------------------------------------
# ZeRO-3 keeps gradient partitions in the model dtype and, at the step, makes each optimiser sub-group's fp32
# gradient from a flat copy of them (2 + 4 bytes a parameter) before stepping it; `sub_group_size` in
# ds_configs/zero3_train*.json bounds the sub-group (DeepSpeed's default, 1e9, held a 0.5B model's whole partition:
# 2.9 GB at once, measured).
SUB_GROUP = 10**8
TEACHERS = ("replicated", "zero3", "int8", "nf4")  # preference order among teachers
TRAINED = ("adamw", "adamw8bit", "offload-opt", "offload-all")  # preference order for the trained model
CPU_BYTES = {"adamw": 0, "adamw8bit": 0, "offload-opt": 16, "offload-all": 18}


@dataclass(frozen=True)
class ModelStates:
    params_grads: int  # bf16 parameter shard + bf16 gradient partition + the gathered largest layer
    optimizer: int  # fp32 master weights + optimiser moments (on the GPU)
    step: int  # the optimiser step's transient: one sub-group's fp32 gradient and its flat bf16 copy
    cpu_per_node: int


def trained_model_states(total: int, largest: int, cluster: Cluster, trained: str) -> ModelStates:
    """The supernet's model states under ZeRO-3 with bf16 mixed precision, as measured (DeepSpeed's
    `estimate_zero3_model_states_mem_needs` counts the gradient partition in fp32: 2 bytes more).

    Per parameter: 2 bytes bf16 weights + 2 bf16 gradient partition + 4 fp32 master + 8 AdamW m and v
    = 16, sharded over all GPUs, plus 4 bytes x the largest module while ZeRO-3 gathers it (bf16 weights
    and their gradient), plus at the step 6 bytes x one sub-group (`SUB_GROUP`). bitsandbytes AdamW8bit keeps
    m and v in 1 byte each (its per-2048-block absmax is 0.2% more): 10 bytes. `offload-opt` keeps master, moments
    and fp32 gradients in CPU memory (16 bytes x params / nodes, times DeepSpeed's 1.5 pinned-buffer factor) and
    only the bf16 shard on the GPU; `offload-all` also moves the bf16 shard to the CPU (18 bytes), leaving the
    gathered layer on the GPU. Without offload DeepSpeed still stages the largest layer in fp32 per GPU on the CPU."""
    per_gpu = lambda nbytes: int(nbytes * total / cluster.gpus)  # noqa: E731
    gathered = 4 * largest
    if trained in ("adamw", "adamw8bit"):
        moments = 8 if trained == "adamw" else 2
        cpu = largest * 4 * cluster.gpus_per_node * CPU_BUFFER
        step = 6 * min(per_gpu(1), SUB_GROUP)
        return ModelStates(gathered + per_gpu(2 + 2), per_gpu(4 + moments), step, int(cpu))
    cpu = total * CPU_BYTES[trained] / cluster.nodes * CPU_BUFFER
    params_on_gpu = per_gpu(2) if trained == "offload-opt" else 0
    return ModelStates(gathered + params_on_gpu, 0, 0, int(cpu))


def teacher_bytes(config, teacher: str, cluster: Cluster) -> int:
    """The frozen teacher on one GPU (no gradients, no optimiser).

    zero3:      2 bytes x params / GPUs, plus 2 bytes x the larger of the largest module (gathered during
                its forward) and the LM head, which `engine.training.trainer.train_step` keeps gathered while all
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
    [seq, seq] scores are kept), counted from what each op saves for its backward. Attention, in every
    family: q and k (rotated under RoPE, which multiplies by constant cos/sin and saves nothing of q's size),
    v and the output kept by flash attention (2 x (2q + 2kv)), whose view is the output projection's input,
    and the log-sum-exp (4 bytes per head). The norms and the FFN are the family's (`SavedBytes`):
        LLaMA: 16h + 8 + 4q + 4kv + 4 heads + 8i        OPT: 8h + 16 + 4q + 4kv + 4 heads + 2i
        Qwen3: LLaMA's + 6(q + kv) + 4(heads + kv heads) for its per-head q/k norms
    h = hidden, q/kv = query/key-value dims kept, i = FFN neurons kept."""
    per_hidden, constant = s.saved.norms
    per_channel, per_head = s.saved.head_norms
    attention = 2 * (2 * q_dim + 2 * kv_dim) + 4 * heads
    head_norms = per_channel * (q_dim + kv_dim) + per_head * (heads + kv_dim // s.head_dim)
    return per_hidden * s.hidden + constant + attention + head_norms + s.saved.ffn_per_neuron * neurons


def _model_level_bytes(s: Shapes) -> int:
    """Per token outside the layers: the ids and the final norm (`SavedBytes`). The fused loss saves no
    input of the final norm's output: its gradient is finished in the forward."""
    per_hidden, constant = s.saved.final_norm
    return s.saved.ids + (per_hidden * s.hidden + constant if s.final_norm else 0)


def hidden_state_bytes(s: Shapes) -> int:
    """Per token: layer outputs that only `output_hidden_states=True` keeps alive while the loss is computed
    (all L + 1 where the norms save an fp32 copy of their input, else only the final normed state)."""
    return BF16 * s.hidden * ((s.layers + 1) if s.saved.all_hidden_states else 1)


def mse_bytes(s: Shapes) -> int:
    """Per token: the hidden-state MSE's `pow` saves the fp32 difference at every compared layer."""
    return 4 * s.hidden * len(hidden_layer_indices(s.layers))


def activation_bytes(config, tokens: int, permille: int = 0, checkpointing: bool = False) -> int:
    """Bytes held for one width's backward at the end of its forward, for `tokens` = micro-batch x
    sequence length, at the candidate `permille` (0 = the full model). A step holds the sum over
    `PlanOptions.widths_held` (stacked widths recompute a layer for all of them at once).

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


def loss_buffer_bytes(config, tokens: int, copies: int = 1) -> dict[str, int]:
    """Bytes of the loss that do not scale with the trained width, for one micro-batch of `tokens` run at
    `copies` stacked widths.

    teacher_outputs: the teacher's hidden states, bf16, kept across all K widths: the ones the loss reads,
        every ceil(L/6)-th and the last (`hidden_layer_indices`; `engine.distillation.loss.teacher_outputs` drops
        the others).
    kl_chunk: the fused KL's chunk working set: rows = `kernels.distill_loss.chunk_rows` on CUDA (2^26
        elements / vocab, at most the micro-batch's tokens) x vocab x fp32 x `CHUNK_FACTOR`.
    head_grad: `FusedLinearDistill`'s LM-head gradient, at the backward's start: an fp32 [vocab, hidden] sum
        beside its bf16 cast or, for fewer than 2 x hidden rows (`keeps_logit_grads`), the rows' bf16 logit
        gradients beside the bf16 gradient made from them; plus the bf16 gradient of the rows' hidden states."""
    import torch

    from kernels.distill_loss import chunk_rows
    from kernels.fused_linear_distill import keeps_logit_grads

    s = Shapes.of(config)
    rows = copies * tokens  # the stacked widths' tokens: the fused loss's rows
    chunk = min(tokens, chunk_rows(s.vocab, None, torch.device("cuda")))  # a chunk never spans two widths
    kept = BF16 * rows * s.vocab if keeps_logit_grads(rows, s.embed_dim, BF16) else 4 * s.vocab * s.embed_dim
    return {
        "teacher_outputs": BF16 * len(hidden_layer_indices(s.layers)) * s.hidden * tokens,
        "kl_chunk": int(chunk * s.vocab * 4 * CHUNK_FACTOR),
        "head_grad": kept + BF16 * s.vocab * s.embed_dim + BF16 * s.embed_dim * rows,
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
    step_bytes: int
    usable_bytes: int
    cpu_per_node_bytes: int
    cpu_fits: bool = True

    @property
    def name(self) -> str:
        return f"{self.teacher} / {self.trained}"

    @property
    def total_bytes(self) -> int:
        """The step's peak: the states, then the forward and backward's buffers or the optimiser step's, whichever is
        larger (the backward has freed the activations before DeepSpeed steps)."""
        return (self.teacher_bytes + self.params_grads_bytes + self.optimizer_bytes
                + max(self.activation_bytes + self.loss_bytes, self.step_bytes))

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.usable_bytes and self.cpu_fits

    @property
    def preference(self) -> tuple:
        """Sort key: exact teachers before quantised ones, then AdamW < AdamW8bit < optimiser offload <
        full offload, then replicated (no gathers) < zero3, int8 < nf4."""
        return (self.teacher in ("int8", "nf4"), TRAINED.index(self.trained), TEACHERS.index(self.teacher))

    @property
    def fast(self) -> bool:
        """An exact teacher and a supernet whose states stay on the GPUs: no quantisation, no PCIe every step."""
        return self.teacher in ("replicated", "zero3") and self.trained in ("adamw", "adamw8bit")

    def to_dict(self) -> dict:
        return {**asdict(self), "name": self.name, "total_bytes": self.total_bytes, "fits": self.fits}


def placement(config, cluster: Cluster, options: PlanOptions, teacher: str, trained: str) -> Placement:
    tokens = options.micro_batch(cluster) * options.seq_len
    states = trained_model_states(parameter_count(config), largest_layer_parameters(config), cluster, trained)
    cpu_fits = cluster.cpu_memory_gib is None or states.cpu_per_node <= cluster.cpu_memory_gib * GIB
    return Placement(
        teacher=teacher, trained=trained, teacher_bytes=teacher_bytes(config, teacher, cluster),
        params_grads_bytes=states.params_grads, optimizer_bytes=states.optimizer,
        activation_bytes=sum(activation_bytes(config, tokens, width, options.gradient_checkpointing)
                             for width in options.widths_held),
        loss_bytes=sum(loss_buffer_bytes(config, tokens, len(options.widths_held)).values()), step_bytes=states.step,
        usable_bytes=cluster.usable_bytes,
        cpu_per_node_bytes=states.cpu_per_node, cpu_fits=cpu_fits)


def plan_memory(config, cluster: Cluster, options: PlanOptions) -> list[Placement]:
    """The placements worth showing: every teacher placement with the supernet fully on the GPUs under
    AdamW, then AdamW8bit, optimiser offload and full offload, each with the most preferred teacher that
    fits (or, when none fits, the smallest)."""
    cluster, options = cluster.validate(), options.validate()
    rows = [placement(config, cluster, options, teacher, "adamw") for teacher in TEACHERS]
    for trained in TRAINED[1:]:
        options_ = [placement(config, cluster, options, teacher, trained) for teacher in TEACHERS]
        fitting = [row for row in options_ if row.fits]
        rows.append(fitting[0] if fitting else min(options_, key=lambda row: row.total_bytes))
    return rows
