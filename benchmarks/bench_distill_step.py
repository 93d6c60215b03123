"""One distillation training step of a student LLaMA against a frozen teacher LLaMA: tokens/s and peak memory.

One step = teacher forward under no_grad, student forward, logit-distillation loss, backward into the
student's parameters (no optimizer step). Two implementations of the loss:

  fused  the product path: engine.distillation.loss.width_loss(student, teacher_outputs(teacher, ids), ids, None,
         Objective(hidden_weight=0, logit_weight=1)), i.e. kernels.fused_linear_distill_loss from the last
         hidden states and LM heads (no [tokens, vocab] logits; Triton on CUDA, streaming PyTorch on CPU);
  naive  student(ids).logits and teacher(ids).logits (no_grad) materialised, fp32 log-softmaxes, forward KL
         through torch's kl_div averaged over tokens, the last position ignored, then autograd.

Models are transformers LlamaForCausalLM built from LlamaConfig with random weights (no download). The
teacher has hidden H, H/64 heads of 64 and FFN ~8H/3; the student (a pruned width) keeps H and the layer
count with --width of the heads and FFN neurons (default 1/2). Before anything is reported both
implementations must give the same first-step loss (rel. 1e-4 in fp32, 2e-2 in bf16, where the naive logits
are rounded to bf16 and ours are not) and the same student gradient norms.

Each (implementation, shape) runs in a fresh process so its peak memory is its own: CPU, peak RSS growth
during the first (warm-up) step (VmHWM reset through /proc/self/clear_refs where allowed, else ru_maxrss
growth as in bench_distill_loss.py); CUDA, max_memory_allocated above the models and inputs. Time is the
median of --steps steps after that warm-up. Prints a table and appends one row per implementation to
benchmarks/results/distill_step.csv.

Target: fused >= 1.2x naive tokens/s at V = 32000 (and a fraction of its peak memory).

    python benchmarks/bench_distill_step.py                          # this device's default shape
    python benchmarks/bench_distill_step.py --device cpu --batch 4 --seq-len 512 --steps 3
    python benchmarks/bench_distill_step.py --device cuda --dtype bfloat16 --hidden 2048 --layers 8
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from results_csv import append_rows

RESULTS = Path(__file__).with_name("results") / "distill_step.csv"
# Defaults per device: a few seconds per step on 2 CPU cores; a fuller step on a GPU.
DEFAULTS = {"cpu": dict(hidden=512, layers=4, batch=4, seq_len=512, dtype="float32"),
            "cuda": dict(hidden=2048, layers=8, batch=8, seq_len=2048, dtype="bfloat16")}
IMPLS = ("naive", "fused")
HEAD_DIM = 64


def ffn_size(hidden: int) -> int:
    """LLaMA's FFN width: 8/3 * hidden rounded up to a multiple of 32 (512 -> 1376)."""
    return -(-(8 * hidden // 3) // 32) * 32


def build_models(vocab, hidden, layers, width, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, hidden // HEAD_DIM)
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, head_dim=HEAD_DIM,
                  max_position_embeddings=4096, tie_word_embeddings=False)
    t_cfg = LlamaConfig(num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=ffn_size(hidden),
                        **common)
    s_heads = max(1, round(heads * width))
    s_cfg = LlamaConfig(num_attention_heads=s_heads, num_key_value_heads=s_heads,
                        intermediate_size=max(1, round(ffn_size(hidden) * width)), **common)
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(t_cfg).to(device=device, dtype=dtype).eval().requires_grad_(False)
    torch.manual_seed(1)
    student = LlamaForCausalLM(s_cfg).to(device=device, dtype=dtype).train()
    return teacher, student


def step_fused(student, teacher, ids):
    from engine.distillation.loss import Objective, teacher_outputs, width_loss

    loss = width_loss(student, teacher_outputs(teacher, ids), ids, None,
                      Objective(hidden_weight=0.0, logit_weight=1.0))["loss"]
    loss.backward()
    return loss.detach()


def step_naive(student, teacher, ids):
    with torch.no_grad():
        t = teacher(input_ids=ids).logits[:, :-1]  # token t predicts t+1: the last position is ignored
    s = student(input_ids=ids).logits[:, :-1]
    log_q = torch.log_softmax(s.float(), -1).flatten(0, 1)
    log_p = torch.log_softmax(t.float(), -1).flatten(0, 1)
    loss = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")  # sum / kept tokens
    loss.backward()
    return loss.detach()


class PeakRSS:
    """Peak RSS growth (bytes) of this process over a block: VmHWM reset via clear_refs if allowed."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method, self.base = "hwm", self._status("VmRSS")
        except OSError:
            self.method, self.base = "maxrss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak = self._status("VmHWM") if self.method == "hwm" else rss
        self.peak = peak - self.base

    @staticmethod
    def _status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)


def measure_one(impl, vocab, hidden, layers, width, batch, seq_len, steps, dtype, device) -> dict:
    """Runs in a child process: build the models and inputs, one warm-up step (peak memory, loss), then
    `steps` timed steps."""
    cuda = device == "cuda"
    teacher, student = build_models(vocab, hidden, layers, width, getattr(torch, dtype), device)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(vocab, (batch, seq_len), generator=g).to(device)
    fn = {"naive": step_naive, "fused": step_fused}[impl]

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = fn(student, teacher, ids)
        sync()
        peak, method = torch.cuda.max_memory_allocated() - base, "cuda"
    else:
        with PeakRSS() as rss:
            loss = fn(student, teacher, ids)
        peak, method = rss.peak, rss.method
    grads = [p.grad.float().norm() for p in student.parameters() if p.grad is not None]
    check = {"loss": loss.item(), "grad_norm": torch.stack(grads).norm().item(),
             "head_grad_norm": student.get_output_embeddings().weight.grad.float().norm().item(),
             "n_grads": len(grads)}
    times = []
    for _ in range(steps):
        student.zero_grad(set_to_none=True)
        sync()
        start = time.perf_counter()
        fn(student, teacher, ids)
        sync()
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "times": times, "peak_mb": peak / 2**20, "peak_method": method,
            **check}


def rel(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=None, help="teacher and student hidden size (CPU 512)")
    parser.add_argument("--layers", type=int, default=None, help="CPU default 4")
    parser.add_argument("--width", type=float, default=0.5, help="student's fraction of heads and FFN neurons")
    parser.add_argument("--batch", type=int, default=None, help="CPU default 4")
    parser.add_argument("--seq-len", type=int, default=None, help="CPU default 512")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up (median reported)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch CPU threads")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--no-csv", action="store_true", help="print only, append nothing")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child mode: the implementation to measure
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    torch.set_num_threads(args.threads)
    shape = dict(vocab=args.vocab, hidden=args.hidden, layers=args.layers, width=args.width, batch=args.batch,
                 seq_len=args.seq_len, steps=args.steps, dtype=args.dtype, device=args.device)
    if args.one:
        print(json.dumps(measure_one(args.one, **shape)))
        return

    import kernels  # noqa: F401  (fail early if the package is missing)

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu: {args.threads} cores"
    tokens = args.batch * args.seq_len
    print(f"{device_name}, {args.dtype}, V={args.vocab} H={args.hidden} L={args.layers} "
          f"student width {args.width}, batch {args.batch} x seq {args.seq_len} = {tokens} tokens, "
          f"median of {args.steps} steps after 1 warm-up", flush=True)
    results = {}
    for impl in args.impls:
        cmd = [sys.executable, __file__, "--one", impl, "--device", args.device, "--dtype", args.dtype,
               "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--layers", str(args.layers),
               "--width", str(args.width), "--batch", str(args.batch), "--seq-len", str(args.seq_len),
               "--steps", str(args.steps), "--threads", str(args.threads)]
        child = subprocess.run(cmd, capture_output=True, text=True)
        if child.returncode != 0:
            sys.exit(f"{impl}: failed:\n{child.stderr.strip()}")
        results[impl] = json.loads(child.stdout.strip().splitlines()[-1])
        r = results[impl]
        print(f"  {impl}: loss {r['loss']:.6f}, grad norm {r['grad_norm']:.6f}, steps "
              f"{', '.join(f'{t:.2f}' for t in r['times'])} s", flush=True)
        if max(r["times"]) > 1.25 * min(r["times"]):
            print(f"  warning: {impl} step times vary by more than 25% (other load on the machine?); "
                  "rerun when idle or with more --steps", flush=True)

    # A benchmark of a wrong implementation is worthless: same first-step loss and gradients, or no numbers.
    if len(results) == 2:
        tol = 1e-4 if args.dtype == "float32" else 2e-2
        a, b = results["naive"], results["fused"]
        errors = {k: rel(a[k], b[k]) for k in ("loss", "grad_norm", "head_grad_norm")}
        print("  check (rel. diff naive vs fused): " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
              + f" (tol {tol:g})")
        if errors["loss"] > tol or max(errors.values()) > 10 * tol or a["n_grads"] != b["n_grads"]:
            sys.exit(f"MISMATCH: naive and fused disagree ({errors}, {a['n_grads']} vs {b['n_grads']} grads); "
                     "nothing recorded")

    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    rows = []
    for impl, r in results.items():
        speedup = ""
        if impl == "fused" and "naive" in results:
            speedup = round(results["naive"]["step_s"] / r["step_s"], 3)
        rows.append({"date": date, "device": device_name, "impl": impl, "vocab": args.vocab, "hidden": args.hidden,
                     "layers": args.layers, "batch": args.batch, "seq_len": args.seq_len, "dtype": args.dtype,
                     "step_s": round(r["step_s"], 4), "tokens_per_s": round(tokens / r["step_s"], 1),
                     "peak_mb": round(r["peak_mb"], 1), "speedup_vs_naive": speedup})
    print()
    header = f"{'impl':>6} {'V':>6} {'H':>5} {'L':>3} {'batch':>5} {'seq':>5} {'dtype':>9} {'step s':>8} " \
             f"{'tokens/s':>9} {'peak MB':>9} {'speedup':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['impl']:>6} {r['vocab']:>6} {r['hidden']:>5} {r['layers']:>3} {r['batch']:>5} {r['seq_len']:>5} "
              f"{r['dtype']:>9} {r['step_s']:>8.3f} {r['tokens_per_s']:>9.1f} {r['peak_mb']:>9.1f} "
              f"{(str(r['speedup_vs_naive']) + 'x') if r['speedup_vs_naive'] != '' else '':>8}")
    if args.no_csv or not rows:
        return
    append_rows(RESULTS.name, rows)
    print(f"\nappended {len(rows)} rows to {RESULTS}")


if __name__ == "__main__":
    main()
