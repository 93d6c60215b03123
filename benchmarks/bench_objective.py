"""Which distillation objective, measured: plain KD (`minidisc distill`) of the built-in teacher's target slice with
each objective, and no distillation, over seeds. Dev selects each student's snapshot; the figures are test accuracy.

    ce            no distillation: the next tokens alone, no teacher in training
    logit+hidden  the reference's (logit 0.5 + hidden-state MSE 0.5)
    logit         the logit KL alone
    logit+ce      logit 0.5 + next-token CE 0.5
    logit+ce-T2   the same at temperature 2

Each objective's row per seed has its paired difference from `ce` on the same test blocks with a 95% bootstrap
interval (the regime check: does the teacher carry anything the data does not?). The summary gives per objective
the per-seed values, the mean and the 95% t-interval across seeds, and each objective against the one chosen as
the default. Runs go to WORK/<objective>-s<seed> (a finished one is read back: a killed study continues).
Appends to benchmarks/results/objective.csv.

    python benchmarks/bench_objective.py --seeds 0 1 2
    python benchmarks/bench_objective.py --seeds 0 --objectives ce logit+ce --set max_steps=300
    MINIDISC_BUILTIN=test python benchmarks/bench_objective.py --seeds 0 --no-csv   # quick check
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a source tree too
from bench_schedule import builtin_study_options, log, pruned_teacher, run  # noqa: E402
from results_csv import append_rows  # noqa: E402

OBJECTIVES = {
    "ce": dict(logit_weight=0.0, hidden_weight=0.0, ce_weight=1.0),
    "logit+hidden": dict(logit_weight=0.5, hidden_weight=0.5, ce_weight=0.0),
    "logit": dict(logit_weight=1.0, hidden_weight=0.0, ce_weight=0.0),
    "logit+ce": dict(logit_weight=0.5, hidden_weight=0.0, ce_weight=0.5),
    "logit+ce-T2": dict(logit_weight=0.5, hidden_weight=0.0, ce_weight=0.5, temperature=2.0),
}
COMPARED = ("seed", "max_steps", "lr", "batch_size", "seq_len", "target_sparsity", "eval_every", "eval_samples")
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def across_seeds(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (nan for one seed)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / len(values) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="RunConfig overrides")
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "minidisc" / "bench_objective"))
    parser.add_argument("--no-csv", action="store_true")
    args = parser.parse_args()

    import torch

    from engine.report.scoring import paired_interval

    name, setup, options = builtin_study_options(["target_sparsity=0.9", *args.set])
    work = Path(args.work) / setup.name
    options["teacher"] = str(pruned_teacher(work, options))
    started, rows = time.perf_counter(), []
    for seed in args.seeds:
        reports = {}
        for objective in args.objectives:
            out = work / "-".join(sorted(args.set)) / f"{objective}-s{seed}"
            wanted = {**options, **OBJECTIVES[objective], "seed": seed}
            reports[objective] = run("distill", wanted, out)
            ran = reports[objective]["config"]
            differ = [k for k in (*OBJECTIVES["logit+ce-T2"], *COMPARED) if ran.get(k) != wanted.get(k, ran[k])]
            if differ:
                raise SystemExit(f"{out} holds a run with other {', '.join(differ)}: move it away")
        ce, default = reports.get("ce"), reports.get(default_objective())
        for objective, report in reports.items():
            student = report["student"]
            row = {"seed": seed, "objective": objective, **OBJECTIVES[objective],
                   "max_steps": options["max_steps"], "teacher_test_accuracy": report["teacher"]["accuracy"],
                   "test_accuracy": student["accuracy"], "dev_accuracy": student["dev_accuracy"],
                   "train_flops": student["compute"]["train_flops"], "wall_s": student["compute"]["wall_s"]}
            if ce is not None:
                interval = paired_interval(student["test_correct"], ce["student"]["test_correct"],
                                           report["test_block_tokens"])
                row.update(minus_ce=student["accuracy"] - ce["student"]["accuracy"],
                           minus_ce_low=interval["accuracy_interval"][0],
                           minus_ce_high=interval["accuracy_interval"][1], test_blocks=interval["blocks"])
            if default is not None:
                interval = paired_interval(student["test_correct"], default["student"]["test_correct"],
                                           report["test_block_tokens"])
                row.update(minus_default=student["accuracy"] - default["student"]["accuracy"],
                           minus_default_low=interval["accuracy_interval"][0],
                           minus_default_high=interval["accuracy_interval"][1],
                           minus_default_dev=student["dev_accuracy"] - default["student"]["dev_accuracy"])
            if objective == "ce":
                interval = paired_interval(report["teacher"]["test_correct"], student["test_correct"],
                                           report["test_block_tokens"])
                row.update(teacher_minus_ce=report["teacher"]["accuracy"] - student["accuracy"],
                           teacher_minus_ce_low=interval["accuracy_interval"][0],
                           teacher_minus_ce_high=interval["accuracy_interval"][1])
            rows.append(row)
            log(f"seed {seed} {objective:12s} test {row['test_accuracy']:.4f} dev {row['dev_accuracy']:.4f}"
                + (f"  - ce {100 * row['minus_ce']:+.2f} points [{100 * row['minus_ce_low']:+.2f}, "
                   f"{100 * row['minus_ce_high']:+.2f}]" if "minus_ce" in row else ""))
    summarise(rows, args.objectives)
    log(f"done in {time.perf_counter() - started:.0f} s")
    if not args.no_csv:
        stamp = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "builtin": name,
                 "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
        path = append_rows("objective.csv", [{**stamp, **r} for r in rows])
        print(f"appended {len(rows)} rows to {path}")


def default_objective() -> str:
    """The objective RunConfig uses by default."""
    from engine.config import RunConfig

    cfg = RunConfig()
    return next((name for name, weights in OBJECTIVES.items()
                 if all(getattr(cfg, k) == v for k, v in {"temperature": 1.0, **weights}.items())), "")


def summarise(rows: list[dict], objectives: list[str]) -> None:
    """Per objective: test accuracy per seed, mean and 95% t-interval across seeds; its difference from ce and from
    the default objective (per seed, then mean ± t-interval); the teacher's lead over ce."""
    def spread(key, objective):
        values = [100 * r[key] for r in rows if r["objective"] == objective and key in r]
        if not values or objective == ("ce" if key == "minus_ce" else default_objective()):
            return ""
        return "{} -> {:+.2f} ± {:.2f}".format(", ".join(f"{v:+.2f}" for v in values), *across_seeds(values))

    print(f"{'objective':13s} {'test accuracy per seed':24s} {'mean ± 95% (t)':16s} {'minus ce, points':34s} "
          f"minus the default ({default_objective()}), points")
    for objective in objectives:
        values = [r["test_accuracy"] for r in rows if r["objective"] == objective]
        mean, half = across_seeds(values)
        print(f"{objective:13s} {', '.join(f'{v:.4f}' for v in values):24s} {mean:.4f} ± {half:.4f}  "
              f"{spread('minus_ce', objective):34s} {spread('minus_default', objective)}")
    lead = [100 * r["teacher_minus_ce"] for r in rows if "teacher_minus_ce" in r]
    if lead:
        print("teacher - ce, points: {} -> {:+.2f} ± {:.2f}".format(", ".join(f"{v:+.2f}" for v in lead),
                                                                   *across_seeds(lead)))


if __name__ == "__main__":
    main()
