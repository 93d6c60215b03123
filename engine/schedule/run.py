"""A run between its set-up and its finish: the stages it trains (their time and compute recorded), the models it
slices and publishes, and the metric rows of the report."""
from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from engine.core import distributed as dist
from engine.core.outputs import atomic_output_dir, is_ours
from engine.core.progress import Monitor
from engine.core.tracking import Trackers
from engine.core.widths import PERMILLE, format_sparsity
from engine.distillation.loss import Objective
from engine.distillation.selection import relative, tradeoff
from engine.models.export import sliced_checkpoint
from engine.models.loading import load_causal_lm, load_tokenizer
from engine.report.report import Candidate, Figures, Report, TrainedWidth, TrainedWidths
from engine.report.scoring import perplexity
from engine.schedule.compute import stage_compute
from engine.schedule.setup import Setup
from engine.training.stage import Stage, StageResult, TrainConfig, WidthScore
from engine.training.trainer import run_stage


class Run:
    """What the pipelines train with: the `Setup`, the progress monitor, and what each phase and stage cost
    (`phases`, `stage_timings`, `stage_memory`, `compute`: the report's figures of the same names)."""

    def __init__(self, setup: Setup):
        self.setup = setup
        self.cfg, self.command, self.out, self.work = setup.cfg, setup.command, setup.out, setup.work
        self.target, self.teacher_dir, self.data, self.costs = setup.target, setup.teacher_dir, setup.data, setup.costs
        self.shape_of = setup.shape_of
        self.phases: dict[str, float] = dict(setup.phases)
        self.stage_timings: dict[str, dict] = {}  # stage -> the trainer's seconds per part
        self.stage_memory: dict[str, dict] = {}  # stage -> rank 0's start, peak and end MB (`training.memory`)
        self.compute: dict[str, dict] = {}  # stage -> its steps, tokens, FLOPs and wall time (`stage_compute`)
        cfg = self.cfg
        trackers = (Trackers(cfg.report_to, self.out / "tracking", cfg.to_dict(), self.out.name)
                    if cfg.report_to and dist.is_main() else None)
        self.monitor = Monitor(cfg.log_every, self.costs.tokens_per_step, trackers, enabled=dist.is_main())

    def add_up_phases(self) -> None:
        """The phases' total so far (the report's `phases.total`)."""
        self.phases["total"] = round(sum(v for k, v in self.phases.items() if k != "total"), 2)

    @contextmanager
    def timed(self, phase: str):
        """Record the block's seconds as `phase` of the report's phases."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.phases[phase] = round(time.perf_counter() - started, 2)

    def stage(self, name, teacher_dir, student_dir, widths, supernet=False, objective=None, teacher_width=0,
              max_steps=None, candidates=None, keep_supernet=False) -> StageResult:
        """Train one stage with the run's options (its distillation loss unless `objective` is given, --max-steps
        unless `max_steps` is) and record its time and compute. `teacher_width`: the teacher's sparsity;
        `candidates`: the widths its best snapshot may hold (default all); `keep_supernet`: also write the weights
        at its end (work/NAME/supernet)."""
        objective = objective or Objective.of(self.cfg)
        stage = Stage(name, Path(teacher_dir), Path(student_dir), list(widths), supernet=supernet,
                      shapes={w: self.shape_of(w) for w in widths} if supernet else None, uniform=self.cfg.uniform,
                      objective=objective, candidates=candidates, keep_supernet=keep_supernet)
        train = replace(TrainConfig.of(self.cfg), max_steps=max_steps or self.cfg.max_steps)
        result = run_stage(stage, train, self.data, self.work, self.monitor)
        self.phases[name] = result.wall_s
        self.stage_timings[name] = result.timings
        self.stage_memory[name] = result.memory
        self.compute[name] = stage_compute(result, self.costs.forward_flops, teacher_width if objective.needs_teacher
                                           else None, self.costs.tokens_per_step, self.costs.head_flops)
        return result

    def slice_model(self, permille: int, out: Path, source: Path | None = None) -> Path:
        """The width at `permille` as a real model in `out` (fp32, a stage's start): a prefix slice of `source` (a
        trained TA, itself a prefix of the reordered teacher), or of the reordered teacher itself. Read tensor by
        tensor from the checkpoints (`sliced_checkpoint`): rank 0 never holds the full fp32 teacher."""
        with dist.main_first(f"slicing sparsity {format_sparsity(permille)}") as main:
            if main and not is_ours(out):
                model = sliced_checkpoint(self.teacher_dir, self.shape_of(permille), self.cfg.uniform,
                                          trained=source)
                with atomic_output_dir(out, kind="sliced-model") as scratch:
                    model.save_pretrained(scratch)
                    load_tokenizer(self.teacher_dir).save_pretrained(scratch)
        return out

    def publish(self, source: Path, name: str, summary: dict) -> Path:
        """Copy a finished snapshot (fp32) to OUT/name (atomically) in the teacher checkpoint's dtype, with a summary
        of what it is."""
        target, dtype = self.out / name, self.setup.export_dtype
        with dist.main_first(f"writing {target}") as main:
            if main:
                with atomic_output_dir(target, kind=f"{name}-model") as scratch:
                    for item in Path(source).iterdir():
                        if item.is_file() and item.name not in (".minidisc", "minidisc_best.json"):
                            shutil.copy2(item, scratch / item.name)
                    if dtype != torch.float32:
                        for weights in [*scratch.glob("*.safetensors"), *scratch.glob("*.safetensors.index.json")]:
                            weights.unlink()
                        model = load_causal_lm(source)
                        model.config.dtype = str(dtype).removeprefix("torch.")
                        model.to(dtype).save_pretrained(scratch)
                    (scratch / "minidisc_export.json").write_text(json.dumps(summary, indent=1) + "\n")
        return target

    # --- the report ---------------------------------------------------------------------------------------------
    def report(self, **sections) -> Report:
        """The run's report from what its pipeline found (`Report`'s fields), under the run's settings."""
        return Report(command=self.command, target_sparsity=self.target / PERMILLE, lam=self.cfg.lam,
                      metric=self.cfg.metric, **sections)

    def figures(self, permille: int, accuracy: float, loss: float, path=None, **extra) -> Figures:
        """A model's dev figures (the ones that chose it) at the width `permille`."""
        return Figures(sparsity=permille / PERMILLE, parameters=self.costs.parameters(permille), accuracy=accuracy,
                       loss=loss, perplexity=perplexity(loss), path=None if path is None else str(path), **extra)

    def candidate(self, permille: int, score: WidthScore, p: float, **extra) -> Candidate:
        """One candidate TA of the report: its dev figures, scale, p(s) and trade-off."""
        return Candidate(sparsity=permille / PERMILLE, parameters=self.costs.parameters(permille),
                         accuracy=score.accuracy, loss=score.loss, perplexity=perplexity(score.loss),
                         scale=(PERMILLE - permille) / PERMILLE, p=p, tradeoff=tradeoff(p, permille, self.cfg.lam),
                         best_step=score.step,
                         parameter_fraction=self.costs.parameters(permille) / self.costs.parameters(0), **extra)

    def trained_widths(self, sandwich: StageResult, path: Path) -> TrainedWidths:
        """Every width the sandwich trained, with its dev figures at the sandwich's last evaluation (the weights
        `path`, OUT/supernet, holds); `widths_measured_on_test` adds the test figures."""
        last = {round(p["width"] * PERMILLE): p for p in sandwich.curves["eval"]}  # in step order: the last wins
        rows = [TrainedWidth(sparsity=s / PERMILLE, parameters=self.costs.parameters(s),
                             dev_accuracy=last[s]["accuracy"], dev_loss=last[s]["loss"]) for s in sandwich.widths]
        return TrainedWidths(path=str(path), step=sandwich.steps, one_shot=str(self.teacher_dir), widths=rows)

    def data_summary(self) -> dict:
        """Where dev and test came from, how many blocks each split holds, and each source's share."""
        cfg = self.cfg
        return {"seq_len": cfg.seq_len, **{f"{name}_blocks": len(getattr(self.data, name))
                                           for name in ("train", "dev", "test")},
                "dev": cfg.dev_data or "held out of --data", "test": cfg.test_data or "held out of --data",
                **self.setup.data_sources}

    def teacher_figures(self, stats: dict) -> Figures:
        """The teacher's dev figures (`stats`: its accuracy and loss on dev, as a stage measured them)."""
        return self.figures(0, stats["accuracy"], stats["loss"], path=self.cfg.teacher)

    def student_figures(self, result: StageResult, teacher_stats: dict, via: str, compute: dict) -> Figures:
        """The published student's dev figures; `compute`: what every stage behind it cost together."""
        best = result.best[self.target]
        return self.figures(self.target, best.accuracy, best.loss, path=self.out / "student", uniform=self.cfg.uniform,
                            best_step=best.step, via=via,
                            relative_accuracy=relative(best.accuracy, teacher_stats["accuracy"]), compute=compute)
