"""Models of current releases' shapes through the whole engine on this machine: prune -> compress (a few steps per
stage) -> export -> reload, each phase a `minidisc` command in its own process (prune and compress on
--processes ranks under the `deepspeed` launcher), timed, with its peak memory (the process tree, sampled every
0.2 s) against the teacher's fp32 weights, and one rank's peak against the memory plan of pruning and of
compress's placement (`minidisc plan`'s figures for one rank, plus the Python runtime's own memory).

The weights are random (no download), in bf16 as published; the data is the built-in example's text, tokenised by
its small tokenizer (ids below 2,000 of a vocabulary of 128k-152k: what is measured is the shapes, not quality).

    python benchmarks/bench_real_shapes.py --shape qwen2.5-0.5b               # 0.49B parameters, vocabulary 151,936
    python benchmarks/bench_real_shapes.py --shape qwen2.5-0.5b --processes 2
    python benchmarks/bench_real_shapes.py --shape llama-3.2-1b --optimizer adamw8bit  # 1.24B, vocab 128,256: 22 GB

On a machine with a GPU (`--device cuda`, the default there) it runs the same phases in bf16 on the GPU and compares
rank 0's GPU peak (the CUDA allocator's, as pruning.json and the report record it) with the plan's per-GPU figure
(`make gpu-check PART=shapes`). Every row also records the seconds per training step of each compress stage.

Figures (2 cores, 24 GB): docs/memory.md, "Host memory at a real shape". Appends a row per phase to
benchmarks/results/real_shapes.csv.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from results_csv import append_rows  # noqa: E402

SHAPES = {  # the published configs' shapes (hidden, layers, heads, KV heads, FFN, vocabulary, tied embeddings)
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, intermediate_size=8192, vocab_size=128256,
                         tie_word_embeddings=True, rope_theta=500000.0),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
}
MINIDISC = str(Path(sys.executable).parent / "minidisc")


def build_teacher(shape: str, folder: Path, tokenizer_dir: Path) -> int:
    """A randomly initialised model of `shape`, saved in bf16 with the built-in tokenizer; returns its parameters."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    options = dict(SHAPES[shape])
    config = AutoConfig.for_model(options.pop("model_type"), max_position_embeddings=4096, bos_token_id=1,
                                  eos_token_id=2, **options)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def measured(command: list) -> tuple[float, int, int, int]:
    """(wall seconds, peak RSS of the process and its children together, the largest peak of anonymous memory of any
    one of them: a rank's, the peak of their anonymous memory together: the node's) of one command, in bytes. RSS
    also counts the file pages a process maps (the checkpoint, read through mmap: clean page cache the kernel can
    drop, and counted once per rank in the sum); anonymous memory (RSS less those) is what a memory plan must
    cover."""
    started = time.perf_counter()
    process = subprocess.Popen(list(map(str, command)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": str(os.cpu_count())})
    peak, node, per_process, done = 0, 0, {}, threading.Event()

    def sample():
        nonlocal peak, node
        root = psutil.Process(process.pid)
        while not done.is_set():
            try:
                info = {p.pid: p.memory_info() for p in [root, *root.children(recursive=True)]}
                peak = max(peak, sum(i.rss for i in info.values()))
                node = max(node, sum(i.rss - i.shared for i in info.values()))
                per_process.update({pid: max(i.rss - i.shared, per_process.get(pid, 0)) for pid, i in info.items()})
            except psutil.Error:
                pass
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = process.communicate()
    done.set()
    sampler.join()
    if process.returncode:
        raise SystemExit(f"{command[1]} failed ({process.returncode}):\n{err[-3000:]}")
    return time.perf_counter() - started, peak, max(per_process.values(), default=0), node


def runtime_bytes() -> int:
    """Anonymous resident bytes of a process that has imported what a `minidisc` run imports, before any model: the
    part of each phase's peak that no memory plan counts."""
    code = ("import psutil, deepspeed, transformers, engine.schedule.run; "
            "i = psutil.Process().memory_info(); print(i.rss - i.shared)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return int(out.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2, help="optimiser steps of each stage")
    parser.add_argument("--stack-widths", type=int, default=0, help="compress's --stack-widths (0: all of a step's)")
    parser.add_argument("--deepspeed", default="zero3_train.json",
                        help="compress's DeepSpeed config in ds_configs/ (default: bf16 mixed precision, as users run; "
                        "zero3_train_fp32.json computes in fp32)")
    parser.add_argument("--teacher-deepspeed", default="zero3_inference.json",
                        help="compress's DeepSpeed config of the frozen teacher, in ds_configs/ (or a path)")
    parser.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw")
    parser.add_argument("--processes", type=int, default=1,
                        help="ranks of prune and compress under the `deepspeed` launcher (the teacher partitioned)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="where prune and compress run (default: cuda when a GPU is visible)")
    parser.add_argument("--no-csv", action="store_true")
    args = parser.parse_args()
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = args.device == "cuda"

    from engine.cli.demo import builtin_setup
    from engine.cli.memory_plan.estimate import Cluster, PlanOptions, placement
    from engine.cli.memory_plan.pruning import pruning_memory
    from engine.cli.memory_plan.shapes import load_model_config
    from engine.core.distributed import free_port

    setup = builtin_setup("default")
    ds_config = REPO / "ds_configs" / args.deepspeed
    bf16 = json.loads(ds_config.read_text()).get("bf16", {}).get("enabled", False)
    runtime = runtime_bytes()
    rows = []
    with tempfile.TemporaryDirectory(prefix="minidisc-shapes-") as scratch:
        work = Path(scratch)
        parameters = build_teacher(args.shape, work / "teacher", setup / "teacher")
        weights = 4 * parameters  # fp32, as a CPU computes
        config, ranks = load_model_config(str(work / "teacher")), Cluster(1, args.processes, 1024)
        # On a CPU each rank is a process whose "GPU" is host memory, beside the Python runtime; on a GPU the plan's
        # per-GPU figure is compared with the allocator's peak, which counts no runtime.
        on_device = 0 if gpu else runtime
        prune = pruning_memory(config, ranks, 1, args.seq_len, weight_bytes=2 if gpu else 4, checkpoint_bytes=2)
        # on a CPU rank 0 (the largest) also holds what it writes after a launch: the plan's CPU part, the same memory
        plans = {"prune": prune.total_bytes + on_device + (prune.cpu_node_bytes if args.processes > 1 and not gpu
                                                           else 0)}
        if bf16:  # the plan counts bf16 mixed precision (fp32 training is not planned)
            options = PlanOptions(target=900, grid=(0, 500, 900), batch_size=args.processes, seq_len=args.seq_len,
                                  stack_widths=args.stack_widths)
            plans["compress"] = placement(config, ranks, options, "zero3", args.optimizer).total_bytes + on_device
        launch = [MINIDISC] if args.processes == 1 else [
            Path(sys.executable).parent / "deepspeed", "--num_gpus", args.processes, "--master_port", free_port(),
            MINIDISC]
        phases = {
            "prune": [*launch, "prune", "--teacher", work / "teacher", "--data", setup / "train.txt", "--out",
                      work / "pruned", "--calib-samples", 4, "--calib-seq-len", args.seq_len, "--calib-batch-size", 1,
                      "--sparsities", 0, 0.5, 0.9, *(["--device", "cuda"] if gpu and args.processes == 1 else [])],
            "compress": [*launch, "compress", "--teacher", work / "pruned", "--data", setup / "train.txt",
                         "--dev-data", setup / "dev.txt", "--test-data", setup / "test.txt", "--out", work / "run",
                         "--max-steps", args.steps, "--sandwich-steps", args.steps, "--eval-every", args.steps,
                         "--batch-size", args.processes, "--seq-len", args.seq_len, "--eval-samples", 2,
                         "--test-samples", 2, "--baselines", "kd", "--sample-tokens", 0, "--deepspeed", ds_config,
                         "--teacher-deepspeed", REPO / "ds_configs" / args.teacher_deepspeed,
                         "--log-level", "WARNING", "--stack-widths", args.stack_widths, "--optimizer", args.optimizer],
            "export": [MINIDISC, "export", "--model", work / "run" / "supernet", "--sparsity", 0.5, "--out",
                       work / "export"],
            "reload": [sys.executable, "-c", "import sys, torch; from transformers import AutoModelForCausalLM as M; "
                       "m = M.from_pretrained(sys.argv[1], trust_remote_code=True); "
                       "print(m.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4, do_sample=False))",
                       work / "export"],
        }
        for phase, command in phases.items():
            wall, peak, rank_peak, node_peak = measured(command)
            row = {"phase": phase, "wall_s": round(wall, 1), "peak_rss_gb": round(peak / 1e9, 2),
                   "rss_over_fp32_weights": round(peak / weights, 2), "peak_rank_anon_gb": round(rank_peak / 1e9, 2),
                   "peak_node_anon_gb": round(node_peak / 1e9, 2)}
            if phase == "prune" and gpu:  # rank 0's GPU peak while scoring, as pruning.json records it
                scoring = json.loads((work / "pruned" / "pruning.json").read_text())["memory"]["scoring"]
                row["gpu_peak_gb"] = round(scoring["peak_mb"] * 2**20 / 1e9, 2)
            if phase == "compress":  # rank 0's peak and seconds per step of each stage, from the run's own record
                report = json.loads((work / "run" / "report.json").read_text())
                stages = report["stage_memory"]
                row["stage_peaks_gib"] = " ".join(f"{name}={m['peak_mb'] / 1024:.1f}" for name, m in stages.items())
                row["step_s"] = " ".join(f"{name}={t['training steps']['seconds'] / t['training steps']['calls']:.3f}"
                                         for name, t in report["stage_timings"].items() if "training steps" in t)
                print(f"rank 0's peak per stage, GiB ({next(iter(stages.values()))['kind']}):",
                      row["stage_peaks_gib"], "| seconds per step:", row["step_s"], flush=True)
                if gpu:
                    row["gpu_peak_gb"] = round(max(m["peak_mb"] for m in stages.values()) * 2**20 / 1e9, 2)
            if phase in plans:
                measured_peak = row["gpu_peak_gb"] * 1e9 if gpu else rank_peak
                row.update(plan_gb=round(plans[phase] / 1e9, 2),
                           plan_over_peak=round(plans[phase] / measured_peak, 2))
            rows.append(row)
            print(f"{args.shape} ({parameters / 1e9:.2f}B parameters, fp32 weights {weights / 1e9:.2f} GB): {phase} "
                  f"{wall:.0f} s, peak RSS {peak / 1e9:.2f} GB ({peak / weights:.2f}x the fp32 weights"
                  + f"; anonymous, one rank: {rank_peak / 1e9:.2f} GB, all together: {node_peak / 1e9:.2f} GB)"
                  + (f"; GPU peak {row['gpu_peak_gb']} GB" if "gpu_peak_gb" in row else "")
                  + (f"; the plan {row['plan_gb']} GB per rank ({row['plan_over_peak']:.2f}x that"
                     + (")" if gpu else f", the Python runtime's {runtime / 1e9:.2f} GB included)")
                     if phase in plans else ""), flush=True)
    if not args.no_csv:
        stamp = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "shape": args.shape,
                 "parameters": parameters, "seq_len": args.seq_len, "steps": args.steps,
                 "stack_widths": args.stack_widths, "ds_config": args.deepspeed,
                 "teacher_ds_config": args.teacher_deepspeed, "optimizer": args.optimizer,
                 "processes": args.processes,
                 "device": torch.cuda.get_device_name() if gpu else "cpu",
                 "cores": os.cpu_count(), "torch": torch.__version__}
        print("appended to", append_rows("real_shapes.csv", [{**stamp, **row} for row in rows]))


if __name__ == "__main__":
    main()
