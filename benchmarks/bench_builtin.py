"""The built-in example end to end (`minidisc compress` with no teacher and no data): time and what it chose.

Runs the real command in a fresh process, into a scratch output folder, the way a user would: one process
(NCCL on one GPU in bf16 where CUDA is available, gloo in fp32 on a CPU), or under the deepspeed launcher
with --gpus N. The cached teacher is reused (MINIDISC_CACHE); on a first run wall_s - total_s includes its
pretraining. Reads the run's report.json and appends one row to benchmarks/results/builtin.csv: the device,
the precision, every phase's seconds, each stage's memory in MB (start/peak/end: allocated on a GPU, resident on
a CPU), the chosen TA, each student's accuracy (the baselines have the student's size) and each trained width's
test accuracy against its one-shot prune.

    python benchmarks/bench_builtin.py                 # this device's default
    MINIDISC_BUILTIN=test python benchmarks/bench_builtin.py   # the test suite's tiny variant (seconds)
    python benchmarks/bench_builtin.py -- --baselines kd ce    # options for `minidisc compress` after --
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from results_csv import append_rows

RESULTS = "builtin.csv"


def minidisc_command(gpus: int) -> list[str]:
    # The script beside this interpreter first: `.venv/bin/python benchmarks/...` without activating the venv.
    minidisc = (shutil.which("minidisc", path=str(Path(sys.executable).parent)) or shutil.which("minidisc")
                or sys.exit("minidisc is not installed (pip install -e .)"))
    if gpus > 1:
        return ["deepspeed", "--num_gpus", str(gpus), minidisc, "compress"]
    return [minidisc, "compress"]


def run(gpus: int, out: Path, options: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([*minidisc_command(gpus), "--out", str(out), *options], check=True)
    return time.perf_counter() - started


def row(report: dict, wall: float, gpus: int, options: list[str]) -> dict:
    cuda = torch.cuda.is_available()
    from engine.config import RunConfig

    deepspeed = json.loads(RunConfig(**report["config"]).train_ds_config().read_text())
    phases = dict(report["phases"])
    baselines = report.get("baselines") or {}
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "device": torch.cuda.get_device_name() if cuda else f"cpu x{torch.get_num_threads()}",
            "processes": gpus, "bf16": bool(deepspeed.get("bf16", {}).get("enabled", False)),
            "builtin": os.environ.get("MINIDISC_BUILTIN", "default"), "options": " ".join(options),
            "wall_s": round(wall, 1),
            "total_s": phases.pop("total"), "phases": " ".join(f"{k}={v}" for k, v in phases.items()),
            "stage_memory": " ".join(f"{k}={m['start_mb']}/{m['peak_mb']}/{m['end_mb']}"
                                     for k, m in report.get("stage_memory", {}).items()),
            "ta_sparsity": (report.get("ta") or {}).get("sparsity", "none"),
            "student_accuracy": round(report["student"]["accuracy"], 4),
            **{f"{name}_accuracy": round(baselines[name]["accuracy"], 4) if name in baselines else ""
               for name in ("kd", "kd-matched", "ce")},
            "trained_widths": " ".join(  # sparsity=test accuracy from OUT/supernet/one-shot prune of that width
                f"{w['sparsity']:g}={w['trained']['accuracy']:.4f}/{w['one_shot']['accuracy']:.4f}"
                for w in (report.get("supernet") or {}).get("widths", [])),
            "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=1, help="processes: >1 runs under the deepspeed launcher")
    parser.add_argument("--keep", type=Path, help="write the run here and keep it (default: a scratch folder)")
    parser.add_argument("options", nargs="*", help="after --: options for `minidisc compress` (default: none)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="minidisc-bench-") as scratch:
        out = args.keep or Path(scratch) / "out"
        wall = run(args.gpus, out, args.options)
        result = row(json.loads((out / "report.json").read_text()), wall, args.gpus, args.options)
    print("  ".join(f"{k}={v}" for k, v in result.items()))
    append_rows(RESULTS, [result])


if __name__ == "__main__":
    main()
