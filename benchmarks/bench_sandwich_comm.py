"""ZeRO-3 communication of one sandwich training step as a function of K, the widths trained per step.

Runs the engine's own step, engine.training.trainer.train_step on engines from build_engines (a ZeRO-3 teacher
and the supernet student), under the `deepspeed` launcher with 2 CPU processes (gloo), for K = 1, 2, 4, 6: the
widths are the first K of the pruning grid (0, 100, 200, ... per mille). The step runs the widths as the product
does by default (--stack-widths 0: all K in one forward and one backward) or --stack-widths N per forward (1: one
after another, a forward and a backward each, gradient_accumulation_steps = K).
Each K builds fresh engines, runs one warm-up step, then --steps measured steps.

How it counts: DeepSpeed's comms logger ("comms_logger", prof_all, added to a copy of the DeepSpeed config).
ZeRO-3 fetches parameters through deepspeed.comm.allgather_fn -> all_gather_into_tensor and reduces gradients
through reduce_scatter_fn -> reduce_scatter_tensor, both logged (@timed_op). The logger records the input size;
the MB below are the full tensors moved: all-gather outputs (input x world size), reduce-scatter inputs. The
trainer's all_reduce (losses + flags) calls torch.distributed directly and is not counted. All-gathers are split
by where they happen: the teacher forward (trainer.teacher_outputs), the student engine's forward, backward and
step (each wrapped only to read the counters before and after), and "other" (the teacher's LM head, gathered
for the fused loss). gathers/width = student (forward + backward) bytes / (K x one full gather of the student's
partitioned, i.e. non-persistent, parameters). Times include the logger's (small, CPU) bookkeeping.
--zero overrides zero_optimization keys, e.g. to see a model too big to stay gathered between forward and backward.

    python benchmarks/bench_sandwich_comm.py                    # prune a small LLaMA in a temp dir, K = 1 2 4 6
    python benchmarks/bench_sandwich_comm.py --ks 1 2 --steps 2 --no-csv
    python benchmarks/bench_sandwich_comm.py --zero stage3_max_reuse_distance=0 stage3_prefetch_bucket_size=0
    python benchmarks/bench_sandwich_comm.py --stack-widths 1  # the widths one after another
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = "sandwich_comm.csv"
MODEL = dict(hidden_size=256, num_hidden_layers=4, intermediate_size=688, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=512)
OPS = {"all_gather_into_tensor": "ag", "reduce_scatter_tensor": "rs"}


def make_pruned(root: Path) -> Path:
    """A random small LLaMA with a SentencePiece tokenizer, pruned (reordered) by engine.prune on 4 blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import engine
    from engine.cli.demo import train_tokenizer, write_corpus

    (root / "corpus").mkdir()
    train, _ = write_corpus(root / "corpus")
    teacher = root / "teacher"
    train_tokenizer(train, teacher, vocab_size=MODEL["vocab_size"])
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(bos_token_id=1, eos_token_id=2, **MODEL)).eval().save_pretrained(teacher)
    engine.prune(teacher, train, root / "pruned", calib_samples=4, seq_len=32, batch_size=2)
    return root / "pruned"


def counters(world: int) -> dict:
    """Calls and bytes so far per counted op, from deepspeed.comm.comms_logger.comms_dict {name: {size: [n, ...]}}."""
    from deepspeed.comm import comms_logger

    out = {}
    for name, key in OPS.items():
        sizes = comms_logger.comms_dict.get(name, {})
        scale = world if key == "ag" else 1  # all-gather: the logged size is this rank's shard
        out[f"{key}_calls"] = sum(v[0] for v in sizes.values())
        out[f"{key}_bytes"] = sum(size * v[0] * scale for size, v in sizes.items())
    return out


