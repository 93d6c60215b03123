#!/usr/bin/env bash
# `make test-dependency-ends`: the suite at both ends of what pyproject allows, a release check run by hand (not by
# .ci/run: each end downloads a CUDA build of torch from PyPI, several GB, and the suite takes 35 to 38 minutes per
# end on 2 cores alone, measured 2026-12-07).
#   .venv-lowest  every direct dependency at its lower bound (uv --resolution lowest-direct): torch, transformers,
#                 deepspeed, datasets, accelerate, matplotlib ... as old as pyproject lets a user have them;
#   .venv-newest  every dependency at the newest release pyproject allows, as `pip install -e .` gives today.
# Neither uses constraints.txt. Arguments are pytest's (default: the whole suite).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || set -- tests
export PIP_CONFIG_FILE=/dev/null  # a machine-wide pip cap (e.g. on torch) would hide the newest end
unset PIP_CONSTRAINT
[ -x .venv-uv/bin/uv ] || { python3 -m venv .venv-uv && .venv-uv/bin/pip install -q uv; }
status=0
for end in lowest newest; do
  venv=.venv-$end
  if [ ! -f $venv/.installed ]; then
    rm -rf $venv && .venv-uv/bin/uv venv -q --seed $venv --python python3  # --seed: pip, as users have
    # lowest: torch 2.6 pins triton 3.2, whose interpreter (the kernels' tests on a CPU) fails on numpy 2.4
    # ("only 0-dimensional arrays can be converted to Python scalars"); compiled kernels on a GPU do not use it.
    # A constraint, not a requirement: under lowest-direct a requirement `numpy<2.4` would resolve to numpy 1.3.
    cap=$([ $end = lowest ] && echo 'numpy<2.4' || echo 'numpy')
    resolution=$([ $end = lowest ] && echo lowest-direct || echo highest)
    .venv-uv/bin/uv pip install -q --python $venv/bin/python --resolution $resolution -e '.[dev,triton,eval,tracking]' \
      --constraint <(echo "$cap")
    $venv/bin/python .ci/build_extensions.py 2>&1 | grep -v '^\[' || true
    touch $venv/.installed
  fi
  $venv/bin/python -m pip install -q --no-deps -e .  # the package itself every time: entry points move
  echo "== $venv: $($venv/bin/python -c 'from importlib.metadata import version as v; print(", ".join(
    f"{p} {v(p)}" for p in ("torch", "transformers", "deepspeed", "datasets", "accelerate", "triton", "numpy")))')"
  $venv/bin/python -m pytest -q -p no:cacheprovider "$@" || status=1
done
exit $status
