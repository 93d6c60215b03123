"""MiniDisc vs MaxiDisc vs plain KD on one small setup: wall time, student quality, and how well MiniDisc's
one-trial TA score predicts the student each TA actually yields.

Setup (cached under --work, so reruns reuse it): the pydoc corpus (engine.tools.demo.write_corpus), a SentencePiece
tokenizer (engine.tools.demo.train_tokenizer), a LLaMA teacher (hidden 256, 4 layers, 8 heads / 4 KV heads,
intermediate 688) pretrained with engine.tools.demo.pretrain, and that teacher pruned ONCE on the default grid
(engine.pruning.prune). The pruned teacher dir (it holds pruning.json, so the engine uses it as is) is given to all
three runs, so pruning is not timed three times. Then, sequentially and in this process (`--mode subprocess` runs the
`minidisc` console script instead and reads OUT/report.json), each into a fresh OUT dir:

    distill    plain KD, teacher -> student at --target-sparsity            (1 stage)
    compress   MiniDisc: sandwich over the candidates, lambda choice, TA -> student   (2 stages)
    maxidisc   MaxiDisc: teacher -> TA -> student for every candidate        (2K-1 stages)

with the same per-stage budget (--steps), target 0.9, truncate 0.5 (candidates 0.5 0.6 0.7 0.8 0.85 0.9). Prints
the per-method table, the per-candidate table (MiniDisc p(s) and p + lam*s next to MaxiDisc's student accuracy
through that TA), Pearson/Spearman correlations, the two targets (MiniDisc wall <= 40% of MaxiDisc's; MiniDisc
student accuracy within 1% relative of MaxiDisc's best), and, in-process, where each method's time went.
Appends rows to benchmarks/results/schedule.csv (column `row`: method | candidate | summary).

    python benchmarks/bench_schedule.py --steps 20 --eval-every 10 --pretrain-steps 100      # quick check
    python benchmarks/bench_schedule.py --pretrain-steps 500 --steps 80 --eval-every 20      # a real run
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from results_csv import append_rows  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a source tree too

RESULTS = Path(__file__).with_name("results") / "schedule.csv"
METHODS = ("distill", "compress", "maxidisc")
LABEL = {"distill": "plain KD", "compress": "MiniDisc", "maxidisc": "MaxiDisc"}
TIME_TARGET, ACCURACY_TARGET = 0.40, 0.01
PRETRAIN_LR = 3e-3
FIELDS = ["date", "device", "dtype", "row", "method", "mode", "pretrain_steps", "steps", "eval_every", "batch",
          "seq_len", "lam", "sandwich_sample", "lr", "teacher_params", "teacher_accuracy", "wall_s",
          "phases_total_s", "cpu_s", "load_avg", "student_accuracy", "student_loss", "ta_sparsity", "sparsity", "p",
          "tradeoff",
          "minidisc_accuracy", "maxidisc_student_accuracy", "maxidisc_trial_wall_s", "pearson", "spearman",
          "pearson_p", "spearman_p", "time_ratio", "time_target_met", "cpu_ratio", "accuracy_ratio",
          "accuracy_target_met",
          "prune_s", "minidisc", "torch"]


# --- statistics (scipy is not installed) ------------------------------------------------------------------------
def pearson(x: list[float], y: list[float]) -> float:
    n = len(x)
    if n < 2:
        return math.nan
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


# --- setup: corpus, tokenizer, pretrained teacher, pruned teacher (all cached) ----------------------------------
def setup(args, log) -> dict:
    from engine.data import load_text_dataset, token_blocks
    from engine.tools.demo import DEMO_TEACHER, pretrain, train_tokenizer, write_corpus

    work = Path(args.work)
    data_dir = work / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    train, dev = data_dir / "train.txt", data_dir / "dev.txt"
    if not (train.is_file() and dev.is_file()):
        write_corpus(data_dir)
    tok_dir = work / f"tokenizer-v{args.vocab}"
    if not (tok_dir / "tokenizer_config.json").is_file():
        log(f"training the SentencePiece tokenizer (vocab {args.vocab}) -> {tok_dir}")
        train_tokenizer(train, tok_dir, vocab_size=args.vocab)

    teacher = work / f"teacher-v{args.vocab}-p{args.pretrain_steps}-t{args.seq_len}-s{args.seed}"
    if args.pretrain_lr != PRETRAIN_LR:
        teacher = teacher.with_name(f"{teacher.name}-lr{args.pretrain_lr:g}")
    info_file = teacher / "bench_teacher.json"
    if not info_file.is_file():
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        blocks = token_blocks(load_text_dataset(train), tokenizer, args.seq_len, None, seed=args.seed)
        torch.manual_seed(args.seed)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2,
                                             **DEMO_TEACHER))
        log(f"pretraining the teacher ({sum(p.numel() for p in model.parameters()):,} parameters) for "
            f"{args.pretrain_steps} steps on {len(blocks)} blocks of {args.seq_len} tokens")
        started = time.perf_counter()
        losses = pretrain(model, blocks, steps=args.pretrain_steps, batch_size=16, lr=args.pretrain_lr,
                          seed=args.seed) if args.pretrain_steps else []
        seconds = time.perf_counter() - started
        model.eval().save_pretrained(teacher)
        tokenizer.save_pretrained(teacher)
        info_file.write_text(json.dumps({"pretrain_steps": args.pretrain_steps, "seconds": round(seconds, 2),
                                         "first_loss": losses[0] if losses else None,
                                         "last_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
                                         "params": sum(p.numel() for p in model.parameters())}) + "\n")
        del model
    teacher_info = json.loads(info_file.read_text())

    from engine.pruning.widths import DEFAULT_GRID, parse_sparsity

    grid = tuple(sorted(set(DEFAULT_GRID) | {parse_sparsity(args.target_sparsity)}))
    pruned = work / f"{teacher.name}-pruned-c{args.calib_samples}"
    if not (pruned / "pruning.json").is_file():
        import engine

        log(f"pruning the teacher once ({args.calib_samples} calibration blocks) -> {pruned}")
        started = time.perf_counter()
        engine.prune(teacher, train, pruned, grid=grid, calib_samples=args.calib_samples, seq_len=args.seq_len,
                     batch_size=4, seed=args.seed, device="cuda" if torch.cuda.is_available() else "cpu")
        prune_s = time.perf_counter() - started
        (work / f"{pruned.name}.time.json").write_text(json.dumps({"prune_s": round(prune_s, 2)}) + "\n")
    prune_time = work / f"{pruned.name}.time.json"
    prune_s = json.loads(prune_time.read_text())["prune_s"] if prune_time.is_file() else math.nan
    return {"train": train, "dev": dev, "teacher": teacher, "pruned": pruned, "teacher_info": teacher_info,
            "prune_s": prune_s}


# --- where the time goes: the trainer records seconds per part of every stage in report.json ----------------------
PARTS = {  # the trainer's part -> label; nested ones are shown indented
    "build engines": "build engines (load + deepspeed.initialize)",
    "training steps": "training steps",
    "teacher forwards": "  teacher forwards",
    "student fwd+bwd+optimizer": "  student fwd+bwd+optimizer",
    "evaluation": "evaluation (teacher + widths on dev)",
    "best snapshots": "best-snapshot export",
    "checkpoints": "DeepSpeed checkpoints",
    "release": "engine release",
}
TOP = ("build engines", "training steps", "evaluation", "best snapshots", "checkpoints", "release")


def time_table(report: dict, wall: float) -> list[tuple[str, float, int]]:
    """(label, seconds, calls) per part, summed over the run's stages, and what the stages do not cover."""
    totals: dict[str, list] = {}
    for parts in (report.get("stage_timings") or {}).values():
        for part, t in parts.items():
            seconds, calls = totals.get(part, (0.0, 0))
            totals[part] = [seconds + t["seconds"], calls + t["calls"]]
    rows = [(label, *totals[part]) for part, label in PARTS.items() if part in totals]
    top = sum(totals.get(part, (0.0, 0))[0] for part in TOP)
    rows.append(("other (pruning, slicing, publishing, data, report, ...)", max(0.0, wall - top), 0))
    return rows