def worker(args) -> None:
    import engine
    from engine.config import RunConfig
    from engine.core import distributed as dist
    from engine.core.widths import forwards_per_batch
    from engine.data import Mixture
    from engine.distillation.loss import Objective
    from engine.training import trainer
    from engine.training.batches import BatchOrder
    from engine.training.engines import build_engines, release
    from engine.training.stage import Stage, TrainConfig

    dist.init()
    from deepspeed.comm import comms_logger

    world = dist.world_size()
    ds = json.loads(Path(args.ds_config).read_text())
    ds["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True}
    for item in args.zero:  # e.g. stage3_max_reuse_distance=0
        key, value = item.split("=", 1)
        ds["zero_optimization"][key] = json.loads(value)
    ds_path = Path(args.out).with_name(f"ds_rank{dist.rank()}.json")
    ds_path.write_text(json.dumps(ds))
    cfg = RunConfig(teacher=args.pruned, data="-", out="-", max_steps=1000, warmup_ratio=0.0,
                    batch_size=args.batch, deepspeed=str(ds_path), stack_widths=args.stack_widths)
    plan = engine.PruningPlan.load(args.pruned)
    objective = Objective.of(cfg)
    blocks = torch.randint(3, MODEL["vocab_size"], (64, args.seq_len), generator=torch.Generator().manual_seed(0))
    order = BatchOrder(Mixture.of(blocks, seed=0))

    # Per-phase counts: wrap the step's parts only to read the counters before and after each call.
    phases = {}

    def marked(label, function):
        def call(*a, **kw):
            before = counters(world)
            try:
                return function(*a, **kw)
            finally:
                after = counters(world)
                for key in before:
                    phases[(label, key)] = phases.get((label, key), 0) + after[key] - before[key]
        return call

    trainer.teacher_outputs = marked("teacher", trainer.teacher_outputs)
    report = {"rows": []}
    for k in args.ks:
        widths = list(plan.grid[:k])
        stage = Stage(f"k{k}", Path(args.pruned), Path(args.pruned), widths, supernet=True,
                      shapes={w: plan.shape(w) for w in widths})
        backwards = forwards_per_batch(k, cfg.stack_widths)
        teacher, ds_engine, distiller, keep_alive, _ = build_engines(stage, TrainConfig.of(cfg), backwards)
        for label in ("forward", "backward", "step"):  # ds_engine(...) calls the instance's forward
            setattr(ds_engine, label, marked(label, getattr(ds_engine, label)))
        # One full gather of a model: every partitioned (non-persistent) parameter, padded shard x world.
        gatherable = lambda m: sum(p.ds_tensor.ds_numel * world * p.ds_tensor.element_size()  # noqa: E731
                                   for p in m.parameters() if not p.ds_persist)
        steps = []
        for step in range(1 + args.steps):  # step 0 warms up (records ZeRO-3's trace) and is not reported
            comms_logger.reset_data()
            phases.clear()
            started = time.perf_counter()
            outcome = trainer.train_step(teacher, ds_engine, [order.batch(step, 0, cfg)], widths, objective,
                                         stage.shapes, per_forward=cfg.stack_widths)
            seconds = time.perf_counter() - started
            assert outcome.finite, outcome
            steps.append({"s": seconds, **counters(world), **{f"{lb}_{key}": v for (lb, key), v in phases.items()}})
        measured = steps[1:]
        row = {"k": k, "widths": " ".join(map(str, widths)), "student_bytes": gatherable(distiller),
               "teacher_bytes": gatherable(teacher.module), "step_s": statistics.median(m["s"] for m in measured),
               "warmup_s": steps[0]["s"]}
        for key in measured[0]:
            if key != "s":
                row[key] = statistics.mean(m[key] for m in measured)
        report["rows"].append(row)
        release(teacher, ds_engine)
        del teacher, ds_engine, distiller, keep_alive
    if dist.is_main():
        Path(args.out).write_text(json.dumps(report))
    dist.barrier()
    torch.distributed.destroy_process_group()
    print(end="", flush=True)
    os._exit(0)  # as tests/workers/trainer_step_worker.py: gloo threads can abort a normal interpreter exit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 6], help="widths per step to measure")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per K, after one warm-up step")
    parser.add_argument("--batch", type=int, default=4, help="global batch (split over the 2 processes)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--ds-config", default=str(REPO / "ds_configs" / "zero3_train_fp32.json"))
    parser.add_argument("--zero", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override zero_optimization keys of --ds-config (VALUE is JSON)")
    parser.add_argument("--stack-widths", type=int, default=0, metavar="N",
                        help="widths per forward: 0 = all K in one forward and backward (the product's default), 1 = "
                        "one after another")
    parser.add_argument("--pruned", help="an existing `minidisc prune` output (default: build one in a temp dir)")
    parser.add_argument("--no-csv", action="store_true", help="print only, append nothing")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # set by the launch below
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    with tempfile.TemporaryDirectory(prefix="bench-sandwich-comm-") as scratch:
        scratch = Path(scratch)
        pruned = args.pruned or make_pruned(scratch)
        out = scratch / "report.json"
        launcher = Path(sys.executable).parent / "deepspeed"
        with socket.socket() as sock:  # a free port for the launcher's rendezvous
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [launcher, "--num_gpus", "2", "--master_port", port, __file__, "--worker",
               "--pruned", pruned, "--out", out, "--steps", args.steps, "--batch", args.batch,
               "--seq-len", args.seq_len, "--ds-config", args.ds_config, "--ks", *args.ks,
               "--stack-widths", args.stack_widths,
               *(["--zero", *args.zero] if args.zero else [])]
        run = subprocess.run(list(map(str, cmd)), capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        if run.returncode != 0 or not out.exists():
            sys.exit(f"worker failed:\n{(run.stdout + run.stderr)[-5000:]}")
        report = json.loads(out.read_text())

    rows, base = report["rows"], report["rows"][0]
    mb = 2**20
    config = Path(args.ds_config).name + "".join(f" {z}" for z in args.zero)
    order = f"{args.stack_widths} per forward" if args.stack_widths else "all stacked in one forward"
    print(f"2 processes (gloo, CPU), {config}, widths {order}, LLaMA {MODEL}, batch {args.batch} x seq "
          f"{args.seq_len}; per step, mean of {args.steps} steps after 1 warm-up (time: median); MB = full tensors "
          "moved (all-gather outputs, reduce-scatter inputs); student fwd/bwd/opt step, teacher fwd: the all-gathers "
          "inside those calls")
    header = (f"{'K':>2} {'AG calls':>8} {'AG MB':>7} {'teacher':>7} {'fwd':>7} {'bwd':>7} {'opt':>7} {'other':>6} "
              f"{'gathers/width':>13} {'RS MB':>7} {'step s':>7} {'AG/K=1':>7} {'RS/K=1':>7} {'s/K=1':>7}")
    print(header + "\n" + "-" * len(header))
    common = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "device": "cpu, 2 processes (gloo)",
              "ds_config": config, "stack_widths": args.stack_widths, "hidden": MODEL["hidden_size"],
              "layers": MODEL["num_hidden_layers"],
              "batch": args.batch, "seq_len": args.seq_len}
    csv_rows = []
    for r in rows:
        part = {p: r.get(f"{p}_ag_bytes", 0) for p in ("teacher", "forward", "backward", "step")}
        other = r["ag_bytes"] - sum(part.values())  # outside those calls: the teacher's LM head for the loss
        per_width = (part["forward"] + part["backward"]) / r["student_bytes"] / r["k"]  # full student gathers
        ratios = {"ag_vs_k1": r["ag_bytes"] / base["ag_bytes"], "rs_vs_k1": r["rs_bytes"] / max(base["rs_bytes"], 1),
                  "step_vs_k1": r["step_s"] / base["step_s"]}
        print(f"{r['k']:>2} {r['ag_calls']:>8.0f} {r['ag_bytes'] / mb:>7.2f} "
              + " ".join(f"{part[p] / mb:>7.2f}" for p in part) + f" {other / mb:>6.2f} {per_width:>13.2f} "
              f"{r['rs_bytes'] / mb:>7.2f} {r['step_s']:>7.3f} " + " ".join(f"{v:>7.2f}" for v in ratios.values()))
        csv_rows.append({**common, "k": r["k"], "widths": r["widths"], "ag_calls": r["ag_calls"],
                         "ag_bytes": round(r["ag_bytes"]), **{f"{p}_ag_bytes": round(v) for p, v in part.items()},
                         "other_ag_bytes": round(other), "student_model_bytes": r["student_bytes"],
                         "gathers_per_width": round(per_width, 3), "rs_calls": r["rs_calls"],
                         "rs_bytes": round(r["rs_bytes"]), "step_s": round(r["step_s"], 4),
                         **{k: round(v, 3) for k, v in ratios.items()}})
    print(f"one full gather: student {base['student_bytes'] / mb:.2f} MB, teacher {base['teacher_bytes'] / mb:.2f} MB "
          "(partitioned parameters); warm-up steps: " + ", ".join(f"K={r['k']} {r['warmup_s']:.2f} s" for r in rows))
    if not args.no_csv:
        from results_csv import append_rows

        print(f"appended {len(csv_rows)} rows to {append_rows(RESULTS, csv_rows)}")


if __name__ == "__main__":
    main()
