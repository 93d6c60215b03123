"""Evaluation's next-token accuracy and cross-entropy: full logits vs kernels.fused_linear_token_stats.

Naive = what `model(...).logits` evaluation does: the [N, V] logits in the model's dtype, an fp32 copy, argmax
and cross-entropy. Ours = the LM head streamed in chunks of rows (no [N, V] tensor). Each measurement runs in a
fresh process (CPU: peak RSS growth; CUDA: max_memory_allocated above the inputs), and the two must agree.
Prints a table and appends rows to benchmarks/results/token_stats.csv.

    python benchmarks/bench_token_stats.py                        # this device's default cases
    python benchmarks/bench_token_stats.py --cases 2048,32000,1024
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from results_csv import append_rows

RESULTS = "token_stats.csv"
CPU_CASES = ["2048,32000,1024", "2048,128256,1024"]
GPU_CASES = ["8192,32000,4096", "8192,128256,4096"]


def naive(h, w, targets):
    logits = (h @ w.t()).float()
    return (logits.argmax(-1) == targets).sum(), F.cross_entropy(logits, targets, reduction="sum")


def ours(h, w, targets):
    import kernels

    correct, nll = kernels.fused_linear_token_stats(h, w, targets)
    return correct.sum(), nll.sum()


def measure_one(impl, n, v, hidden, dtype, device) -> dict:
    """Runs in a child process: one run for peak memory (and the figures), the best of two for time."""
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(n, hidden, device=device, dtype=getattr(torch, dtype), generator=g)
    w = torch.randn(v, hidden, device=device, dtype=h.dtype, generator=g).div_(hidden**0.5)
    targets = torch.randint(0, v, (n,), device=device, generator=g)
    fn, cuda = {"naive": naive, "ours": ours}[impl], device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    correct, nll = fn(h, w, targets)
    sync()
    peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        fn(h, w, targets)
        sync()
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "peak_extra_mb": (peak - base) / 2**20, "correct": int(correct),
            "mean_nll": nll.item() / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--cases", nargs="+", metavar="N,V,H", help="token count, vocabulary, hidden size")
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)  # child mode: impl n v h
    args = parser.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.one:
        impl, *shape = args.one
        print(json.dumps(measure_one(impl, *map(int, shape), dtype, args.device)))
        return
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()}"
    rows = []
    for case in args.cases or (GPU_CASES if args.device == "cuda" else CPU_CASES):
        n, v, hidden = map(int, case.split(","))
        results = {}
        for impl in ("naive", "ours"):
            child = subprocess.run([sys.executable, __file__, "--device", args.device, "--dtype", dtype, "--one",
                                    impl, str(n), str(v), str(hidden)], capture_output=True, text=True)
            if child.returncode != 0:
                sys.exit(f"{impl} N={n} V={v}: failed: {child.stderr.strip().splitlines()[-1]}")
            results[impl] = r = json.loads(child.stdout.strip().splitlines()[-1])
            rows.append({"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "device": device_name,
                         "dtype": dtype, "impl": impl, "N": n, "V": v, "H": hidden, "seconds": round(r["seconds"], 4),
                         "peak_extra_mb": round(r["peak_extra_mb"], 1), "correct": r["correct"],
                         "mean_nll": round(r["mean_nll"], 5), "torch": torch.__version__})
            print(f"{impl:>6}  N={n:<5} V={v:<6} H={hidden:<5} {r['seconds']:8.3f} s  {r['peak_extra_mb']:9.1f} MB  "
                  f"correct {r['correct']}  mean NLL {r['mean_nll']:.5f}", flush=True)
        # bf16 logits (naive) round before the softmax; ours sums in fp32: close, not equal, in bf16
        tolerance = 1e-4 if dtype == "float32" else 2e-2
        if abs(results["naive"]["mean_nll"] - results["ours"]["mean_nll"]) > tolerance * results["naive"]["mean_nll"]:
            sys.exit(f"N={n} V={v}: the two disagree: {results}")
    append_rows(RESULTS, rows)


if __name__ == "__main__":
    main()
