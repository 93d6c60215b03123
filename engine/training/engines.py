"""A stage's models: the frozen teacher in its placement and the trained student engine with its optimiser."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from engine.core import distributed as dist
from engine.distillation.loss import Objective, stacked_width_loss
from engine.models.families import family_for
from engine.models.loading import load_causal_lm
from engine.models.supernet import Supernet
from engine.training.deepspeed_config import bf16_enabled, offloaded, teacher_ds_config, train_ds_config
from engine.training.memory import give_back
from engine.training.stage import Stage, TrainConfig

log = logging.getLogger(__name__)
BETAS, EPS = (0.9, 0.95), 1e-8  # AdamW, as in LLaMA pre-training

class Distiller(nn.Module):
    """What the trained engine wraps. Its forward is the distillation loss of the active widths (one, or
    `copies` stacked: `Supernet.stack`), so under ZeRO-3 the student's LM head is gathered by DeepSpeed while
    the fused loss reads it."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    @property
    def lm(self):
        return self.student.model if isinstance(self.student, Supernet) else self.student

    def forward(self, input_ids, loss_mask, teacher_out, objective: Objective, copies: int = 1):
        return stacked_width_loss(self.lm, teacher_out, input_ids, loss_mask, objective, copies)


def load_partitioned(directory: Path, ds_config: dict):
    """A causal LM built under `ds_config` (partitioned while loading under ZeRO-3). The returned
    HfDeepSpeedConfig must stay referenced as long as the model lives."""
    from transformers.integrations import HfDeepSpeedConfig

    if ds_config.get("zero_optimization", {}).get("zero_hpz_partition_size", 1) > 1:
        # ZeRO++ hpZ: DeepSpeed builds its intra-node group in every zero.Init that asks for it and asserts on
        # the second (the next model, the next stage); each model keeps the group it was built with.
        from deepspeed.utils import groups

        groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None
    keep_alive = HfDeepSpeedConfig(ds_config)
    dtype = torch.bfloat16 if bf16_enabled(ds_config) else torch.float32
    return load_causal_lm(directory, dtype=dtype), keep_alive


def _no_decay(name: str, param) -> bool:
    """Biases and norm weights (the 1-D parameters) are not decayed."""
    return len(getattr(param, "ds_shape", param.shape)) < 2


def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    warmup = round(cfg.warmup_ratio * cfg.max_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        return max(0.0, (cfg.max_steps - step) / max(1, cfg.max_steps - warmup))

    return factor


class FrozenTeacher:
    """A teacher held whole on this process's device (the non-ZeRO placements); `.module` as on an engine."""

    def __init__(self, module: nn.Module):
        self.module = module


def quantization_config(placement: str, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if placement == "int8":  # LLM.int8(): int8 weights, outlier features in 16 bit; the LM head stays unquantised
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def load_teacher(directory: Path, cfg: TrainConfig, frozen_config: dict):
    """The frozen teacher placed as --teacher-placement says: (teacher, what must stay referenced)."""
    import deepspeed

    if cfg.teacher_placement == "zero3":
        teacher, keep_alive = load_partitioned(directory, frozen_config)
        teacher.requires_grad_(False)
        engine, *_ = deepspeed.initialize(model=teacher, config=frozen_config)
        engine.module.eval()
        return engine, keep_alive
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # a whole copy: no ZeRO-3 partitioning while it loads
    dtype = torch.bfloat16 if bf16_enabled(frozen_config) else torch.float32
    if cfg.teacher_placement == "replicated":
        teacher = load_causal_lm(directory, dtype=dtype).to(dist.device())
    else:
        teacher = load_causal_lm(directory, dtype=dtype, device_map={"": dist.device()},
                                 quantization_config=quantization_config(cfg.teacher_placement, dtype))
        _avoid_cpu_4bit_packing(teacher)
    teacher.requires_grad_(False)
    log.info("teacher %s: %s copy per process, %.1f MB", short_path(directory), cfg.teacher_placement,
             teacher.get_memory_footprint() / 2**20)
    return FrozenTeacher(teacher.eval()), None


def _avoid_cpu_4bit_packing(model: nn.Module) -> None:
    """bitsandbytes' AVX512-bf16 CPU path for 4-bit inference repacks weights in blocks of 32 output rows and
    asserts on any other count, which pruned widths (multiples of --ffn-multiple) often are: keep those layers
    on its generic path. (GPUs are unaffected.)"""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False) and module.out_features % 32:
            module.support_avx512bf16_for_cpu = False


def checkpoint_layers(model: nn.Module) -> None:
    """Recompute every decoder layer's activations in the backward (--gradient-checkpointing). Hugging
    Face's switch acts only in train() mode, which would also turn on OPT's dropout; the student trains
    in eval mode (no dropout: deterministic and resumable), so the layers are wrapped here."""
    from torch.utils.checkpoint import checkpoint

    for layer in family_for(model.config).layers(model):
        def forward(*args, _forward=layer.forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        layer.forward = forward


def gather_whole_layers(model: nn.Module) -> None:
    """Make ZeRO-3 gather each decoder layer as one unit (a "leaf module": its parameters fetched once before its
    forward and once before its backward), not linear by linear. Stacked widths call every linear once per width;
    with a small stage3_max_reuse_distance (a model too large to keep gathered) each call would gather it again."""
    from deepspeed.utils import set_z3_leaf_module

    for layer in family_for(model.config).layers(model):
        set_z3_leaf_module(layer, True)


def make_optimizer(cfg: TrainConfig, groups: list[dict]):
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=BETAS, eps=EPS)
    # fused: one pass, without the multi-tensor step's temporaries the size of ZeRO's flat fp32 partition
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=BETAS, eps=EPS, fused=True)


