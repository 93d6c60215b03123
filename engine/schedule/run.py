"""The run set-up the three schedules share: input checks, claiming --out (and resume checks), the pruned
teacher, the token blocks, slicing and publishing models, parameter counts and metric rows."""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import replace
from functools import cached_property
from pathlib import Path

import torch

from engine.config import RunConfig
from engine.core import distributed as dist
from engine.core import faults
from engine.core.errors import UserError
from engine.core.outputs import RUN_FILE, abandon_run_dir, atomic_output_dir, claim_run_dir, is_ours
from engine.core.progress import Monitor
from engine.core.tracking import Trackers, check_trackers
from engine.core.widths import (
    PERMILLE,
    candidate_widths,
    format_sparsity,
    grid_with_target,
    joint_widths,
    parse_sparsity,
    past_target,
)
from engine.data import load_records, load_text_dataset, token_cache
from engine.data.chat import check_chat_template
from engine.data.splits import describe, held_out_texts, open_data, summary
from engine.distillation.loss import Objective
from engine.distillation.selection import relative, tradeoff
from engine.models.export import sliced_checkpoint
from engine.models.families import family_for
from engine.models.loading import (
    check_checkpoint,
    checkpoint_dtype,
    load_causal_lm,
    load_config,
    load_tokenizer,
    meta_model,
)
from engine.models.plan import PLAN_FILE, PruningPlan
from engine.models.units import count_parameters, forward_flops
from engine.pruning.prune import calibration_batch, prune
from engine.report.harness import BUILTIN_TASKS, builtin_documents, check_tasks
from engine.report.scoring import perplexity
from engine.schedule.compute import sandwich_steps, stage_compute, step_flops
from engine.training.deepspeed_config import read_ds_config, train_ds_config
from engine.training.stage import Data, Stage, StageResult, TrainConfig, WidthScore
from engine.training.trainer import run_stage

log = logging.getLogger(__name__)
# Options that may change between a run and its --resume (they do not change what is computed).
RESUMABLE = {"resume", "deepspeed", "teacher_deepspeed", "cluster", "sample_prompts", "sample_tokens", "eval_tasks",
             "eval_include", "eval_text", "log_every", "report_to", "token_cache", "data_workers", "stack_widths"}


def check_teacher(cfg: RunConfig):
    """The teacher checked before any output is written (`check_checkpoint`); returns its config."""
    return check_checkpoint(cfg.teacher, cfg.seq_len, "teacher's")[0]


def check_target_on_grid(cfg: RunConfig, grid, teacher_dir) -> int:
    """The target (per-mille), which a pruned teacher's fixed grid must contain (and --sparsest, when given)."""
    target = parse_sparsity(cfg.target_sparsity)
    for flag, value in (("--target-sparsity", cfg.target_sparsity), ("--sparsest", cfg.sparsest)):
        if (value or flag == "--target-sparsity") and parse_sparsity(value) not in grid:
            raise UserError(f"{flag} {value} is not on the grid of {teacher_dir} "
                            f"({', '.join(format_sparsity(s) for s in grid)}); re-prune with it included")
    return target


