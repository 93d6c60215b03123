"""The run report, typed: what a pipeline found, and report.json written from it.

A pipeline builds a `Report` from its stage results: each model's dev `Figures` (the ones that chose it), the
candidate TAs, the trained widths. `engine.schedule.finish` adds the run's set-up and cost, and
`engine.report.scoring` returns the report measured on test. Every command's report.json has every top-level key
(null or empty where a command has none: distill has no candidates, TA or baselines); a model's figures leave out
what does not apply to it. The views (report.md, the plots, the console summary) read report.json's form, so
`minidisc report` redraws any finished run, an older one included.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

FORMAT = "minidisc-report/1"


def _present(obj) -> dict:
    """A dataclass as a dict without its unset (None) fields, nested reports as dicts too."""
    return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj) if getattr(obj, f.name) is not None}


class _Record:
    """report.json's form of a section: its set fields (None ones left out), nested sections as dicts."""

    def to_dict(self) -> dict:
        return _present(self)


def _plain(value):
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class Figures(_Record):
    """One model's figures: on dev until `engine.report.scoring` measures it, then on test (the dev ones kept as
    `dev_accuracy` / `dev_loss`)."""

    sparsity: float
    parameters: int
    accuracy: float
    loss: float
    perplexity: float
    path: str | None = None  # its folder: OUT/student, OUT/baselines/NAME, the teacher as given
    label: str | None = None  # a baseline's name in the report's words ("plain KD, equal FLOPs")
    uniform: bool | None = None  # the student's --uniform
    best_step: int | None = None  # the step of the snapshot dev chose
    via: str | None = None  # the student's teacher: "ta" or "teacher"
    relative_accuracy: float | None = None  # to the teacher's (both on test once measured)
    compute: dict | None = None  # every stage behind it (`engine.schedule.compute.stage_compute`, summed)
    dev_accuracy: float | None = None
    dev_loss: float | None = None
    test_tokens: int | None = None
    test_correct: list[int] | None = None  # per test block: what paired intervals resample
    benchmarks: dict | None = None  # lm-eval: {task: {metric: value}}


@dataclass(frozen=True)
class Candidate(_Record):
    """A candidate TA: its dev figures, p(s) and the trade-off p(s) + lambda s; under MaxiDisc also the student
    distilled through it (its test accuracy once measured, `student_dev_accuracy` the one that chose)."""

    sparsity: float
    parameters: int
    accuracy: float
    loss: float
    perplexity: float
    scale: float  # 1 - sparsity
    p: float
    tradeoff: float
    best_step: int
    parameter_fraction: float  # of the teacher's parameters
    student_accuracy: float | None = None
    student_loss: float | None = None
    student_path: str | None = None
    compute: dict | None = None  # the TA's and its student's stages
    student_dev_accuracy: float | None = None


@dataclass(frozen=True)
class Selection(_Record):
    """The chosen TA: its sparsity, the step of its weights and where they are."""

    sparsity: float
    step: int
    path: str


@dataclass(frozen=True)
class TrainedWidth(_Record):
    """One width the sandwich trained: its dev figures at the last evaluation; on test, its slice of the supernet
    (`trained`) against the same slice of the pruned teacher (`one_shot`), and the paired difference (`gain`)."""

    sparsity: float
    parameters: int
    dev_accuracy: float
    dev_loss: float
    trained: dict | None = None
    one_shot: dict | None = None
    gain: dict | None = None


@dataclass(frozen=True)
class TrainedWidths(_Record):
    """OUT/supernet: the sandwich's weights at its last step, and every width they hold."""

    path: str
    step: int
    one_shot: str  # the pruned teacher, sliced for the comparison
    widths: list[TrainedWidth]


@dataclass(frozen=True, kw_only=True)
class Report:
    """A finished run (compress, distill or maxidisc). `curves`, `data`, `compute`, `phases`, `stage_timings`,
    `stage_memory`, `config`, `environment`, `samples` and `benchmarks` are JSON sections their producers describe;
    `student_vs_baselines` and `regime` are `engine.report.scoring`'s. Fields in report.json's order."""

    format: str = FORMAT
    command: str
    target_sparsity: float
    lam: float
    metric: str
    teacher: Figures
    candidates: list[Candidate] = field(default_factory=list)
    selected_ta: Selection | None = None
    ta_reason: str | None = None
    ta: Figures | None = None
    student: Figures
    baselines: dict[str, Figures] = field(default_factory=dict)
    curves: dict
    supernet: TrainedWidths | None = None
    data: dict = field(default_factory=dict)
    compute: dict = field(default_factory=dict)
    phases: dict = field(default_factory=dict)
    stage_timings: dict = field(default_factory=dict)
    stage_memory: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)
    test_block_tokens: list[int] | None = None
    student_vs_baselines: dict = field(default_factory=dict)
    regime: dict | None = None
    samples: dict | None = None
    benchmarks: dict | None = None

    def to_dict(self) -> dict:
        """report.json's content: every key, null where the run has none."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    def models(self) -> list[tuple[str, str, Figures]]:
        """(label, key, figures) of every model the run produced or compared, teacher first; `key` is what
        `with_model` replaces: "teacher", "ta", "student" or "baselines/NAME"."""
        models = [("teacher", "teacher", self.teacher), ("TA", "ta", self.ta),
                  (student_label(bool(self.candidates)), "student", self.student)]
        models += [(b.label or name, f"baselines/{name}", b) for name, b in self.baselines.items()]
        return [(label, key, m) for label, key, m in models if m is not None]

    def with_model(self, key: str, figures: Figures) -> Report:
        """This report with the model at `key` (see `models`) replaced."""
        if key.startswith("baselines/"):
            return replace(self, baselines={**self.baselines, key.removeprefix("baselines/"): figures})
        return replace(self, **{key: figures})


def student_label(has_candidates: bool) -> str:
    """The student's label in tables and samples: a run that searched for a TA names whose student it is."""
    return "student (MiniDisc)" if has_candidates else "student"
