"""Everything a run needs before its first stage, in the order it happens: the cheap input checks (before --out is
touched), claiming --out (or checking --resume against it), the pruned teacher and its widths, the token blocks.
`set_up` returns it all as a `Setup`; a refusal after the claim leaves a new --out as it found it."""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from engine.config import RunConfig
from engine.core import distributed as dist
from engine.core import faults
from engine.core.errors import UserError
from engine.core.outputs import RUN_FILE, abandon_run_dir, claim_run_dir, is_ours
from engine.core.tracking import check_trackers
from engine.core.widths import (
    Shape,
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
from engine.models.families import Family, family_for
from engine.models.loading import check_checkpoint, checkpoint_dtype, load_config, load_tokenizer
from engine.models.plan import PLAN_FILE, PruningPlan
from engine.pruning.prune import calibration_batch, prune
from engine.report.harness import BUILTIN_TASKS, builtin_documents, check_tasks
from engine.schedule.compute import Costs, sandwich_steps
from engine.training.deepspeed_config import read_ds_config, train_ds_config
from engine.training.stage import Data, TrainConfig

log = logging.getLogger(__name__)
# Options that may change between a run and its --resume (they do not change what is computed).
RESUMABLE = {"resume", "deepspeed", "teacher_deepspeed", "cluster", "sample_prompts", "sample_tokens", "eval_tasks",
             "eval_include", "eval_text", "log_every", "report_to", "token_cache", "data_workers", "stack_widths"}


@dataclass
class Setup:
    """A run's checked inputs and what was made of them before training. Widths are per-mille sparsities."""

    cfg: RunConfig
    command: str
    out: Path
    lock: object  # the held lock on --out (`claim_run_dir`), released when the process ends
    teacher_dir: Path  # the pruned (reordered) teacher: --teacher itself when it is one, else OUT/work/pruned
    pruning: PruningPlan
    target: int
    family: Family
    export_dtype: torch.dtype  # the teacher checkpoint's: published models are written in it
    costs: Costs
    sandwich_steps: int
    data: Data
    described: dict  # work/data.json: which documents each split takes
    data_sources: dict  # each source's share of the splits (`engine.data.splits.summary`)
    phases: dict[str, float] = field(default_factory=dict)  # seconds of pruning and tokenising

    @property
    def work(self) -> Path:
        return self.out / "work"

    def shape_of(self, permille: int) -> Shape:
        return shape_of(self.pruning, self.family, self.cfg.uniform, permille)

    def candidates(self) -> list[int]:
        """The candidate TAs: grid sparsities from --truncate up to the target (included: no TA)."""
        return candidate_widths(self.pruning.grid, parse_sparsity(self.cfg.truncate), self.target)

    def past_target(self) -> list[int]:
        """Widths the sandwich also trains (--sparsest), never a TA."""
        return past_target(self.pruning.grid, self.target, parse_sparsity(self.cfg.sparsest))

    def joint_widths(self, ta: int | None) -> list[int]:
        return joint_widths(self.pruning.grid, ta, self.target, parse_sparsity(self.cfg.sparsest))

    def eval_texts(self) -> list[str]:
        """The text the built-in lm-eval tasks are made of: --eval-text, --test-data, or the held-out test records."""
        source = self.cfg.eval_text or self.cfg.test_data
        if source:
            return list(load_text_dataset(source, self.cfg.text_field)[self.cfg.text_field])
        return held_out_texts(self.described, "test", token_cache(self.cfg.token_cache),
                              load_tokenizer(self.teacher_dir))


def shape_of(pruning: PruningPlan, family: Family, uniform: bool, permille: int) -> Shape:
    """What the width at `permille` keeps per layer (--uniform: the same share of every layer)."""
    return pruning.uniform_shape(permille, family) if uniform else pruning.shape(permille)


def set_up(cfg: RunConfig, command: str) -> Setup:
    """Check, claim --out, prune (unless --teacher is pruned), tokenise: on every rank (rank 0 writes)."""
    if cfg.baselines and command != "compress":
        raise UserError(f"--baselines compares students inside `minidisc compress`; `minidisc {command}` is "
                        "itself a baseline: drop the option")
    if (cfg.sparsest or cfg.student_stage != "single" or cfg.no_supernet) and command != "compress":
        raise UserError(f"--sparsest, --student-stage and --no-supernet shape the MiniDisc schedule of `minidisc "
                        f"compress`; `minidisc {command}` has no sandwich: drop them")
    dist.init()
    check_inputs(cfg)
    out = Path(cfg.out)
    found = set(os.listdir(out)) if out.is_dir() else None
    lock = claim_run_dir(out, command, cfg.to_dict(), cfg.resume, RESUMABLE)  # held while it runs
    try:
        return _after_the_claim(cfg, command, out, lock)
    except UserError:
        if RUN_FILE not in (found or set()):  # a new run: leave --out as it was, so the fixed command starts
            abandon_run_dir(out, lock, found)
        raise


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


def check_inputs(cfg: RunConfig) -> None:
    """Everything cheap, before any weights are read (same errors everywhere): the files on every rank, the data
    on rank 0 alone (reading a JSON source converts it to Arrow: once per job, not once per rank)."""
    check_teacher(cfg)
    read_ds_config(cfg.teacher_ds_config())
    train_ds_config(TrainConfig.of(cfg), backwards_per_step=1)  # readable, and compatible with --optimizer
    check_trackers(cfg.report_to or [])
    faults.check_build_locks()  # on every rank: each node has its own build cache
    with dist.main_first("reading the data") as main:
        if main:
            _check_data(cfg)


def _check_data(cfg: RunConfig) -> None:
    sources = [(s.path, s.text_field or cfg.text_field) for s in cfg.sources()]
    chat = [path for path, field_ in sources + [(p, cfg.text_field) for p in (cfg.dev_data, cfg.test_data) if p]
            if load_records(path, field_)[2]]
    if chat:
        check_chat_template(load_tokenizer(cfg.teacher), f"data {chat[0]}")
    if cfg.eval_tasks:  # names, and their data sets loaded (once, into the cache other ranks share)
        check_tasks(cfg.eval_tasks, cfg.eval_include)
    if cfg.eval_tasks and cfg.eval_text:
        load_text_dataset(cfg.eval_text, cfg.text_field)


def _after_the_claim(cfg: RunConfig, command: str, out: Path, lock) -> Setup:
    """The pruned teacher, the widths and the token blocks: the checks only they allow run here (a refusal here
    undoes the claim)."""
    phases = {}
    started = time.perf_counter()
    teacher_dir = _pruned_teacher(cfg, out / "work" / "pruned")
    if teacher_dir != Path(cfg.teacher):  # (a pruned --teacher is used as it is)
        phases["prune"] = round(time.perf_counter() - started, 2)
    pruning = PruningPlan.load(teacher_dir)
    config = load_config(teacher_dir)
    family, target = family_for(config), check_target_on_grid(cfg, pruning.grid, teacher_dir)
    shape_at = partial(shape_of, pruning, family, cfg.uniform)
    trained = (candidate_widths(pruning.grid, parse_sparsity(cfg.truncate), target)  # what the sandwich trains
               + past_target(pruning.grid, target, parse_sparsity(cfg.sparsest)))
    if cfg.uniform:  # fail now on a candidate that keeps no units in a layer
        for permille in trained:
            shape_at(permille)
    costs = Costs(config, family, shape_at, cfg.seq_len, cfg.batch_size * cfg.seq_len)
    steps = cfg.sandwich_steps or sandwich_steps(  # --sandwich-share of the pipeline's FLOPs
        cfg.sandwich_share, cfg.max_steps, trained, cfg.sandwich_sample, costs.forward_flops, target, costs.head_flops)
    started = time.perf_counter()
    data, described, shares = _data(cfg, out / "work" / "data.json", teacher_dir,
                                    max(cfg.max_steps, steps if command == "compress" else 0))
    phases["data"] = round(time.perf_counter() - started, 2)
    setup = Setup(cfg, command, out, lock, teacher_dir, pruning, target, family, checkpoint_dtype(config), costs,
                  steps, data, described, shares, phases)
    if set(cfg.eval_tasks or []) & set(BUILTIN_TASKS):  # fail now, not after the training
        builtin_documents(setup.eval_texts())
    return setup


def _pruned_teacher(cfg: RunConfig, pruned: Path) -> Path:
    teacher = Path(cfg.teacher)
    if (teacher / PLAN_FILE).is_file():
        return teacher
    if dist.any_rank(not is_ours(pruned)):  # every rank scores (the teacher partitioned), rank 0 writes
        grid = grid_with_target([parse_sparsity(s) for s in cfg.grid or []], parse_sparsity(cfg.target_sparsity),
                                parse_sparsity(cfg.sparsest))
        log.info("pruning the teacher (importance on %d calibration blocks)", cfg.calib_samples)
        prune(teacher, cfg.sources(), pruned, grid=grid, calib_samples=cfg.calib_samples, seq_len=cfg.seq_len,
              batch_size=calibration_batch(cfg.batch_size, cfg.seq_len), ffn_multiple=cfg.ffn_multiple,
              text_field=cfg.text_field, seed=cfg.seed, attention_unit=cfg.attention_unit,
              attention_norm=cfg.attention_norm, device=str(dist.device()),
              ds_config=read_ds_config(cfg.teacher_ds_config()))
    return pruned


def _data(cfg: RunConfig, path: Path, teacher_dir: Path, steps: int) -> tuple[Data, dict, dict]:
    """Rank 0 tokenises each source once into a token file and writes work/data.json: which documents each split
    takes (`engine.data.splits`). Every rank reads its own batches from the token files; a resumed run finds the
    same description, or is refused if the data changed. Returns (the blocks, the description, each source's
    share of the `steps` x --batch-size training samples)."""
    root = token_cache(cfg.token_cache)
    with dist.main_first("tokenising the data") as main:
        if main:
            splits = {"dev": (cfg.dev_data, cfg.eval_samples), "test": (cfg.test_data, cfg.test_samples)}
            described = describe(cfg.sources(), splits, cfg.text_field, load_tokenizer(teacher_dir), cfg.seq_len,
                                 root, cfg.data_workers)
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
    described = json.loads(path.read_text())
    data = Data(*open_data(described, root, cfg.seed))
    log.info("data: %d train, %d dev, %d test blocks of %d tokens", len(data.train), len(data.dev), len(data.test),
             cfg.seq_len)
    return data, described, summary(described, data.train, data.dev, data.test, steps * cfg.batch_size)
