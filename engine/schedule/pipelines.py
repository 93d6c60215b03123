"""`minidisc compress | distill | maxidisc`: the MiniDisc schedule and its two baselines, end to end.

    compress   prune (unless given a pruned teacher) -> sandwich training of every candidate TA -> the
               lambda-tradeoff choice -> TA export -> TA -> student -> export + report      (2 stages)
               (--sparsest: widths past the target trained too; --student-stage joint: the student trained
               with every width past the TA, the reference's schedule)
    distill    plain KD: teacher -> student at the target sparsity                            (1 stage)
    maxidisc   for every candidate TA: teacher -> TA -> student; the best student is kept     (2K-1 stages)

All three share the trainer, the data splits and the per-stage budget (--max-steps; the sandwich gets
--sandwich-share of the pipeline's training FLOPs, or --sandwich-steps). What each model cost (steps, tokens x
widths, FLOPs, wall time) is in the report, and the kd-matched baseline gets the FLOPs of the whole compress
pipeline. Dev selects, test reports.
Work lives in OUT/work (a stage per folder); OUT/ta, OUT/student and the report appear only when complete.
"""
from __future__ import annotations

import logging
from dataclasses import replace

from engine.config import RunConfig
from engine.core.widths import PERMILLE, format_sparsity, widths_per_step
from engine.distillation.loss import Objective
from engine.distillation.selection import choose_ta, relative, tradeoff
from engine.report.report import Figures, Report, Selection
from engine.schedule.compute import matched_steps, step_flops, total
from engine.schedule.finish import finish
from engine.schedule.run import Run
from engine.schedule.setup import set_up
from engine.training.stage import StageResult

log = logging.getLogger(__name__)
BASELINES = {"kd": "plain KD", "kd-matched": "plain KD, equal FLOPs", "kd-steps": "plain KD, equal steps",
             "ce": "no distillation"}


def _curves(*results: StageResult) -> dict:
    return {r.stage: r.curves for r in results}


def compress(cfg: RunConfig) -> Report:
    """MiniDisc: every candidate TA trained and scored in one sandwich run, the lambda-optimal one chosen."""
    run = Run(set_up(cfg, "compress"))
    candidates = run.setup.candidates()
    run.monitor.plan_stages(compress_flops(run))
    if not cfg.sandwich_steps:
        log.info("sandwich: %d steps, %g of the pipeline's training FLOPs (--sandwich-share)",
                 run.setup.sandwich_steps, cfg.sandwich_share)
    sandwich = run.stage("sandwich", run.teacher_dir, run.teacher_dir, candidates + run.setup.past_target(),
                         supernet=True, max_steps=run.setup.sandwich_steps, candidates=candidates,
                         keep_supernet=not cfg.no_supernet)
    supernet = None if cfg.no_supernet else run.publish(
        run.work / "sandwich" / "supernet", "supernet", {"role": "supernet: every width the sandwich trained, "
                                                         "exported with `minidisc export`", "step": sandwich.steps})
    teacher_stats = sandwich.teacher_stats
    p = {s: sandwich.best[s].p for s in candidates}
    choice = choose_ta(p, cfg.lam, run.target)
    if choice is not None and choice != sandwich.best_width:  # the snapshot rule and choose_ta must agree
        raise RuntimeError(f"internal error: the TA is sparsity {format_sparsity(choice)} but the sandwich's best "
                           f"snapshot holds {format_sparsity(sandwich.best_width)}")
    with run.timed("ta_export"):
        if choice is None:
            reason = (f"the best trade-off p + {cfg.lam:g} s is at the target {format_sparsity(run.target)}: "
                      "no TA is needed, the student is distilled from the teacher directly")
            student_teacher, ta = run.teacher_dir, None
        else:
            reason = (f"sparsity {format_sparsity(choice)} maximises p + {cfg.lam:g} s "
                      f"({tradeoff(p[choice], choice, cfg.lam):.4f}) among the candidates below the target")
            ta = run.publish(sandwich.best_dir, "ta", {"role": "teacher assistant", "sparsity": choice / PERMILLE,
                                                       "step": sandwich.best_step})
            student_teacher = ta
    student = student_stage(run, student_teacher, sandwich.best_dir, choice)
    run.publish(student.best_dir, "student", {"role": "student", "sparsity": run.target / PERMILLE,
                                              "via_ta": None if choice is None else choice / PERMILLE})
    pipeline = total(run.compute["sandwich"], run.compute["student"])
    trained = {name: baseline(run, name, teacher_stats, pipeline) for name in cfg.baselines or []}
    ta_score = None if choice is None else sandwich.best[choice]
    return finish(run, run.report(
        teacher=run.teacher_figures(teacher_stats),
        candidates=[run.candidate(s, sandwich.best[s], sandwich.best[s].p) for s in candidates],
        selected_ta=None if choice is None else Selection(choice / PERMILLE, sandwich.best_step, "ta"),
        ta_reason=reason,
        ta=None if choice is None else run.figures(choice, ta_score.accuracy, ta_score.loss, path=ta,
                                                   compute=run.compute["sandwich"]),
        student=run.student_figures(student, teacher_stats, "ta" if choice is not None else "teacher", pipeline),
        baselines={name: figures for name, (figures, _) in trained.items()},
        curves=_curves(sandwich, student, *(result for _, result in trained.values())),
        supernet=None if supernet is None else run.trained_widths(sandwich, supernet)))


