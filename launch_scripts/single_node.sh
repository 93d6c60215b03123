#!/usr/bin/env bash
# Quick start on one machine: one rank per GPU under the `deepspeed` launcher (CPU processes on gloo when
# the machine has no GPU).
#
#   RECIPE=recipes/opt-1.3b-10pct.yaml bash launch_scripts/single_node.sh [more minidisc options]
#
# Environment:
#   RECIPE            YAML/JSON recipe with teacher, data, out and the run's options            (required)
#   MINIDISC_COMMAND  compress, distill or maxidisc                                             (default: compress)
#   NUM_GPUS          ranks to start                                (default: every GPU, or 1 without GPU)
#   MASTER_PORT       rendezvous port on this machine                                           (default: 29500)
#   RESUME            1 = continue the run in the recipe's out/ from its last checkpoint        (default: 0)
# Options after the script name override the recipe (e.g. --out runs/try2 --max-steps 100).
set -euo pipefail

die() { echo "single_node.sh: $*" >&2; exit 2; }
[ -n "${RECIPE:-}" ] || die "set RECIPE to a recipe file (see the header of $0)"
[ -f "$RECIPE" ] || die "RECIPE=$RECIPE does not exist"
MINIDISC=$(command -v minidisc) || die "minidisc is not on PATH: activate the environment you ran 'pip install -e .' in"
if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "$NUM_GPUS" -gt 0 ] || NUM_GPUS=1
fi

args=("${MINIDISC_COMMAND:-compress}" --config "$RECIPE")
[ "${RESUME:-0}" = 1 ] && args+=(--resume)
exec deepspeed --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" "$MINIDISC" "${args[@]}" "$@"
