"""The DeepSpeed distillation trainer: one stage = a frozen teacher engine and a trained student engine.

The student is either the supernet (the reordered teacher, trained at every candidate width per step: the
sandwich) or a plain pruned model (a TA or a student, one width). Both run the same loop:

    for every step:                          one optimiser step per global batch
        teacher forward once (no grad)       hidden states + gathered LM head
        for every width (1/K each):          forward, distillation loss, backward at once
        DeepSpeed steps at the boundary      gradient_accumulation_steps = K x --grad-accum
        every --eval-every steps:            all widths on the dev split in one pass, best-so-far p(s),
                                             snapshot of the best, atomic DeepSpeed checkpoint

Models are built with `HfDeepSpeedConfig` + `from_pretrained`, so ZeRO-3 partitions them while they load.
A stage killed at any point resumes from its last checkpoint (`resume=True`) and ends where an
uninterrupted run ends: the data order and the sampled widths are functions of the step, and the RNG state
travels with the checkpoint.
"""
from __future__ import annotations

import gc
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import distributed as dist
from . import faults
from .checkpoint import atomic_output_dir, load_causal_lm, load_tokenizer
from .config import RunConfig, split_batch
from .errors import UserError
from .export import materialize, pruned_model
from .grid import PERMILLE, Width, format_sparsity
from .objective import Objective, teacher_outputs, width_loss
from .progress import progress
from .sandwich import evaluate_widths, performance, sandwich_step, tradeoff
from .supernet import Supernet

log = logging.getLogger(__name__)
BETAS, EPS = (0.9, 0.95), 1e-8  # AdamW, as in LLaMA pre-training


class Diverged(UserError):
    """The loss became NaN or infinite."""


@dataclass
class Data:
    """Token blocks [n, seq_len]: the training stream and the dev split."""

    train: torch.Tensor
    dev: torch.Tensor


@dataclass
class Stage:
    """One distillation: `teacher_dir` -> `student_dir`, trained at `widths` (per-mille sparsities)."""

    name: str
    teacher_dir: Path
    student_dir: Path
    widths: list[int]
    supernet: bool = False  # student_dir is a reordered teacher; train every width of it
    width_of: Callable[[int], Width] | None = None  # supernet only: the per-layer width of a sparsity
    uniform: bool = False  # supernet only: widths are uniform, snapshots are stock HF classes
    export_dtype: torch.dtype = torch.float32
    objective: Objective | None = None  # default: the run's distillation objective (objective_of(cfg))


@dataclass
class StageState:
    """What a checkpoint carries besides weights and optimiser (plain data, JSON-friendly)."""

    step: int = 0
    best: dict = field(default_factory=dict)  # str(permille) -> {"p", "accuracy", "loss", "step"}
    objective: float = -math.inf
    best_step: int = -1
    best_width: int | None = None
    stale_evals: int = 0
    teacher: dict = field(default_factory=dict)  # the teacher's dev stats
    train_curve: list = field(default_factory=list)
    eval_curve: list = field(default_factory=list)