def compress_flops(run: Run) -> dict[str, float]:
    """Each stage's planned training FLOPs, for the run's ETA (the student's teacher counted as the teacher's
    cost: its TA is not chosen yet)."""
    cfg, target, costs, steps = run.cfg, run.target, run.costs, run.setup.sandwich_steps
    sandwich = run.setup.candidates() + run.setup.past_target()
    per_step = widths_per_step(len(sandwich), cfg.sandwich_sample)
    flops = {"sandwich": steps * step_flops(costs.tokens_per_step, sandwich, 0, costs.forward_flops, per_step,
                                            costs.head_flops),
             "student": cfg.max_steps * costs.step_flops(target)}
    for name in cfg.baselines or []:
        matched = name == "kd-matched"
        flops[f"baseline-{name}"] = flops["sandwich"] + flops["student"] if matched else \
            (steps + cfg.max_steps if name == "kd-steps" else cfg.max_steps) * \
            costs.step_flops(target, None if name == "ce" else 0)
    return flops


def student_stage(run: Run, teacher, snapshot, ta: int | None) -> StageResult:
    """TA (or, when `ta` is None, teacher) -> student. The sandwich's best `snapshot` is the TA in fp32 (or the
    target's width when there is no TA). --student-stage single trains the target's slice of it alone; joint
    trains the snapshot as a supernet at every width past the TA up to --sparsest, keeping the weights with the
    best dev score at the target."""
    if run.cfg.student_stage == "joint":
        return run.stage("student", teacher, snapshot, run.setup.joint_widths(ta), supernet=True, teacher_width=ta or 0,
                         candidates=[run.target])
    init = snapshot if ta is None else run.slice_model(run.target, run.work / "student_init", source=snapshot)
    return run.stage("student", teacher, init, [run.target], teacher_width=ta or 0)


def baseline(run: Run, name: str, teacher_stats: dict, pipeline: dict) -> tuple[Figures, StageResult]:
    """A comparison student of the target size from the same slice of the pruned teacher: `kd` distils it from
    the teacher (no TA) for --max-steps, `kd-matched` for the steps that spend the training FLOPs of the
    MiniDisc `pipeline` (its compute), `kd-steps` for the pipeline's optimiser steps; `ce` trains it on the
    next tokens alone (no distillation, no teacher forward in training) for --max-steps."""
    objective = Objective.of(run.cfg)
    if name == "ce":
        objective = replace(objective, logit_weight=0.0, hidden_weight=0.0, ce_weight=1.0)
    steps = {"kd-matched": matched_steps(pipeline["train_flops"], run.costs.step_flops(run.target)),
             "kd-steps": pipeline["steps"]}.get(name, run.cfg.max_steps)
    init = run.slice_model(run.target, run.work / "student_init-direct")
    stage = f"baseline-{name}"
    result = run.stage(stage, run.teacher_dir, init, [run.target], objective=objective, max_steps=steps)
    run.publish(result.best_dir, f"baselines/{name}", {"role": f"baseline student ({BASELINES[name]})",
                                                      "sparsity": run.target / PERMILLE})
    best = result.best[run.target]
    figures = run.figures(run.target, best.accuracy, best.loss, path=run.out / "baselines" / name,
                          label=BASELINES[name], best_step=best.step,
                          relative_accuracy=relative(best.accuracy, teacher_stats["accuracy"]),
                          compute=run.compute[stage])
    return figures, result


