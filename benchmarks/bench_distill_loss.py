"""Naive KD loss vs kernels.fused_linear_distill_loss: peak extra memory and forward+backward time.

Naive = both logits materialised ([N, V]), fp32 log-softmaxes, torch KL, autograd. Ours = the fused linear
loss (PyTorch streaming backend on CPU, Triton on CUDA). Each measurement runs in a fresh process so peak
memory is its own (CPU: peak RSS growth; CUDA: max_memory_allocated above the inputs). Prints a table and
appends rows to benchmarks/results/distill_loss.csv.

    python benchmarks/bench_distill_loss.py                       # this device's default cases
    python benchmarks/bench_distill_loss.py --cases 4096,32000,1024,1024 --kind forward_kl
    BENCH_CHUNK_SIZE=256 python benchmarks/bench_distill_loss.py --impls ours   # override the chunk rows
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from results_csv import append_rows

RESULTS = Path(__file__).with_name("results") / "distill_loss.csv"
CPU_CASES = ["4096,32000,1024,1024", "2048,50272,2048,2048", "1024,128256,2048,4096"]
GPU_CASES = ["8192,32000,4096,4096", "8192,50272,2048,4096", "8192,128256,2048,4096", "4096,128256,4096,4096"]


def naive(h_s, w_s, h_t, w_t, kind):
    student = (h_s @ w_s.t()).float()
    with torch.no_grad():
        teacher = (h_t @ w_t.t()).float()
    log_q, log_p = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    if kind == "forward_kl":
        loss = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    else:
        loss = torch.nn.functional.kl_div(log_p, log_q, log_target=True, reduction="batchmean")
    loss.backward()


def ours(h_s, w_s, h_t, w_t, kind):
    import os

    import kernels

    chunk = int(os.environ.get("BENCH_CHUNK_SIZE", "0")) or None
    kernels.fused_linear_distill_loss(h_s, w_s, h_t, w_t, kind=kind, chunk_size=chunk).backward()


def liger(h_s, w_s, h_t, w_t, kind):
    from liger_kernel.transformers import LigerFusedLinearJSD  # Liger-Kernel >= 0.5 (earlier: ...JSDLoss)

    beta = 0.0 if kind == "forward_kl" else 1.0  # Liger's generalised JSD: 0 is forward KL, 1 reverse KL
    LigerFusedLinearJSD(jsd_beta=beta)(h_s, w_s, h_t, w_t, None).backward()


def measure_one(impl, n, v, hs, ht, dtype, device, kind) -> dict:
    """Runs in a child process: build the inputs, then one run for peak memory and the best of two for time."""
    dtype = getattr(torch, dtype)
    g = torch.Generator(device=device).manual_seed(0)
    # in place, so building the inputs never peaks above their own size (the CPU baseline is peak RSS)
    h_s = torch.randn(n, hs, device=device, dtype=dtype, generator=g).requires_grad_()
    w_s = torch.randn(v, hs, device=device, dtype=dtype, generator=g).div_(hs**0.5).requires_grad_()
    h_t = torch.randn(n, ht, device=device, dtype=dtype, generator=g)
    w_t = torch.randn(v, ht, device=device, dtype=dtype, generator=g).div_(ht**0.5)
    fn = {"naive": naive, "ours": ours, "liger": liger}[impl]
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    fn(h_s, w_s, h_t, w_t, kind)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(2):
        h_s.grad = w_s.grad = None
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(h_s, w_s, h_t, w_t, kind)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    flops = 2 * n * v * (hs + ht) + 2 * 2 * n * v * hs  # forward head GEMMs + student backward GEMMs
    return {"seconds": min(times), "peak_extra_mb": peak / 2**20, "tflops": flops / min(times) / 1e12}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--kind", default="forward_kl", choices=["forward_kl", "reverse_kl"])
    parser.add_argument("--cases", nargs="+", metavar="N,V,HS,HT", help="token count, vocabulary, hidden sizes")
    parser.add_argument("--impls", nargs="+", default=None, help="naive ours [liger]")
    parser.add_argument("--one", nargs=5, help=argparse.SUPPRESS)  # child mode: impl n v hs ht
    args = parser.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.one:
        impl, *shape = args.one
        print(json.dumps(measure_one(impl, *map(int, shape), dtype, args.device, args.kind)))
        return
    from importlib.metadata import version

    import kernels  # noqa: F401  (fail early if the package is missing)

    impls = args.impls or (["naive", "ours", "liger"] if args.device == "cuda" else ["naive", "ours"])
    cases = args.cases or (GPU_CASES if args.device == "cuda" else CPU_CASES)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()}"
    rows, failures = [], 0
    for case in cases:
        n, v, hs, ht = map(int, case.split(","))
        for impl in impls:
            child = subprocess.run([sys.executable, __file__, "--device", args.device, "--dtype", dtype, "--kind",
                                    args.kind, "--one", impl, str(n), str(v), str(hs), str(ht)],
                                   capture_output=True, text=True)
            if child.returncode != 0:
                print(f"{impl} N={n} V={v}: failed: {child.stderr.strip().splitlines()[-1]}")
                failures += 1
                continue
            result = json.loads(child.stdout.strip().splitlines()[-1])
            rows.append({"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "device": device_name,
                         "dtype": dtype, "kind": args.kind, "impl": impl, "N": n, "V": v, "H_s": hs, "H_t": ht,
                         "seconds": round(result["seconds"], 4), "peak_extra_mb": round(result["peak_extra_mb"], 1),
                         "tflops": round(result["tflops"], 3), "minidisc": version("minidisc"),
                         "torch": torch.__version__})
            r = rows[-1]
            print(f"{impl:>6}  N={n:<5} V={v:<6} H={hs}/{ht}  {r['seconds']:8.3f} s  {r['peak_extra_mb']:9.1f} MB  "
                  f"{r['tflops']:.3f} TFLOP/s", flush=True)
    if rows:
        append_rows(RESULTS.name, rows)
    if failures:
        sys.exit(f"{failures} measurement(s) failed; the others were recorded")


if __name__ == "__main__":
    main()
