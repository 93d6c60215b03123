"""The DeepSpeed distillation trainer: one stage = a frozen teacher engine and a trained student engine.

The student is either the supernet (the reordered teacher, trained at every candidate width per step: the
sandwich) or a plain pruned model (a TA or a student, one width). Both run the same loop:

    for every step:                          one optimiser step per global batch
        teacher forward once (no grad)       hidden states + gathered LM head
        the widths, stacked (1/K each):      one forward (each layer runs every width), the loss, one backward
                                             (--stack-widths n: per group of n widths)
        one all-reduce                       the losses, the finite check, the requeue flag
        DeepSpeed steps at the boundary      gradient_accumulation_steps = forwards x --grad-accum (if finite)
        every --eval-every steps:            all widths on the dev split in one pass, best-so-far p(s),
                                             snapshot of the best trade-off among the stage's candidates,
                                             atomic DeepSpeed checkpoint

Models are built with `HfDeepSpeedConfig` + `from_pretrained`, so ZeRO-3 partitions them while they load.
A stage killed at any point resumes from its last checkpoint (`resume=True`) and ends where an
uninterrupted run ends: the data order and the sampled widths are functions of the step, and the RNG state
travels with the checkpoint.
"""
from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch

from engine.core import distributed as dist
from engine.core import faults
from engine.core.progress import Monitor
from engine.core.widths import PERMILLE, format_sparsity, forwards_per_batch
from engine.distillation.evaluation import evaluate_widths
from engine.distillation.loss import Objective, teacher_outputs
from engine.distillation.selection import best_tradeoff, performance, snapshot_moves, tradeoff
from engine.training.batches import BatchOrder, dev_batches, widths_at
from engine.training.engines import build_engines, release, short_path
from engine.training.memory import StageMemory
from engine.training.snapshots import save_best, save_checkpoint, save_supernet, write_result
from engine.training.stage import Data, Diverged, Stage, StageResult, StageState, TrainConfig, WidthScore

log = logging.getLogger(__name__)


PARTS = ("loss", "logit", "hidden", "ce")  # the objective and its terms, per width and step


@dataclass
class StepOutcome:
    """What every rank agrees on after a step: each width's loss and its terms (PARTS, averaged over processes),
    whether all were finite (if not, the optimiser did not step) and whether any rank got the requeue signal."""

    parts: list[dict[str, float]]
    finite: bool
    signalled: bool

    @property
    def losses(self) -> list[float]:
        return [parts["loss"] for parts in self.parts]