class Distiller(nn.Module):
    """What the trained engine wraps. Its forward is the distillation loss of the active width, so under
    ZeRO-3 the student's LM head is gathered by DeepSpeed while the fused loss reads it."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    @property
    def lm(self):
        return self.student.model if isinstance(self.student, Supernet) else self.student

    def forward(self, input_ids, attention_mask, teacher_out, objective: Objective):
        return width_loss(self.lm, teacher_out, input_ids, attention_mask, objective)


# --- DeepSpeed set-up -------------------------------------------------------------------------------------------
def read_ds_config(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"DeepSpeed config {path} does not exist")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise UserError(f"DeepSpeed config {path} must be a JSON object")
    return config


def _set_owned(config: dict, key: str, value, path: Path, option: str) -> None:
    """Batch keys and clipping come from our options; a conflicting explicit value in the JSON is reported."""
    old = config.get(key, "auto")
    if old != "auto" and old != value:
        log.debug("%s: %s=%s replaced by %s (set from %s)", path.name, key, old, value, option)
    config[key] = value


def train_ds_config(cfg: RunConfig, widths_per_step: int) -> dict:
    path = cfg.train_ds_config()
    config = read_ds_config(path)
    config.pop("train_batch_size", None)
    _set_owned(config, "train_micro_batch_size_per_gpu", micro_batch(cfg), path, "--batch-size")
    # Each width's backward is one DeepSpeed micro-step, so it steps once per global batch.
    _set_owned(config, "gradient_accumulation_steps", widths_per_step * cfg.grad_accum, path,
               "the widths per step x --grad-accum")
    _set_owned(config, "gradient_clipping", cfg.max_grad_norm, path, "--max-grad-norm")
    if cfg.optimizer != "adamw" and "optimizer" in config:
        raise UserError(f"--optimizer {cfg.optimizer} cannot replace the optimizer block of {path} "
                        f"({config['optimizer'].get('type')}): use a DeepSpeed config without one (e.g. "
                        "ds_configs/zero3_train.json) or --optimizer adamw")
    config.setdefault("zero_allow_untested_optimizer", True)
    return config


def teacher_ds_config(cfg: RunConfig, train_config: dict) -> dict:
    config = read_ds_config(cfg.teacher_ds_config())
    for key in ("optimizer", "scheduler", "train_batch_size"):
        config.pop(key, None)
    config.update(train_micro_batch_size_per_gpu=micro_batch(cfg), gradient_accumulation_steps=1)
    config["bf16"] = {"enabled": bf16_enabled(train_config)}  # the teacher computes in the student's precision
    return config


def bf16_enabled(config: dict) -> bool:
    return bool(config.get("bf16", {}).get("enabled", False))


def is_zero3(config: dict) -> bool:
    return config.get("zero_optimization", {}).get("stage", 0) == 3


def micro_batch(cfg: RunConfig) -> int:
    return split_batch(cfg.batch_size, dist.world_size(), cfg.grad_accum)


def _load_model(directory: Path, ds_config: dict):
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


def _lr_lambda(cfg: RunConfig) -> Callable[[int], float]:
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


def load_teacher(directory: Path, cfg: RunConfig, frozen_config: dict):
    """The frozen teacher placed as --teacher-placement says: (teacher, what must stay referenced)."""
    import deepspeed

    if cfg.teacher_placement == "zero3":
        teacher, keep_alive = _load_model(directory, frozen_config)
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
    log.info("teacher %s: %s copy per process, %.1f MB", _short(directory), cfg.teacher_placement,
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

    from .families import family_for

    for layer in family_for(model.config).layers(model):
        def forward(*args, _forward=layer.forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        layer.forward = forward


def make_optimizer(cfg: RunConfig, groups: list[dict]):
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=BETAS, eps=EPS)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=BETAS, eps=EPS)


def build_engines(stage: Stage, cfg: RunConfig, widths_per_step: int):
    """(teacher, student engine, Distiller, configs kept alive, train config) for a stage."""
    import deepspeed

    train_config = train_ds_config(cfg, widths_per_step)
    frozen_config = teacher_ds_config(cfg, train_config)
    teacher_engine, teacher_hf = load_teacher(stage.teacher_dir, cfg, frozen_config)

    model, student_hf = _load_model(stage.student_dir, train_config)
    if cfg.gradient_checkpointing:
        checkpoint_layers(model)
    if stage.supernet:
        from .plan import PruningPlan

        model = Supernet(model, PruningPlan.load(stage.student_dir))
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
    zero = train_config.get("zero_optimization", {})
    offloaded = [what for what in ("param", "optimizer") if zero.get(f"offload_{what}", {}).get("device") == "cpu"]
    log.info("stage %s: trained with %s, ZeRO-%s%s, teacher %s", stage.name,
             type(getattr(engine.optimizer, "optimizer", engine.optimizer)).__name__, zero.get("stage", 0),
             f", {' and '.join(offloaded)} offloaded to CPU" if offloaded else "", cfg.teacher_placement)
    return teacher_engine, engine, distiller, (teacher_hf, student_hf), train_config


def _release(*engines) -> None:
    for engine in engines:
        if hasattr(engine, "destroy"):
            engine.destroy()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- data order -------------------------------------------------------------------------------------------------
class BatchOrder:
    """Global sample i of the stream is block perm_e[i % n] with perm_e a seeded permutation per epoch, so a
    step's batch depends on the step alone (resume needs no data-loader state). Process r, micro-batch a
    takes its own slice of the global batch, so any process count sees the same global batches."""

    def __init__(self, blocks: torch.Tensor, seed: int):
        self.blocks, self.seed, self._perms = blocks, seed, {}

    def _index(self, i: int) -> int:
        epoch, position = divmod(i, len(self.blocks))
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(len(self.blocks),
                                                 generator=torch.Generator().manual_seed(self.seed + epoch))}
        return int(self._perms[epoch][position])

    def batch(self, step: int, micro: int, cfg: RunConfig) -> torch.Tensor:
        size = micro_batch(cfg)
        start = step * cfg.batch_size + (micro * dist.world_size() + dist.rank()) * size
        return self.blocks[[self._index(i) for i in range(start, start + size)]]


def dev_batches(dev: torch.Tensor, cfg: RunConfig) -> list:
    """This process's share of the dev blocks (every process gets as many batches: ZeRO-3 forwards are
    collective)."""
    usable = len(dev) - len(dev) % dist.world_size()
    mine = dev[:usable][dist.rank()::dist.world_size()]
    return [(ids.to(dist.device()), None) for ids in mine.split(micro_batch(cfg))]


def widths_at(stage: Stage, cfg: RunConfig, step: int) -> list[int]:
    """The widths trained at `step`: all, or (sandwich rule) the largest, the smallest and n random others."""
    widths = sorted(stage.widths)
    if not cfg.sandwich_sample or len(widths) <= cfg.sandwich_sample + 2:
        return widths
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    middle = widths[1:-1]
    picked = torch.randperm(len(middle), generator=generator)[: cfg.sandwich_sample].tolist()
    return [widths[0], *sorted(middle[i] for i in picked), widths[-1]]


def objective_of(cfg: RunConfig) -> Objective:
    return Objective(kind=cfg.loss, temperature=cfg.temperature, beta=cfg.jsd_beta, logit_weight=cfg.logit_weight,
                     hidden_weight=cfg.hidden_weight, ce_weight=cfg.ce_weight)


def train_step(teacher, engine, select, micro_batches, widths, objective: Objective,
               check: Callable = lambda loss: None) -> torch.Tensor:
    """One optimiser step: per micro-batch one teacher forward, then every width's loss (weighted
    1/(K x micro-batches)) back-propagated at once. Returns each width's loss, averaged over processes."""
    import deepspeed

    head = teacher.module.get_output_embeddings()
    head_params = [p for p in (head.weight, head.bias) if p is not None]
    accum = len(micro_batches)
    step_losses = torch.zeros(len(widths), dtype=torch.float64)

    def backward(loss):
        engine.backward(loss / accum, scale_wrt_gas=False)
        engine.step()  # a real optimiser step only at the accumulation boundary

    for ids in micro_batches:
        ids = ids.to(dist.device())
        t_out = teacher_outputs(teacher.module, ids)
        # The fused loss reads the teacher's LM head outside the teacher's forward: gather it for the widths
        # (after the teacher forward, which re-partitions a head tied to the input embeddings).
        with deepspeed.zero.GatheredParameters(head_params, enabled=hasattr(head.weight, "ds_id")):
            def forward():
                losses = engine(ids, None, t_out, objective)
                check(losses["loss"])
                return losses

            metrics = sandwich_step(forward, select, widths, backward)
        step_losses += torch.tensor([metrics[w]["loss"].item() for w in widths], dtype=torch.float64) / accum
    return dist.all_sum(step_losses) / dist.world_size()


