"""Experiment tracking (--report-to): the numbers of every step and evaluation, per stage, under OUT/tracking.

    tensorboard   OUT/tracking/tensorboard/STAGE/   event files (torch.utils.tensorboard's writer); a resumed
                                                    stage purges the steps after its checkpoint
    csv           OUT/tracking/STAGE.csv            step,name,value rows; a resumed stage drops the rows after
                                                    its checkpoint
    wandb         OUT/tracking/wandb/               one W&B run per --out (its id kept in tracking/wandb-id, so
                                                    --resume continues it); each stage's numbers under STAGE/,
                                                    against STAGE/step. W&B cannot take steps back: after a kill,
                                                    the steps since the checkpoint are logged twice

Names: `train/loss/s=0.5` (and logit, hidden, ce), `train/lr`, `train/grad_norm`, `train/tokens_per_s`,
`eval/accuracy/s=0.5` (and loss, p, tradeoff), `eval/accuracy/teacher`; at the end `selected_ta` (0 = none).
Only rank 0 writes.
"""
from __future__ import annotations

import csv
import os
import uuid
from pathlib import Path

from engine.core.errors import UserError

KINDS = ("tensorboard", "csv", "wandb")


def check_trackers(kinds: list[str]) -> None:
    """Each chosen tracker's package is installed (checked before --out is claimed)."""
    import importlib.util

    packages = {"tensorboard": "tensorboard", "wandb": "wandb"}
    for kind in kinds:
        if kind in packages and importlib.util.find_spec(packages[kind]) is None:
            raise UserError(f"--report-to {kind} needs the {packages[kind]} package: pip install {packages[kind]} "
                            "(or minidisc[tracking])")


def final_figures(report: dict) -> dict[str, float]:
    """The run's outcome for the trackers: the chosen TA's sparsity (0: none) and every student's test figures."""
    figures = {"selected_ta": (report.get("selected_ta") or {}).get("sparsity", 0.0),
               "student/accuracy": report["student"]["accuracy"], "student/loss": report["student"]["loss"]}
    for name, metrics in (report.get("baselines") or {}).items():
        figures.update({f"baselines/{name}/accuracy": metrics["accuracy"], f"baselines/{name}/loss": metrics["loss"]})
    return figures


class Trackers:
    """The chosen trackers of one run. `config`: the run's options (W&B shows them)."""

    def __init__(self, kinds: list[str], folder: Path, config: dict, run_name: str):
        self.folder, self.kinds = Path(folder), list(dict.fromkeys(kinds))
        self.folder.mkdir(parents=True, exist_ok=True)
        self._tensorboard = None
        self._stage = None
        self._wandb = _start_wandb(self.folder, config, run_name) if "wandb" in self.kinds else None

    def start_stage(self, stage: str, first_step: int) -> None:
        """Open the stage's writers; a stage resumed at `first_step` forgets what was logged after it."""
        self.close_stage()
        self._stage = stage
        if "tensorboard" in self.kinds:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard drops what earlier writers logged from this step on (a killed run's lost steps)
            self._tensorboard = SummaryWriter(str(self.folder / "tensorboard" / stage), purge_step=first_step + 1)
        if "csv" in self.kinds:
            _truncate_csv(self.folder / f"{stage}.csv", first_step)
        if self._wandb is not None:
            self._wandb.define_metric(f"{stage}/step")
            self._wandb.define_metric(f"{stage}/*", step_metric=f"{stage}/step")

    def log(self, step: int, values: dict[str, float]) -> None:
        stage = self._stage
        if self._tensorboard is not None:
            for name, value in values.items():
                self._tensorboard.add_scalar(name, value, step)
        if "csv" in self.kinds:
            path = self.folder / f"{stage}.csv"
            new = not path.exists()
            with open(path, "a", newline="") as f:
                writer = csv.writer(f)
                if new:
                    writer.writerow(["step", "name", "value"])
                writer.writerows([step, name, repr(float(value))] for name, value in values.items())
        if self._wandb is not None:
            self._wandb.log({f"{stage}/step": step, **{f"{stage}/{name}": value for name, value in values.items()}})

    def summary(self, values: dict[str, float]) -> None:
        """End-of-run figures (the chosen TA): W&B's summary, a `run` TensorBoard folder, `run.csv`."""
        self.close_stage()
        self.start_stage("run", 0)
        self.log(0, values)
        if self._wandb is not None:
            self._wandb.summary.update(values)
        self.close_stage()

    def close_stage(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def close(self) -> None:
        self.close_stage()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _truncate_csv(path: Path, last_step: int) -> None:
    """Keep the rows up to `last_step` (a resumed stage logs the rest again); none for a fresh stage."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = [rows[0], *(row for row in rows[1:] if int(row[0]) <= last_step)]
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(kept)
    os.replace(tmp, path)


def _start_wandb(folder: Path, config: dict, run_name: str):
    """One W&B run per --out: a resumed run continues it (its id is kept beside the logs)."""
    import wandb

    id_file = folder / "wandb-id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    try:
        return wandb.init(project=os.environ.get("WANDB_PROJECT", "minidisc"), name=run_name, id=run_id,
                          resume="allow", dir=str(folder), config=config)
    except Exception as e:  # no login, no network: say what to do
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"--report-to wandb: W&B did not start ({detail}); run `wandb login`, or set "
                        "WANDB_MODE=offline and `wandb sync` the run later") from None
