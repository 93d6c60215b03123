"""What a stage writes: the best weights as an HF checkpoint, DeepSpeed checkpoints to resume from, the result."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from engine.core import distributed as dist
from engine.core import faults
from engine.core.errors import UserError
from engine.core.outputs import atomic_output_dir
from engine.core.widths import PERMILLE
from engine.models.export import SUPERNET_FILE, materialize, pruned_model
from engine.models.loading import load_tokenizer
from engine.models.plan import PLAN_FILE
from engine.training.deepspeed_config import is_zero3
from engine.training.stage import Stage, StageResult, StageState


def consolidated_state(engine, train_config: dict) -> dict | None:
    """The trained module's full state dict on rank 0 (gathered layer by layer under ZeRO-3), None elsewhere."""
    if is_zero3(train_config):
        return engine._zero3_consolidated_16bit_state_dict()
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()} if dist.is_main() else None


def consolidated_dtype(state: dict) -> torch.dtype:
    """The dtype the stage trained its weights in (fp32, or bf16 under mixed precision), which its snapshots keep:
    the next stage starts from them, and publishing converts to the teacher checkpoint's dtype. An fp32 copy of
    bf16 weights would add no information and double the snapshot, in memory while it is written too."""
    return next(v.dtype for v in state.values() if v.is_floating_point())


def save_best(stage, distiller, engine, train_config, out: Path, state: StageState) -> None:
    """Write the current weights at the best width as a real HF checkpoint (atomically replacing the last), in
    the dtype they were trained in (`consolidated_dtype`)."""
    full = consolidated_state(engine, train_config)  # collective
    with dist.main_first(f"saving the best {stage.name} weights") as main:
        if main:
            dtype = consolidated_dtype(full)
            if stage.supernet:
                prefix = "student.model."
                weights = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
                lm = distiller.student.model
                model = pruned_model(lm, stage.shapes[state.best_width], uniform=stage.uniform, dtype=dtype,
                                     state=weights)
            else:
                prefix = "student."
                weights = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
                lm = distiller.student
                lm.config.dtype = _name(dtype)
                model = materialize(type(lm), lm.config, weights, lm)
            with atomic_output_dir(out, kind="best-snapshot") as scratch:
                model.save_pretrained(scratch)
                load_tokenizer(stage.student_dir).save_pretrained(scratch)
                (scratch / "minidisc_best.json").write_text(json.dumps(
                    {"stage": stage.name, "step": state.best_step, "sparsity": state.best_width / PERMILLE,
                     "tradeoff": state.tradeoff}) + "\n")


def save_supernet(stage: Stage, distiller, engine, train_config, out: Path, step: int) -> None:
    """Write the weights every width of a supernet stage shares, in the pruned teacher's shape with its pruning plan
    beside them (in the trained dtype, like the best snapshots): `minidisc export` writes any width of it as its own
    model."""
    full = consolidated_state(engine, train_config)  # collective
    with dist.main_first(f"saving the {stage.name} supernet") as main:
        if main:
            prefix = "student.model."
            weights = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
            lm = distiller.student.model
            lm.config.dtype = _name(consolidated_dtype(full))
            model = materialize(type(lm), lm.config, weights, lm)
            with atomic_output_dir(out, kind="supernet") as scratch:
                model.save_pretrained(scratch)
                load_tokenizer(stage.student_dir).save_pretrained(scratch)
                shutil.copy2(stage.student_dir / PLAN_FILE, scratch / PLAN_FILE)
                (scratch / SUPERNET_FILE).write_text(json.dumps(
                    {"stage": stage.name, "step": step, "uniform": stage.uniform,
                     "trained_widths": [w / PERMILLE for w in stage.widths]}) + "\n")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")  # a config's dtype: "bfloat16"


def save_checkpoint(engine, checkpoints: Path, state: StageState) -> None:
    """Weights, optimiser, scheduler, the stage's state and the RNG, as one DeepSpeed tag (collective)."""
    try:
        engine.save_checkpoint(str(checkpoints), tag=f"step{state.step:07d}",
                               client_state={"minidisc": state.to_json(), "rng": torch.get_rng_state()})
    except Exception as e:  # `latest` still names the last complete tag
        faults.raise_if_disk_full(e, checkpoints, f"the checkpoint of step {state.step}")
        raise
    _keep_latest_only(checkpoints)


def _keep_latest_only(checkpoints: Path) -> None:
    """Old checkpoint tags go once the new one is complete (DeepSpeed writes `latest` last)."""
    dist.barrier()
    if dist.is_main():
        latest = (checkpoints / "latest").read_text().strip()
        for old in checkpoints.iterdir():
            if old.is_dir() and old.name != latest:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def write_result(stage: Stage, state: StageState, stage_dir: Path, wall: float, timings: dict,
                 memory: dict) -> StageResult:
    result = StageResult(
        stage=stage.name, teacher=str(stage.teacher_dir), student=str(stage.student_dir), widths=list(stage.widths),
        steps=state.step, best_step=state.best_step, best_width=state.best_width, tradeoff=state.tradeoff,
        teacher_stats=state.teacher, best=state.best, best_dir=stage_dir / "best", wall_s=round(wall, 2),
        curves={"train": state.train_curve, "eval": state.eval_curve}, timings=timings, memory=memory)
    with dist.main_first(f"finishing stage {stage.name}") as main:
        if main:
            snapshot = json.loads((stage_dir / "best" / "minidisc_best.json").read_text())
            if snapshot["step"] != state.best_step:
                raise UserError(f"stage {stage.name}: the best snapshot is from step {snapshot['step']} but the "
                                f"checkpointed state says {state.best_step}; the resumed run diverged from the "
                                "interrupted one (non-deterministic kernels?). Remove --out and run again")
            tmp = stage_dir / f".result.json.{os.getpid()}"
            tmp.write_text(json.dumps(result.to_json(), indent=1) + "\n")
            os.replace(tmp, stage_dir / "result.json")
            shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)  # optimiser states are large
    return result