# --- the stage --------------------------------------------------------------------------------------------------
def run_stage(stage: Stage, cfg: RunConfig, data: Data, work: Path) -> dict:
    """Train a stage to its end (or early stop) and return its result; a finished stage is read back."""
    stage_dir = work / stage.name
    result_file = stage_dir / "result.json"
    if result_file.is_file():
        log.info("stage %s: already finished, reusing %s", stage.name, result_file)
        return json.loads(result_file.read_text())
    started = time.perf_counter()
    widths_per_step = len(widths_at(stage, cfg, 0))
    teacher, engine, distiller, keep_alive, train_config = build_engines(stage, cfg, widths_per_step)
    objective = stage.objective or objective_of(cfg)
    select = (lambda s: distiller.student.set_width(stage.width_of(s))) if stage.supernet else (lambda s: None)
    checkpoints = stage_dir / "checkpoints"
    state = StageState()
    torch.manual_seed(cfg.seed + dist.rank())
    if cfg.resume and (checkpoints / "latest").is_file():
        _, client = engine.load_checkpoint(str(checkpoints))
        state = StageState(**client["minidisc"])
        torch.set_rng_state(client["rng"])
        log.info("stage %s: resumed at step %d from %s", stage.name, state.step, checkpoints)
    order = BatchOrder(data.train, cfg.seed)
    dev = dev_batches(data.dev, cfg)
    log.info("stage %s: %s -> %s, widths %s, %d steps from step %d", stage.name, _short(stage.teacher_dir),
             _short(stage.student_dir), ", ".join(format_sparsity(w) for w in stage.widths), cfg.max_steps, state.step)

    def check(loss, step):
        _check_finite(loss, stage, step, checkpoints)

    steps = range(state.step, cfg.max_steps)
    for step in progress(steps, f"{stage.name}", total=len(steps)) if dist.is_main() else steps:
        widths = widths_at(stage, cfg, step)
        micro_batches = [order.batch(step, micro, cfg) for micro in range(cfg.grad_accum)]
        step_losses = train_step(teacher, engine, select, micro_batches, widths, objective,
                                 check=lambda loss, step=step: check(loss, step))
        state.train_curve += [{"step": step + 1, "width": w / PERMILLE, "loss": round(float(l), 6)}
                              for w, l in zip(widths, step_losses)]
        state.step = step + 1
        if state.step % cfg.eval_every == 0 or state.step == cfg.max_steps:
            improved = _evaluate(stage, cfg, state, distiller, teacher.module, dev, select)
            if improved:
                _save_best(stage, distiller, engine, train_config, stage_dir / "best", state)
            _save_checkpoint(engine, checkpoints, state)
            if cfg.patience and state.stale_evals >= cfg.patience:
                log.info("stage %s: no improvement in %d evaluations, stopping early at step %d", stage.name,
                         cfg.patience, state.step)
                break
        if state.step < cfg.max_steps and faults.stop_requested():  # Slurm's pre-timeout signal, on any rank
            if state.step % cfg.eval_every:  # (an evaluation step has just been checkpointed)
                _save_checkpoint(engine, checkpoints, state)
            raise faults.Preempted(f"stage {stage.name}: checkpointed at step {state.step} on "
                                   f"{faults.REQUEUE_SIGNAL.name} in {checkpoints}; run again with --resume")
    result = _finish(stage, state, stage_dir, time.perf_counter() - started)
    _release(engine, teacher)
    del keep_alive
    return result


