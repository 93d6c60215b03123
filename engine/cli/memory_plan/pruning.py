"""Memory of the set-up before training: pruning's importance pass (`engine.pruning.prune`), per GPU and on the
CPU of rank 0's node, for the plan and the dry run."""
from __future__ import annotations

import os
from dataclasses import dataclass

from engine.cli.memory_plan.estimate import BF16, GIB, Cluster, _model_level_bytes, layer_activation_bytes
from engine.cli.memory_plan.shapes import Shapes, largest_layer_parameters, parameter_count
from engine.core.errors import UserError
from engine.models.export import SHARD_BYTES

MASKS = 24  # bytes a token and layer the masks' multiplications keep (measured)
LOGIT_COPIES = 3  # fp32 [tokens, vocab]: the upcast logits, log-softmax's output kept for the backward, their gradient


@dataclass(frozen=True)
class PruningMemory:
    teacher_bytes: int  # per GPU: its ZeRO-3 shard and the gathered largest module, or all of it on one GPU
    activation_bytes: int  # per GPU: what the backward to the masks keeps for one calibration batch
    logit_bytes: int
    usable_bytes: int
    cpu_node_bytes: int  # rank 0's node, writing the reordered teacher: whole on one GPU, else a shard at a time

    @property
    def total_bytes(self) -> int:
        return self.teacher_bytes + self.activation_bytes + self.logit_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.usable_bytes


def pruning_memory(config, cluster: Cluster, batch_size: int, seq_len: int, weight_bytes: int = BF16,
                   checkpoint_bytes: int | None = None) -> PruningMemory:
    """Importance scores |dL/dmask| need a backward through the whole teacher but no weight gradient: per GPU the
    weights (`weight_bytes` each: the checkpoint's dtype on a GPU, 4 on a CPU; what rank 0 writes is in the
    checkpoint's, `checkpoint_bytes`, by default the same), partitioned by ZeRO-3 over every GPU of a launch (plus
    the largest module or the LM head while gathered) or whole on a single GPU; the activations one batch of
    `batch_size` x `seq_len` tokens saves at full width, as in training but for the inputs only a weight gradient
    needs; and the loss's fp32 logits (`LOGIT_COPIES`)."""
    s, total = Shapes.of(config), parameter_count(config)
    tokens = batch_size * seq_len
    if cluster.gpus > 1:
        gathered = max(largest_layer_parameters(config), s.vocab * s.embed_dim)
        teacher = weight_bytes * (total // cluster.gpus + gathered)
    else:
        teacher = weight_bytes * total
    # With frozen weights autograd keeps no linear's input for its weight gradient (the family's `weight_inputs`);
    # the masks' own multiplications keep ~24 bytes a token and layer more (measured).
    per_hidden, per_neuron, per_channel = s.saved.weight_inputs
    weight_only = per_hidden * s.hidden + per_neuron * s.intermediate + per_channel * (s.q_dim + s.kv_dim)
    per_layer = layer_activation_bytes(s, s.q_dim, s.kv_dim, s.heads, s.intermediate) - weight_only + MASKS
    activations = (s.layers * per_layer + _model_level_bytes(s)) * tokens
    # One process writes its reordered copy from the CPU; after a launch rank 0 streams the checkpoint through one
    # output shard (`write_reordered`), held twice while safetensors serialises it.
    whole = (checkpoint_bytes or weight_bytes) * total
    written = whole if cluster.gpus == 1 else min(whole, 2 * SHARD_BYTES)
    return PruningMemory(teacher, activations, LOGIT_COPIES * 4 * s.vocab * tokens, cluster.usable_bytes, written)


def longest_fitting(seq_len: int, fits) -> int:
    """The calibration length to advise when a batch does not fit: `seq_len` halved, down to 128 tokens, until one
    sequence of it `fits` (a predicate of the length)."""
    while seq_len > 128 and not fits(seq_len):
        seq_len //= 2
    return seq_len


def check_pruning_fits(config, batch_size: int, seq_len: int, device: str, world: int, local: int,
                       checkpoint_bytes: int) -> None:
    """`minidisc prune` against this machine, before anything is loaded: per GPU on a GPU (the checkpoint's dtype),
    else the host's memory for every local rank's share (fp32) and, under a launcher, rank 0's output shard.
    Refuses only a plan above what there is (plans run 0.8-1x the measured peak), naming what would fit."""
    nodes = max(1, world // max(local, 1))
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return  # prune itself says so
        cluster = Cluster(nodes, local, torch.cuda.get_device_properties(0).total_memory / GIB)
        have, where = cluster.usable_bytes, "per GPU"

        def need(batch: int, tokens: int) -> int:
            return pruning_memory(config, cluster, batch, tokens, checkpoint_bytes).total_bytes
    else:
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "of this host's memory"
        cluster = Cluster(nodes, local, have / GIB)

        def need(batch: int, tokens: int) -> int:
            memory = pruning_memory(config, cluster, batch, tokens, 4, checkpoint_bytes)
            return local * memory.total_bytes + (memory.cpu_node_bytes if world > 1 else 0)
    if need(batch_size, seq_len) <= have:
        return
    tokens = longest_fitting(seq_len, lambda length: need(1, length) <= have)
    fix = (f"--calib-batch-size 1 --calib-seq-len {tokens}" if need(1, tokens) <= have else
           "more GPUs under a launcher (ZeRO-3 then partitions the teacher)")
    raise UserError(f"pruning needs {need(batch_size, seq_len) / GIB:.1f} GiB {where} for {batch_size} x {seq_len} "
                    f"calibration tokens a batch, and there are {have / GIB:.1f}: use {fix}")
