#!/usr/bin/env bash
# `make gpu-check`: everything this project checks on a machine with an NVIDIA GPU, in one command.
#   1. installs the package with Triton and Liger-Kernel into $PYTHON's environment (GPU_CHECK_INSTALL=0 skips:
#      for a machine without internet, where they were installed beforehand), without constraints.txt, whose
#      torch pin is the CPU build;
#   2. the kernels' tests on CUDA against the torch references (the `gpu` marker: they pick CUDA by themselves);
#   3. bench_distill_loss.py on the GPU shapes (naive, ours, Liger-Kernel), bench_token_stats.py (evaluation without
#      full logits), the stage-memory test on CUDA, bench_distill_step.py and bench_memory_plan.py (`minidisc plan`'s
#      estimate against the measured peak of OPT-1.3B sandwich steps, widths stacked and one after another);
#   4. the built-in example in bf16 with NCCL on one GPU (bench_builtin.py), with the kd and ce baselines.
#   5. a Llama-3.2-1B-shaped model (random weights, 128k vocabulary) through prune -> compress -> export -> reload in
#      bf16 on the GPU (bench_real_shapes.py): seconds per step and the GPU peak against `minidisc plan`'s figure.
# `gpu_check.sh kernels` runs 2-3 (about 4 minutes on an H200 before bench_memory_plan.py, which is not timed yet),
# `gpu_check.sh builtin` runs 4 (over 5 minutes on an H200) and `gpu_check.sh shapes` runs 5 (not timed yet), so a
# machine lent for at most 10 minutes per command runs them as three commands.
# Every benchmark appends CSV rows tagged with the GPU's name to benchmarks/results/. A failing step does not stop
# the later ones (GPU time is scarce); the exit status is 1 if any failed, and the failures are listed last.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
part=${1:-all}
case $part in all|kernels|builtin|shapes) ;; *) echo "gpu-check: unknown part '$part'; use kernels, builtin, shapes or nothing (all)" >&2; exit 2;; esac
failed=()
step() { echo; echo "== $1"; shift; "$@" || failed+=("$*"); }

command -v nvidia-smi >/dev/null || { echo "gpu-check: no nvidia-smi here; run it on a machine with an NVIDIA GPU" >&2; exit 2; }
if [ "${GPU_CHECK_INSTALL:-1}" = 1 ]; then
  env -u PIP_CONSTRAINT "$PYTHON" -m pip install -q -e '.[triton]' liger-kernel || exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PYTHON" -c 'import torch, triton, transformers, deepspeed; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}),",
  f"triton {triton.__version__}, transformers {transformers.__version__}, deepspeed {deepspeed.__version__}")'
"$PYTHON" -c 'assert __import__("torch").cuda.is_available(), "torch sees no GPU: install its CUDA build"' || exit 1

if [ "$part" = all ] || [ "$part" = kernels ]; then
step "Triton kernels on CUDA against the torch references" "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/kernels
step "KD loss: naive vs ours vs Liger-Kernel (benchmarks/results/distill_loss.csv)" "$PYTHON" benchmarks/bench_distill_loss.py
step "evaluation statistics: full logits vs ours (benchmarks/results/token_stats.csv)" "$PYTHON" benchmarks/bench_token_stats.py
step "three stages in one process free their CUDA memory" "$PYTHON" -m pytest -q -p no:cacheprovider tests/training/test_memory.py
step "one distillation step (benchmarks/results/distill_step.csv)" "$PYTHON" benchmarks/bench_distill_step.py --device cuda
step "memory plan vs measured, widths stacked (benchmarks/results/memory_plan.csv)" "$PYTHON" benchmarks/bench_memory_plan.py
step "memory plan vs measured, one width at a time" "$PYTHON" benchmarks/bench_memory_plan.py --stack-widths 1
fi
if [ "$part" = all ] || [ "$part" = builtin ]; then
# Without the kd-matched baseline: its 1,894 steps take 3 of the 6 minutes of the default run on an H200.
step "the built-in example, bf16, NCCL, one GPU (benchmarks/results/builtin.csv)" "$PYTHON" benchmarks/bench_builtin.py \
  -- --baselines kd ce
fi
if [ "$part" = all ] || [ "$part" = shapes ]; then
step "a Llama-3.2-1B shape, bf16 on the GPU: step times and peak vs the plan (benchmarks/results/real_shapes.csv)" \
  "$PYTHON" benchmarks/bench_real_shapes.py --shape llama-3.2-1b --seq-len 1024 --steps 4 --device cuda
fi

[ ${#failed[@]} -eq 0 ] && { echo; echo "gpu-check: all steps passed"; exit 0; }
echo; echo "gpu-check: ${#failed[@]} step(s) failed:"; printf '  %s\n' "${failed[@]}"; exit 1