def _short(path: Path) -> str:
    return "/".join(Path(path).parts[-2:])


def _check_finite(loss, stage, step, checkpoints) -> None:
    if dist.any_rank(not torch.isfinite(loss).item()):
        latest = checkpoints / "latest"
        kept = (f"the last good checkpoint is kept in {checkpoints} ({latest.read_text().strip()})"
                if latest.is_file() else "no checkpoint had been written yet")
        raise Diverged(f"stage {stage.name}: the distillation loss became {loss.item()} at step {step + 1}; "
                       f"{kept}. Lower --lr, raise --warmup-ratio or lower --max-grad-norm, then run again "
                       "(with --resume to start from that checkpoint)")


def _evaluate(stage, cfg, state: StageState, distiller, teacher, dev, select) -> bool:
    """Evaluate every width in one pass; update best-so-far p(s) and the trade-off objective. Returns whether
    the objective improved (then the current weights are the stage's best)."""
    student = distiller.student
    stats = evaluate_widths(student, teacher, dev, stage.widths, select=select, reduce=dist.all_sum)
    if not all(math.isfinite(s["loss"]) for s in stats.values()):
        raise Diverged(f"stage {stage.name}: the dev loss is not finite at step {state.step}; the previous "
                       f"checkpoint in {stage.name}/checkpoints is kept. Lower --lr and run again")
    state.teacher = stats["teacher"]
    for permille in stage.widths:
        p = performance(stats[permille], stats["teacher"], cfg.metric)
        state.eval_curve.append({"step": state.step, "width": permille / PERMILLE, "p": p, **stats[permille]})
        best = state.best.get(str(permille))
        if best is None or p > best["p"]:
            state.best[str(permille)] = {"p": p, "accuracy": stats[permille]["accuracy"],
                                         "loss": stats[permille]["loss"], "step": state.step}
    scores = {int(s): tradeoff(b["p"], int(s), cfg.lam) for s, b in state.best.items()}
    argmax = max(scores, key=lambda s: (scores[s], -s))
    log.info("stage %s step %d: %s", stage.name, state.step, "  ".join(
        f"s={format_sparsity(s)} acc={stats[s]['accuracy']:.4f} loss={stats[s]['loss']:.4f}" for s in stage.widths))
    if scores[argmax] > state.objective:
        state.objective, state.best_step, state.best_width, state.stale_evals = scores[argmax], state.step, argmax, 0
        return True
    state.stale_evals += 1
    return False