def train_step(teacher, engine, micro_batches, widths: list[int], objective: Objective, shapes: dict | None = None,
               timer: StageTimer | None = None, per_forward: int = 1) -> StepOutcome:
    """One optimiser step of `engine` (the student's, wrapping a `Distiller`) on the global batch: each width's
    loss weighted 1/K, the same maths as a plain PyTorch loop over the widths (tests/workers/trainer_step_worker.py).
    `shapes`: what each width keeps per layer (a supernet; None: a plain student, one width); `per_forward`: the
    widths stacked in one forward (--stack-widths; 0 = all K)."""
    timer = timer or StageTimer()
    student, device = engine.module.student, dist.device()
    head = teacher.module.get_output_embeddings()
    head_params = [p for p in (head.weight, head.bias) if p is not None]
    size = per_forward or len(widths)
    starts = range(0, len(widths), size)  # each forward's widths: widths[start:start + size]
    # DeepSpeed's accumulation boundary (gradient_accumulation_steps) is set to every backward of the step, so the
    # optimiser steps once per global batch; `engine.step()` before it only counts the backward.
    accum = len(micro_batches)
    backwards, per_step = 0, accum * len(starts)
    losses = torch.zeros(len(widths), len(PARTS), dtype=torch.float32, device=device)  # kept on the device
    for ids, mask in micro_batches:
        ids, mask = ids.to(device), None if mask is None else mask.to(device)
        # The teacher runs once per micro-batch: every width distils from the same outputs (none without distillation).
        t_out = None
        if objective.needs_teacher:
            with timer("teacher forwards"):
                t_out = teacher_outputs(teacher.module, ids, hidden_states=bool(objective.hidden_weight))
        # The fused loss reads the teacher's LM head outside the teacher's forward, which re-partitions it (a head
        # tied to the input embeddings is the last module it uses): gather it once for all the widths.
        gathered = deepspeed.zero.GatheredParameters(head_params, enabled=objective.needs_teacher and
                                                     hasattr(head.weight, "ds_id"))
        with gathered, timer("student fwd+bwd+optimizer"):
            for start in starts:
                group = widths[start:start + size]
                if shapes:  # the batch runs once per width of the group, copy k at the k-th width
                    student.stack([shapes[w] for w in group])
                # Distiller.forward: `stacked_width_loss`, the mean of the group's losses and each width's terms. The
                # fused loss rebuilds the teacher's logits from its last hidden state and head for every width, chunk
                # by chunk: keeping them across the K widths would hold [tokens, vocab] floats (the head's FLOPs once
                # more per width are counted in `compute.step_flops`).
                loss, parts = engine(ids, mask, t_out, objective, len(group))
                # The group's share of the step: len(group) of the K widths, 1/accum of the global batch.
                # scale_wrt_gas=False: the weights are all here, DeepSpeed must not divide again.
                engine.backward(loss * len(group) / len(widths) / accum, scale_wrt_gas=False)
                backwards += 1
                if backwards < per_step:  # the boundary's step waits for the finite check below
                    engine.step()
                losses[start:start + len(group)] += torch.stack([parts[n] for n in PARTS], 1).float() / accum
    # One all-reduce, one host sync per step, whatever K and the accumulation: the losses, whether any is not
    # finite (then no rank steps: the weights stay the last good ones) and whether any rank got a stop signal.
    flags = torch.stack([(~torch.isfinite(losses[:, 0])).any().float(),
                         torch.tensor(float(faults.signal_received()), device=device)])
    agreed = dist.all_sum(torch.cat([losses.double().flatten(), flags.double()])).tolist()
    means = [value / dist.world_size() for value in agreed[:-2]]
    parts = [dict(zip(PARTS, means[i * len(PARTS):(i + 1) * len(PARTS)])) for i in range(len(widths))]
    outcome = StepOutcome(parts, finite=agreed[-2] == 0, signalled=agreed[-1] > 0)
    if outcome.finite:
        with timer("student fwd+bwd+optimizer"):
            engine.step()
    return outcome


def run_stage(stage: Stage, cfg: TrainConfig, data: Data, work: Path, monitor: Monitor | None = None) -> StageResult:
    """Train a stage to its end (or early stop) and return its result; a finished stage is read back. `monitor`
    hears of every step and evaluation (progress lines, trackers)."""
    stage_dir = work / stage.name
    result_file = stage_dir / "result.json"
    if result_file.is_file():
        log.info("stage %s: already finished, reusing %s", stage.name, result_file)
        return StageResult.from_json(json.loads(result_file.read_text()))
    started, timer, memory = time.perf_counter(), StageTimer(), StageMemory()
    memory.start()
    monitor = monitor or Monitor(enabled=False)
    with faults.deferred_stops():  # SIGTERM too waits for a step boundary, where the ranks checkpoint together
        state = _train(stage, cfg, data, stage_dir, timer, started, monitor)  # its engines are gone when it returns
    faults.kill_point(f"{stage.name}:trained")
    used = memory.to_json()
    log.info("stage %s: %s memory %s MB at the start, %s at the peak, %s at the end; %s MB of tensors left alive",
             stage.name, used["kind"], used["start_mb"], used["peak_mb"], used["end_mb"], used["left_mb"])
    result = write_result(stage, state, stage_dir, state.seconds, timer.to_json(), used)
    if dist.any_rank(faults.signal_received()):  # a signal during the last step: stop before the next stage
        raise faults.Preempted(f"stage {stage.name} finished, then stopped on {faults.signal_name()}; run again "
                               "with --resume")
    return result