# --- the three runs ---------------------------------------------------------------------------------------------
def run_config(args, files, method: str, out: Path):
    from engine.config import REPO_CONFIGS, RunConfig

    return RunConfig(
        teacher=str(files["pruned"]), data=str(files["train"]), dev_data=str(files["dev"]), out=str(out),
        target_sparsity=args.target_sparsity, lam=args.lam, truncate=args.truncate,
        sandwich_sample=args.sandwich_sample if method == "compress" else 0,
        max_steps=args.steps, eval_every=args.eval_every, batch_size=args.batch_size, seq_len=args.seq_len,
        eval_samples=args.eval_samples, seed=args.seed, lr=args.lr,
        deepspeed=str(REPO_CONFIGS / ("zero3_train.json" if args.bf16 else "zero3_train_fp32.json")),
    ).validate()


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_inprocess(method: str, cfg) -> tuple[dict, float]:
    from engine.schedule.pipelines import COMMANDS

    gc.collect()
    started = time.perf_counter()
    report = COMMANDS[method](cfg)
    return report, time.perf_counter() - started


def run_subprocess(method: str, cfg, log_file: Path) -> tuple[dict, float]:
    from dataclasses import fields

    from engine.config import RunConfig

    defaults = RunConfig()
    argv = [str(Path(sys.executable).parent / "minidisc"), method]
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if value == getattr(defaults, f.name) or value is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag)
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    started = time.perf_counter()
    with log_file.open("w") as log:
        child = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    wall = time.perf_counter() - started
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({child.returncode}); see {log_file}")
    return json.loads((Path(cfg.out) / "report.json").read_text()), wall


