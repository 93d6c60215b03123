"""A stage: what it distils (Stage), its token blocks (Data), what its checkpoints carry (StageState) and what it
returns (StageResult). Widths are integer per-mille sparsities everywhere; they become strings and fractions
only in JSON (`to_json`/`from_json`)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from engine.core.errors import UserError
from engine.core.widths import PERMILLE, Shape
from engine.distillation.loss import Objective

if TYPE_CHECKING:
    from engine.data.blocks import Mixture, Split


class Diverged(UserError):
    """The loss became NaN or infinite."""


@dataclass
class Data:
    """The training stream (`engine.data.Mixture`), the dev split (selects) and the test split (reports)
    (`engine.data.Split`s: blocks [n, seq_len] and their loss masks)."""

    train: Mixture
    dev: Split
    test: Split | None = None


@dataclass(frozen=True)
class TrainConfig:
    """The options a stage trains with: the RunConfig fields of the same names, and the two DeepSpeed files."""

    batch_size: int
    grad_accum: int
    max_steps: int
    eval_every: int
    patience: int
    seed: int
    lr: float
    weight_decay: float
    warmup_ratio: float
    max_grad_norm: float
    optimizer: str
    teacher_placement: str
    gradient_checkpointing: bool
    sandwich_sample: int
    stack_widths: int
    lam: float
    metric: str
    resume: bool
    train_ds_path: Path
    teacher_ds_path: Path

    @classmethod
    def of(cls, cfg) -> "TrainConfig":
        """From a RunConfig."""
        own = {f.name: getattr(cfg, f.name) for f in fields(cls) if not f.name.endswith("_ds_path")}
        return cls(**own, train_ds_path=cfg.train_ds_config(), teacher_ds_path=cfg.teacher_ds_config())


@dataclass
class Stage:
    """One distillation: `teacher_dir` -> `student_dir`, trained at `widths` (per-mille sparsities)."""

    name: str
    teacher_dir: Path
    student_dir: Path
    widths: list[int]
    supernet: bool = False  # student_dir is a reordered teacher (or a width of one); train every width of it
    shapes: dict[int, Shape] | None = None  # supernet only: what each of its widths keeps per layer
    uniform: bool = False  # supernet only: widths are uniform, snapshots are stock HF classes
    objective: Objective = field(default_factory=Objective)  # the distillation loss and its weights
    candidates: list[int] | None = None  # the widths the best snapshot may hold (None: every width)
    keep_supernet: bool = False  # supernet only: write the weights every width shares at the stage's end

    @property
    def selectable(self) -> list[int]:
        return self.widths if self.candidates is None else self.candidates


@dataclass
class WidthScore:
    """The best dev score a width reached in a stage: p(s), its accuracy and loss, and when."""

    p: float
    accuracy: float
    loss: float
    step: int


def _scores_to_json(best: dict[int, WidthScore]) -> dict:
    return {str(permille): asdict(score) for permille, score in best.items()}


def _scores_from_json(best: dict) -> dict[int, WidthScore]:
    return {int(permille): WidthScore(**score) for permille, score in best.items()}


def _renamed(data: dict) -> dict:
    """Results and checkpoints of earlier releases called the trade-off score "objective"."""
    return {("tradeoff" if key == "objective" else key): value for key, value in data.items()}


@dataclass
class StageState:
    """What a checkpoint carries besides weights and optimiser."""

    step: int = 0
    best: dict[int, WidthScore] = field(default_factory=dict)  # per width, its best dev score so far
    tradeoff: float = -math.inf  # the best p(s) + lambda * s so far, over every width
    best_step: int = -1
    best_width: int | None = None
    stale_evals: int = 0
    teacher: dict = field(default_factory=dict)  # the teacher's dev stats
    train_curve: list = field(default_factory=list)
    eval_curve: list = field(default_factory=list)
    seconds: float = 0.0  # wall time of the work this state holds, over every process (not a killed one's lost steps)

    def to_json(self) -> dict:
        return {**asdict(self), "best": _scores_to_json(self.best)}

    @classmethod
    def from_json(cls, data: dict) -> "StageState":
        return cls(**{**_renamed(data), "best": _scores_from_json(data["best"])})


@dataclass
class StageResult:
    """A finished stage: its best weights (`best_dir`, at `best_width`), every width's best score, curves."""

    stage: str
    teacher: str
    student: str
    widths: list[int]
    steps: int
    best_step: int
    best_width: int | None
    tradeoff: float
    teacher_stats: dict
    best: dict[int, WidthScore]
    best_dir: Path
    wall_s: float  # its processes' seconds together, but the steps a kill lost (`StageState.seconds`)
    curves: dict
    timings: dict = field(default_factory=dict)  # part -> {"seconds", "calls"} (this process's run of the stage)
    memory: dict = field(default_factory=dict)  # this process's start, peak and end MB (`training.memory`)

    def to_json(self) -> dict:
        return {**asdict(self), "widths": [w / PERMILLE for w in self.widths],
                "best_width": None if self.best_width is None else self.best_width / PERMILLE,
                "best": _scores_to_json(self.best), "best_dir": str(self.best_dir)}

    @classmethod
    def from_json(cls, data: dict) -> "StageResult":
        best_width = data["best_width"]
        return cls(**{**_renamed(data), "widths": [round(w * PERMILLE) for w in data["widths"]],
                      "best_width": None if best_width is None else round(best_width * PERMILLE),
                      "best": _scores_from_json(data["best"]), "best_dir": Path(data["best_dir"])})
