"""DeepSpeed JSON for a stage: the user's file with the batch keys, clipping and precision our options own."""
from __future__ import annotations

import difflib
import json
import logging
from pathlib import Path

from engine.config import split_batch
from engine.core import distributed as dist
from engine.core.errors import UserError
from engine.training.stage import TrainConfig

log = logging.getLogger(__name__)

def read_ds_config(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"DeepSpeed config {path} does not exist")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise UserError(f"DeepSpeed config {path} must be a JSON object")
    _check_keys(config, path)
    return config


# Top-level sections DeepSpeed reads that its runtime constants do not name.
SECTIONS = {"zero_optimization", "activation_checkpointing", "aio", "autotuning", "comms_logger", "compile",
            "compression_training", "csv_monitor", "curriculum_learning", "data_efficiency", "eigenvalue", "elasticity",
            "flops_profiler", "hybrid_engine", "nebula", "pipeline", "quantize_training", "sparse_attention",
            "tensorboard", "timers", "wandb", "weight_quantization"}


def _check_keys(config: dict, path: Path) -> None:
    """DeepSpeed ignores unknown top-level keys (a misspelt zero_optimization trains without ZeRO) and checks its
    ZeRO section only when an engine starts: a near-miss of a known key and a bad ZeRO key fail here, at once."""
    import deepspeed.runtime.constants as constants
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    known = SECTIONS | {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str)}
    for key in config:
        near = [] if key in known else difflib.get_close_matches(key, known, n=1, cutoff=0.8)
        if near:
            raise UserError(f"DeepSpeed config {path}: unknown key {key!r}; did you mean {near[0]!r}?")
    try:
        DeepSpeedZeroConfig(**config.get("zero_optimization", {}))
    except (TypeError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        errors = e.errors() if hasattr(e, "errors") else [{"loc": (), "msg": str(e)}]
        where = ".".join(map(str, errors[0]["loc"]))
        raise UserError(f"DeepSpeed config {path}: zero_optimization{'.' + where if where else ''}: "
                        f"{errors[0]['msg']}") from None


def _set_owned(config: dict, key: str, value, path: Path, option: str) -> None:
    """Batch keys and clipping come from our options; a conflicting explicit value in the JSON is reported."""
    old = config.get(key, "auto")
    if old != "auto" and old != value:
        log.debug("%s: %s=%s replaced by %s (set from %s)", path.name, key, old, value, option)
    config[key] = value


def train_ds_config(cfg: TrainConfig, backwards_per_step: int) -> dict:
    path = cfg.train_ds_path
    config = read_ds_config(path)
    config.pop("train_batch_size", None)
    _set_owned(config, "train_micro_batch_size_per_gpu", micro_batch(cfg), path, "--batch-size")
    # Each backward (one per width, or one for the stacked widths) is a DeepSpeed micro-step: it steps once per
    # global batch.
    _set_owned(config, "gradient_accumulation_steps", backwards_per_step * cfg.grad_accum, path,
               "the backwards per step (--stack-widths) x --grad-accum")
    _set_owned(config, "gradient_clipping", cfg.max_grad_norm, path, "--max-grad-norm")
    if cfg.optimizer != "adamw" and "optimizer" in config:
        raise UserError(f"--optimizer {cfg.optimizer} cannot replace the optimizer block of {path} "
                        f"({config['optimizer'].get('type')}): use a DeepSpeed config without one (e.g. "
                        "ds_configs/zero3_train.json) or --optimizer adamw")
    config.setdefault("zero_allow_untested_optimizer", True)
    return config


def teacher_ds_config(cfg: TrainConfig, train_config: dict) -> dict:
    # the teacher computes in the student's precision
    return frozen_ds_config(read_ds_config(cfg.teacher_ds_path), micro_batch(cfg), bf16_enabled(train_config))


def frozen_ds_config(config: dict, micro_batch: int, bf16: bool) -> dict:
    """A DeepSpeed config for a model that only runs forwards and backwards to its inputs: no optimiser, scheduler
    or global batch, one accumulation step, `micro_batch` sequences per rank, bf16 or not."""
    config = dict(config)
    for key in ("optimizer", "scheduler", "train_batch_size"):
        config.pop(key, None)
    config.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=1, bf16={"enabled": bf16})
    return config


def bf16_enabled(config: dict) -> bool:
    return bool(config.get("bf16", {}).get("enabled", False))


def offloaded(config: dict) -> list[str]:
    """What a DeepSpeed config offloads to the CPU: "param" and/or "optimizer"."""
    zero = config.get("zero_optimization", {})
    return [what for what in ("param", "optimizer") if zero.get(f"offload_{what}", {}).get("device") == "cpu"]


def is_zero3(config: dict) -> bool:
    return config.get("zero_optimization", {}).get("stage", 0) == 3


def micro_batch(cfg: TrainConfig) -> int:
    return split_batch(cfg.batch_size, dist.world_size(), cfg.grad_accum)