def distill(cfg: RunConfig) -> Report:
    """Plain KD baseline: the pruned teacher's target slice distilled from the teacher, no TA."""
    run = Run(set_up(cfg, "distill"))
    run.monitor.plan_stages({"student": cfg.max_steps * run.costs.step_flops(run.target)})
    init = run.slice_model(run.target, run.work / "student_init")
    student = run.stage("student", run.teacher_dir, init, [run.target])
    run.publish(student.best_dir, "student", {"role": "student", "sparsity": run.target / PERMILLE, "via_ta": None})
    return finish(run, run.report(
        teacher=run.teacher_figures(student.teacher_stats),
        student=run.student_figures(student, student.teacher_stats, "teacher", run.compute["student"]),
        curves=_curves(student)))


def maxidisc(cfg: RunConfig) -> Report:
    """MaxiDisc baseline: teacher -> TA -> student for every candidate TA (and teacher -> student for the
    no-TA option); the student with the best dev accuracy is kept."""
    run = Run(set_up(cfg, "maxidisc"))
    trials, results = {}, []
    run.monitor.plan_stages(maxidisc_flops(run))
    for s in run.setup.candidates():
        if s == run.target:  # the no-TA option: plain KD
            init = run.slice_model(run.target, run.work / "student_init-direct")
            student = run.stage("student-direct", run.teacher_dir, init, [run.target])
            trials[s] = (None, student)
            results.append(student)
            continue
        name = format_sparsity(s)
        ta = run.stage(f"ta-{name}", run.teacher_dir, run.slice_model(s, run.work / f"ta_init-{name}"), [s])
        init = run.slice_model(run.target, run.work / f"student_init-{name}", source=ta.best_dir)
        student = run.stage(f"student-via-{name}", ta.best_dir, init, [run.target], teacher_width=s)
        trials[s] = (ta, student)
        results += [ta, student]
    score = {s: student.best[run.target].accuracy for s, (_, student) in trials.items()}
    winner = max(score, key=lambda s: (score[s], s))
    ta, student = trials[winner]
    teacher_stats = (ta or student).teacher_stats
    run.publish(student.best_dir, "student", {"role": "student", "sparsity": run.target / PERMILLE,
                                              "via_ta": None if ta is None else winner / PERMILLE})
    rows = []
    for s, (trial_ta, trial_student) in trials.items():
        stats, final = (trial_ta or trial_student).best[s], trial_student.best[run.target]
        stages = [r.stage for r in (trial_ta, trial_student) if r is not None]
        rows.append(run.candidate(s, stats, relative(stats.accuracy, teacher_stats["accuracy"]),
                                  student_accuracy=final.accuracy, student_loss=final.loss,
                                  student_path=str(trial_student.best_dir),
                                  compute=total(*(run.compute[name] for name in stages))))
    ta_score = None if ta is None else ta.best[winner]
    return finish(run, run.report(
        teacher=run.teacher_figures(teacher_stats),
        candidates=rows,
        selected_ta=None if ta is None else Selection(winner / PERMILLE, ta.best_step, str(ta.best_dir)),
        ta_reason=f"MaxiDisc: the student through sparsity {format_sparsity(winner)} has the best dev accuracy "
                  f"({score[winner]:.4f}) of {len(trials)} trials",
        ta=None if ta is None else run.figures(winner, ta_score.accuracy, ta_score.loss, path=ta.best_dir),
        student=run.student_figures(student, teacher_stats, "ta" if ta is not None else "teacher",
                                    total(*run.compute.values())),
        curves=_curves(*results)))


def maxidisc_flops(run: Run) -> dict[str, float]:
    """Each MaxiDisc stage's planned training FLOPs, for the run's ETA."""
    flops, steps = {}, run.cfg.max_steps
    for s in run.setup.candidates():
        if s == run.target:
            flops["student-direct"] = steps * run.costs.step_flops(run.target)
        else:
            flops[f"ta-{format_sparsity(s)}"] = steps * run.costs.step_flops(s)
            flops[f"student-via-{format_sparsity(s)}"] = steps * run.costs.step_flops(run.target, teacher=s)
    return flops


COMMANDS = {"compress": compress, "distill": distill, "maxidisc": maxidisc}