def build_engines(stage: Stage, cfg: TrainConfig, backwards_per_step: int):
    """(teacher, student engine, Distiller, configs kept alive, train config) for a stage whose step runs
    `backwards_per_step` backwards per micro-batch (one per group of stacked widths)."""
    import deepspeed

    train_config = train_ds_config(cfg, backwards_per_step)
    frozen_config = teacher_ds_config(cfg, train_config)
    teacher_engine, teacher_hf = load_teacher(stage.teacher_dir, cfg, frozen_config)

    model, student_hf = load_partitioned(stage.student_dir, train_config)
    if stage.supernet:
        model = Supernet(model)  # each step stacks the widths it trains (`train_step`)
        if cfg.stack_widths != 1:
            gather_whole_layers(model.model)
    if cfg.gradient_checkpointing:  # around the supernet's stacked layers: the recomputation runs every width again
        checkpoint_layers(model.model if stage.supernet else model)
    distiller = Distiller(model)
    named = list(distiller.named_parameters())
    groups = [{"params": [p for n, p in named if not _no_decay(n, p)], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in named if _no_decay(n, p)], "weight_decay": 0.0}]
    schedule = None if "scheduler" in train_config else (
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg)))
    if "optimizer" in train_config:  # the DeepSpeed JSON names the optimiser (e.g. CPU Adam under offload)
        params = train_config["optimizer"].setdefault("params", {})
        ours = {"lr": cfg.lr, "betas": list(BETAS), "eps": EPS, "weight_decay": cfg.weight_decay}
        params.update({k: v for k, v in ours.items() if params.get(k, "auto") == "auto"})
        engine, *_ = deepspeed.initialize(model=distiller, model_parameters=groups, config=train_config,
                                          lr_scheduler=schedule)
    else:
        optimizer = make_optimizer(cfg, groups)
        engine, *_ = deepspeed.initialize(model=distiller, optimizer=optimizer, config=train_config,
                                          lr_scheduler=schedule)
    zero, offload = train_config.get("zero_optimization", {}), offloaded(train_config)
    log.info("stage %s: trained with %s, ZeRO-%s%s, teacher %s", stage.name,
             type(getattr(engine.optimizer, "optimizer", engine.optimizer)).__name__, zero.get("stage", 0),
             f", {' and '.join(offload)} offloaded to CPU" if offload else "", cfg.teacher_placement)
    return teacher_engine, engine, distiller, (teacher_hf, student_hf), train_config


def release(*engines) -> None:
    """Free a stage's engines, so the next stage starts where this one did."""
    for engine in engines:
        if hasattr(engine, "destroy"):
            engine.destroy()
        _forget_forward_stack(getattr(engine, "module", None))
    _clear_release_cache()
    give_back()


def _forget_forward_stack(module) -> None:
    """ZeRO-3 pushes each engine's top module onto a module-level stack that `destroy()` leaves in place: through
    its parameters' ZeRO attributes that keeps the stage's weights, gradients and optimiser states alive."""
    from deepspeed.runtime.zero import parameter_offload

    parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK if m is not module]


def _clear_release_cache() -> None:
    """ZeRO-3's parameter coordinator memoises, per (coordinator, module, step), which parameters to release, in an
    lru_cache on the class: every engine's modules, and through them its weights, stay alive until it is cleared."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    method = vars(PartitionedParameterCoordinator).get("_PartitionedParameterCoordinator__params_to_release")
    wrapped = [cell.cell_contents for cell in getattr(method, "__closure__", None) or ()]  # under an NVTX wrapper
    for function in (method, *wrapped):
        if hasattr(function, "cache_clear"):
            function.cache_clear()


def short_path(path: Path) -> str:
    return "/".join(Path(path).parts[-2:])