def _train(stage: Stage, cfg: TrainConfig, data: Data, stage_dir: Path, timer: "StageTimer",
           started: float, monitor: Monitor) -> StageState:
    """Build the stage's engines, train (or resume) to its end or early stop, release the engines. `started`:
    when this process began the stage (`state.seconds` adds it to the seconds of the checkpoint it resumed)."""
    per_forward = cfg.stack_widths if stage.supernet else 1
    with timer("build engines"):
        teacher, engine, distiller, keep_alive, train_config = build_engines(
            stage, cfg, forwards_per_batch(len(widths_at(stage, cfg, 0)), per_forward))
    objective = stage.objective
    checkpoints = stage_dir / "checkpoints"
    state = StageState()
    torch.manual_seed(cfg.seed + dist.rank())
    if cfg.resume and (checkpoints / "latest").is_file():
        _, client = engine.load_checkpoint(str(checkpoints))
        state = StageState.from_json(client["minidisc"])
        torch.set_rng_state(client["rng"])
        log.info("stage %s: resumed at step %d from %s", stage.name, state.step, checkpoints)
    before = state.seconds

    def checkpoint():
        state.seconds = round(before + time.perf_counter() - started, 2)
        with timer("checkpoints"):
            save_checkpoint(engine, checkpoints, state)
    order = BatchOrder(data.train)
    dev = dev_batches(data.dev, cfg)
    log.info("stage %s: %s -> %s, widths %s, %d steps from step %d", stage.name, short_path(stage.teacher_dir),
             short_path(stage.student_dir), ", ".join(format_sparsity(w) for w in stage.widths), cfg.max_steps,
             state.step)

    # A stage resumed after its early stop (killed before its result was written) has no steps left.
    steps = range(state.step, state.step if _out_of_patience(cfg, state) else cfg.max_steps)
    with monitor.stage(stage.name, state.step, cfg.max_steps):
        for step in steps:
            widths = widths_at(stage, cfg, step)
            micro_batches = [order.batch(step, micro, cfg) for micro in range(cfg.grad_accum)]
            with timer("training steps"):
                outcome = train_step(teacher, engine, micro_batches, widths, objective, stage.shapes, timer,
                                     per_forward)
            if not outcome.finite:
                _diverged(stage, step, checkpoints, dict(zip(widths, outcome.losses)))
            faults.kill_point(f"{stage.name}:step")
            state.train_curve += [{"step": step + 1, "width": w / PERMILLE, "loss": round(loss, 6)}
                                  for w, loss in zip(widths, outcome.losses)]
            state.step = step + 1
            monitor.step(state.step, dict(zip(widths, outcome.parts)), engine.get_lr()[0], _grad_norm(engine))
            if state.step % cfg.eval_every == 0 or state.step == cfg.max_steps:
                with timer("evaluation"):
                    improved = _evaluate(stage, cfg, state, distiller.student, teacher.module, dev, monitor)
                if improved:
                    with timer("best snapshots"):
                        save_best(stage, distiller, engine, train_config, stage_dir / "best", state)
                checkpoint()
                faults.kill_point(f"{stage.name}:checkpoint")
                if _out_of_patience(cfg, state):
                    log.info("stage %s: no improvement in %d evaluations, stopping early at step %d", stage.name,
                             cfg.patience, state.step)
                    break
            if state.step < cfg.max_steps and outcome.signalled:  # Slurm's pre-timeout signal, agreed in the step
                if state.step % cfg.eval_every:  # (an evaluation step has just been checkpointed)
                    checkpoint()
                raise faults.Preempted(f"stage {stage.name}: checkpointed at step {state.step} on "
                                       f"{faults.signal_name()} in {checkpoints}; run again with --resume")
    if stage.keep_supernet:  # after an early stop too: the last checkpoint's weights, which a resume reloads
        with timer("best snapshots"):
            save_supernet(stage, distiller, engine, train_config, stage_dir / "supernet", state.step)
    with timer("release"):
        release(engine, teacher)
    state.seconds = round(before + time.perf_counter() - started, 2)
    return state