# --- output -----------------------------------------------------------------------------------------------------
def fmt(value, spec=".4f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "minidisc_bench_schedule"),
                        help="cache for corpus, tokenizer, teacher, pruned teacher; runs go to WORK/runs/<time>")
    parser.add_argument("--pretrain-steps", type=int, default=500, help="teacher pretraining steps (batch 16)")
    parser.add_argument("--pretrain-lr", type=float, default=PRETRAIN_LR)
    parser.add_argument("--vocab", type=int, default=2000, help="SentencePiece vocabulary size")
    parser.add_argument("--steps", type=int, default=80, help="--max-steps of every distillation stage")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-samples", type=int, default=64, help="dev blocks per evaluation")
    parser.add_argument("--calib-samples", type=int, default=64, help="calibration blocks for the one pruning")
    parser.add_argument("--lam", type=float, default=0.2)
    parser.add_argument("--sandwich-sample", type=int, default=0, help="MiniDisc --sandwich-sample (0 = train "
                        "every candidate each step)")
    parser.add_argument("--lr", type=float, default=1e-3, help="distillation peak LR (engine default 1e-4 is for "
                        "large models; a few-million-parameter student moves little at 1e-4 in ~100 steps)")
    parser.add_argument("--target-sparsity", type=float, default=0.9)
    parser.add_argument("--truncate", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="ds_configs/zero3_train.json (bf16) instead of "
                        "zero3_train_fp32.json (CUDA only)")
    parser.add_argument("--threads", type=int, default=int(os.environ["OMP_NUM_THREADS"]), help="torch threads")
    parser.add_argument("--mode", choices=["inprocess", "subprocess"], default="inprocess",
                        help="call engine.schedule.pipelines.* here, or run the minidisc console script per method")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--log-level", default="WARNING", help="engine logging (on stderr)")
    parser.add_argument("--no-csv", action="store_true", help="do not append to " + str(RESULTS))
    args = parser.parse_args()
    if args.bf16 and not torch.cuda.is_available():
        parser.error("--bf16 needs CUDA")
    torch.set_num_threads(args.threads)

    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    import datasets
    import transformers

    import engine  # noqa: F401  (registers the MiniDisc model classes)
    from engine.progress import setup_logging

    setup_logging(args.log_level)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    def log(message):
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"cpu x{torch.get_num_threads()}"
    dtype = "bfloat16" if args.bf16 else "float32"
    files = setup(args, log)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    runs = Path(args.work) / "runs" / stamp
    suffix = 0
    while runs.exists():
        suffix += 1
        runs = Path(args.work) / "runs" / f"{stamp}-{suffix}"
    runs.mkdir(parents=True)

    reports, walls, cpus, loads = {}, {}, {}, {}
    for method in args.methods:
        out = runs / method
        cfg = run_config(args, files, method, out)
        log(f"{LABEL[method]} ({method}) -> {out}")
        cpu = cpu_seconds()
        if args.mode == "inprocess":
            reports[method], walls[method] = run_inprocess(method, cfg)
        else:
            reports[method], walls[method] = run_subprocess(method, cfg, runs / f"{method}.log")
        # CPU seconds per wall second near --threads means the cores were ours; well below it, or a 1-minute
        # load average above --threads, means something else competed for them (wall times are then inflated).
        cpus[method], loads[method] = cpu_seconds() - cpu, os.getloadavg()[0]
        log(f"{LABEL[method]} done in {walls[method]:.1f} s (CPU {cpus[method]:.1f} s, load {loads[method]:.2f}): "
            f"student accuracy {reports[method]['student']['accuracy']:.4f}")

    # ---- tables
    any_report = next(iter(reports.values()))
    teacher = any_report["teacher"]
    info = files["teacher_info"]
    print(f"\nsetup: teacher {teacher['parameters']:,} params (LLaMA 256h/4L/8H/4KV/688i, vocab {args.vocab}), "
          f"pretrained {info['pretrain_steps']} steps in {info['seconds']:.0f} s "
          f"(loss {fmt(info['first_loss'], '.2f')} -> "
          f"{fmt(info['last_loss'], '.2f')}), dev accuracy {teacher['accuracy']:.4f}; pruned once in "
          f"{fmt(files['prune_s'], '.1f')} s (not counted below)")
    print(f"runs: {args.steps} steps/stage, eval every {args.eval_every}, batch {args.batch_size}, seq {args.seq_len},"
          f" lr {args.lr:g}, lam {args.lam:g}, target {args.target_sparsity:g}, truncate {args.truncate:g}, "
          f"MiniDisc --sandwich-sample {args.sandwich_sample}, {dtype}, {device}, mode {args.mode}; in {runs}")

    rows = []
    for method in args.methods:
        r = reports[method]
        ta = r.get("selected_ta")
        stages = [k for k in r["phases"] if k not in ("prune", "data", "ta_export", "total")]
        rows.append([LABEL[method], f"{walls[method]:.1f}", f"{r['phases']['total']:.1f}",
                     f"{cpus[method] / walls[method]:.2f}", f"{loads[method]:.2f}", str(len(stages)),
                     "-" if ta is None else f"{ta['sparsity']:g}", fmt(r["student"]["accuracy"]),
                     fmt(r["student"]["loss"]), fmt(r["student"]["relative_accuracy"])])
    print_table("per method (student at the target sparsity: dev next-token accuracy and CE loss)",
                ["method", "wall s", "phases s", "CPU/wall", "load1", "stages", "TA", "student acc", "student loss",
                 "rel. to teacher"],
                rows)
    for method in args.methods:
        phases = reports[method]["phases"]
        print(f"  {LABEL[method]} phases: " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))

    candidates = []
    mini, maxi = reports.get("compress"), reports.get("maxidisc")
    if mini and maxi:
        by_s = {round(c["sparsity"], 3): c for c in maxi["candidates"]}
        for c in sorted(mini["candidates"], key=lambda c: c["sparsity"]):
            m = by_s.get(round(c["sparsity"], 3), {})
            candidates.append({"sparsity": c["sparsity"], "p": c["p"], "tradeoff": c["tradeoff"],
                               "minidisc_accuracy": c["accuracy"], "maxidisc_p": m.get("p"),
                               "maxidisc_student_accuracy": m.get("student_accuracy"),
                               "maxidisc_trial_wall_s": m.get("wall_s")})
        chosen = mini["selected_ta"]["sparsity"] if mini["selected_ta"] else args.target_sparsity
        winner = maxi["selected_ta"]["sparsity"] if maxi["selected_ta"] else args.target_sparsity
        mark = lambda s, w: "*" if math.isclose(s, w, abs_tol=1e-6) else ""  # noqa: E731
        print_table(f"per candidate TA s (MiniDisc choice *, MaxiDisc winner *; s = {args.target_sparsity:g} means no "
                    "TA)", ["s", "MiniDisc acc", "MiniDisc p(s)", f"p+{args.lam:g}s", "", "MaxiDisc TA p",
                            "MaxiDisc student acc", "trial s", ""],
                    [[f"{c['sparsity']:g}", fmt(c["minidisc_accuracy"]), fmt(c["p"]), fmt(c["tradeoff"]),
                      mark(c["sparsity"], chosen), fmt(c["maxidisc_p"]), fmt(c["maxidisc_student_accuracy"]),
                      fmt(c["maxidisc_trial_wall_s"], ".1f"), mark(c["sparsity"], winner)] for c in candidates])

    summary = {}
    if candidates:
        paired = [c for c in candidates if c["maxidisc_student_accuracy"] is not None]
        y = [c["maxidisc_student_accuracy"] for c in paired]
        summary.update(pearson=pearson([c["tradeoff"] for c in paired], y),
                       spearman=spearman([c["tradeoff"] for c in paired], y),
                       pearson_p=pearson([c["p"] for c in paired], y), spearman_p=spearman([c["p"] for c in paired], y))
        print(f"\ncorrelation over {len(paired)} candidates, MiniDisc p+lam*s vs MaxiDisc student accuracy: "
              f"Pearson {fmt(summary['pearson'], '.3f')}, Spearman {fmt(summary['spearman'], '.3f')}")
        print(f"  (MiniDisc p(s) alone vs the same: Pearson {fmt(summary['pearson_p'], '.3f')}, Spearman "
              f"{fmt(summary['spearman_p'], '.3f')})")
        time_ratio = walls["compress"] / walls["maxidisc"]
        mini_acc, maxi_acc = mini["student"]["accuracy"], maxi["student"]["accuracy"]
        accuracy_ratio = mini_acc / maxi_acc
        summary.update(time_ratio=time_ratio, accuracy_ratio=accuracy_ratio,
                       cpu_ratio=cpus["compress"] / cpus["maxidisc"],
                       time_target_met=time_ratio <= TIME_TARGET,
                       accuracy_target_met=mini_acc >= (1 - ACCURACY_TARGET) * maxi_acc)
        print("\ntargets:")
        print(f"  MiniDisc wall <= {TIME_TARGET:.0%} of MaxiDisc's: {walls['compress']:.1f} s / "
              f"{walls['maxidisc']:.1f} s = {time_ratio:.1%} -> {'met' if summary['time_target_met'] else 'NOT met'}"
              f"  (CPU-time ratio {summary['cpu_ratio']:.1%}, insensitive to other load on the machine)")
        print(f"  MiniDisc student accuracy within {ACCURACY_TARGET:.0%} (relative) of MaxiDisc's best: "
              f"{mini_acc:.4f} vs {maxi_acc:.4f} = {accuracy_ratio:.2%} ({(accuracy_ratio - 1):+.2%}) -> "
              f"{'met' if summary['accuracy_target_met'] else 'NOT met'}")

    if reports:
        names = list(reports)
        tables = {m: {label: (s, n) for label, s, n in time_table(reports[m], walls[m])} for m in names}
        labels = list(dict.fromkeys(label for m in names for label in tables[m]))
        print_table("where the time goes (s, calls)", ["part", *(LABEL[m] for m in names)],
                    [[label, *(f"{tables[m][label][0]:.1f} ({tables[m][label][1]})" if label in tables[m] else "-"
                               for m in names)] for label in labels])

    # ---- CSV
    if args.no_csv:
        return
    from importlib.metadata import version

    base = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "device": device, "dtype": dtype,
            "mode": args.mode, "pretrain_steps": args.pretrain_steps, "steps": args.steps,
            "eval_every": args.eval_every, "batch": args.batch_size, "seq_len": args.seq_len, "lam": args.lam,
            "sandwich_sample": args.sandwich_sample, "lr": args.lr, "teacher_params": teacher["parameters"],
            "teacher_accuracy": round(teacher["accuracy"], 5), "prune_s": files["prune_s"],
            "minidisc": version("minidisc"), "torch": torch.__version__}
    r5 = lambda v: None if v is None else round(v, 5)  # noqa: E731
    out_rows = []
    for method in args.methods:
        r = reports[method]
        ta = r.get("selected_ta")
        out_rows.append({**base, "row": "method", "method": method, "wall_s": round(walls[method], 2),
                         "phases_total_s": r["phases"]["total"], "cpu_s": round(cpus[method], 1),
                         "load_avg": round(loads[method], 2), "student_accuracy": r5(r["student"]["accuracy"]),
                         "student_loss": r5(r["student"]["loss"]),
                         "ta_sparsity": None if ta is None else ta["sparsity"]})
    for c in candidates:
        out_rows.append({**base, "row": "candidate", "method": "compress+maxidisc", "sparsity": c["sparsity"],
                         "p": r5(c["p"]), "tradeoff": r5(c["tradeoff"]),
                         "minidisc_accuracy": r5(c["minidisc_accuracy"]),
                         "maxidisc_student_accuracy": r5(c["maxidisc_student_accuracy"]),
                         "maxidisc_trial_wall_s": None if c["maxidisc_trial_wall_s"] is None else
                         round(c["maxidisc_trial_wall_s"], 2)})
    if summary:
        out_rows.append({**base, "row": "summary", "method": "compress/maxidisc",
                         **{k: (r5(v) if isinstance(v, float) else v) for k, v in summary.items()},
                         "wall_s": round(walls["compress"], 2), "student_accuracy": r5(mini["student"]["accuracy"]),
                         "maxidisc_student_accuracy": r5(maxi["student"]["accuracy"]),
                         "ta_sparsity": mini["selected_ta"]["sparsity"] if mini["selected_ta"] else None})
    append_rows(RESULTS.name, out_rows, FIELDS)
    print(f"\nappended {len(out_rows)} rows to {RESULTS}")


if __name__ == "__main__":
    main()