def consolidated_state(engine, train_config: dict) -> dict | None:
    """The trained module's full state dict on rank 0 (gathered layer by layer under ZeRO-3), None elsewhere."""
    if is_zero3(train_config):
        return engine._zero3_consolidated_16bit_state_dict()
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()} if dist.is_main() else None


def _save_best(stage, distiller, engine, train_config, out: Path, state: StageState) -> None:
    """Write the current weights at the best width as a real HF checkpoint (atomically replacing the last)."""
    full = consolidated_state(engine, train_config)  # collective
    with dist.main_first(f"saving the best {stage.name} weights") as main:
        if main:
            if stage.supernet:
                prefix = "student.model."
                weights = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
                lm = distiller.student.model
                model = pruned_model(lm, stage.width_of(state.best_width), uniform=stage.uniform,
                                     dtype=stage.export_dtype, state=weights)
            else:
                prefix = "student."
                weights = {k[len(prefix):]: v.to(stage.export_dtype) for k, v in full.items()
                           if k.startswith(prefix)}
                lm = distiller.student
                lm.config.dtype = str(stage.export_dtype).removeprefix("torch.")
                model = materialize(type(lm), lm.config, weights, lm)
            with atomic_output_dir(out, kind="best-snapshot") as scratch:
                model.save_pretrained(scratch)
                load_tokenizer(stage.student_dir).save_pretrained(scratch)
                (scratch / "minidisc_best.json").write_text(json.dumps(
                    {"stage": stage.name, "step": state.best_step, "sparsity": state.best_width / PERMILLE,
                     "objective": state.objective}) + "\n")


def _save_checkpoint(engine, checkpoints: Path, state: StageState) -> None:
    """Weights, optimiser, scheduler, the stage's state and the RNG, as one DeepSpeed tag (collective)."""
    engine.save_checkpoint(str(checkpoints), tag=f"step{state.step:07d}",
                           client_state={"minidisc": state.__dict__, "rng": torch.get_rng_state()})
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


def _finish(stage: Stage, state: StageState, stage_dir: Path, wall: float) -> dict:
    result = {
        "stage": stage.name, "teacher": str(stage.teacher_dir), "student": str(stage.student_dir),
        "widths": [w / PERMILLE for w in stage.widths], "steps": state.step, "best_step": state.best_step,
        "best_width": None if state.best_width is None else state.best_width / PERMILLE,
        "objective": state.objective, "teacher_stats": state.teacher, "best": state.best,
        "best_dir": str(stage_dir / "best"), "wall_s": round(wall, 2),
        "curves": {"train": state.train_curve, "eval": state.eval_curve},
    }
    with dist.main_first(f"finishing stage {stage.name}") as main:
        if main:
            snapshot = json.loads((stage_dir / "best" / "minidisc_best.json").read_text())
            if snapshot["step"] != state.best_step:
                raise UserError(f"stage {stage.name}: the best snapshot is from step {snapshot['step']} but the "
                                f"checkpointed state says {state.best_step}; the resumed run diverged from the "
                                "interrupted one (non-deterministic kernels?). Remove --out and run again")
            tmp = stage_dir / f".result.json.{os.getpid()}"
            tmp.write_text(json.dumps(result, indent=1) + "\n")
            os.replace(tmp, stage_dir / "result.json")
            shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)  # optimiser states are large
    return result
