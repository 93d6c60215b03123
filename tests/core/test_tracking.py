"""--report-to: a resumed stage's CSV keeps only the rows up to its checkpoint; bad values and missing packages
are refused in one line."""
import csv

import pytest

from engine.core.errors import UserError
from engine.core.tracking import Trackers, check_trackers


def rows(path):
    with open(path, newline="") as f:
        return [(int(r["step"]), r["name"], float(r["value"])) for r in csv.DictReader(f)]


def test_a_resumed_stage_drops_the_rows_after_its_checkpoint(tmp_path):
    trackers = Trackers(["csv"], tmp_path, {}, "run")
    trackers.start_stage("sandwich", 0)
    for step in range(1, 6):
        trackers.log(step, {"train/loss/s=0.5": step / 10})
    trackers.start_stage("sandwich", 3)  # killed at step 5, resumed from the checkpoint of step 3
    trackers.log(4, {"train/loss/s=0.5": 0.45})
    trackers.close()
    assert rows(tmp_path / "sandwich.csv") == [(1, "train/loss/s=0.5", 0.1), (2, "train/loss/s=0.5", 0.2),
                                               (3, "train/loss/s=0.5", 0.3), (4, "train/loss/s=0.5", 0.45)]


def test_a_missing_tracker_package_is_named(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"--report-to wandb needs the wandb package: pip install wandb"):
        check_trackers(["csv", "wandb"])


def test_an_unknown_tracker_is_refused(capsys):
    from engine.cli.main import main

    with pytest.raises(SystemExit) as exit:
        main(["compress", "--teacher", "t", "--data", "d", "--out", "o", "--report-to", "mlflow"])
    assert exit.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--report-to: invalid choice: 'mlflow'" in error and "--help" in error
