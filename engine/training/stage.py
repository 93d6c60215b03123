"""A stage: what it distils (Stage), what its checkpoints carry (StageState), the token blocks it reads."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from engine.distill.loss import Objective
from engine.errors import UserError
from engine.pruning.widths import Width


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
