"""The MiniDisc schedule measured on the built-in example, over seeds: which TA the trade-off picks and what it
is worth at equal compute. Dev selects everything; every accuracy below is on the test split.

    --study ta-choice      per seed, `compress` and `maxidisc` with --truncate 0 (every grid point up to the target
                           is a candidate). The sandwich gives p(s) on dev for each metric definition; MaxiDisc
                           gives the student each TA actually yields. For each metric and lambda: the Spearman
                           correlation of p + lambda s with those students' test accuracy, and the regret of its
                           pick (accuracy points behind MaxiDisc's best student); and the oracle check: the best
                           TA path on test against plain KD given exactly its training FLOPs.
    --study equal-compute  per seed, `compress` with the given options and --baselines kd kd-matched: the MiniDisc
                           student against plain KD given the training FLOPs of the whole MiniDisc pipeline.
    --study compare        per seed, `compress` with the given options and with `--with KEY=VALUE` changed (e.g.
                           uniform=true, student_stage=joint): the two students paired on test.

The built-in teacher and data (engine.cli.demo, cached in MINIDISC_CACHE) are pruned once into --work; runs go to
WORK/runs/<options>/seed<N>/<command> (named by the options that differ from STUDY_BASE, so the two studies share
runs) and a finished run is read back, so a killed study continues where it was.
Options of the built-in run are the base; `--set KEY=VALUE` overrides any RunConfig field (e.g. --set
sandwich_steps=50 lam=0.5). Appends rows to benchmarks/results/ta_choice.csv or equal_compute.csv.

    python benchmarks/bench_schedule.py --study ta-choice --seeds 0 1 2
    python benchmarks/bench_schedule.py --study equal-compute --seeds 0 1 2 --set lam=1.0 truncate=0
    python benchmarks/bench_schedule.py --study compare --with uniform=true --seeds 0 1 2
    MINIDISC_BUILTIN=test python benchmarks/bench_schedule.py --study ta-choice --seeds 0 --no-csv   # quick check
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a source tree too
from results_csv import RESULTS, append_rows  # noqa: E402

METRICS = ("relative_accuracy", "accuracy", "exp_loss")
# RunConfig fields that change what a run computes (the folder name lists those that differ from the built-in run)
RUN_KEYS = ("target_sparsity", "lam", "truncate", "metric", "grid", "sandwich_sample", "sandwich_steps",
            "sandwich_share", "max_steps", "eval_every", "batch_size", "seq_len", "lr", "loss", "temperature",
            "logit_weight", "hidden_weight", "ce_weight", "uniform", "patience", "sparsest", "student_stage")

LAMBDAS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


# --- statistics (no scipy) -----------------------------------------------------------------------------------------
def pearson(x: list[float], y: list[float]) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties get their average rank (as scipy.stats.rankdata)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float:
    return pearson(ranks(x), ranks(y))


def across_seeds(values: list[float]) -> tuple[float, float]:
    """The 95% t-interval of the mean of per-seed values (nan for one seed)."""
    if len(values) < 2:
        return math.nan, math.nan
    t = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}.get(len(values) - 1, 1.96)
    half = t * statistics.stdev(values) / math.sqrt(len(values))
    return statistics.fmean(values) - half, statistics.fmean(values) + half


def _points(fraction) -> str:
    return "—" if fraction is None else f"{100 * fraction:+.2f}"


def mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.fmean(values) if values else math.nan


# --- setup and runs ------------------------------------------------------------------------------------------------
def pruned_teacher(work: Path, options: dict) -> Path:
    """The built-in teacher pruned once (the built-in run's calibration), with the target on the grid."""
    import engine
    from engine.core.widths import DEFAULT_GRID, parse_sparsity

    target = parse_sparsity(options["target_sparsity"])
    grid = sorted({*(parse_sparsity(s) for s in options.get("grid") or []), *(() if options.get("grid") else
                                                                               DEFAULT_GRID), target})
    pruned = work / ("pruned-" + "-".join(map(str, grid)))
    if not (pruned / "pruning.json").is_file():
        engine.prune(options["teacher"], options["data"], pruned, grid=tuple(grid),
                     calib_samples=options["calib_samples"], seq_len=options["seq_len"], batch_size=4, seed=0)
    return pruned


def run(command: str, options: dict, out: Path) -> dict:
    """A finished run's report (read back), or the run (continued with --resume when it was killed)."""
    from engine.config import RunConfig
    from engine.schedule.pipelines import COMMANDS

    if not (out / "report.json").is_file():
        cfg = RunConfig(**{**options, "out": str(out), "resume": (out / "run.json").is_file()}).validate()
        log(f"{command} -> {out}")
        COMMANDS[command](cfg)
    return json.loads((out / "report.json").read_text())


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- study 1: the TA choice ----------------------------------------------------------------------------------------
def candidate_scores(compress: dict, maxidisc: dict) -> list[dict]:
    """Per candidate: p(s) on dev for every metric (its best over the sandwich's evaluations) and the test
    accuracy of the student MaxiDisc distilled through it."""
    from engine.distillation.selection import performance

    teacher = {"accuracy": compress["teacher"]["dev_accuracy"], "loss": compress["teacher"]["dev_loss"]}
    evals = compress["curves"]["sandwich"]["eval"]
    rows = []
    for c in sorted(maxidisc["candidates"], key=lambda c: c["sparsity"]):
        points = [p for p in evals if math.isclose(p["width"], c["sparsity"], abs_tol=1e-6)]
        rows.append({"sparsity": c["sparsity"],
                     **{f"p_{m}": max(performance(p, teacher, m) for p in points) for m in METRICS},
                     **{f"teacher_p_{m}": performance(teacher, teacher, m) for m in METRICS},
                     "student_test_accuracy": c["student_accuracy"], "student_dev_accuracy": c["student_dev_accuracy"],
                     "trial_train_flops": c["compute"]["train_flops"]})
    return rows


def chord(rows: list[dict], metric: str) -> float:
    """The lambda that scores the teacher (s = 0) and the target alike: the slope of the chord of p(s). With
    it, p + lambda s picks the candidate farthest above that chord (the knee), whatever the metric's scale."""
    target = rows[-1]
    return (target[f"teacher_p_{metric}"] - target[f"p_{metric}"]) / target["sparsity"]


def rule_scores(per_seed: dict[int, list[dict]]) -> list[dict]:
    """For every metric and lambda (fixed, or the chord's): Spearman of p + lambda s with the student's test
    accuracy, and the regret of its argmax against the best student, per seed."""
    rows = []
    for metric in METRICS:
        for lam in (*LAMBDAS, "chord"):
            rho, regret, picks = [], [], []
            for rows_of_seed in per_seed.values():
                slope = chord(rows_of_seed, metric) if lam == "chord" else lam
                score = [r[f"p_{metric}"] + slope * r["sparsity"] for r in rows_of_seed]
                accuracy = [r["student_test_accuracy"] for r in rows_of_seed]
                pick = max(range(len(score)), key=lambda i: (score[i], -i))  # ties: the denser TA
                rho.append(spearman(score, accuracy))
                regret.append(100 * (max(accuracy) - accuracy[pick]))
                picks.append(rows_of_seed[pick]["sparsity"])
            rows.append({"metric": metric, "lam": lam, "spearman_mean": mean(rho), "regret_mean": mean(regret),
                         "regret_max": max(regret), "spearman": ";".join(f"{v:.3f}" for v in rho),
                         "regret": ";".join(f"{v:.2f}" for v in regret), "picks": ";".join(f"{s:g}" for s in picks)})
    return rows


def ta_choice(args, options: dict, base: Path) -> list[dict]:
    per_seed, out_rows = {}, []
    for seed in args.seeds:
        seeded = {**options, "seed": seed}
        compress = run("compress", seeded, base / f"seed{seed}" / "compress")
        maxidisc = run("maxidisc", seeded, base / f"seed{seed}" / "maxidisc")
        per_seed[seed] = candidate_scores(compress, maxidisc)
        best = max(per_seed[seed], key=lambda r: r["student_test_accuracy"])
        chosen = (compress["selected_ta"] or {}).get("sparsity", options["target_sparsity"])
        print(f"\nseed {seed}: compress chose {chosen:g} (student test acc {compress['student']['accuracy']:.4f}); "
              f"MaxiDisc's best TA on test {best['sparsity']:g} ({best['student_test_accuracy']:.4f}), on dev "
              f"{(maxidisc['selected_ta'] or {}).get('sparsity', options['target_sparsity']):g} "
              f"(student test acc {maxidisc['student']['accuracy']:.4f})")
        print(f"{'s':>6} " + " ".join(f"{'p_' + m:>20}" for m in METRICS) + f" {'student test acc':>17}")
        for r in per_seed[seed]:
            print(f"{r['sparsity']:>6g} " + " ".join(f"{r['p_' + m]:>20.4f}" for m in METRICS)
                  + f" {r['student_test_accuracy']:>17.4f}")
        out_rows += [{"row": "candidate", "seed": seed, **r} for r in per_seed[seed]]
        out_rows.append(oracle_check(options, base, seed, best, maxidisc))
        out_rows.append({"row": "run", "seed": seed, "sparsity": chosen,
                         "student_test_accuracy": compress["student"]["accuracy"],
                         "trial_train_flops": compress["student"]["compute"]["train_flops"],
                         "maxidisc_student_test_accuracy": maxidisc["student"]["accuracy"],
                         "maxidisc_train_flops": maxidisc["student"]["compute"]["train_flops"]})
    oracle = [100 * r["minus_kd"] for r in out_rows if r["row"] == "oracle"]
    low, high = across_seeds(oracle)
    print(f"oracle TA path - plain KD at its FLOPs, points: mean {mean(oracle):+.2f}, 95% t-interval {low:+.2f} to "
          f"{high:+.2f}")
    rules = rule_scores(per_seed)
    picks = [(r["sparsity"], r["student_test_accuracy"]) for r in out_rows if r["row"] == "run"]
    plot_ta_choice(per_seed, rules, picks, RESULTS / args.plot)
    print(f"\n{'metric':>18} {'lambda':>6} {'Spearman':>9} {'regret pts':>10} {'max':>6}  picks per seed")
    for r in rules:
        print(f"{r['metric']:>18} {r['lam']:>6} {r['spearman_mean']:>9.3f} {r['regret_mean']:>10.2f} "
              f"{r['regret_max']:>6.2f}  {r['picks']}")
    return out_rows + [{"row": "rule", **r} for r in rules]


def oracle_check(options: dict, base: Path, seed: int, best: dict, maxidisc: dict) -> dict:
    """The best TA path on test (what a perfect choice would take) against plain KD given exactly that path's
    training FLOPs (TA stage + student stage). If even it loses, no TA schedule can win on this example."""
    from engine.report.scoring import paired_interval
    from engine.schedule.compute import matched_steps

    kd_folder = base.parent / ("kd-" + kd_label(options)) / f"seed{seed}"
    steps = reuse_steps(kd_folder, matched_steps(best["trial_train_flops"], kd_step_flops(options)), 0.02)
    kd = run("distill", {**kd_options({**options, "seed": seed}), "max_steps": steps}, kd_folder / f"distill-{steps}")
    gap = best["student_test_accuracy"] - kd["student"]["accuracy"]
    winner = (maxidisc["selected_ta"] or {}).get("sparsity", options["target_sparsity"])  # the published student's
    same = math.isclose(winner, best["sparsity"])  # per-block figures exist for MaxiDisc's published student only
    interval = paired_interval(maxidisc["student"].get("test_correct"), kd["student"].get("test_correct"),
                               maxidisc.get("test_block_tokens")).get("accuracy_interval", [None, None]) if same \
        else [None, None]
    print(f"seed {seed} oracle: the TA path through {best['sparsity']:g} ({best['student_test_accuracy']:.4f}, "
          f"{best['trial_train_flops']:.3g} FLOPs) - plain KD at those FLOPs ({kd['student']['accuracy']:.4f}, "
          f"{steps} steps) = {100 * gap:+.2f} points [{_points(interval[0])}, {_points(interval[1])}]")
    return {"row": "oracle", "seed": seed, "sparsity": best["sparsity"],
            "student_test_accuracy": best["student_test_accuracy"], "trial_train_flops": best["trial_train_flops"],
            "kd_steps": steps, "kd_train_flops": kd["student"]["compute"]["train_flops"],
            "kd_test_accuracy": kd["student"]["accuracy"], "minus_kd": gap, "minus_kd_low": interval[0],
            "minus_kd_high": interval[1]}


def plot_ta_choice(per_seed: dict[int, list[dict]], rules: list[dict], picks: list[tuple], path: Path) -> None:
    """Left: p(s) on dev and the test accuracy of the student through each TA (MaxiDisc), per seed, with the
    MiniDisc students (stars, at the TA compress chose). Right: Spearman and regret of p + lambda s against
    lambda, per metric."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.2), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    curves, rho_ax, regret_ax = fig.subplots(1, 3)
    student_ax = curves.twinx()
    for seed, rows in per_seed.items():
        s = [r["sparsity"] for r in rows]
        curves.plot(s, [r["p_relative_accuracy"] for r in rows], "o-", color="tab:blue", alpha=0.6)
        student_ax.plot(s, [r["student_test_accuracy"] for r in rows], "^--", color="tab:green", alpha=0.6)
    student_ax.plot(*zip(*picks), "*", color="crimson", markersize=12, label="MiniDisc student (sandwich TA)")
    student_ax.legend(loc="lower left", fontsize="small")
    curves.set_xlabel("TA sparsity s")
    curves.set_ylabel("p(s): relative dev accuracy after the sandwich", color="tab:blue")
    student_ax.set_ylabel("test accuracy of the student via this TA", color="tab:green")
    curves.set_title(f"candidates ({len(per_seed)} seeds)")
    fixed = [r for r in rules if r["lam"] != "chord"]
    for metric in METRICS:
        mine = [r for r in fixed if r["metric"] == metric]
        rho_ax.plot([r["lam"] for r in mine], [r["spearman_mean"] for r in mine], "o-", label=metric)
        regret_ax.plot([r["lam"] for r in mine], [r["regret_mean"] for r in mine], "o-", label=metric)
    rho_ax.set(xlabel="lambda", ylabel="Spearman(p + lambda s, student test acc.)", title="ranking (mean over seeds)")
    regret_ax.set(xlabel="lambda", ylabel="regret (accuracy points)", title="regret of the pick (mean over seeds)")
    for ax in (rho_ax, regret_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path)
    print(f"wrote {path}")


# --- study 2: equal compute ----------------------------------------------------------------------------------------
def equal_compute(args, options: dict, base: Path) -> list[dict]:
    """MiniDisc's student against plain KD from the same slice for the steps that spend the training FLOPs of the
    whole MiniDisc pipeline (kd-matched; what `--baselines kd-matched` trains), and for --max-steps (kd) when that is
    the built-in run's. Plain-KD runs depend only on the options plain KD uses, so schedules of (about) the same
    compute share them: one within `--kd-tolerance` of the matched steps is reused, and each side's FLOPs are in
    the row. The compress runs are the TA-choice study's when the options are the same."""
    from engine.report.scoring import paired_interval
    from engine.schedule.compute import matched_steps

    rows = []
    for seed in args.seeds:
        seeded, folder = {**options, "seed": seed}, base / f"seed{seed}"
        report = run("compress", seeded, folder / "compress")
        pipeline, student = report["student"]["compute"], report["curves"]["student"]["train"]
        stage = report["compute"]
        kd_folder = base.parent / ("kd-" + kd_label(options)) / f"seed{seed}"
        sides = [("minidisc", report)]
        if options["max_steps"] == args.builtin_steps:
            sides.append(("kd", run("distill", kd_options(seeded), kd_folder / f"distill-{options['max_steps']}")))
        steps = matched_steps(pipeline["train_flops"], kd_step_flops(options))
        steps = reuse_steps(kd_folder, steps, args.kd_tolerance)
        sides.append(("kd_matched", run("distill", {**kd_options(seeded), "max_steps": steps},
                                        kd_folder / f"distill-{steps}")))
        row = {"seed": seed, "ta": (report["selected_ta"] or {}).get("sparsity"),
               "student_widths": len({point["width"] for point in student}),
               "sandwich_train_flops": stage["sandwich"]["train_flops"],
               "student_train_flops": stage["student"]["train_flops"]}
        for key, r in sides:
            c = r["student"]["compute"]
            row.update({f"{key}_test_accuracy": r["student"]["accuracy"], f"{key}_steps": c["steps"],
                        f"{key}_train_flops": c["train_flops"], f"{key}_wall_s": c["wall_s"]})
            if key != "minidisc":  # MiniDisc minus this side, paired over the test blocks (95% bootstrap interval)
                interval = paired_interval(report["student"].get("test_correct"), r["student"].get("test_correct"),
                                           report.get("test_block_tokens")).get("accuracy_interval", [None, None])
                row.update({f"minus_{key}": report["student"]["accuracy"] - r["student"]["accuracy"],
                            f"minus_{key}_low": interval[0], f"minus_{key}_high": interval[1]})
        rows.append(row)
        print(f"seed {seed}: TA {row['ta']}; test accuracy MiniDisc {row['minidisc_test_accuracy']:.4f} "
              f"({row['minidisc_steps']} steps, {row['minidisc_train_flops']:.3g} FLOPs, {row['minidisc_wall_s']:.0f} "
              f"s), kd-matched {row['kd_matched_test_accuracy']:.4f} ({row['kd_matched_steps']} steps, "
              f"{row['kd_matched_train_flops']:.3g} FLOPs, {row['kd_matched_wall_s']:.0f} s)")
    for key, what in (("kd_matched", "plain KD at equal training FLOPs"), ("kd", "plain KD at equal student steps")):
        if f"minus_{key}" in rows[0]:
            gaps = [100 * r[f"minus_{key}"] for r in rows]
            low, high = across_seeds(gaps)
            print(f"MiniDisc - {what}, test accuracy points: per seed "
                  + ", ".join(f"{100 * r[f'minus_{key}']:+.2f} [{_points(r[f'minus_{key}_low'])}, "
                              f"{_points(r[f'minus_{key}_high'])}]" for r in rows)
                  + f"; mean {mean(gaps):+.2f}, 95% t-interval across seeds {low:+.2f} to {high:+.2f}")
    keys = [k for k in rows[0] if k not in ("seed", "ta", "student_widths") and not k.endswith(("_low", "_high"))]
    return rows + [{"seed": "mean", **{k: mean([r[k] for r in rows]) for k in keys}}]


# --- study 3: one option changed ---------------------------------------------------------------------------------
def compare(args, options: dict, base: Path) -> list[dict]:
    """The MiniDisc student with the study's options against the same run with `--with KEY=VALUE` changed (e.g.
    uniform=true: every layer keeps the same units, a stock class any serving stack loads; student_stage=joint),
    same seeds: paired over the test blocks, with each side's parameters and training FLOPs."""
    from engine.report.scoring import paired_interval

    changed = dict(option_value(item) for item in args.with_)
    other_base = runs_folder(base.parent.parent, {**options, **changed})
    label = ", ".join(f"{k}={v}" for k, v in changed.items())
    rows = []
    for seed in args.seeds:
        seeded = {**options, "seed": seed}
        runs = {"base": run("compress", seeded, base / f"seed{seed}" / "compress"),
                "changed": run("compress", {**seeded, **changed}, other_base / f"seed{seed}" / "compress")}
        a, b = runs["base"]["student"], runs["changed"]["student"]
        interval = paired_interval(b.get("test_correct"), a.get("test_correct"),
                                   runs["base"].get("test_block_tokens")).get("accuracy_interval", [None, None])
        row = {"seed": seed, "changed": label}
        for side, report in runs.items():
            student = report["student"]
            row.update({f"{side}_ta": (report["selected_ta"] or {}).get("sparsity"),
                        f"{side}_parameters": student["parameters"], f"{side}_test_accuracy": student["accuracy"],
                        f"{side}_train_flops": sum(stage["train_flops"] for stage in report["compute"].values())})
        row.update({"changed_minus_base": b["accuracy"] - a["accuracy"], "minus_low": interval[0],
                    "minus_high": interval[1]})
        rows.append(row)
        print(f"seed {seed}: base {a['accuracy']:.4f} ({a['parameters']:,} parameters), {label} {b['accuracy']:.4f} "
              f"({b['parameters']:,}): {100 * row['changed_minus_base']:+.2f} points "
              f"[{_points(interval[0])}, {_points(interval[1])}]")
    gaps = [100 * r["changed_minus_base"] for r in rows]
    low, high = across_seeds(gaps)
    print(f"{label} - base, test accuracy points: mean {mean(gaps):+.2f}, 95% t-interval {low:+.2f} to {high:+.2f}")
    keys = [k for k in rows[0] if k not in ("seed", "changed") and not k.endswith(("_low", "_high", "_ta"))]
    return rows + [{"seed": "mean", "changed": label, **{k: mean([r[k] for r in rows]) for k in keys}}]


def kd_step_flops(options: dict) -> int:
    """Training FLOPs of one plain-KD step: the target width (uniform when the run is) trained (3 forwards), the
    teacher's forward."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine.core.widths import parse_sparsity
    from engine.models.families import family_for
    from engine.models.loading import load_config
    from engine.models.plan import PruningPlan
    from engine.models.units import forward_flops
    from engine.schedule.setup import shape_of

    config, plan = load_config(options["teacher"]), PruningPlan.load(options["teacher"])
    family, uniform = family_for(config), bool(options.get("uniform"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    flops = lambda s: forward_flops(model, family, shape_of(plan, family, uniform, s), options["seq_len"])  # noqa: E731
    return options["batch_size"] * options["seq_len"] * (3 * flops(parse_sparsity(options["target_sparsity"]))
                                                         + flops(0))


SCHEDULE_KEYS = ("lam", "truncate", "metric", "sandwich_sample", "sandwich_steps", "sandwich_share", "student_stage",
                 "sparsest")


def kd_options(options: dict) -> dict:
    """A plain-KD run's options: the schedule's own ones back at the studies' base (plain KD ignores them)."""
    from engine.config import RunConfig

    base = {**RunConfig().to_dict(), **BUILTIN}
    return {**options, **{k: base[k] for k in SCHEDULE_KEYS}}


def kd_label(options: dict) -> str:
    """The options plain KD uses that differ from the built-in run (max_steps aside: it is in the run's name)."""
    return runs_folder(Path("."), {**kd_options(options), "max_steps": BUILTIN["max_steps"]}).name


def reuse_steps(kd_folder: Path, steps: int, tolerance: float) -> int:
    """`steps`, or the steps of a finished plain-KD run in `kd_folder` within `tolerance` (relative) of it."""
    done = [int(p.parent.name.removeprefix("distill-")) for p in kd_folder.glob("distill-*/report.json")]
    near = [n for n in done if abs(n - steps) <= tolerance * steps]
    return min(near, key=lambda n: abs(n - steps)) if near else steps


BUILTIN: dict = {}  # the studies' base options (main sets them)
# What run folders are named against: the built-in run's options when the studies began (v2, before the default
# sandwich became --sandwich-share of the FLOPs). Frozen, so that a change of the built-in defaults does not
# relabel the cached runs; a run with today's defaults is named by how they differ from these.
STUDY_BASE = {"default": {"max_steps": 150, "sandwich_steps": 150}, "test": {"max_steps": 6, "sandwich_steps": 6}}


def runs_folder(work: Path, options: dict, builtin: dict | None = None) -> Path:
    """Runs with the same options share a folder (named by what differs from the built-in run), so both studies
    reuse each other's runs."""
    from engine.config import RunConfig

    defaults = RunConfig().to_dict()
    base, given = {**defaults, **(builtin or BUILTIN)}, {**defaults, **options}  # not given: at its default
    changed = {k: given[k] for k in sorted(RUN_KEYS) if given[k] != base[k]}
    return work / "runs" / ("-".join(f"{k}={v}" for k, v in changed.items()) or "builtin")


def builtin_study_options(overrides: list[str]) -> tuple[str, Path, dict]:
    """(MINIDISC_BUILTIN's name, its cached folder, the RunConfig options of a study run): the built-in run's
    options on its teacher and data, no baselines, samples or lm-eval, fp32 on a CPU; `KEY=VALUE` overrides."""
    import torch
    import transformers

    import engine  # noqa: F401  (registers the MiniDisc model classes)
    from engine.cli.demo import BUILTINS, builtin_setup
    from engine.config import DS_CONFIGS
    from engine.core.progress import setup_logging

    setup_logging("WARNING")
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    name = os.environ.get("MINIDISC_BUILTIN", "default")
    setup = builtin_setup(name)
    options = {**BUILTINS[name].run, "teacher": str(setup / "teacher"), "data": str(setup / "train.txt"),
               "dev_data": str(setup / "dev.txt"), "test_data": str(setup / "test.txt"), "baselines": None,
               "sample_tokens": 0, "eval_tasks": None,
               "deepspeed": str(DS_CONFIGS / ("zero3_train.json" if torch.cuda.is_available() else
                                                "zero3_train_fp32.json"))}
    options.update(option_value(item) for item in overrides)
    return name, setup, options


def option_value(item: str) -> tuple[str, object]:
    """KEY=VALUE as a RunConfig option: the value read as YAML (true, 0.5, joint), a comma list as a list."""
    import yaml

    from engine.config import _coerce

    key, _, value = item.partition("=")
    return key, _coerce(key, [yaml.safe_load(v) for v in value.split(",")] if "," in value else yaml.safe_load(value))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", choices=["ta-choice", "equal-compute", "compare"], required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="RunConfig overrides")
    parser.add_argument("--with", dest="with_", nargs="+", default=[], metavar="KEY=VALUE",
                        help="compare: the options the other side changes (e.g. uniform=true)")
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "minidisc" / "bench_schedule"))
    parser.add_argument("--kd-tolerance", type=float, default=0.02,
                        help="equal-compute: reuse a plain-KD run whose steps are within this fraction of the match")
    parser.add_argument("--plot", default="ta_choice.png", help="ta-choice: the plot's file in benchmarks/results")
    parser.add_argument("--no-csv", action="store_true")
    args = parser.parse_args()

    import torch

    from engine.cli.demo import BUILTINS
    from engine.config import RunConfig

    name, setup, options = builtin_study_options(args.set)
    work = Path(args.work) / setup.name  # the pruned teacher and the runs belong to this teacher
    options.setdefault("target_sparsity", RunConfig().target_sparsity)
    options["teacher"] = str(pruned_teacher(work, options))
    if args.study == "ta-choice":
        options["truncate"] = 0.0  # every grid point up to the target is a candidate
    BUILTIN.update({**BUILTINS[name].run, **STUDY_BASE[name], "target_sparsity": RunConfig().target_sparsity})
    args.builtin_steps = BUILTINS[name].run["max_steps"]
    folder = runs_folder(work, options)
    label = folder.name
    started = time.perf_counter()
    if args.study == "compare" and not args.with_:
        parser.error("--study compare needs --with KEY=VALUE")
    study = {"ta-choice": ta_choice, "equal-compute": equal_compute, "compare": compare}[args.study]
    rows = study(args, options, folder)
    log(f"done in {time.perf_counter() - started:.0f} s")
    if not args.no_csv:
        stamp = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "builtin": name, "label": label,
                 "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
        fields = list(dict.fromkeys(k for r in rows for k in {**stamp, **r}))
        path = append_rows(f"{args.study.replace('-', '_')}.csv", [{**stamp, **r} for r in rows], fields)
        print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