class StageTimer:
    """Host wall seconds and calls per part of a stage, recorded in its result (`timings`) and the report
    (`stage_timings`). On a GPU, asynchronous work is counted in the part that waits for it."""

    def __init__(self):
        self.parts: dict[str, list] = {}

    @contextmanager
    def __call__(self, part: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            seconds, calls = self.parts.get(part, (0.0, 0))
            self.parts[part] = [seconds + time.perf_counter() - started, calls + 1]

    def to_json(self) -> dict:
        return {part: {"seconds": round(seconds, 3), "calls": calls} for part, (seconds, calls) in self.parts.items()}


def _out_of_patience(cfg: TrainConfig, state: StageState) -> bool:
    return bool(cfg.patience) and state.stale_evals >= cfg.patience


def _diverged(stage, step, checkpoints, losses: dict[int, float]) -> None:
    latest = checkpoints / "latest"
    kept = (f"the last good checkpoint is kept in {checkpoints} ({latest.read_text().strip()})"
            if latest.is_file() else "no checkpoint had been written yet")
    widths = ", ".join(f"{loss} at s={format_sparsity(w)}" for w, loss in losses.items() if not math.isfinite(loss))
    raise Diverged(f"stage {stage.name}: the distillation loss became {widths} at step {step + 1} (the optimiser did "
                   f"not step); {kept}. Lower --lr, raise --warmup-ratio or lower --max-grad-norm, then run again "
                   "(with --resume to start from that checkpoint)")


def _grad_norm(engine) -> float | None:
    """The last step's global gradient norm, where DeepSpeed keeps it (before clipping)."""
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def _evaluate(stage, cfg, state: StageState, student, teacher, dev, monitor: Monitor) -> bool:
    """Evaluate every width in one pass; update each width's best p(s) and the best trade-off. Returns whether
    the trade-off improved (then the current weights are the stage's best)."""
    stats = evaluate_widths(student, teacher, monitor.dev_batches(dev), stage.widths, stage.shapes,
                            reduce=dist.all_sum)
    if not all(math.isfinite(s["loss"]) for s in stats.values()):
        raise Diverged(f"stage {stage.name}: the dev loss is not finite at step {state.step}; the previous "
                       f"checkpoint in {stage.name}/checkpoints is kept. Lower --lr and run again")
    state.teacher = stats["teacher"]
    p_now = {}
    for permille in stage.widths:
        p = p_now[permille] = performance(stats[permille], stats["teacher"], cfg.metric)
        state.eval_curve.append({"step": state.step, "width": permille / PERMILLE, "p": p, **stats[permille]})
        best = state.best.get(permille)
        if best is None or p > best.p:
            state.best[permille] = WidthScore(p=p, accuracy=stats[permille]["accuracy"],
                                              loss=stats[permille]["loss"], step=state.step)
    monitor.evaluated(state.step, stats, p_now, {s: tradeoff(p, s, cfg.lam) for s, p in p_now.items()})
    argmax = best_tradeoff({s: state.best[s].p for s in stage.selectable}, cfg.lam)
    score = tradeoff(state.best[argmax].p, argmax, cfg.lam)
    log.info("stage %s step %d: %s", stage.name, state.step, "  ".join(
        f"s={format_sparsity(s)} acc={stats[s]['accuracy']:.4f} loss={stats[s]['loss']:.4f}" for s in stage.widths))
    if snapshot_moves(score, argmax, state.tradeoff, state.best_width):
        state.tradeoff, state.best_step, state.best_width, state.stale_evals = score, state.step, argmax, 0
        return True
    state.stale_evals += 1
    return False