class Run:
    """Shared set-up of the three commands: checked inputs, the output folder, the pruned teacher, the data."""

    def __init__(self, cfg: RunConfig, command: str):
        self.cfg, self.command = cfg, command
        self.out = Path(cfg.out)
        self.work = self.out / "work"
        self.phases: dict[str, float] = {}
        self.stage_timings: dict[str, dict] = {}  # stage -> the trainer's seconds per part
        self.stage_memory: dict[str, dict] = {}  # stage -> rank 0's start, peak and end MB (`training.memory`)
        self.compute: dict[str, dict] = {}  # stage -> its steps, tokens, FLOPs and wall time (`stage_compute`)
        self._flops: dict[int, int] = {}
        self.started = time.perf_counter()
        if cfg.baselines and command != "compress":
            raise UserError(f"--baselines compares students inside `minidisc compress`; `minidisc {command}` is "
                            "itself a baseline: drop the option")
        if (cfg.sparsest or cfg.student_stage != "single" or cfg.no_supernet) and command != "compress":
            raise UserError(f"--sparsest, --student-stage and --no-supernet shape the MiniDisc schedule of `minidisc "
                            f"compress`; `minidisc {command}` has no sandwich: drop them")
        dist.init()
        self._check_inputs()
        found = set(os.listdir(self.out)) if self.out.is_dir() else None
        self.lock = claim_run_dir(self.out, command, cfg.to_dict(), cfg.resume, RESUMABLE)  # held while it runs
        try:
            self._set_up()
        except UserError:
            if RUN_FILE not in (found or set()):  # a new run: leave --out as it was, so the fixed command starts
                abandon_run_dir(self.out, self.lock, found)
            raise
        trackers = (Trackers(cfg.report_to, self.out / "tracking", cfg.to_dict(), self.out.name)
                    if cfg.report_to and dist.is_main() else None)
        self.monitor = Monitor(cfg.log_every, self.tokens_per_step, trackers, enabled=dist.is_main())

    # --- set-up --------------------------------------------------------------------------------------------
    def _set_up(self) -> None:
        """The pruned teacher, the widths and the token blocks: the checks only they allow run here, after --out is
        claimed (a refusal here undoes the claim)."""
        cfg = self.cfg
        self.teacher_dir = self._pruned_teacher()
        self.plan = PruningPlan.load(self.teacher_dir)
        self.target = check_target_on_grid(cfg, self.plan.grid, self.teacher_dir)
        self.family = family_for(load_config(self.teacher_dir))
        self.export_dtype = checkpoint_dtype(load_config(self.teacher_dir))
        widths = self.candidates() + self.past_target()  # what the sandwich trains
        if cfg.uniform:  # fail now on a candidate that keeps no units in a layer
            for permille in widths:
                self.width_of(permille)
        self.sandwich_steps = cfg.sandwich_steps or sandwich_steps(  # --sandwich-share of the pipeline's FLOPs
            cfg.sandwich_share, cfg.max_steps, widths, cfg.sandwich_sample, self.forward_flops, self.target,
            self.head_flops)
        self.data = self._data()
        if set(cfg.eval_tasks or []) & set(BUILTIN_TASKS):  # fail now, not after the training
            builtin_documents(self.eval_texts())

    def _check_inputs(self) -> None:
        """Everything cheap, before any weights are read (same errors everywhere): the files on every rank, the data
        on rank 0 alone (reading a JSON source converts it to Arrow: once per job, not once per rank)."""
        cfg = self.cfg
        check_teacher(cfg)
        read_ds_config(cfg.teacher_ds_config())
        train_ds_config(TrainConfig.of(cfg), backwards_per_step=1)  # readable, and compatible with --optimizer
        check_trackers(cfg.report_to or [])
        faults.check_build_locks()  # on every rank: each node has its own build cache
        with dist.main_first("reading the data") as main:
            if main:
                self._check_data()

    def _check_data(self) -> None:
        cfg = self.cfg
        sources = [(s.path, s.text_field or cfg.text_field) for s in cfg.sources()]
        chat = [path for path, field in sources + [(p, cfg.text_field) for p in (cfg.dev_data, cfg.test_data) if p]
                if load_records(path, field)[2]]
        if chat:
            check_chat_template(load_tokenizer(cfg.teacher), f"data {chat[0]}")
        if cfg.eval_tasks:  # names, and their data sets loaded (once, into the cache other ranks share)
            check_tasks(cfg.eval_tasks, cfg.eval_include)
        if cfg.eval_tasks and cfg.eval_text:
            load_text_dataset(cfg.eval_text, cfg.text_field)

    def _pruned_teacher(self) -> Path:
        teacher = Path(self.cfg.teacher)
        if (teacher / PLAN_FILE).is_file():
            return teacher
        pruned = self.work / "pruned"
        started = time.perf_counter()
        if dist.any_rank(not is_ours(pruned)):  # every rank scores (the teacher partitioned), rank 0 writes
            grid = grid_with_target([parse_sparsity(s) for s in self.cfg.grid or []],
                                    parse_sparsity(self.cfg.target_sparsity), parse_sparsity(self.cfg.sparsest))
            log.info("pruning the teacher (importance on %d calibration blocks)", self.cfg.calib_samples)
            prune(teacher, self.cfg.sources(), pruned, grid=grid, calib_samples=self.cfg.calib_samples,
                  seq_len=self.cfg.seq_len, batch_size=calibration_batch(self.cfg.batch_size, self.cfg.seq_len),
                  ffn_multiple=self.cfg.ffn_multiple, text_field=self.cfg.text_field, seed=self.cfg.seed,
                  attention_unit=self.cfg.attention_unit, attention_norm=self.cfg.attention_norm,
                  device=str(dist.device()), ds_config=read_ds_config(self.cfg.teacher_ds_config()))
        self.phases["prune"] = round(time.perf_counter() - started, 2)
        return pruned

    def _data(self) -> Data:
        """Rank 0 tokenises each source once into a token file and writes work/data.json: which documents each split
        takes (`engine.data.splits`). Every rank reads its own batches from the token files; a resumed run
        finds the same description, or is refused if the data changed."""
        cfg, path = self.cfg, self.work / "data.json"
        root = token_cache(cfg.token_cache)
        started = time.perf_counter()
        with dist.main_first("tokenising the data") as main:
            if main:
                splits = {"dev": (cfg.dev_data, cfg.eval_samples), "test": (cfg.test_data, cfg.test_samples)}
                described = describe(cfg.sources(), splits, cfg.text_field, load_tokenizer(self.teacher_dir),
                                     cfg.seq_len, root, cfg.data_workers)
                if path.is_file() and json.loads(path.read_text()) != described:
                    raise UserError(f"--resume: the data changed since the run started ({path} no longer matches "
                                    "--data's files or the tokenizer); resume on the same data")
                dev_blocks = sum(part["blocks"] for part in described["dev"])
                if dev_blocks < dist.world_size():
                    raise UserError(f"the dev split has {dev_blocks} blocks, fewer than the {dist.world_size()} "
                                    "processes; give more dev text or a smaller --seq-len")
                path.with_name(".data.json.partial").write_text(json.dumps(described, indent=1) + "\n")
                faults.kill_point("data:tokenised")
                path.with_name(".data.json.partial").replace(path)  # whole or absent: a resumed run trusts it
        self.described = json.loads(path.read_text())
        data = Data(*open_data(self.described, root, cfg.seed))
        log.info("data: %d train, %d dev, %d test blocks of %d tokens", len(data.train), len(data.dev),
                 len(data.test), cfg.seq_len)
        steps = max(cfg.max_steps, self.sandwich_steps if self.command == "compress" else 0)
        self.data_sources = summary(self.described, data.train, data.dev, data.test, steps * cfg.batch_size)
        self.phases["data"] = round(time.perf_counter() - started, 2)
        return data

    # --- pieces used by the commands ---------------------------------------------------------------------------
    def width_of(self, permille: int):
        return self.plan.uniform_width(permille, self.family) if self.cfg.uniform else self.plan.width(permille)

    def candidates(self) -> list[int]:
        return candidate_widths(self.plan.grid, parse_sparsity(self.cfg.truncate), self.target)

    def past_target(self) -> list[int]:
        """Widths the sandwich also trains (--sparsest), never a TA."""
        return past_target(self.plan.grid, self.target, parse_sparsity(self.cfg.sparsest))

    def joint_widths(self, ta: int | None) -> list[int]:
        return joint_widths(self.plan.grid, ta, self.target, parse_sparsity(self.cfg.sparsest))

    def stage(self, name, teacher_dir, student_dir, widths, supernet=False, objective=None, teacher_width=0,
              max_steps=None, candidates=None, keep_supernet=False) -> StageResult:
        """Train one stage with the run's options (its distillation loss unless `objective` is given, --max-steps
        unless `max_steps` is) and record its time and compute. `teacher_width`: the teacher's sparsity;
        `candidates`: the widths its best snapshot may hold (default all); `keep_supernet`: also write the weights
        at its end (work/NAME/supernet)."""
        objective = objective or Objective.of(self.cfg)
        stage = Stage(name, Path(teacher_dir), Path(student_dir), list(widths), supernet=supernet,
                      shapes={w: self.width_of(w) for w in widths} if supernet else None, uniform=self.cfg.uniform,
                      objective=objective, candidates=candidates, keep_supernet=keep_supernet)
        train = replace(TrainConfig.of(self.cfg), max_steps=max_steps or self.cfg.max_steps)
        result = run_stage(stage, train, self.data, self.work, self.monitor)
        self.phases[name] = result.wall_s
        self.stage_timings[name] = result.timings
        self.stage_memory[name] = result.memory
        self.compute[name] = stage_compute(result, self.forward_flops, teacher_width if objective.needs_teacher
                                           else None, self.tokens_per_step, self.head_flops)
        return result

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.seq_len

    def step_flops(self, permille: int, teacher: int | None = 0) -> float:
        """Training FLOPs of one step of a single-width stage (the width at `permille`, its teacher at `teacher`;
        None: no teacher)."""
        return step_flops(self.tokens_per_step, [permille], teacher, self.forward_flops)

    @cached_property
    def head_flops(self) -> int:
        """The teacher's LM-head FLOPs per token (hidden size and vocabulary are never pruned: every width's too)."""
        head = self._shape_model.get_output_embeddings()
        return 2 * head.in_features * head.out_features

    def forward_flops(self, permille: int) -> int:
        """Forward FLOPs per token of the width at `permille` (the teacher at 0)."""
        if permille not in self._flops:
            self._flops[permille] = forward_flops(self._shape_model, self.family, self.width_of(permille),
                                                  self.cfg.seq_len)
        return self._flops[permille]

    def slice_model(self, permille: int, out: Path, source: Path | None = None) -> Path:
        """The width at `permille` as a real model in `out` (fp32, a stage's start): a prefix slice of `source` (a
        trained TA, itself a prefix of the reordered teacher), or of the reordered teacher itself. Read tensor by
        tensor from the checkpoints (`sliced_checkpoint`): rank 0 never holds the full fp32 teacher."""
        with dist.main_first(f"slicing sparsity {format_sparsity(permille)}") as main:
            if main and not is_ours(out):
                model = sliced_checkpoint(self.teacher_dir, self.width_of(permille), self.cfg.uniform,
                                          trained=source)
                with atomic_output_dir(out, kind="sliced-model") as scratch:
                    model.save_pretrained(scratch)
                    load_tokenizer(self.teacher_dir).save_pretrained(scratch)
        return out

    def publish(self, source: Path, name: str, summary: dict) -> Path:
        """Copy a finished snapshot (fp32) to OUT/name (atomically) in the teacher checkpoint's dtype, with a summary
        of what it is."""
        target = self.out / name
        with dist.main_first(f"writing {target}") as main:
            if main:
                with atomic_output_dir(target, kind=f"{name}-model") as scratch:
                    for item in Path(source).iterdir():
                        if item.is_file() and item.name not in (".minidisc", "minidisc_best.json"):
                            shutil.copy2(item, scratch / item.name)
                    if self.export_dtype != torch.float32:
                        for weights in [*scratch.glob("*.safetensors"), *scratch.glob("*.safetensors.index.json")]:
                            weights.unlink()
                        model = load_causal_lm(source)
                        model.config.dtype = str(self.export_dtype).removeprefix("torch.")
                        model.to(self.export_dtype).save_pretrained(scratch)
                    (scratch / "minidisc_export.json").write_text(json.dumps(summary, indent=1) + "\n")
        return target

    @cached_property
    def _shape_model(self):
        """The teacher's architecture on the meta device: what parameter and FLOP counts are read from."""
        return meta_model(load_config(self.teacher_dir))

    def parameters(self, permille: int) -> int:
        return count_parameters(self._shape_model, self.family, self.width_of(permille))

    def model_metrics(self, permille: int, accuracy: float, loss: float, path=None, **extra) -> dict:
        return {"sparsity": permille / PERMILLE, "parameters": self.parameters(permille), "accuracy": accuracy,
                "loss": loss, "perplexity": perplexity(loss), **({"path": str(path)} if path else {}), **extra}

    def candidate_row(self, permille: int, score: WidthScore, p: float, **extra) -> dict:
        """One candidate TA of the report: its metrics, scale, p(s) and trade-off."""
        row = {**self.model_metrics(permille, score.accuracy, score.loss), "scale": (PERMILLE - permille) / PERMILLE,
               "p": p, "tradeoff": tradeoff(p, permille, self.cfg.lam), "best_step": score.step, **extra}
        row["parameter_fraction"] = row["parameters"] / self.parameters(0)
        return row

    def width_rows(self, sandwich: StageResult) -> list[dict]:
        """Every width the sandwich trained, with its dev figures at the sandwich's last evaluation (the weights
        OUT/supernet holds); `score_widths` adds the test figures."""
        last = {round(p["width"] * PERMILLE): p for p in sandwich.curves["eval"]}  # in step order: the last wins
        return [{"sparsity": s / PERMILLE, "parameters": self.parameters(s), "dev_accuracy": last[s]["accuracy"],
                 "dev_loss": last[s]["loss"]} for s in sandwich.widths]

    def data_summary(self) -> dict:
        """Where dev and test came from, how many blocks each split holds, and each source's share."""
        cfg = self.cfg
        return {"seq_len": cfg.seq_len, **{f"{name}_blocks": len(getattr(self.data, name))
                                           for name in ("train", "dev", "test")},
                "dev": cfg.dev_data or "held out of --data", "test": cfg.test_data or "held out of --data",
                **self.data_sources}

    def eval_texts(self) -> list[str]:
        """The text the built-in lm-eval tasks are made of: --eval-text, --test-data, or the held-out test records."""
        source = self.cfg.eval_text or self.cfg.test_data
        if source:
            return list(load_text_dataset(source, self.cfg.text_field)[self.cfg.text_field])
        return held_out_texts(self.described, "test", token_cache(self.cfg.token_cache),
                              load_tokenizer(self.teacher_dir))

    def teacher_metrics(self, stats: dict) -> dict:
        return {"path": str(self.cfg.teacher), **self.model_metrics(0, stats["accuracy"], stats["loss"])}

    def student_summary(self, result: StageResult, teacher_stats: dict, via: str, compute: dict) -> dict:
        """The published student's metrics; `compute`: what every stage behind it cost together."""
        best = result.best[self.target]
        return self.model_metrics(self.target, best.accuracy, best.loss, path=self.out / "student",
                                  uniform=self.cfg.uniform, best_step=best.step, via=via,
                                  relative_accuracy=relative(best.accuracy, teacher_stats["accuracy"]),
                                  compute=compute)
